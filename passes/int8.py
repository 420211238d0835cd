"""int8: quantize linear layers to int8 weights per output channel. Activations: `dynamic` mode quantizes
them at run time; `static` mode (W8A8) uses ranges calibrated beforehand (`effc calibrate`, then
`--calib FILE`, or `--calib-data DATA` inline), symmetric int8 with zero point 0.

annotate (which linears, by module-name globs) then convert (each chosen linear becomes the custom op
effc::int8_linear_dynamic, whose reference implementation is what ONNX Runtime's DynamicQuantizeMatMul
computes). Weights are symmetric absmax int8 per output channel (per-tensor weights cost MiniLM
0.954 -> 0.994 embedding cosine in REFERENCE.md's measurements). Only linear layers' inputs are
quantized: attention masks, softmax and additive biases stay in float.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal

import torch

from effc.ops import quantize_rows, quantize_weight_per_channel
from effc.passes.base import Level, Need, Pass, PassConfig, PassContext, PassResult
from effc.passes.program import add_parameter, call, drop_unused_weights, edit, module_name, rebuild

aten = torch.ops.aten


@dataclass(frozen=True)
class Int8Config(PassConfig):
    mode: Literal["dynamic", "static"] = "dynamic"  # static: calibrated activation scales (--calib / --calib-data)
    exclude: tuple[str, ...] = ()  # globs of module names kept in float, e.g. lm_head,*.down_proj
    embeddings: bool = True  # int8 embedding tables too (one scale per row); they are most of a small model
    outlier_threshold: float | None = None  # LLM.int8(): input features whose calibrated |x| exceeds this stay float


class Int8(Pass[Int8Config]):
    name = "int8"
    level = Level.FX
    config_class = Int8Config
    summary = "int8 linear layers: per-channel weights, activations quantized at run time"
    after = ("merge_lora",)
    exact = False

    def needs(self) -> set[Need]:
        calibrated = self.config.mode == "static" or self.config.outlier_threshold is not None
        return {Need.CALIBRATION} if calibrated else set()

    def run(self, ep, ctx: PassContext) -> PassResult:
        gm, signature, state_dict, constants = edit(ep)
        ranges = ctx.calibration["tensors"] if ctx.calibration else {}
        uncalibrated = []
        weights = {s.arg.name: state_dict.get(s.target) for s in signature.input_specs if hasattr(s.arg, "name")}
        counts = {"linear layers quantized": 0, "linear layers excluded": 0, "embeddings quantized": 0}
        matched: set[str] = set()
        for node in list(gm.graph.nodes):
            if node.target is aten.embedding.default and self.config.embeddings:
                self._embedding(gm, signature, state_dict, weights, node, counts, matched)
                continue
            if node.target is not aten.linear.default:
                continue
            w, name = self._select(weights, node.args[1], node, matched)
            if w is None:
                counts["linear layers excluded"] += name is not None
                continue
            bias = node.args[2] if len(node.args) > 2 else None
            if self.needs() and name not in ranges:
                uncalibrated.append(name)
                continue
            x = node.args[0]
            outliers = self._outliers(ranges.get(name))
            with gm.graph.inserting_before(node):
                if outliers is None:
                    new = self._int8(gm, signature, state_dict, name, x, w, bias, ranges.get(name))
                else:
                    new = self._decompose(gm, signature, state_dict, name, node, x, w, bias, ranges[name], outliers)
                    counts["outlier features kept in float"] = counts.get("outlier features kept in float", 0) + len(outliers)
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            counts["linear layers quantized"] += 1
        counts = {k: v for k, v in counts.items() if v or k == "linear layers quantized"}
        notes = [f"int8.exclude pattern {p!r} matched no linear layer" for p in self.config.exclude if p not in matched]
        if uncalibrated:
            counts["linear layers without calibration (kept in float)"] = len(uncalibrated)
            notes.append(f"no calibration range for {', '.join(uncalibrated[:5])}{'…' if len(uncalibrated) > 5 else ''}: kept in float")
        counts["float weights dropped"] = drop_unused_weights(gm, signature, state_dict, constants)
        changed = counts["linear layers quantized"] + counts.get("embeddings quantized", 0) > 0
        return PassResult(rebuild(ep, gm, signature, state_dict, constants) if changed else ep, changed, counts, notes)

    def _outliers(self, stats: dict | None) -> torch.Tensor | None:
        """Input features whose calibrated |x| exceeds outlier_threshold (LLM.int8()), or None."""
        if self.config.outlier_threshold is None or stats is None:
            return None
        cols = torch.nonzero(torch.tensor(stats["channel_absmax"]) > self.config.outlier_threshold).flatten()
        return cols if 0 < cols.numel() < len(stats["channel_absmax"]) else None

    def _int8(self, gm, signature, state_dict, name, x, w, bias, stats, amax: float | None = None) -> torch.fx.Node:
        """One int8 linear (static with the calibrated scale, else dynamic) replacing linear(x, w, bias)."""
        q, scale = quantize_weight_per_channel(w)
        q_node = add_parameter(gm, signature, state_dict, f"{name}.weight_int8", q)
        s_node = add_parameter(gm, signature, state_dict, f"{name}.weight_scale", scale)
        if self.config.mode == "static":
            amax = stats["amax"] if amax is None else amax
            x_scale = torch.tensor(max(amax / 127, 1e-12), dtype=torch.float32)
            x_node = add_parameter(gm, signature, state_dict, f"{name}.input_scale", x_scale)
            return call(gm.graph, torch.ops.effc.int8_linear_static.default, (x, x_node, q_node, s_node, bias))
        return call(gm.graph, torch.ops.effc.int8_linear_dynamic.default, (x, q_node, s_node, bias))

    def _decompose(self, gm, signature, state_dict, name, node, x, w, bias, stats, outliers) -> torch.fx.Node:
        """LLM.int8() mixed precision: y = x[:, O] @ W[:, O]^T in float + int8 part over the other features.

        The int8 part keeps x whole and zeroes W's outlier columns, so no copy of x is gathered: static
        mode quantizes x with the inliers' range (outliers saturate against zero weights); dynamic mode
        multiplies x by a 0/1 mask first so the run-time range leaves the outliers out."""
        w = w.detach()
        inlier = torch.ones(w.shape[1], dtype=torch.bool)
        inlier[outliers] = False
        w_in = w * inlier.to(w.dtype)
        amax = min(stats["amax"], max(v for v, keep in zip(stats["channel_absmax"], inlier.tolist()) if keep))
        x_in = x
        if self.config.mode == "dynamic":
            mask = add_parameter(gm, signature, state_dict, f"{name}.inlier_mask", inlier.to(w.dtype))
            x_in = call(gm.graph, aten.mul.Tensor, (x, mask), node)
        y_in = self._int8(gm, signature, state_dict, name, x_in, w_in, bias, stats, amax)
        out_idx = add_parameter(gm, signature, state_dict, f"{name}.outlier_index", outliers.to(torch.int64))
        w_out = add_parameter(gm, signature, state_dict, f"{name}.outlier_weight", w[:, outliers].contiguous())
        x_out = call(gm.graph, aten.index_select.default, (x, -1, out_idx), node)
        y_out = call(gm.graph, aten.linear.default, (x_out, w_out), node)
        return call(gm.graph, aten.add.Tensor, (y_in, y_out), node)

    def _select(self, weights, weight_arg, node, matched: set[str]) -> tuple[torch.Tensor | None, str | None]:
        """The annotate step: (weight, module name) of a layer to quantize; (None, name) when int8.exclude
        keeps it in float; (None, None) when its weight is not a 2-D float parameter."""
        w = weights.get(getattr(weight_arg, "name", None))
        if w is None or w.dim() != 2 or not w.is_floating_point():
            return None, None
        name = module_name(node)
        hits = [p for p in self.config.exclude if fnmatch.fnmatchcase(name, p)]
        matched.update(hits)
        return (None, name) if hits else (w, name)

    def _embedding(self, gm, signature, state_dict, weights, node, counts, matched) -> None:
        w, name = self._select(weights, node.args[0], node, matched)
        if w is None:
            return
        q, scale = quantize_rows(w)
        q_node = add_parameter(gm, signature, state_dict, f"{name}.weight_int8", q)
        s_node = add_parameter(gm, signature, state_dict, f"{name}.weight_scale", scale)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.effc.int8_embedding.default, (node.args[1], q_node, s_node))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        counts["embeddings quantized"] += 1
