"""The extension point, shown by this file alone: a new op (reference, fake, onnx/ort/torch translations)
registered in effc.ops.registry, a rewrite rule that introduces it and a pass that applies the rule,
made known to the pass table without editing it. The program then compiles for onnx, ort and torch
and each artifact matches eager PyTorch; the op's translation is what the artifact runs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnxscript import opset20 as op

import effc
from effc.capture import NamedOutputs, prepare, run_torch
from effc.inputs import make_text_inputs
from effc.ops import registry
from effc.passes import registry as passes
from effc.passes.base import Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.rewrite import GraphEdit, Rule, apply_rules
from effc.runtime import open as open_artifact
from effc.sources import load
from effc.targets.onnx_nodes import provenance

ATOL = 1e-4


@torch.library.custom_op("effc_test::silu", mutates_args=())
def silu(x: torch.Tensor) -> torch.Tensor:
    """Reference: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


@silu.register_fake
def silu_fake(x):
    return torch.empty_like(x)


def silu_onnx(x):
    """Standard ops, spelled x / (1 + exp(-x)) so the artifact shows it is this translation."""
    return op.Div(x, op.Add(op.Constant(value_float=1.0), op.Exp(op.Neg(x))))


def silu_ort(x):
    return op.Mul(x, op.Reciprocal(op.Add(op.Constant(value_float=1.0), op.Exp(op.Neg(x)))))


def silu_torch(x):
    """Decomposition into aten ops for the torch target (ExportedProgram.run_decompositions)."""
    return torch.ops.aten.div.Tensor(x, torch.ops.aten.add.Tensor(torch.ops.aten.exp.default(torch.ops.aten.neg.default(x)), 1))


OP = registry.Op(torch.ops.effc_test.silu.default, {"onnx": silu_onnx, "ort": silu_ort, "torch": silu_torch},
                 silu_fake)

SILU = Rule("silu", lambda n: n.target is torch.ops.aten.silu.default,
            lambda edit, node: edit.call(torch.ops.effc_test.silu.default, (node.args[0],), node))


class SiluOp(Pass[PassConfig]):
    name = "silu_op"
    level = Level.FX
    summary = "aten.silu -> effc_test::silu"

    def run(self, ep, ctx: PassContext) -> PassResult:
        edit = GraphEdit(ep, self.name)
        return edit.finish({"silu rewritten": apply_rules(edit, [SILU])}, dropped=None)


@pytest.fixture
def extension(monkeypatch):
    monkeypatch.setattr(registry, "OPS", dict(registry.OPS))  # registered for this test only
    registry.register(OP)
    monkeypatch.setitem(passes.PASSES, "silu_op", f"{__name__}:SiluOp")


@pytest.mark.parametrize("target", ["onnx", "ort", "torch"])
def test_new_op_and_rule_compile_and_match_eager(target, extension, hf_dir, tmp_path):
    model_dir = hf_dir("llama")  # its MLP's act_fn is SiLU
    out = tmp_path / target
    report = effc.compile(str(model_dir), out, passes=["silu_op"], target=target)
    rewritten = report.passes[0].counts["silu rewritten"]
    assert rewritten >= 1
    if target == "torch":
        assert "aten::silu" not in report.ops and report.ops.get("aten::exp", 0) >= rewritten
        assert not any(k.startswith("effc_test") for k in report.ops)  # decomposed at build
    else:
        model = onnx.load(str(out / "model.onnx"))
        made = [n.op_type for n in model.graph.node if provenance(n) == "silu_op/silu"]
        assert made.count("Exp") == rewritten and (("Div" in made) if target == "onnx" else ("Reciprocal" in made))
    src = load(str(model_dir))
    eager = prepare(src.model)
    with open_artifact(out) as session:
        names = [i.name for i in session.input_metadata()]
        outputs = ["logits"]  # the decoder's cache: tests/test_decoder.py
        feeds = make_text_inputs(names, src.config, (2, 9), seed=7, pad=True)  # a prefill: input_ids, mask
        ref = run_torch(NamedOutputs(eager, list(feeds), outputs), feeds, outputs)
        got = session.run({k: v.numpy() for k, v in feeds.items()})
    valid = feeds["attention_mask"].numpy().astype(bool)
    for name in outputs:
        r, g = ref[name], got[name]
        if r.ndim >= 2 and r.shape[:2] == valid.shape:
            r, g = r[valid], g[valid]
        assert float(np.abs(r - g).max()) <= ATOL, f"{target} {name}"
