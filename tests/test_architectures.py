"""Random-weight HF architectures compile with no passes to onnx and ort and match eager PyTorch
within atol 1e-4 on input shapes other than the export example's (2x16). Decoders compile with their KV
cache and are fed as plain prefills here (input_ids and mask only); tests/test_decoder.py drives the cache."""

from __future__ import annotations

import numpy as np
import pytest


import effc
from effc.capture import NamedOutputs, prepare, run_torch
from effc.inputs import make_text_inputs
from effc.runtime import open as open_artifact
from effc.sources import load
from examples.models import ARCHITECTURES

SHAPES = [(1, 7), (3, 33), (4, 100)]  # batch, sequence: none is the export example's (2, 16)
ATOL = 1e-4


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_matches_eager_on_new_shapes(arch, target, hf_dir, tmp_path):
    model_dir = hf_dir(arch)
    effc.compile(str(model_dir), tmp_path / "art", target=target)
    src = load(str(model_dir))
    model = prepare(src.model)
    with open_artifact(tmp_path / "art") as session:
        names = [i.name for i in session.input_metadata()]
        outputs = [o.name for o in session.output_metadata()]
        assert set(names) >= {"input_ids", "attention_mask"}
        if "past_key_values.0.key" in names:
            outputs = ["logits"]  # eager's single pass returns no cache
        for i, shape in enumerate(SHAPES):
            feeds = make_text_inputs(names, src.config, shape, seed=100 + i, pad=True)
            ref = run_torch(NamedOutputs(model, list(feeds), outputs), feeds, outputs)
            got = session.run({k: v.numpy() for k, v in feeds.items()})
            valid = feeds["attention_mask"].numpy().astype(bool)  # right-padded positions carry no meaning
            for name in outputs:
                r, g = ref[name], got[name]
                assert g.shape == r.shape
                if r.ndim >= 2 and r.shape[:2] == valid.shape:
                    r, g = r[valid], g[valid]
                err = float(np.abs(r - g).max())
                assert err <= ATOL, f"{arch}/{target} {name} at {shape}: max |Δ| {err:.3g} > {ATOL}"


def test_dynamic_dims_are_named(hf_dir, tmp_path):
    effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx", task="text-generation")
    with open_artifact(tmp_path / "art") as session:
        shapes = {i.name: i.shape for i in session.input_metadata()}
        out = session.output_metadata()[0]
    assert shapes == {"input_ids": ("batch", "sequence"), "attention_mask": ("batch", "sequence")}
    assert out.name == "logits" and out.shape[:2] == ("batch", "sequence")


def test_decoder_dims_are_named(hf_dir, tmp_path):
    effc.compile(str(hf_dir("llama")), tmp_path / "art", target="onnx")
    with open_artifact(tmp_path / "art") as session:
        shapes = {i.name: i.shape for i in session.input_metadata()}
        outs = {o.name: o.shape for o in session.output_metadata()}
    assert shapes["input_ids"] == shapes["position_ids"] == ("batch", "sequence")
    assert shapes["attention_mask"][0] == "batch" and isinstance(shapes["attention_mask"][1], str)
    assert shapes["past_key_values.1.value"] == ("batch", 2, "past_sequence", 16)
    assert outs["logits"][:2] == ("batch", "sequence") and len(outs) == 1 + 2 * 2


def test_onnx_target_uses_standard_ops_only(hf_dir, tmp_path):
    import onnx

    effc.compile(str(hf_dir("bert")), tmp_path / "onnx", target="onnx")
    effc.compile(str(hf_dir("bert")), tmp_path / "ort", target="ort")
    portable = onnx.load(tmp_path / "onnx" / "model.onnx")
    optimized = onnx.load(tmp_path / "ort" / "model.onnx")
    assert {n.domain for n in portable.graph.node} <= {"", "ai.onnx"}
    onnx.checker.check_model(portable)
    # ORT's build-time optimization fuses BERT's LayerNorm/GELU into contrib or fused ops
    assert len(optimized.graph.node) < len(portable.graph.node)


def test_factory_source(tmp_path):
    report = effc.compile("examples.models:tiny_gpt2", tmp_path / "gpt2", target="ort")
    assert report.source["kind"] == "factory" and report.verification["max_abs"] < 1e-5


def test_large_models_use_external_data(hf_dir, tmp_path, monkeypatch):
    """Past the 2 GB protobuf limit weights go to model.onnx.data; the limit is lowered here to test it."""
    from effc.targets import onnx_export

    monkeypatch.setattr(onnx_export, "TWO_GB", 0)
    for target in ("onnx", "ort"):
        report = effc.compile(str(hf_dir("gpt2")), tmp_path / target, target=target)
        assert report.verification["max_abs"] < 1e-5
        files = {p.name for p in (tmp_path / target).iterdir()}
        assert {"model.onnx", "model.onnx.data"} <= files
        assert (tmp_path / target / "model.onnx").stat().st_size < (tmp_path / target / "model.onnx.data").stat().st_size
        with open_artifact(tmp_path / target) as session:
            assert session.manifest["files"]["model.onnx.data"]
