"""Calibration: thresholds against numpy on heavy-tailed data, bounded memory, the file format, bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from effc import calibration
from effc.calibration import Histogram
from effc.cli import main
from effc.errors import EffcError


@pytest.fixture(scope="module")
def heavy_tailed():
    """Student-t with 2 degrees of freedom: most mass near 0, rare huge values (like outlier features)."""
    rng = np.random.default_rng(0)
    h = Histogram()
    chunks = [rng.standard_t(2, 100_000).astype(np.float32) for _ in range(5)]
    for c in chunks:
        h.add(c)
    return h, np.concatenate(chunks)


def test_histogram_is_bounded_and_exact_in_count(heavy_tailed):
    h, x = heavy_tailed
    assert h.counts.size == calibration.BINS and h.count == x.size and h.counts.sum() == x.size
    assert h.lo == x.min() and h.hi == x.max() and h.edge >= np.abs(x).max()


def test_methods_on_heavy_tails(heavy_tailed):
    h, x = heavy_tailed
    amax = {m: calibration.AMAX[m](h) for m in calibration.METHODS}
    assert amax["minmax"] == pytest.approx(np.abs(x).max())
    # percentile agrees with numpy within one histogram bin
    assert abs(amax["percentile"] - np.quantile(np.abs(x), 0.9999)) <= 2 * h.bin_width
    for m in ("percentile", "entropy", "mse"):
        assert amax[m] < 0.5 * amax["minmax"], m  # they clip the tail; minmax does not
    # mse's threshold really has lower quantization error on the data than minmax's
    def mse(t):
        step = t / 127
        return np.mean((np.clip(np.round(x / step), -127, 127) * step - x) ** 2)
    assert mse(amax["mse"]) < mse(amax["minmax"])
    assert len({round(v, 6) for v in amax.values()}) == 4  # four different answers


def test_gaussian_needs_no_clipping():
    rng = np.random.default_rng(1)
    h = Histogram()
    h.add(rng.standard_normal(200_000).astype(np.float32))
    # on a light-tailed distribution the clipping methods stay near the range (> 60% of max)
    top = calibration.amax_minmax(h)
    assert calibration.amax_percentile(h) > 0.6 * top
    assert calibration.amax_entropy(h) > 0.4 * top


def write_npz(path, n, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, input_ids=rng.integers(0, 512, (n, seq)), attention_mask=np.ones((n, seq), np.int64))


def modelopt_read_cache(cache_path) -> dict[str, float]:
    """ModelOpt's reader of a TensorRT calibration cache, copied from nvidia-modelopt 0.47.0
    modelopt/onnx/quantization/calib_utils.py import_scales_from_calib_cache (Apache-2.0; its module
    imports onnxruntime and modelopt.onnx.utils, so it is not imported here). It keys each scale
    '<tensor>_scale': the name onnxruntime's quantize_static gives that tensor's QuantizeLinear scale,
    which modelopt's replace_scale_values then sets to this value (a scale, amax / 127, not amax)."""
    with open(cache_path) as f:
        scales_dict = {}
        lines = f.readlines()
        for i, line in enumerate(lines):
            if i > 0:  # Skips the first line (i.e., TRT-8501-EntropyCalibration2)
                layer_name, hex_value = line.replace("\n", "").split(": ")
                scale = struct.unpack("!f", bytes.fromhex(hex_value))[0]
                scales_dict[layer_name + "_scale"] = scale
        return scales_dict


def test_calibrate_cli_writes_file_and_trt_cache(default_model, tmp_path):
    import ast

    import onnx

    import effc
    from effc.passes.program import module_path

    write_npz(tmp_path / "d.npz", 24)
    out, cache = tmp_path / "calib.json", tmp_path / "trt.cache"
    r = CliRunner().invoke(main, ["calibrate", str(default_model[0]), "--data", str(tmp_path / "d.npz"),
                                  "--method", "percentile", "-o", str(out), "--trt-cache", str(cache)])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "effc-calibration" and doc["samples"] == 24 and doc["method"] == "percentile"
    assert len(doc["tensors"]) == 29  # every linear's input: 4 layers x 7 + lm_head
    assert cache.read_text().splitlines()[0] == "TRT-100000-EntropyCalibration2"
    scales = {k.removesuffix("_scale"): v for k, v in modelopt_read_cache(cache).items()}
    # q/k/v read one tensor, gate/up another: 4 layers x (qkv, o, gate/up, down) + lm_head
    assert len(scales) == 17
    # every key is a tensor of the graph `effc compile MODEL --target trt` writes, feeding a MatMul
    # (where ModelOpt puts the activation's Q/DQ), and carries the scale of the layers reading it
    effc.compile(str(default_model[0]), tmp_path / "trt", target="trt", verify=False)
    model = onnx.load(str(tmp_path / "trt" / "model.onnx"), load_external_data=False)
    matmul_inputs = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    assert set(scales) <= matmul_inputs
    # each linear's MatMul (found by the exporter's name scope, not by effc's probes) reads its tensor,
    # whose cached scale is that linear's amax / 127
    modules = set()
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        module = module_path(ast.literal_eval(scopes)[-2]) if node.op_type == "MatMul" and scopes else None
        if module in doc["tensors"]:
            modules.add(module)
            assert scales[node.input[0]] == pytest.approx(doc["tensors"][module]["amax"] / 127, rel=1e-6), module
    assert modules == set(doc["tensors"])


def test_trt_cache_in_a_missing_folder_is_refused_first(default_model, tmp_path):
    write_npz(tmp_path / "d.npz", 4)
    r = CliRunner().invoke(main, ["calibrate", str(default_model[0]), "--data", str(tmp_path / "d.npz"), "-o",
                                  str(tmp_path / "c.json"), "--trt-cache", str(tmp_path / "no" / "trt.cache")])
    assert r.exit_code == 2 and "--trt-cache" in r.output and "does not exist" in r.output, r.output
    assert not (tmp_path / "c.json").exists()


def test_trt_cache_refuses_a_layer_without_a_tensor():
    doc = {"tensors": {"model.layers.0.mlp.down_proj": {"amax": 1.0}}}
    with pytest.raises(EffcError, match="no tensor for the input of model.layers.0.mlp.down_proj"):
        calibration.tensorrt_cache(doc, {})
    assert calibration.tensorrt_cache(doc, {"model.layers.0.mlp.down_proj": "mul_3"}) == \
        f"TRT-100000-EntropyCalibration2\nmul_3: {struct.pack('>f', 1 / 127).hex()}\n"


def test_calibration_file_of_another_model_is_refused(default_model, tmp_path):
    write_npz(tmp_path / "d.npz", 8)
    calibration.run(str(default_model[0]), str(tmp_path / "d.npz"), tmp_path / "c.json", "minmax")
    with pytest.raises(EffcError, match="another model"):
        calibration.read(tmp_path / "c.json", model_sha256="0" * 64)


def test_bad_calibration_input(default_model, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    np.savez(tmp_path / "names.npz", tokens=np.zeros((4, 8), np.int64))
    (tmp_path / "x.txt").write_text("some text\n")
    untokenized = tmp_path / "untokenized"  # the default model without its tokenizer files
    untokenized.mkdir()
    for f in default_model[0].iterdir():
        if not f.name.startswith("tokenizer"):
            (untokenized / f.name).write_bytes(f.read_bytes())
    for data, needle, model in [("empty.txt", "empty", default_model[0]),
                                ("names.npz", "missing attention_mask, input_ids", default_model[0]),
                                ("nope.npz", "no such file", default_model[0]), ("x.txt", "no tokenizer", untokenized)]:
        r = CliRunner().invoke(main, ["calibrate", str(model), "--data", str(tmp_path / data), "-o", str(tmp_path / "c.json")])
        assert r.exit_code == 2 and needle in r.output, (data, r.output)
        assert not (tmp_path / "c.json").exists()


def test_memory_does_not_grow_with_samples(default_model, tmp_path):
    """Peak RSS calibrating 2,000 samples stays within 10% of calibrating 200 (each in a fresh process)."""
    write_npz(tmp_path / "big.npz", 2000, seq=8)
    code = ("import sys; from effc import calibration; calibration.run(sys.argv[1], sys.argv[2], sys.argv[3], 'minmax', "
            "int(sys.argv[4]), batch_size=50); print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    peaks = {}
    for n in (200, 2000):
        out = subprocess.run([sys.executable, "-c", code, str(default_model[0]), str(tmp_path / "big.npz"),
                              str(tmp_path / f"c{n}.json"), str(n)], capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "c2000.json").read_text())["samples"] == 2000
    assert peaks[2000] <= 1.10 * peaks[200], peaks
