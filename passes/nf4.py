"""nf4: QLoRA's 4-bit NormalFloat weights for linear layers (effc.formats.nf4: bitsandbytes' codes, packing and
double quantization, bit for bit). Each chosen linear becomes effc::nf4_linear, which dequantizes to
float32 for the matmul. Embeddings and the LM head stay in float unless asked (QLoRA's recipe: the
output projection is the most sensitive layer and, with tied embeddings, shares the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effc.errors import EffcError
import effc.ops  # noqa: F401  (registers torch.ops.effc.*)
from effc.formats.nf4 import quantize_nf4, storage_bits_per_param, to_int8_blocks
from effc.passes.base import Capability, Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.layers import LayerScan, bias, is_linear
from effc.passes.program import add_parameter, call, module_name
from effc.passes.rewrite import GraphEdit, Rule, apply_rules

aten = torch.ops.aten


@dataclass(frozen=True)
class Nf4Config(PassConfig):
    block: int = 64  # elements per absmax block (bitsandbytes: 64 for QLoRA)
    double_quant: bool = True  # 8-bit codes for the block absmax (block 256): 0.127 instead of 0.5 bits/param
    exclude: tuple[str, ...] = ()  # globs of module names kept in float
    lm_head: bool = False  # quantize the output projection (lm_head) too
    # exact: NF4 as stored (ONNX Runtime's MatMulBnb4 on ort: exact, slower than fp32 on CPU).
    # int8_blocks: each NF4 block re-expressed as 8-bit codes round(127 * nf4) with scale absmax / 127, run
    # by MatMulNBits with int8 activations (its fast path); the weights then differ from NF4 by a little
    # (reported) and activations are rounded per block, at 8.5 bits per weight.
    kernel: Literal["exact", "int8_blocks"] = "exact"
    # QLoRA's bnb_4bit_compute_dtype: activations are cast to it, the weight is dequantized to it and the
    # matmul runs in it; the output is cast back. bfloat16/float16 run on --target torch.
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    def __post_init__(self):
        if self.block < 16 or self.block & (self.block - 1):
            raise EffcError(f"nf4.block={self.block} is not a power of two >= 16 (bitsandbytes and ONNX Runtime's "
                            "MatMulBnb4 use 64, 128, 256...)")
        if self.kernel == "int8_blocks" and self.compute_dtype != "float32":
            raise EffcError("nf4.kernel=int8_blocks computes with int8 activations; nf4.compute_dtype applies to "
                            "kernel=exact")


class Nf4(Pass[Nf4Config]):
    name = "nf4"
    level = Level.FX
    config_class = Nf4Config
    summary = "NF4 (QLoRA) 4-bit linear weights with double quantization, bitsandbytes-exact"
    expects = frozenset({Capability.MERGED_WEIGHTS})
    provides = frozenset({Capability.QUANTIZED_WEIGHTS})
    exact = False

    def run(self, ep, ctx: PassContext) -> PassResult:
        edit = GraphEdit(ep, self.name)
        scan = LayerScan(self.name, self.config.exclude + (() if self.config.lm_head else ("lm_head", "*.lm_head")))
        chosen = edit.select(scan.rule())
        block = self.config.block
        stored_bits = params = 0
        drift: list[float] = []
        exact_fallback: list[str] = []

        def quantize(edit: GraphEdit, node: torch.fx.Node) -> tuple[torch.Tensor, dict]:
            nonlocal params
            w = edit.weight(node.args[1])
            params += w.numel()
            return w, quantize_nf4(w.detach(), block, self.config.double_quant)

        def fits_blocks(edit: GraphEdit, node: torch.fx.Node) -> str | None:
            # NF4 blocks that straddle rows cannot be held by MatMulNBits
            return None if edit.weight(node.args[1]).shape[1] % block == 0 else "in_features not divisible by nf4.block"

        def int8_blocks(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
            nonlocal stored_bits
            w, state = quantize(edit, node)
            new, diff = self._int8_blocks(edit.gm, edit.signature, edit.state_dict, node, module_name(node), state,
                                          bias(node))
            drift.append(diff)
            stored_bits += (8 + 32 / block) * w.numel()  # 8-bit codes + a float scale per block
            return new

        def exact(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
            nonlocal stored_bits
            w, state = quantize(edit, node)
            stored_bits += storage_bits_per_param(state) * w.numel()
            if self.config.kernel == "int8_blocks":
                exact_fallback.append(module_name(node))
            return self._exact(edit, node, module_name(node), state, bias(node))

        rules = [Rule("linear", is_linear, exact)]
        if self.config.kernel == "int8_blocks":
            rules.insert(0, Rule("linear_int8_blocks", is_linear, int8_blocks, fits_blocks))
        counts = {"linear layers quantized": apply_rules(edit, rules, chosen),
                  "linear layers excluded": len(edit.refused.get(scan.excluded, []))}
        if params:
            counts["bits per quantized weight (codes + scales)"] = round(stored_bits / params, 4)
        notes = scan.notes(self.config.exclude)
        if exact_fallback:
            notes.append(f"nf4.kernel=int8_blocks: {len(exact_fallback)} layers with in_features not divisible by "
                         f"nf4.block kept the exact kernel ({', '.join(exact_fallback[:3])}"
                         f"{'…' if len(exact_fallback) > 3 else ''})")
        if drift:
            notes.append(f"nf4.kernel=int8_blocks: weights differ from NF4 by {100 * max(drift):.2f}% relative RMS "
                         f"at most (mean {100 * sum(drift) / len(drift):.2f}%)")
        return edit.finish(counts, notes)

    def _exact(self, edit: GraphEdit, node, name, state, bias) -> torch.fx.Node:
        """effc::nf4_linear over the stored NF4 codes and (double-quantized) block absmax."""
        tensors = [edit.add_parameter(f"{name}.weight_nf4", state["packed"])]
        if self.config.double_quant:
            tensors += [edit.add_parameter(f"{name}.absmax_codes", state["absmax_codes"]),
                        edit.add_parameter(f"{name}.absmax2", state["absmax2"]),
                        edit.add_parameter(f"{name}.absmax_offset", state["offset"].reshape(1))]
        else:
            tensors += [edit.add_parameter(f"{name}.absmax", state["absmax"]), None, None]
        n, k = state["shape"]
        x = node.args[0]
        compute = getattr(torch, self.config.compute_dtype)
        if compute == x.meta["val"].dtype:
            return edit.call(torch.ops.effc.nf4_linear.default, (x, *tensors, bias, n, k, self.config.block,
                                                                 state["dq_block"]))
        x_c = edit.call(aten.to.dtype, (x, compute))
        bias_c = None if bias is None else edit.call(aten.to.dtype, (bias, compute))
        y = edit.call(torch.ops.effc.nf4_linear.default,
                      (x_c, *tensors, bias_c, n, k, self.config.block, state["dq_block"]))
        return edit.call(aten.to.dtype, (y, x.meta["val"].dtype))

    def _int8_blocks(self, gm, signature, state_dict, node, name, state, bias) -> tuple[torch.fx.Node, float]:
        """NF4 re-expressed for MatMulNBits 8-bit: code round(127 * nf4[c]) + 128, scale absmax / 127 per
        block along K. Returns the new node and the relative RMS difference from the NF4 weight."""
        n, k = state["shape"]
        block = self.config.block
        q8, scales, diff = to_int8_blocks(state)
        args = [add_parameter(gm, signature, state_dict, f"{name}.weight_int8_blocks", q8.contiguous()),
                add_parameter(gm, signature, state_dict, f"{name}.weight_scales", scales.contiguous()), None]
        with gm.graph.inserting_before(node):
            # int8 activations too: MatMulNBits' 8-bit kernel with float activations ran 7.5x slower than
            # fp32 on a Llama decode step here; with int8 activations it is the fast path (docs/ONNXRUNTIME.md).
            new = call(gm.graph, torch.ops.effc.nbits_linear.default, (node.args[0], *args, bias, k, block, 8, True))
        return new, diff
