"""Bad input is one line, exit code 2, no traceback and nothing written; code shipped in a model directory
never runs unless the user passes --trust-remote-code (issue 10, items 6 and 7)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from effc import dataset, sources
from effc.errors import EffcError
from examples.models import build
from tests.test_cli import artifact, one_line_error, run  # noqa: F401 - artifact is a fixture

CUSTOM_CONFIG = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "custom_llama"
'''
CUSTOM_MODEL = '''
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


@pytest.fixture(scope="module")
def custom_code(tmp_path_factory):
    """A Llama directory whose config.json asks for its own code (auto_map); importing it leaves a marker."""
    root = tmp_path_factory.mktemp("custom")
    model, marker = root / "model", root / "code-ran"
    build("llama").save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_custom.py").write_text(CUSTOM_CONFIG.format(marker=str(marker)))
    (model / "modeling_custom.py").write_text(CUSTOM_MODEL)
    return model, marker


@pytest.fixture(scope="module")
def unknown_arch(tmp_path_factory):
    model = tmp_path_factory.mktemp("unknown_arch")
    build("llama").save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["LlamaForSomethingNew"]
    (model / "config.json").write_text(json.dumps(config))
    return model


@pytest.fixture(scope="module")
def gpt2_artifact(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2") / "art"
    result = run("compile", hf_dir("gpt2"), "--target", "onnx", "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory):
    """A tiny Llama directory with a word-level tokenizer, for text data."""
    model = tmp_path_factory.mktemp("tokenized")
    build("llama").save_pretrained(model)
    words = ["[PAD]", "[UNK]"] + "a review with dash another one".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(model)
    return model


def feeds(path, seq, value=3, batch=1):
    np.savez(path, input_ids=np.full((batch, seq), value, np.int64), attention_mask=np.ones((batch, seq), np.int64))
    return path


def test_model_code_never_runs_without_trust_remote_code(custom_code, artifact, tmp_path):  # noqa: F811
    model, marker = custom_code
    np.savez(tmp_path / "calib.npz", input_ids=np.zeros((2, 8), np.int64), attention_mask=np.ones((2, 8), np.int64))
    out = tmp_path / "out"
    for args in (("compile", model, "-o", out), ("calibrate", model, "--data", tmp_path / "calib.npz", "-o", out),
                 ("golden", "record", model, "-o", out), ("debug", model, artifact, "--data", tmp_path / "calib.npz")):
        one_line_error(run(*args), "auto_map", "--trust-remote-code")
        assert not out.exists(), args
    assert not marker.exists(), "the model directory's code ran"


def test_trust_remote_code_runs_it(custom_code, tmp_path, monkeypatch):
    from transformers import dynamic_module_utils

    # transformers copies the code into its module cache: keep that in tmp_path
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    model, marker = custom_code
    result = run("golden", "record", model, "--trust-remote-code", "--input-shapes", "input_ids:2x8", "-o", tmp_path / "g.npz")
    assert result.exit_code == 0, result.output
    assert marker.exists() and (tmp_path / "g.npz").exists()


def test_unknown_architecture_needs_task(unknown_arch, tmp_path):
    out = tmp_path / "out"
    one_line_error(run("compile", unknown_arch, "-o", out), "LlamaForSomethingNew", "--task", "text-generation")
    one_line_error(run("compile", unknown_arch, "--task", "poetry", "-o", out), "unknown task 'poetry'", "fill-mask")
    one_line_error(run("compile", "examples.models:tiny_llama", "--task", "fill-mask", "-o", out), "--task", "factory")
    assert not out.exists()
    src = sources.load(str(unknown_arch), task="text-generation")
    assert type(src.model).__name__ == "LlamaForCausalLM"
    assert type(sources.load(str(unknown_arch), task="feature-extraction").model).__name__ == "LlamaModel"


def test_run_refuses_token_ids_outside_the_vocabulary(artifact, tmp_path):  # noqa: F811
    out = tmp_path / "out.npz"
    one_line_error(run("run", artifact, "--inputs", feeds(tmp_path / "big.npz", 8, 1024), "--save-outputs", out),
                   "token id 1024", "0..1023")
    one_line_error(run("run", artifact, "--inputs", feeds(tmp_path / "neg.npz", 8, -1), "--save-outputs", out),
                   "token id -1", "0..1023")
    assert not out.exists()


def test_save_outputs_into_a_missing_directory(artifact, tmp_path):  # noqa: F811
    out = tmp_path / "missing" / "out.npz"
    one_line_error(run("run", artifact, "--inputs", feeds(tmp_path / "in.npz", 8), "--save-outputs", out),
                   "no such directory", "missing")
    assert not out.parent.exists()


def test_gpt2_artifact_beyond_n_positions(gpt2_artifact, tmp_path):
    manifest = json.loads((gpt2_artifact / "manifest.json").read_text())
    assert manifest["source"]["max_positions"] == 256  # n_positions, recorded at compile
    out = tmp_path / "out.npz"
    one_line_error(run("run", gpt2_artifact, "--inputs", feeds(tmp_path / "long.npz", 257), "--save-outputs", out),
                   "sequence length 257", "256")
    assert not out.exists()


def test_lengths_beyond_verification_warn(artifact, tmp_path):  # noqa: F811
    verified = max(s["input_ids"][1] for s in json.loads((artifact / "manifest.json").read_text())["verification"]["shapes"])
    result = run("run", artifact, "--inputs", feeds(tmp_path / "in.npz", verified + 1), "--save-outputs", tmp_path / "o.npz")
    assert result.exit_code == 0, result.output
    warnings = [ln for ln in result.output.splitlines() if ln.startswith("effc: warning:")]
    assert len(warnings) == 1 and f"sequence length {verified + 1}" in warnings[0] and f"up to {verified}" in warnings[0]
    within = run("run", artifact, "--inputs", feeds(tmp_path / "short.npz", verified))
    assert within.exit_code == 0 and "warning" not in within.output
    # golden check at that length: the same warning, and the check itself still passes
    golden = tmp_path / "g.npz"
    assert run("golden", "record", "examples/default/model", "--input-shapes", f"input_ids:2x{verified + 2}", "-o", golden).exit_code == 0
    check = run("golden", "check", artifact, golden)
    assert check.exit_code == 0 and f"sequence length {verified + 2}" in check.output, check.output


def test_calibrate_on_data_it_cannot_read(default_model, tmp_path):
    model = default_model[0]
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 8)
    np.savez(tmp_path / "objects.npz", input_ids=np.array([{"a": 1}], dtype=object))
    (tmp_path / "fake.npz").write_bytes(b"\x93NUMPY not really" * 10)
    out = tmp_path / "calib.json"
    for data, needles in (("binary.txt", ["binary", "not text"]), ("objects.npz", ["pickled", "numpy.savez"]),
                          ("fake.npz", ["fake.npz", "not an .npz file", "numpy.savez"])):
        one_line_error(run("calibrate", model, "--data", tmp_path / data, "-o", out), *needles)
        assert not out.exists(), data


def test_calibration_file_with_non_numbers(default_model, tmp_path):
    model = default_model[0]
    np.savez(tmp_path / "d.npz", input_ids=np.random.default_rng(0).integers(0, 1000, (4, 8)),
             attention_mask=np.ones((4, 8), np.int64))
    result = run("calibrate", model, "--data", tmp_path / "d.npz", "--method", "minmax", "-o", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "c.json").read_text())
    first = next(iter(doc["tensors"]))
    out = tmp_path / "out"
    for edit, needles in ((("amax", "big"), ["amax", "not a finite number"]), (("scale", None), ["scale"]),
                          (("channel_absmax", ["x"]), ["channel_absmax"]), (("amax", -1.0), ["negative amax"])):
        bad = json.loads(json.dumps(doc))
        bad["tensors"][first][edit[0]] = edit[1]
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        one_line_error(run("compile", model, "--passes", "int8", "--pass-config", "int8.mode=static",
                           "--calib", tmp_path / "bad.json", "-o", out), first, *needles, "effc calibrate")
        assert not out.exists()


def test_sequences_longer_than_the_model_has_positions(hf_dir, tmp_path):
    gpt2 = hf_dir("gpt2")
    np.savez(tmp_path / "long.npz", input_ids=np.zeros((2, 300), np.int64), attention_mask=np.ones((2, 300), np.int64))
    out = tmp_path / "out"
    cases = [
        (("compile", gpt2, "--input-shapes", "input_ids:2x300,attention_mask:2x300", "-o", out), ["300", "256", "n_positions"]),
        (("compile", gpt2, "--passes", "int8", "--pass-config", "int8.mode=static", "--calib-data", tmp_path / "long.npz",
          "-o", out), ["long.npz", "300", "256"]),
        (("calibrate", gpt2, "--data", tmp_path / "long.npz", "-o", out), ["long.npz", "300", "256"]),
        (("golden", "record", gpt2, "--inputs", tmp_path / "long.npz", "-o", out), ["300", "256"]),
    ]
    for args, needles in cases:
        result = run(*args)
        one_line_error(result, *needles)
        assert "torch.export" not in result.output and not out.exists(), args


def test_text_that_is_not_utf8_is_read_as_cp1252(with_tokenizer, tmp_path, capsys):
    corpus = tmp_path / "reviews.txt"
    corpus.write_bytes(b"a review \x97 with a dash\nanother one\n")  # cp1252's em dash
    assert list(dataset._texts(corpus)) == ["a review \u2014 with a dash", "another one"]
    assert "not UTF-8; reading it as cp1252" in capsys.readouterr().err
    out = tmp_path / "calib.json"
    result = run("calibrate", with_tokenizer, "--data", corpus, "--method", "minmax", "-o", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["samples"] == 2
    (tmp_path / "utf8.txt").write_text("a review \u2014 with a dash\n", encoding="utf-8")
    assert list(dataset._texts(tmp_path / "utf8.txt")) == ["a review \u2014 with a dash"]
    assert "cp1252" not in capsys.readouterr().err
    (tmp_path / "neither.txt").write_bytes(b"caf\x81 \x8d\n")  # bytes cp1252 leaves undefined
    with pytest.raises(EffcError, match="neither UTF-8 nor cp1252"):
        list(dataset._texts(tmp_path / "neither.txt"))


def test_golden_of_another_model_or_shape_is_bad_input(artifact, hf_dir, tmp_path):  # noqa: F811
    other = tmp_path / "other.npz"
    assert run("golden", "record", hf_dir("llama"), "--input-shapes", "input_ids:2x9", "-o", other).exit_code == 0
    one_line_error(run("golden", "check", artifact, other), "another model", "sha256")
    # the same model, but outputs of another shape (and no record of where the golden came from)
    good = tmp_path / "good.npz"
    assert run("golden", "record", "examples/default/model", "--input-shapes", "input_ids:2x9", "-o", good).exit_code == 0
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["output/logits"] = arrays["output/logits"][..., :512]
    del arrays["effc_golden"]
    np.savez(tmp_path / "sliced.npz", **arrays)
    one_line_error(run("golden", "check", artifact, tmp_path / "sliced.npz"), "logits", "[2, 9, 512]", "1024")
    arrays["output/hidden"] = arrays.pop("output/logits")
    np.savez(tmp_path / "renamed.npz", **arrays)
    one_line_error(run("golden", "check", artifact, tmp_path / "renamed.npz"), "hidden", "does not compute")
