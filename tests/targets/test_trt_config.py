"""targets/trt_config.py: TensorRT optimization profiles from the model config or --input-shapes, the
file in the artifact and its validation, and which profile a run's shapes fall in."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from effc.errors import EffcError
from effc.preflight import parse_shape_ranges
from effc.runtime.manifest import file_hashes, write_manifest
from effc.targets import trt_config

TEXT = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "sequence"]}]
EXAMPLE = {"input_ids": (2, 16), "attention_mask": (2, 16)}
LLAMA = SimpleNamespace(max_position_embeddings=2048)


def profile(config, name):
    r = config["profiles"][0][name]
    return list(zip(r["min"], r["opt"], r["max"]))


def test_defaults_from_the_model_config():
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA)
    assert len(config["profiles"]) == 1
    for name in ("input_ids", "attention_mask"):
        assert profile(config, name) == [(1, 2, 8), (1, 128, 2048)]
    assert config["strongly_typed"] is True and config["workspace_bytes"] == 4 << 30
    assert config["timing_cache"] == "timing.cache" and config["builder_optimization_level"] == 3
    assert config["tensorrt_min_version"] == "10.0" and config["plugins"] == []


def test_sequence_limits():
    # GPT-2 names its positions n_positions; a long context is capped at 4096; none known: 512
    assert profile(trt_config.build_config(TEXT, EXAMPLE, None, {"n_positions": 1024}), "input_ids")[1] == (1, 128, 1024)
    assert profile(trt_config.build_config(TEXT, EXAMPLE, None, {"max_position_embeddings": 131072}),
                   "input_ids")[1] == (1, 128, 4096)
    assert profile(trt_config.build_config(TEXT, EXAMPLE, None, None), "input_ids")[1] == (1, 128, 512)
    # a short model: OPT and MAX both its 64 positions; a large example batch raises batch MAX to twice it
    short = trt_config.build_config(TEXT, {"input_ids": (12, 64), "attention_mask": (12, 64)}, None,
                                    {"max_position_embeddings": 64})
    assert profile(short, "input_ids") == [(1, 12, 24), (1, 64, 64)]
    # a long example: MAX holds the second verification shape (2 x 3000 + 3), within the positions
    long = trt_config.build_config(TEXT, {"input_ids": (2, 3000), "attention_mask": (2, 3000)}, None,
                                   {"max_position_embeddings": 8192})
    assert profile(long, "input_ids")[1] == (1, 3000, 6003)


def test_fixed_dims_and_plugins():
    inputs = [{"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    config = trt_config.build_config(inputs, {"pixel_values": (2, 3, 224, 224)}, None, None, plugins=["nf4_linear"])
    assert profile(config, "pixel_values") == [(1, 2, 8), (3, 3, 3), (224, 224, 224), (224, 224, 224)]
    assert config["tensorrt_min_version"] == "10.9" and config["plugins"] == ["nf4_linear"]


def test_given_ranges_apply_to_every_input_sharing_the_dim():
    ranges = parse_shape_ranges("input_ids:1-4-16x1-256-1024")
    config = trt_config.build_config(TEXT, {"input_ids": (4, 256), "attention_mask": (4, 256)}, ranges, LLAMA)
    assert profile(config, "attention_mask") == profile(config, "input_ids") == [(1, 4, 16), (1, 256, 1024)]
    # the same ranges given twice are one range
    both = parse_shape_ranges("input_ids:1-4-16x1-256-1024,attention_mask:1-4-16x1-256-1024")
    assert trt_config.build_config(TEXT, {"input_ids": (4, 256), "attention_mask": (4, 256)}, both, LLAMA) == config


@pytest.mark.parametrize("ranges, example, message", [
    ("input_ids:1-4-16x1-256-1024,attention_mask:1-4-16x1-128-1024", (4, 256),
     "dim 'sequence' two ranges: 1-256-1024 (input_ids) and 1-128-1024 (attention_mask)"),
    ("pixels:1x3", (2, 16), "--input-shapes names pixels, which the TensorRT graph does not take"),
    ("input_ids:1-2-8", (2, 16), "input_ids: 1 dims given, the input has 2"),
    ("input_ids:1-2-8x32-64-128", (2, 16), "dim 1 (sequence) range 32-64-128 does not contain the example size 16"),
    ("input_ids:4-4-8x1-16-64", (2, 16), "dim 0 (batch) range 4-4-8 does not contain the example size 2"),
])
def test_bad_ranges_are_one_line(ranges, example, message):
    with pytest.raises(EffcError) as e:
        trt_config.build_config(TEXT, {"input_ids": example, "attention_mask": example}, parse_shape_ranges(ranges), LLAMA)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dim_ranges_before_capture():
    # what preflight can check for text inputs, whose dims are known before the capture
    text = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert trt_config.dim_ranges(text, parse_shape_ranges("attention_mask:1-2-4x8-16-32")) == \
        {"batch": (1, 2, 4), "sequence": (8, 16, 32)}
    # None: the dim takes its default (or another input's range)
    assert trt_config.dim_ranges(text, {"input_ids": [None, (8, 16, 32)]}) == {"sequence": (8, 16, 32)}
    config = trt_config.build_config(TEXT, {"input_ids": (4, 16), "attention_mask": (4, 16)},
                                     {"input_ids": [None, (8, 16, 32)]}, LLAMA)
    assert profile(config, "attention_mask") == [(1, 4, 8), (8, 16, 32)]
    with pytest.raises(EffcError, match="dim 'batch' two ranges: 1-2-4 \\(input_ids\\) and 1-2-8 \\(attention_mask\\)"):
        trt_config.dim_ranges(text, parse_shape_ranges("input_ids:1-2-4x16,attention_mask:1-2-8x16"))


def test_fixed_dim_and_unknown_dynamic_dim_refused():
    inputs = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, "s7"]}]
    with pytest.raises(EffcError, match="dim 1 is fixed at 3 in the graph, not the range 1-3-4"):
        trt_config.build_config(inputs, {"x": (2, 3, 5)}, {"x": [(1, 2, 8), (1, 3, 4), (5, 5, 5)]}, None)
    with pytest.raises(EffcError, match=r"dim 2 \('s7'\) is dynamic and has no default range"):
        trt_config.build_config(inputs, {"x": (2, 3, 5)}, None, None)
    # given a range, the unnamed dim is fine
    config = trt_config.build_config(inputs, {"x": (2, 3, 5)}, {"x": [(1, 2, 8), (3, 3, 3), (1, 5, 9)]}, None)
    assert profile(config, "x") == [(1, 2, 8), (3, 3, 3), (1, 5, 9)]


def test_profile_for():
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA)
    config["profiles"].append({n: {"min": [9, 1], "opt": [16, 64], "max": [32, 128]} for n in ("input_ids", "attention_mask")})
    assert trt_config.profile_for(config, {"input_ids": (1, 1), "attention_mask": (1, 1)}) == 0
    assert trt_config.profile_for(config, {"input_ids": (8, 2048), "attention_mask": (8, 2048)}) == 0
    assert trt_config.profile_for(config, {"input_ids": (9, 128), "attention_mask": (9, 128)}) == 1
    assert trt_config.profile_for(config, {"input_ids": (8, 2049), "attention_mask": (8, 2049)}) is None
    assert trt_config.profile_for(config, {"input_ids": (33, 16), "attention_mask": (33, 16)}) is None
    assert trt_config.profile_for(config, {"input_ids": (1, 16)}) is None  # attention_mask missing
    assert trt_config.profile_for(config, {"input_ids": (1, 16, 1), "attention_mask": (1, 16)}) is None


def artifact(tmp_path, config, inputs=TEXT):
    root = tmp_path / "art"
    root.mkdir(exist_ok=True)
    (root / "model.onnx").write_bytes(b"onnx")
    assert trt_config.write(root, config) == "trt_build.json"
    manifest = {"model_file": "model.onnx", "inputs": inputs}
    write_manifest(root, manifest)
    return root, json.loads((root / "manifest.json").read_text())


def test_write_read_round_trip(tmp_path):
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA)
    root, manifest = artifact(tmp_path, config)
    assert "trt_build.json" in file_hashes(root) and not list(root.glob("*.tmp"))
    assert trt_config.read(root, manifest) == config


def edited(config, **change):
    out = json.loads(json.dumps(config))
    for key, value in change.items():
        out[key] = value
    return out


@pytest.mark.parametrize("change, message", [
    ({"format": "other"}, "not an effc TensorRT build configuration"),
    ({"version": 99}, "build configuration version 99, this effc reads 1"),
    ({"strongly_typed": False}, "strongly_typed must be true"),
    ({"workspace_bytes": -1}, "workspace_bytes -1 is not a positive integer"),
    ({"builder_optimization_level": 7}, "builder_optimization_level 7 is not an integer 0..5"),
    ({"timing_cache": "../x.cache"}, "timing_cache '../x.cache' is not a plain file name"),
    ({"tensorrt_min_version": "ten"}, "tensorrt_min_version 'ten' is not MAJOR.MINOR"),
    ({"profiles": []}, "no optimization profiles"),
    ({"profiles": [{"input_ids": {"min": [1, 1], "opt": [2, 16], "max": [8, 2048]}}]},
     "profile 0 covers inputs input_ids, the artifact takes attention_mask, input_ids"),
    ({"profiles": [{n: {"min": [1, 1], "opt": [9, 16], "max": [8, 2048]} for n in ("input_ids", "attention_mask")}]},
     "profile 0 input input_ids: not min <= opt <= max in every dim"),
    ({"profiles": [{n: {"min": [1, 0], "opt": [2, 16], "max": [8, 2048]} for n in ("input_ids", "attention_mask")}]},
     "min/opt/max are not three shapes of positive sizes of one rank"),
    ({"profiles": [{n: {"min": [1], "opt": [2], "max": [8]} for n in ("input_ids", "attention_mask")}]},
     "profile 0 input input_ids: shape [1]..[8] does not fit the input's batchxsequence"),
])
def test_read_refuses_bad_content(tmp_path, change, message):
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA)
    root, manifest = artifact(tmp_path, config)
    (root / "trt_build.json").write_text(json.dumps(edited(config, **change)))
    manifest["files"] = file_hashes(root)  # rehashed: the content check, not the hash, must refuse it
    with pytest.raises(EffcError) as e:
        trt_config.read(root, manifest)
    assert message in str(e.value) and "recompile the artifact" in str(e.value) and "\n" not in str(e.value)


def test_read_refuses_an_unhashed_or_unreadable_file(tmp_path):
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA)
    root, manifest = artifact(tmp_path, config)
    del manifest["files"]["trt_build.json"]
    with pytest.raises(EffcError, match="trt_build.json' is not a file manifest.json hashes"):
        trt_config.read(root, manifest)
    root, manifest = artifact(tmp_path, config)
    (root / "trt_build.json").write_text("{not json")
    with pytest.raises(EffcError, match="cannot read .*trt_build.json"):
        trt_config.read(root, manifest)
    with pytest.raises(EffcError, match="profile 0 is not an object of input"):
        trt_config.write(root, edited(config, profiles=[{}]))  # write refuses what read would


def test_version_ok():
    config = trt_config.build_config(TEXT, EXAMPLE, None, LLAMA, plugins=["nf4_linear"])
    assert trt_config.version_ok(config, "10.9.0.34") is None and trt_config.version_ok(config, "11.0") is None
    why = trt_config.version_ok(config, "10.8.0.43")
    assert "needs TensorRT 10.9 or newer (effc plugins nf4_linear), this machine has 10.8.0.43" in why
    assert trt_config.version_ok(trt_config.build_config(TEXT, EXAMPLE, None, LLAMA), "10.0.1") is None


def test_reading_does_not_import_torch():
    code = ("import sys; from effc.targets import trt_config; "
            "c = {'profiles': [{'x': {'min': [1], 'opt': [2], 'max': [4]}}]}; "
            "assert trt_config.profile_for(c, {'x': (3,)}) == 0; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_compile_writes_the_configuration(default_model, tmp_path):
    """End to end: `effc compile --target trt --input-shapes` with a range for input_ids only; the artifact's
    trt_build.json (hashed by its manifest) gives attention_mask, which shares its dims, the same range, and
    holds both verification shapes."""
    from click.testing import CliRunner

    from effc.cli import main
    from effc.runtime.manifest import read_manifest

    out = tmp_path / "trt"
    r = CliRunner().invoke(main, ["compile", str(default_model[0]), "--target", "trt", "--no-verify", "-o", str(out),
                                  "--input-shapes", "input_ids:1-4-16x1-64-256"])
    assert r.exit_code == 0, r.output
    manifest = read_manifest(out)
    assert manifest["target"]["build"] == "trt_build.json"
    config = trt_config.read(out, manifest)
    assert profile(config, "input_ids") == profile(config, "attention_mask") == [(1, 4, 16), (1, 64, 256)]
    assert trt_config.profile_for(config, {"input_ids": (4, 64), "attention_mask": (4, 64)}) == 0
    assert trt_config.profile_for(config, {"input_ids": (5, 131), "attention_mask": (5, 131)}) == 0  # 2nd check set


@pytest.mark.slow  # a second compile (~1 min); the message itself is unit-tested above
def test_compile_with_conflicting_ranges_is_one_line(default_model, tmp_path):
    from click.testing import CliRunner

    from effc.cli import main

    bad = tmp_path / "bad"
    r = CliRunner().invoke(main, ["compile", str(default_model[0]), "--target", "trt", "--no-verify", "-o", str(bad),
                                  "--input-shapes", "input_ids:1-4-16x1-64-256,attention_mask:1-4-16x1-64-128"])
    assert r.exit_code == 2 and not bad.exists() and not list(tmp_path.iterdir()), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("effc: error")]
    assert errors == [r.output.strip().splitlines()[-1]] and \
        "dim 'sequence' two ranges: 1-64-256 (input_ids) and 1-64-128 (attention_mask)" in errors[0]


def test_a_plain_dim_sets_the_example_and_keeps_the_default_range():
    # --input-shapes input_ids:4x128 chooses the example shape; the profile still spans the defaults around it
    ranges = parse_shape_ranges("input_ids:4x1-128-1024")
    config = trt_config.build_config(TEXT, {"input_ids": (4, 128), "attention_mask": (4, 128)}, ranges, LLAMA)
    assert profile(config, "input_ids") == [(1, 4, 8), (1, 128, 1024)]
    assert profile(config, "attention_mask") == [(1, 4, 8), (1, 128, 1024)]
