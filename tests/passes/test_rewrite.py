"""The rule mechanism (passes/rewrite.py): Before/Expected on small graphs, refusals by reason, the no-op
input, counts per rule and provenance on every node a rule makes."""

from __future__ import annotations

import torch

from effc.passes.base import PassContext
from effc.passes.int8 import Int8, Int8Config
from effc.passes.layers import LayerScan, is_linear
from effc.passes.rewrite import PROVENANCE, GraphEdit, Rule, apply_rules

aten = torch.ops.aten


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def export(module, *args):
    return torch.export.export(module.eval(), args, strict=False)


def targets(ep) -> list:
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def relu_as_clamp() -> Rule:
    """relu(x) -> clamp_min(x, 0) via a helper mul by one: two new nodes from one rule."""
    def rewrite(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
        one = edit.call(aten.mul.Tensor, (node.args[0], 1.0), node)
        return edit.call(aten.clamp_min.default, (one, 0.0), node)

    return Rule("relu_as_clamp", lambda n: n.target is aten.relu.default, rewrite)


def test_a_matching_rule_rewrites_and_tags_every_node_it_makes():
    torch.manual_seed(0)
    module, x = Block(), torch.randn(2, 8)
    ep = export(module, x)
    edit = GraphEdit(ep, "demo")
    assert apply_rules(edit, [relu_as_clamp()]) == 1
    result = edit.finish({})
    # Before: linear, relu, linear. Expected: linear, mul, clamp_min, linear.
    assert targets(ep) == [aten.linear.default, aten.relu.default, aten.linear.default]
    assert targets(result.ir) == [aten.linear.default, aten.mul.Tensor, aten.clamp_min.default, aten.linear.default]
    tags = {n.target: n.meta.get(PROVENANCE) for n in result.ir.graph.nodes if n.op == "call_function"}
    assert tags == {aten.linear.default: None, aten.mul.Tensor: "demo/relu_as_clamp",
                    aten.clamp_min.default: "demo/relu_as_clamp"}
    assert result.changed and result.rules == {"demo/relu_as_clamp": 1}
    torch.testing.assert_close(result.ir.module()(x), module(x), rtol=0, atol=0)


def test_a_refusing_check_records_the_reason_and_changes_nothing():
    ep = export(Block(), torch.randn(2, 8))
    edit = GraphEdit(ep, "demo")
    scan = LayerScan("demo", ("up",))
    rule = Rule("linear", is_linear, lambda edit, node: None, check=lambda edit, node: scan.check(edit, node) or "too small")
    assert apply_rules(edit, [rule]) == 0
    assert {reason: len(nodes) for reason, nodes in edit.refused.items()} == {"excluded by demo.exclude": 1, "too small": 1}
    result = edit.finish({})
    assert not result.changed and result.ir is ep and result.rules == {}
    assert scan.notes(("up", "nothing*")) == ["demo.exclude pattern 'nothing*' matched no layer"]


def test_first_accepting_rule_wins_and_counts_are_per_rule():
    ep = export(Block(), torch.randn(2, 8))
    edit = GraphEdit(ep, "demo")
    only_up = Rule("up", is_linear, lambda e, n: None,
                   check=lambda e, n: None if n.args[1].name.endswith("up_weight") else "not up")
    plain = Rule("plain", is_linear, lambda e, n: None)
    assert apply_rules(edit, [only_up, plain]) == 2
    assert edit.rules == {"demo/up": 1, "demo/plain": 1}
    assert edit.refused == {}  # every candidate was taken by some rule


def test_no_op_input():
    class NoLinear(torch.nn.Module):
        def forward(self, x):
            return x * 2

    ep = export(NoLinear(), torch.randn(3))
    edit = GraphEdit(ep, "demo")
    assert apply_rules(edit, [relu_as_clamp()]) == 0
    result = edit.finish({"things": 0})
    assert result.ir is ep and not result.changed and result.counts == {"things": 0, "float weights dropped": 0}


def test_int8_counts_per_rule_and_tags_its_nodes():
    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.block = Block()

        def forward(self, ids):
            return self.block(self.emb(ids))

    ep = export(Embed(), torch.tensor([[1, 2, 3]]))
    result = Int8(Int8Config(exclude=("block.down",))).run(ep, PassContext())
    assert result.rules == {"int8/embedding": 1, "int8/linear_dynamic": 1}
    assert result.counts["linear layers quantized"] == 1 and result.counts["linear layers excluded"] == 1
    made = {n.target.name(): n.meta.get(PROVENANCE) for n in result.ir.graph.nodes
            if n.op == "call_function" and n.target.namespace == "effc"}
    assert made == {"effc::int8_embedding": "int8/embedding", "effc::int8_linear_dynamic": "int8/linear_dynamic"}


def test_inspect_provenance_lists_the_rules_of_an_int8_artifact(hf_dir, tmp_path):
    import effc
    from click.testing import CliRunner

    from effc.cli import main

    report = effc.compile(str(hf_dir("llama")), tmp_path / "art", passes=["int8"], target="ort")
    counts = report.passes[0].counts
    result = CliRunner().invoke(main, ["inspect", "--provenance", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split(None, 2) for line in result.output.splitlines()[1:]}
    # ORT fuses each int8 linear into one DynamicQuantizeMatMul: one node per layer the pass quantized.
    assert rows["int8/linear_dynamic"][1] == str(counts["linear layers quantized"])
    assert rows["int8/linear_dynamic"][2] == f"com.microsoft.DynamicQuantizeMatMul x{counts['linear layers quantized']}"
    assert ("int8/embedding" in rows) == (counts.get("embeddings quantized", 0) > 0)
    # The ort target's own fusions (targets/ort.py fx_lowerings): cached attention, RMSNorm, rotary
    own = {"kv_attention/gqa", "rms_norm/simplified_layer_norm", "rotary/rope", "sibling_linears/concat"}
    assert "(untagged)" in rows and set(rows) <= {"int8/linear_dynamic", "int8/embedding", "(untagged)", *own}
    # Reading the tags needs onnx only: inspect stays as light as effc.runtime (no torch import).
    import subprocess
    import sys

    code = ("import sys; from effc.cli import main; sys.argv = ['effc', 'inspect', '--provenance', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch imported' if 'torch' in sys.modules else 'no torch')")
    probe = subprocess.run([sys.executable, "-c", code, str(tmp_path / "art")], capture_output=True, text=True)
    assert probe.stdout.strip().endswith("no torch"), probe.stdout[-500:] + probe.stderr[-500:]
    # The report records the same per-rule counts (report.json "rules").
    assert report.passes[0].rules["int8/linear_dynamic"] == counts["linear layers quantized"]
    assert report.passes[0].rules.get("int8/embedding", 0) == counts.get("embeddings quantized", 0)
