"""Layer-wise accuracy: where a compiled (quantized) model departs from the float one, layer by layer.

Each layer (a module that runs a linear, an embedding or an effc op) is probed at its input and output.
A layer's own damage is the noise it adds: the relative noise power at its output minus that at its
input (noise that reaches a linear layer's input leaves it at about the same relative power), shown as
an SQNR in dB, the "layer SQNR". Ranking by it names the layer that broke things rather than every
layer downstream of it. The same comparison serves `effc debug` (float model vs artifact) and
int8.auto_exclude (float graph vs quantized graph, both in PyTorch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from effc.errors import EffcError
from effc.passes.program import module_name
from effc.runtime.compare import Pooled, sqnr_db
from effc.watch import watch

# Own noise this far above the median layer's (4x power) marks where the error jumps.
JUMP_DB = 6.0


_ATTENTION = (torch.ops.aten.scaled_dot_product_attention.default,)


def _is_attention(node: torch.fx.Node) -> bool:
    return node.target in _ATTENTION or str(node.target) == "effc.window_attention.default"


def is_layer(node: torch.fx.Node, attention: bool = False) -> bool:
    """A node that makes its module a layer: a linear, an embedding, an effc op, and with `attention` an
    SDPA (the float twin of sparse_attention's effc::window_attention, so the debugger can compare it)."""
    target = node.target
    return node.op == "call_function" and (
        target in (torch.ops.aten.linear.default, torch.ops.aten.embedding.default)
        or getattr(target, "namespace", None) == "effc"
        or (attention and target in _ATTENTION))


def probes(gm: torch.fx.GraphModule, attention: bool = False) -> dict[str, dict[str, str | None]]:
    """module name -> {"input": fx node name or None, "output": fx node name}, in graph order.

    The output is the module's last node that something outside the module reads; the input is the
    first float activation its first node reads from outside (None for embeddings: indices are exact);
    an attention layer's input is its query."""
    nodes: dict[str, list[torch.fx.Node]] = {}
    layers = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not node.meta.get("nn_module_stack"):
            continue
        name = module_name(node)
        nodes.setdefault(name, []).append(node)
        if is_layer(node, attention) and name not in layers:
            layers.append(name)
    out = {}
    for name in layers:
        inside = set(nodes[name])
        exits = [n for n in nodes[name] if any(u not in inside for u in n.users)]
        if not exits:
            continue
        attention = next((n for n in nodes[name] if _is_attention(n)), None)
        if attention is not None:  # the query as attention reads it (the artifact's probe sees the same)
            activation = attention.args[0]
        else:
            activation = next((a for a in nodes[name][0].all_input_nodes if a not in inside
                               and a.op == "call_function" and _is_float(a)), None)
        out[name] = {"input": activation.name if activation is not None else None, "output": exits[-1].name}
    return out


def attention_layers(gm: torch.fx.GraphModule) -> set[str]:
    """Names of the modules that run an attention (SDPA or effc::window_attention)."""
    return {module_name(n) for n in gm.graph.nodes if n.op == "call_function" and _is_attention(n)}


def _is_float(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def tap_names(layer_probes: dict[str, dict]) -> list[str]:
    return sorted({v for p in layer_probes.values() for v in p.values() if v})


def graph_taps(module: torch.fx.GraphModule, names: list[str], feeds: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Values of the named nodes of an ExportedProgram's module() on one batch."""
    taps: dict[str, np.ndarray] = {}
    watch(module, feeds, set(names), lambda node, value: taps.__setitem__(node.name, value.detach().float().numpy()))
    return taps


@dataclass
class LayerRow:
    name: str
    order: int
    sqnr_in_db: float | None  # None: the layer's input is exact by construction (embedding indices)
    sqnr_out_db: float
    layer_sqnr_db: float  # the noise this layer adds, as an SQNR; lower is worse
    cosine_out: float
    max_abs_out: float
    rules: list[str] = field(default_factory=list)  # the "<pass>/<rule>"s that made the layer's nodes


@dataclass
class LayerReport:
    rows: list[LayerRow]  # execution order
    first_jump: str | None
    outputs: dict[str, dict] = field(default_factory=dict)  # model output name -> sqnr_db, cosine, max_abs
    attention: set[str] = field(default_factory=set)  # layers that are attention (sparse_attention's patterns)

    def ranked(self) -> list[LayerRow]:
        return sorted(self.rows, key=lambda r: (r.layer_sqnr_db, r.order))

    def to_dict(self) -> dict:
        """Plain JSON: an infinite SQNR (no error at all) becomes null."""
        def clean(d: dict) -> dict:
            return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in d.items()}
        return {"first_jump": self.first_jump, "outputs": {k: clean(v) for k, v in self.outputs.items()},
                "ranked": [clean(asdict(r)) for r in self.ranked()]}

    def table(self, top: int | None = 15) -> str:
        ranked = self.ranked()[:top] if top else self.ranked()
        width = max([len(r.name) for r in ranked] + [5])
        rules = any(r.rules for r in ranked)
        lines = [f"{'rank':>4}  {'layer':<{width}}  {'layer SQNR':>10}  {'SQNR in':>8}  {'SQNR out':>8}  "
                 f"{'cosine out':>10}  {'max |Δ| out':>11}" + ("  rules" if rules else "")]
        for i, r in enumerate(ranked, 1):
            sin = "exact" if r.sqnr_in_db is None else f"{r.sqnr_in_db:.1f}"
            lines.append(f"{i:>4}  {r.name:<{width}}  {r.layer_sqnr_db:>10.1f}  {sin:>8}  {r.sqnr_out_db:>8.1f}  "
                         f"{r.cosine_out:>10.5f}  {r.max_abs_out:>11.3g}"
                         + (f"  {', '.join(r.rules) or '-'}" if rules else ""))
        return "\n".join(lines)

    def advice(self, worst: int = 3) -> str:
        ranked = self.ranked()
        names = [r.name for r in ranked[:worst]]
        jump = f"the error first jumps at {self.first_jump}; " if self.first_jump else ""
        sparse = [r.name for r in ranked if r.name in self.attention]
        if sparse and set(names) <= set(sparse):  # the damage is the attention pattern's, not quantization's
            rest = [n for n in sparse if n not in names]
            keep = f"--pass-config sparse_attention.layers={','.join(rest)}" if rest else "drop sparse_attention"
            return f"{jump}most damage is added by the sparse attention of {', '.join(names)}. To keep them dense: {keep}"
        return (f"{jump}most damage is added by {', '.join(names)}. To keep them in float: "
                f"--pass-config int8.exclude={','.join(names)}")

    def plot(self, path: str) -> None:
        """Error per layer in execution order, as noise power relative to the signal (dB, taller is worse):
        bars for the noise each layer adds, a line for the noise at its output."""
        try:
            import matplotlib
        except ImportError:
            raise EffcError("--plot needs matplotlib: pip install 'effc[plot]'") from None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        floor = -80.0  # a layer that adds no noise (or less than this) sits at the floor
        x = np.arange(len(self.rows))
        added = [max(-r.layer_sqnr_db, floor) for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(self.rows)), 4.5))
        ax.bar(x, [a - floor for a in added], bottom=floor, color="tab:orange",
               label="noise this layer adds (-layer SQNR)")
        ax.plot(x, [max(-r.sqnr_out_db, floor) for r in self.rows], "o-", ms=3,
                label="noise at the layer's output (-SQNR out)")
        ax.set_xticks(x, [r.name for r in self.rows], rotation=90, fontsize=6)
        ax.set_ylabel("dB relative to the signal (higher is worse)")
        ax.set_title("effc debug: error per layer vs the float model")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


class LayerComparison:
    """Streams batches of (float taps, other taps) for layers probed in both, then reports per layer.

    `reference` and `other` map module name -> {"input", "output"} tap names in their own graphs."""

    def __init__(self, reference: dict[str, dict], other: dict[str, dict], rules: dict[str, list[str]] | None = None):
        """`rules`: layer -> the rewrite rules that made its nodes in `other` (effc_provenance)."""
        self.layers = [name for name in reference if name in other]
        self.reference, self.other = reference, other
        self.rules = rules or {}
        self.noise = {(name, end): Pooled() for name in self.layers for end in ("input", "output")}
        self.outputs: dict[str, Pooled] = {}

    def add(self, ref_taps: dict, other_taps: dict, attention_mask: np.ndarray | None = None) -> None:
        for name in self.layers:
            for end in ("input", "output"):
                r, o = self.reference[name][end], self.other[name][end]
                if r and o and r in ref_taps and o in other_taps and other_taps[o].dtype.kind == "f":
                    ref, got = ref_taps[r], other_taps[o]
                    if ref.size == got.size:  # a probe may be a reshape of the layer's input (onnx_export)
                        self.noise[(name, end)].add(ref, got.reshape(ref.shape), attention_mask)

    def add_outputs(self, ref: dict[str, np.ndarray], got: dict[str, np.ndarray],
                    attention_mask: np.ndarray | None = None) -> None:
        for name, value in ref.items():
            self.outputs.setdefault(name, Pooled()).add(value, got[name], attention_mask)

    def report(self) -> LayerReport:
        rows = []
        for i, name in enumerate(self.layers):
            out = self.noise[(name, "output")]
            if out.signal == 0:
                continue  # never seen (e.g. the artifact's optimizer fused the value away)
            inp = self.noise[(name, "input")]
            has_input = self.reference[name]["input"] is not None and inp.signal > 0
            added = out.relative_noise - (inp.relative_noise if has_input else 0.0)
            rows.append(LayerRow(name, i, inp.sqnr_db if has_input else None, out.sqnr_db,
                                 sqnr_db(1.0, max(added, 0.0)), out.cosine, out.max_abs, self.rules.get(name, [])))
        return LayerReport(rows, _first_jump(rows), {
            name: {"sqnr_db": n.sqnr_db, "cosine": n.cosine, "max_abs": n.max_abs}
            for name, n in self.outputs.items()})


def _first_jump(rows: list[LayerRow]) -> str | None:
    """The earliest layer whose own noise is JUMP_DB above the median layer's."""
    finite = [r.layer_sqnr_db for r in rows if math.isfinite(r.layer_sqnr_db)]
    if len(finite) < 2:
        return None
    median = float(np.median(finite))
    return next((r.name for r in rows if r.layer_sqnr_db <= median - JUMP_DB), None)
