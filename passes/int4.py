"""int4: uniform 4-bit block-wise linear weights (effc.int4), by round-to-nearest or GPTQ.

`int4.method=gptq` needs calibration samples (--calib-data): each layer's Hessian H = 2 X^T X is summed
over the inputs that reach it in the float model (padding positions left out), then GPTQ quantizes
the columns with error feedback. The LM head stays in float unless int4.lm_head=true.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effc.errors import EffcError
from effc.int4 import gptq, pack, rtn, storage_bits
from effc.passes.base import Level, Need, Pass, PassConfig, PassContext, PassResult
from effc.passes.layers import replace, select, unmatched_notes, weights_by_node
from effc.passes.program import add_parameter, call, drop_unused_weights, edit, module_name, rebuild

aten = torch.ops.aten


@dataclass(frozen=True)
class Int4Config(PassConfig):
    method: Literal["rtn", "gptq"] = "rtn"
    block: int = 32  # weights per scale along K: 32, 64 or 128 (MatMulNBits takes powers of two >= 16)
    symmetric: bool = True  # False: a 4-bit zero point per block as well
    act_order: bool = False  # gptq: visit columns by decreasing Hessian diagonal
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to it
    # Quantize activations to int8 per block at run time too (ONNX Runtime's MatMulNBits accuracy_level 4):
    # 2-4x faster decode here, at a small extra error the report shows.
    int8_activations: bool = False
    exclude: tuple[str, ...] = ()
    lm_head: bool = False

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
    summary = "uniform 4-bit block-wise linear weights: round-to-nearest or GPTQ"
    after = ("merge_lora",)
    exact = False

    def needs(self) -> set[Need]:
        return {Need.CALIBRATION_DATA} if self.config.method == "gptq" else set()

    def run(self, ep, ctx: PassContext) -> PassResult:
        c = self.config
        hessians = _hessians(ep, ctx.data) if c.method == "gptq" else {}
        gm, signature, state_dict, constants = edit(ep)
        weights = weights_by_node(signature, state_dict)
        exclude = c.exclude + (() if c.lm_head else ("lm_head", "*.lm_head"))
        matched: set[str] = set()
        counts = {"linear layers quantized": 0, "linear layers excluded": 0}
        bits = params = 0.0
        for node in list(gm.graph.nodes):
            if node.target is not aten.linear.default:
                continue
            w, name = select(weights, node.args[1], node, exclude, matched)
            if w is None:
                counts["linear layers excluded"] += name is not None
                continue
            if c.method == "gptq":
                codes, scales, zeros = gptq(w, hessians[name], c.block, c.symmetric, c.damp, c.act_order)
            else:
                codes, scales, zeros = rtn(w, c.block, c.symmetric)
            packed, zero_points = pack(codes, zeros, c.block, c.symmetric)
            args = [add_parameter(gm, signature, state_dict, f"{name}.weight_int4", packed),
                    add_parameter(gm, signature, state_dict, f"{name}.weight_scales", scales.contiguous()),
                    None if zero_points is None else add_parameter(gm, signature, state_dict,
                                                                   f"{name}.weight_zero_points", zero_points)]
            bias = node.args[2] if len(node.args) > 2 else None
            with gm.graph.inserting_before(node):
                new = call(gm.graph, torch.ops.effc.int4_linear.default, (node.args[0], *args, bias, w.shape[1], c.block,
                                                                       c.int8_activations))
            replace(gm, node, new)
            counts["linear layers quantized"] += 1
            bits += storage_bits(*w.shape, c.block, c.symmetric) * w.numel()
            params += w.numel()
        if params:
            counts["int4 bits per quantized weight (codes + scales)"] = round(bits / params, 4)
        notes = unmatched_notes("int4", c.exclude, matched)
        counts["float weights dropped"] = drop_unused_weights(gm, signature, state_dict, constants)
        changed = counts["linear layers quantized"] > 0
        return PassResult(rebuild(ep, gm, signature, state_dict, constants) if changed else ep, changed, counts, notes)


class _HessianCollector(torch.fx.Interpreter):
    """Runs the float graph and sums 2 x x^T over the (unpadded) input rows of every linear layer."""

    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def run_node(self, n: torch.fx.Node):
        if n.op == "call_function" and n.target is aten.linear.default:
            x = self.env[n.args[0]].detach().double()
            if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
                x = x[self.mask != 0]
            x = x.reshape(-1, x.shape[-1])
            name = module_name(n)
            self.sums[name] = self.sums.get(name, 0) + 2 * x.t() @ x
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]
        return super().run_node(n)


def _hessians(ep, data) -> dict[str, torch.Tensor]:
    if not data:
        raise EffcError("int4.method=gptq needs calibration samples: give --calib-data DATA")
    module = ep.module()
    collector = _HessianCollector(module)
    order = [n.target for n in module.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        for feeds in data:
            collector.mask = feeds.get("attention_mask")
            collector.run(*[feeds[k] for k in order])
    return {name: total / max(collector.rows[name], 1) for name, total in collector.sums.items()}
