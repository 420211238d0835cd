"""Which layers a weight-quantization pass rewrites: the linear-layer scan shared by int8, nf4 and int4
(and int8's embeddings), as a rule check with module-name exclude globs."""

from __future__ import annotations

import fnmatch

import torch

from effc.passes.program import module_name
from effc.passes.rewrite import GraphEdit, Rule

aten = torch.ops.aten
NOT_FLOAT_2D = "weight is not a 2-D float parameter"


def is_linear(node: torch.fx.Node) -> bool:
    return node.target is aten.linear.default


def bias(node: torch.fx.Node) -> torch.fx.Node | None:
    """A linear node's bias argument, if it has one."""
    return node.args[2] if len(node.args) > 2 else None


class LayerScan:
    """check(): accepts a layer whose weight (args[weight_index]) is a 2-D float parameter and whose
    module name no exclude glob matches; remembers which globs matched something, for notes()."""

    def __init__(self, pass_name: str, exclude: tuple[str, ...], weight_index: int = 1):
        self.pass_name, self.exclude, self.weight_index = pass_name, exclude, weight_index
        self.excluded = f"excluded by {pass_name}.exclude"
        self.matched: set[str] = set()

    def check(self, edit: GraphEdit, node: torch.fx.Node) -> str | None:
        w = edit.weight(node.args[self.weight_index])
        if w is None or w.dim() != 2 or not w.is_floating_point():
            return NOT_FLOAT_2D
        hits = [p for p in self.exclude if fnmatch.fnmatchcase(module_name(node), p)]
        self.matched.update(hits)
        return self.excluded if hits else None

    def rule(self, name: str = "linear") -> Rule:
        """The scan as a rule of its own, for GraphEdit.select (it rewrites nothing)."""
        return Rule(name, is_linear, rewrite=lambda edit, node: None, check=self.check)

    def notes(self, reported: tuple[str, ...]) -> list[str]:
        """A note for each of the user's globs (`reported`) that matched no layer."""
        return [f"{self.pass_name}.exclude pattern {p!r} matched no layer" for p in reported if p not in self.matched]
