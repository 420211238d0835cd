"""Rewrites as rules, in the manner of onnxscript's rewriter: a Rule names the nodes it may replace
(pattern), says why it refuses one (check: a short reason, or None to accept) and builds the
replacement (rewrite). apply_rules runs rules over a GraphEdit, counting per rule what was rewritten
and, by reason, what was refused.

Every node a rule makes carries node.meta["effc_provenance"] = "<pass>/<rule>"; the ONNX targets copy
it into the node metadata (effc.provenance) and `effc inspect --provenance` counts it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram

from effc.passes.base import PassResult
from effc.passes.program import add_parameter, call, drop_unused_weights, edit, rebuild

PROVENANCE = "effc_provenance"


def _accept(edit: GraphEdit, node: torch.fx.Node) -> str | None:
    return None


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Callable[[torch.fx.Node], bool]  # is this node a candidate?
    # The replacement for an accepted node: put in its place (GraphEdit.replace), or None when the
    # rewrite edited the graph itself (an erase, a region folded into one node).
    rewrite: Callable[[GraphEdit, torch.fx.Node], torch.fx.Node | None]
    check: Callable[[GraphEdit, torch.fx.Node], str | None] = _accept  # the reason a candidate is refused


class GraphEdit:
    """A private copy of one program (program.edit) that rules change, then finish() rebuilds."""

    def __init__(self, ep: ExportedProgram, pass_name: str):
        self.ep, self.pass_name = ep, pass_name
        self.gm, self.signature, self.state_dict, self.constants = edit(ep)
        # Placeholder node name -> its parameter tensor, as the program came in.
        self.weights: dict[str, torch.Tensor] = {s.arg.name: self.state_dict.get(s.target)
                                                 for s in self.signature.input_specs if hasattr(s.arg, "name")}
        self.rules: Counter[str] = Counter()  # "<pass>/<rule>" -> rewrites
        self.refused: dict[str, list[torch.fx.Node]] = {}  # reason -> candidates no rule took

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph

    def weight(self, arg) -> torch.Tensor | None:
        """The parameter a node argument reads, if it is one."""
        return self.weights.get(getattr(arg, "name", None))

    def add_parameter(self, fqn: str, value: torch.Tensor) -> torch.fx.Node:
        return add_parameter(self.gm, self.signature, self.state_dict, fqn, value)

    def call(self, target, args: tuple, meta_from: torch.fx.Node | None = None) -> torch.fx.Node:
        return call(self.graph, target, args, meta_from)

    def replace(self, node: torch.fx.Node, new: torch.fx.Node) -> None:
        """Put `new` in place of `node`, keeping its value and module meta (the debugger names layers by it)."""
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
        node.replace_all_uses_with(new)
        self.graph.erase_node(node)

    @contextlib.contextmanager
    def made_by(self, rule: str) -> Iterator[None]:
        """Tag the call nodes made inside (helpers too: casts, index_select, add) with `rule`."""
        before = set(self.graph.nodes)
        yield
        tag = f"{self.pass_name}/{rule}"
        for node in self.graph.nodes:
            if node not in before and node.op == "call_function":
                node.meta.setdefault(PROVENANCE, tag)

    def count(self, rule: str, n: int = 1) -> None:
        """Count n rewrites of `rule` (apply_rules counts its own; passes whose candidates are not single
        nodes count theirs)."""
        if n:
            self.rules[f"{self.pass_name}/{rule}"] += n

    def refuse(self, node: torch.fx.Node, reason: str) -> None:
        self.refused.setdefault(reason, []).append(node)

    def select(self, rule: Rule) -> list[torch.fx.Node]:
        """The candidates `rule` accepts, in graph order, recording the refused ones by reason (for passes
        that look at all chosen nodes together before rewriting: SmoothQuant, AWQ)."""
        chosen = []
        for node in self.graph.nodes:
            if rule.pattern(node):
                reason = rule.check(self, node)
                if reason is None:
                    chosen.append(node)
                else:
                    self.refuse(node, reason)
        return chosen

    def drop_unused(self) -> int:
        return drop_unused_weights(self.gm, self.signature, self.state_dict, self.constants)

    def finish(self, counts: dict, notes: Iterable[str] = (), *, changed: bool | None = None,
               dropped: str | None = "float weights dropped") -> PassResult:
        """The shared epilogue: drop the weights nothing reads (counted under `dropped`), rebuild the
        program only when it changed (default: when a rule rewrote something)."""
        if dropped:
            counts[dropped] = self.drop_unused()
        if changed is None:
            changed = sum(self.rules.values()) > 0
        program = rebuild(self.ep, self.gm, self.signature, self.state_dict, self.constants) if changed else self.ep
        return PassResult(program, changed, counts, list(notes), rules=dict(self.rules))


def apply_rules(edit: GraphEdit, rules: list[Rule], nodes: Iterable[torch.fx.Node] | None = None) -> int:
    """Rewrite each candidate (`nodes`, else every node, in graph order) with the first rule whose pattern
    matches and whose check accepts it; one no rule takes is recorded under the first refusal's reason.
    Returns how many nodes were rewritten."""
    done = 0
    for node in list(edit.graph.nodes if nodes is None else nodes):
        if getattr(node, "_erased", False):  # a previous rewrite removed it (a region folded whole)
            continue
        reason = None
        for rule in rules:
            if not rule.pattern(node):
                continue
            refused = rule.check(edit, node)
            if refused is not None:
                reason = reason or refused
                continue
            with edit.made_by(rule.name), edit.graph.inserting_before(node):
                new = rule.rewrite(edit, node)
                if new is not None:
                    edit.replace(node, new)
            edit.count(rule.name)
            done += 1
            break
        else:
            if reason is not None:
                edit.refuse(node, reason)
    return done
