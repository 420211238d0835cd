"""`--target trt` artifacts: every node of model.onnx passes TensorRT 10's ONNX parser matrix
(targets/trt_support.py) or is a registered effc plugin node, the build configuration is written, and
the artifact, run by ONNX Runtime here (the tensorrt runner's fallback), passed verification against
eager PyTorch (exact passes) or the post-pass graph (lossy ones). Refusals: one line, exit 2, nothing
written. A compile takes ~30-60 s on 2 shared cores: the default run is a subset (the README's command,
the plugin, one architecture per family), the full matrix is marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import effc
from effc.cli import main
from effc.targets import trt_config, trt_plugins, trt_support
from examples.models import ARCHITECTURES

PASSES = {  # name -> (passes, pass config)
    "none": ([], []),
    "fp16": (["fp16"], []),
    "int8": (["int8"], []),  # static W8A8: the trt target's int8 default
    "int4": (["int4"], []),
    "nf4": (["nf4"], ["nf4.block=32"]),  # 32 divides every in_features here (the plugin needs whole blocks)
}
DEFAULT_RUN = {("default", "nf4"), ("llama", "fp16"), ("bert", "int4")}  # int8: test_readme_tour_command


def write_calib(path: Path, vocab: int, n: int = 8, seq: int = 16, token_types: bool = False) -> Path:
    rng = np.random.default_rng(0)
    arrays = dict(input_ids=rng.integers(0, vocab, (n, seq)), attention_mask=np.ones((n, seq), np.int64))
    if token_types:  # BERT-style models take token_type_ids too
        arrays["token_type_ids"] = np.zeros((n, seq), np.int64)
    np.savez(path, **arrays)
    return path


def check_artifact(out: Path, report) -> dict:
    """The artifact is TensorRT-ready, says so, and passed verification. Returns its manifest."""
    model = onnx.load(str(out / "model.onnx"))
    assert trt_support.problems(model) == []
    plugin_nodes = [n for n in model.graph.node if n.domain == trt_plugins.DOMAIN]
    assert all(trt_plugins.plugin_of(n) is not None for n in plugin_nodes)
    assert not any(n.domain not in ("", "ai.onnx", trt_plugins.DOMAIN) for n in model.graph.node)
    manifest = json.loads((out / "manifest.json").read_text())
    target = manifest["target"]
    assert target["name"] == "trt" and target["tensorrt_ready"] is True and manifest["runner"] == "tensorrt"
    assert target["opset"] == next(i.version for i in model.opset_import if i.domain in ("", "ai.onnx"))
    assert sum(target["plugins"].values()) == len(plugin_nodes)
    assert target["build"] == trt_config.FILE and (out / trt_config.FILE).is_file()
    assert report.verification["passed"], report.verification
    return manifest


def source_of(name: str, hf_dir, minilm_dir, default_model) -> tuple[str, list[str], list[str]]:
    """(model, adapters, leading passes) of a case's source."""
    if name == "default":
        return str(default_model[0]), [str(default_model[1])], ["merge_lora"]
    if name == "minilm":
        return str(minilm_dir), [], []
    return str(hf_dir(name)), [], []


CASES = [(src, p) for src in ("default", *ARCHITECTURES, "minilm") for p in PASSES]


@pytest.mark.parametrize("src,passes", [
    pytest.param(s, p, marks=() if (s, p) in DEFAULT_RUN else pytest.mark.slow, id=f"{s}-{p}") for s, p in CASES])
def test_trt_artifact(src, passes, hf_dir, minilm_dir, default_model, tmp_path):
    model, adapters, lead = source_of(src, hf_dir, minilm_dir, default_model)
    names, config = PASSES[passes]
    calib = {}
    if "int8" in names:  # minmax on 8 samples: the slow entropy search is not what is tested here
        path = write_calib(tmp_path / "calib.npz", 30522 if src == "minilm" else 512,
                           token_types=src in ("bert", "minilm"))
        calib = dict(calib_data=str(path),
                     calib_method="minmax", calib_samples=8)
    out = tmp_path / "out"
    report = effc.compile(model, out, adapters=adapters, passes=lead + names, pass_config=config, target="trt",
                          **calib)
    manifest = check_artifact(out, report)
    onnx_model = onnx.load(str(out / "model.onnx"))
    ops = {n.op_type for n in onnx_model.graph.node}
    if src == "gpt2" and passes in ("int8", "int4", "nf4"):
        # HF GPT-2's projections are Conv1D, which effc's linear-layer scan does not take: only int8's
        # embedding tables are quantized (DQ of the table, then Gather)
        assert ("DequantizeLinear" in ops) == (passes == "int8")
        return
    if passes == "int8":  # explicit quantization: per-tensor Q/DQ of activations, DQ'd int8 weights
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if passes == "int4":  # INT4 blocked DequantizeLinear needs opset 21
        assert manifest["target"]["opset"] == 21
        assert any(t.data_type == onnx.TensorProto.INT4 for t in onnx_model.graph.initializer)
    if passes == "nf4":
        assert manifest["target"]["plugins"] and all(k in trt_plugins.PLUGINS for k in manifest["target"]["plugins"])
    if passes == "fp16":
        assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx_model.graph.initializer)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line(result) -> str:
    """The one error line of a refused compile (progress lines aside), exit 2, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith(("effc: error:", "Error:"))]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def test_readme_tour_command(default_model, tmp_path):
    """README: effc compile examples/default/model --adapter examples/default/adapter --passes merge_lora,int8
    --target trt --calib-data ... -o out/trt"""
    calib = write_calib(tmp_path / "calib.npz", 512)
    out = tmp_path / "trt"
    r = cli("compile", default_model[0], "--adapter", default_model[1], "--passes", "merge_lora,int8", "--target",
            "trt", "--calib-data", calib, "--calib-method", "minmax", "--calib-samples", 8, "-o", out)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"][1]["config"]["mode"] == "static"  # the trt target's int8 default
    model = onnx.load(str(out / "model.onnx"))
    assert trt_support.problems(model) == []
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert quantize and all(inits[n.input[1]].size == 1 for n in quantize if n.input[1] in inits)  # per tensor


def test_int8_without_calibration_names_effc_calibrate(default_model, tmp_path):
    out = tmp_path / "trt"
    line = one_line(cli("compile", default_model[0], "--passes", "int8", "--target", "trt", "-o", out))
    assert "effc calibrate" in line
    assert not out.exists()


def test_dynamic_int8_has_no_trt_translation(hf_dir, tmp_path):
    out = tmp_path / "trt"
    line = one_line(cli("compile", hf_dir("llama"), "--passes", "int8", "--pass-config", "int8.mode=dynamic",
                        "--target", "trt", "-o", out))
    assert "int8_linear_dynamic" in line and "no translation for target trt" in line
    assert not out.exists()


@pytest.mark.parametrize("setting,needles", [
    ("int4.symmetric=false", ("zero point", "int4.symmetric=true")),
    pytest.param("int4.int8_activations=true", ("int8_activations", "explicit quantization"), marks=pytest.mark.slow),
])
def test_int4_forms_that_are_not_explicit_quantization_are_refused(setting, needles, hf_dir, tmp_path):
    out = tmp_path / "trt"
    line = one_line(cli("compile", hf_dir("llama"), "--passes", "int4", "--pass-config", setting, "--target", "trt",
                        "-o", out))
    assert all(n in line for n in needles), line
    assert not out.exists()
