"""cleanup: remove nodes that compute nothing the outputs need.

torch.export leaves runtime dtype asserts, dtype/device casts to the type a tensor already has,
aliases, eval-mode dropout and clones in HF graphs; unused weights can remain after other passes.
Every later pattern-matching pass sees a simpler graph, and the report counts what went.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effc.passes.base import Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.rewrite import GraphEdit, Rule, apply_rules

aten = torch.ops.aten
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}
IDENTITY = {aten.alias.default, aten.clone.default, aten.detach.default, aten.lift_fresh_copy.default}
CASTS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default}


@dataclass(frozen=True)
class CleanupConfig(PassConfig):
    remove_asserts: bool = True  # dtype/shape asserts torch.export inserts; targets drop them anyway


def _val(node):
    v = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _is_noop(node: torch.fx.Node) -> bool:
    """True when the node returns its first input unchanged (same dtype, device, layout and values)."""
    if node.target in IDENTITY:
        return node.target is not aten.clone.default or node.kwargs.get("memory_format") in (None, torch.preserve_format)
    if node.target is aten.dropout.default:
        return node.args[2] is False or node.args[1] == 0
    if node.target in CASTS:
        src, out = _val(node.args[0]), _val(node)
        return (src is not None and out is not None and src.dtype == out.dtype and src.device == out.device
                and src.layout == out.layout)
    return False


class Cleanup(Pass[CleanupConfig]):
    name = "cleanup"
    level = Level.FX
    config_class = CleanupConfig
    summary = "remove no-op casts, aliases, eval dropout, asserts, dead nodes and unused weights"

    def run(self, ep, ctx: PassContext) -> PassResult:
        edit = GraphEdit(ep, self.name)
        graph = edit.graph

        def erase(edit: GraphEdit, node: torch.fx.Node) -> None:
            graph.erase_node(node)

        def bypass(edit: GraphEdit, node: torch.fx.Node) -> None:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)

        rules = [Rule("noop", _is_noop, bypass)]
        if self.config.remove_asserts:
            rules.insert(0, Rule("assert", lambda n: n.target in ASSERTS, erase))
        apply_rules(edit, rules, [n for n in graph.nodes if n.op == "call_function"])
        counts = {"no-op nodes removed": edit.rules["cleanup/noop"], "asserts removed": edit.rules["cleanup/assert"],
                  "dead nodes removed": 0, "unused weights removed": 0}
        before = sum(1 for n in graph.nodes if n.op == "call_function")
        graph.eliminate_dead_code()
        counts["dead nodes removed"] = before - sum(1 for n in graph.nodes if n.op == "call_function")
        edit.count("dead_code", counts["dead nodes removed"])
        counts["unused weights removed"] = edit.drop_unused()
        return edit.finish(counts, changed=any(counts.values()), dropped=None)
