"""Run a graph module and hand chosen nodes' values to a sink: calibration histograms, GPTQ/AWQ input
statistics and the debugger's taps all read activations this way."""

from __future__ import annotations

from typing import Callable, Literal

import torch


class _Watcher(torch.fx.Interpreter):
    def __init__(self, module: torch.fx.GraphModule, nodes: set[str], sink: Callable, what: str):
        super().__init__(module)
        self.nodes, self.sink, self.what = nodes, sink, what

    def run_node(self, n: torch.fx.Node):
        if self.what == "input" and n.name in self.nodes:
            x = n.args[0]
            self.sink(n, self.env[x] if isinstance(x, torch.fx.Node) else x)
        value = super().run_node(n)
        if self.what == "output" and n.name in self.nodes:
            self.sink(n, value)
        return value


def watch(module: torch.fx.GraphModule, feeds: dict[str, torch.Tensor], nodes: set[str],
          sink: Callable[[torch.fx.Node, torch.Tensor], None], what: Literal["input", "output"] = "output") -> None:
    """Run `module` (an ExportedProgram's module()) on one batch; for each node named in `nodes` call
    sink(node, value), value being the node's first argument ("input") or its result ("output")."""
    order = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        _Watcher(module, nodes, sink, what).run(*[feeds[k] for k in order])
