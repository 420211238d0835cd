"""The ort target's sibling-linear fusion (passes/siblings.py): a Llama layer's q/k/v and gate/up become one
GEMM each; the fused program computes what the unfused one did (float32 and int4 with int8 activations),
overridden parameters keep their layers, and the compiled artifact has 4 GEMMs per layer."""

from __future__ import annotations

import json

import onnx
import torch

import effc
from effc import decoder
from effc.capture import capture
from effc.passes import siblings
from effc.passes.base import PassContext
from effc.passes.int4 import Int4, Int4Config
from examples.models import build

PER_LAYER = 5  # q, k, v (the normed hidden state) and gate, up (the post-attention norm)


def _program(model):
    meta = decoder.info(model, model.config)
    example = decoder.example_inputs(meta, (2, 4))
    program = capture(model, example, decoder.dynamic_dims(list(example)), decoder.WithPast(model, meta["layers"]))
    return getattr(program, "program", program), meta, example


def _same(program, lowered, example, tol: float) -> None:
    with torch.no_grad():
        want, got = program.module()(**example), lowered.module()(**example)
    for w, g in zip(want, got, strict=True):
        assert float((w - g).abs().max()) <= tol


def test_fused_program_matches_float_and_int4():
    model = build("llama")
    program, meta, example = _program(model)
    lowered, fused, _ = siblings.lower(program)
    assert fused == PER_LAYER * meta["layers"]
    linears = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 4 * meta["layers"] + 1  # + lm_head
    _same(program, lowered, example, 1e-5)

    quantized = Int4(Int4Config(int8_activations=True)).run(program, PassContext()).ir
    lowered, fused, _ = siblings.lower(quantized)
    assert fused == PER_LAYER * meta["layers"]
    _same(quantized, lowered, example, 1e-5)


def test_overridden_parameters_keep_their_layers():
    model = build("llama")
    program, meta, _ = _program(model)
    q = next(name for name in program.state_dict if name.endswith("layers.0.self_attn.q_proj.weight"))
    _, fused, _ = siblings.lower(program, keep=frozenset({q}))
    assert fused == PER_LAYER * meta["layers"] - 1  # k and v of layer 0 still fuse, q stays alone


def test_int4_artifact_runs_four_gemms_per_layer(tmp_path):
    model = build("llama")
    model.save_pretrained(tmp_path / "hf")
    report = effc.compile(str(tmp_path / "hf"), tmp_path / "art", target="ort", passes=["int4"],
                          pass_config=["int4.int8_activations=true", "int4.lm_head=true"])
    assert report.verification["passed"]
    layers = model.config.num_hidden_layers
    ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("MatMulNBits") == 4 * layers + 1
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["fused"]["sibling_linears"] == PER_LAYER * layers
