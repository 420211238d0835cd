"""int4: uniform 4-bit block-wise linear weights (effc.formats.nbits), by round-to-nearest, GPTQ or AWQ.

gptq and awq need calibration samples (--calib-data), streamed through the float model (padding
positions left out). GPTQ: each layer's Hessian H = 2 X^T X, then columns quantized with error
feedback. AWQ (Lin et al. 2024): per input channel scales s = mean|X_j|^a, a searched on a grid for the
smallest output error of the quantized W*s on calibration rows; X/s is folded into the norm before the
layer when only the scaled layers read it (else a multiply in the graph). The LM head stays in float
unless int4.lm_head=true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effc.errors import EffcError
import effc.ops  # noqa: F401  (registers torch.ops.effc.*)
from effc.formats.nbits import dequantize, gptq, pack, rtn, storage_bits
from effc.passes.base import Capability, Level, Need, Pass, PassConfig, PassContext, PassResult
from effc.passes.layers import LayerScan, bias, is_linear
from effc.passes.program import module_name
from effc.passes.rewrite import GraphEdit, Rule, apply_rules
from effc.watch import watch
from effc.passes.smoothquant import divide_input
from effc.runtime.compare import unpadded

aten = torch.ops.aten


@dataclass(frozen=True)
class Int4Config(PassConfig):
    method: Literal["rtn", "gptq", "awq"] = "rtn"
    block: int = 32  # weights per scale along K: 32, 64 or 128 (MatMulNBits takes powers of two >= 16)
    symmetric: bool = True  # False: a 4-bit zero point per block as well
    # symmetric: each block's scale searched for the least squared weight error (effc.formats.nbits);
    # false: absmax / 7
    scale_search: bool = True
    act_order: bool = False  # gptq: visit columns by decreasing Hessian diagonal
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to it
    # Quantize activations to int8 per block at run time too (ONNX Runtime's MatMulNBits accuracy_level 4):
    # 2-4x faster decode here, at a small extra error the report shows.
    int8_activations: bool = False
    exclude: tuple[str, ...] = ()
    lm_head: bool = False
    # An embedding tied to a quantized layer (the LM head) looks its rows up in that layer's 4-bit table
    # instead of keeping a float copy: one table for both, as onnxruntime-genai does (not with awq, whose
    # scaled table is not the embedding's; --target trt implies false: no 4-bit gather there)
    tied_embedding: bool = True

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise EffcError(f"int4.block={self.block} is not a power of two >= 16 (32, 64, 128: what ONNX "
                            "Runtime's MatMulNBits takes); K that is not a multiple of it is padded with zeros")
        if self.act_order and self.method != "gptq":
            raise EffcError("int4.act_order is for int4.method=gptq")


class Int4(Pass[Int4Config]):
    name = "int4"
    level = Level.FX
    config_class = Int4Config
    summary = "uniform 4-bit block-wise linear weights: round-to-nearest, GPTQ or AWQ"
    expects = frozenset({Capability.MERGED_WEIGHTS})
    provides = frozenset({Capability.QUANTIZED_WEIGHTS})
    exact = False

    def needs(self) -> set[Need]:
        return {Need.CALIBRATION_DATA} if self.config.method in ("gptq", "awq") else set()

    def run(self, ep, ctx: PassContext) -> PassResult:
        c = self.config
        stats = _input_stats(ep, ctx.data, hessians=c.method == "gptq") if c.method != "rtn" else None
        edit = GraphEdit(ep, self.name)
        scan = LayerScan(self.name, c.exclude + (() if c.lm_head else ("lm_head", "*.lm_head")))
        chosen = {n: (module_name(n), edit.weight(n.args[1]).detach()) for n in edit.select(scan.rule())}
        counts = {"linear layers quantized": 0, "linear layers excluded": len(edit.refused.get(scan.excluded, []))}
        if c.method == "awq":
            with edit.made_by("awq_scales"):
                chosen, counts["AWQ scales folded into norms"] = self._awq(edit, chosen, stats)
        bits = params = 0.0
        tables: dict[torch.fx.Node, tuple] = {}  # weight placeholder -> (packed, scales, zero points, K)

        def quantize(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
            nonlocal bits, params
            name, w = chosen[node]
            if c.method == "gptq":
                codes, scales, zeros = gptq(w, stats.hessians[name], c.block, c.symmetric, c.damp, c.act_order,
                                             search=c.scale_search)
            else:
                codes, scales, zeros = rtn(w, c.block, c.symmetric, c.scale_search)
            packed, zero_points = pack(codes, zeros, c.block, c.symmetric)
            args = [edit.add_parameter(f"{name}.weight_int4", packed),
                    edit.add_parameter(f"{name}.weight_scales", scales.contiguous()),
                    None if zero_points is None else edit.add_parameter(f"{name}.weight_zero_points", zero_points)]
            bits += storage_bits(*w.shape, c.block, c.symmetric) * w.numel()
            params += w.numel()
            tables[node.args[1]] = (*args, w.shape[1])
            return edit.call(torch.ops.effc.nbits_linear.default,
                             (node.args[0], *args, bias(node), w.shape[1], c.block, 4, c.int8_activations))

        counts["linear layers quantized"] = apply_rules(edit, [Rule(f"linear_{c.method}", is_linear, quantize)], chosen)
        if c.tied_embedding and c.method != "awq":
            counts["embeddings sharing a quantized table"] = apply_rules(edit, [Rule(
                "tied_embedding", lambda n: n.target is aten.embedding.default and n.args[0] in tables,
                lambda edit, n: edit.call(torch.ops.effc.nbits_embedding.default,
                                          (n.args[1], *tables[n.args[0]], c.block), n))])
        if params:
            counts["int4 bits per quantized weight (codes + scales)"] = round(bits / params, 4)
        notes = scan.notes(c.exclude)
        if c.method == "gptq":
            # Fewer calibration rows than input features: the Hessian is singular and GPTQ fits its
            # error feedback to the calibration subspace (held-out error can end up above RTN's).
            short = [f"{name} ({stats.count.get(name, 0)} rows < {w.shape[1]})" for name, w in chosen.values()
                     if stats.count.get(name, 0) < w.shape[1]]
            if short:
                notes.append(f"int4.method=gptq: {len(short)} layers saw fewer calibration tokens than their input "
                             f"features, e.g. {short[0]}; give more --calib-data / --calib-samples")
        return edit.finish(counts, notes)

    def _awq(self, edit: GraphEdit, chosen, stats) -> tuple[dict, int]:
        """Scale each group of layers reading one input (q/k/v, gate/up) by the searched s; returns the
        layers with their weights times s, and how many groups' 1/s went into a norm."""
        groups: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        for node in chosen:
            groups.setdefault(node.args[0], []).append(node)
        folded = 0
        out = dict(chosen)
        for x, linears in groups.items():
            name = chosen[linears[0]][0]
            s = awq_scales(stats.rows[name], stats.absmean[name], [chosen[n][1] for n in linears],
                           self.config.block, self.config.symmetric, self.config.scale_search)
            folded += divide_input(edit.gm, edit.signature, edit.state_dict, x, linears, s, f"{name}.awq")
            for n in linears:
                out[n] = (chosen[n][0], (chosen[n][1].double() * s).float())
        edit.count("awq_scales", len(groups))
        return out, folded

AWQ_GRID = 20


def awq_scales(rows: torch.Tensor, absmean: torch.Tensor, weights: list[torch.Tensor], block: int,
               symmetric: bool, search: bool = True) -> torch.Tensor:
    """AWQ's search: s = mean|X|^a (normalized around 1) for a in 0, 0.05 .. 1, keeping the s whose
    round-to-nearest W*s, used as Q(W*s)/s on X, gives the smallest output MSE on the calibration rows."""
    w = torch.cat(weights).double()
    x = rows.double()
    ref = x @ w.t()
    best, best_s = float("inf"), torch.ones(w.shape[1], dtype=torch.float64)
    for i in range(AWQ_GRID + 1):
        s = absmean.double().clamp(min=1e-4).pow(i / AWQ_GRID)
        s = s / (s.max() * s.min()).sqrt()
        codes, scales, zeros = rtn((w * s).float(), block, symmetric, search)
        packed, zero_points = pack(codes, zeros, block, symmetric)
        q = dequantize(packed, scales, zero_points, w.shape[1], block).double() / s
        err = float(((x @ q.t() - ref) ** 2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


ROW_SAMPLE = 512  # calibration rows kept per layer for AWQ's search


class _InputStats:
    """For every linear layer's (unpadded) input rows of the float graph: the sum of 2 x x^T (GPTQ's
    Hessian), or mean |x| per channel and a sample of rows (AWQ)."""

    def __init__(self, hessians: bool):
        self.want_hessians = hessians
        self.hessians: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self.absmean: dict[str, torch.Tensor] = {}
        self.rows: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None  # the batch's attention_mask

    def add(self, node: torch.fx.Node, x: torch.Tensor) -> None:
        x = unpadded(x.detach().double(), self.mask)
        x = x.reshape(-1, x.shape[-1])
        name = module_name(node)
        seen = self.count.get(name, 0)
        self.count[name] = seen + x.shape[0]
        if self.want_hessians:
            self.hessians[name] = self.hessians.get(name, 0) + 2 * x.t() @ x
        else:
            total = self.absmean.get(name, 0) * seen + x.abs().sum(0)
            self.absmean[name] = total / self.count[name]
            kept = self.rows.get(name, x[:0])
            self.rows[name] = torch.cat([kept, x[: max(0, ROW_SAMPLE - kept.shape[0])]])


def _input_stats(ep, data, hessians: bool) -> _InputStats:
    if not data:
        raise EffcError("int4.method=gptq/awq needs calibration samples: give --calib-data DATA")
    module = ep.module()
    linears = {n.name for n in module.graph.nodes if n.target is aten.linear.default}
    stats = _InputStats(hessians)
    for feeds in data:
        stats.mask = feeds.get("attention_mask")
        watch(module, feeds, linears, stats.add, what="input")
    stats.hessians = {name: h / max(stats.count[name], 1) for name, h in stats.hessians.items()}
    return stats
