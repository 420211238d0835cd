"""cleanup: structural counts (Before/Expected), the no-change case, and numerics against eager."""

from __future__ import annotations

import torch

from effc.passes.base import PassContext
from effc.passes.cleanup import Cleanup, CleanupConfig
from effc.passes.program import node_count, parameter_bytes
from examples.models import build


class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.unused = torch.nn.Parameter(torch.randn(100))
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        y = self.drop(self.lin(x.to(torch.float32)))  # a cast to the dtype x already has
        _dead = y * 3  # computed, never used
        return y.clone().detach()


def export(module, *args):
    return torch.export.export(module.eval(), args, strict=False)


def test_removes_noops_dead_code_and_unused_weights():
    torch.manual_seed(0)
    x = torch.randn(2, 8)
    module = Noisy()
    ep = export(module, x)
    result = Cleanup().run(ep, PassContext())
    assert result.changed
    assert result.counts["unused weights removed"] == 1
    assert result.counts["no-op nodes removed"] >= 2
    targets = {n.target for n in result.ir.graph.nodes if n.op == "call_function"}
    assert targets == {torch.ops.aten.linear.default}  # Expected: just the linear
    assert parameter_bytes(result.ir) == parameter_bytes(ep) - 100 * 4
    assert "unused" not in result.ir.state_dict and "unused" in ep.state_dict  # the input program is untouched
    torch.testing.assert_close(result.ir.module()(x), module(x), rtol=0, atol=0)


def test_no_change_returns_the_same_program():
    ep = export(torch.nn.Linear(4, 4), torch.randn(1, 4))
    result = Cleanup().run(ep, PassContext())
    assert not result.changed and result.ir is ep and not any(result.counts.values())


def test_keeps_real_casts():
    class Cast(torch.nn.Module):
        def forward(self, x):
            return x.to(torch.float64) * 2

    ep = export(Cast(), torch.randn(3))
    result = Cleanup().run(ep, PassContext())
    assert any(n.target == torch.ops.aten.to.dtype for n in result.ir.graph.nodes)


def test_on_llama_matches_eager_exactly():
    model = build("llama")
    ids = torch.randint(0, 512, (2, 16))
    model.config.use_cache = False
    ep = torch.export.export(model, (), {"input_ids": ids}, strict=False)
    result = Cleanup(CleanupConfig(remove_asserts=True)).run(ep, PassContext())
    assert node_count(result.ir) < node_count(ep)
    with torch.no_grad():
        torch.testing.assert_close(result.ir.module()(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
