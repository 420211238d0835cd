"""int8: quantize linear layers to int8 weights per output channel. Activations: `dynamic` mode quantizes
them at run time (per tensor, ONNX Runtime's fused kernel, or per token); `static` mode (W8A8) uses
ranges calibrated beforehand (`effc calibrate`, then `--calib FILE`, or `--calib-data DATA` inline),
symmetric int8 with zero point 0; `weight_only` keeps activations in float.

annotate (which linears, by module-name globs) then convert (each chosen linear becomes the custom op
effc::int8_linear_dynamic, whose reference implementation is what ONNX Runtime's DynamicQuantizeMatMul
computes). Weights are symmetric absmax int8 per output channel (per-tensor weights cost MiniLM
0.954 -> 0.994 embedding cosine, docs/ONNXRUNTIME.md). Only linear layers' inputs are
quantized: attention masks, softmax and additive biases stay in float.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from effc.errors import EffcError
import effc.ops  # noqa: F401  (registers torch.ops.effc.*)
from effc.formats.int8 import quantize_rows, quantize_weight_per_channel
from effc.passes.base import Capability, Level, Need, Pass, PassConfig, PassContext, PassResult
from effc.passes.layers import LayerScan, bias, is_linear
from effc.passes.program import module_name
from effc.passes.rewrite import GraphEdit, Rule, apply_rules
from effc.passes.smoothquant import smooth
from effc.runtime.compare import position_cosine

aten = torch.ops.aten


@dataclass(frozen=True)
class Int8Config(PassConfig):
    mode: Literal["dynamic", "static", "weight_only"] = "dynamic"  # static: calibrated activation scales
    # dynamic mode's run-time activation scales: per_tensor runs ONNX Runtime's fused DynamicQuantizeMatMul;
    # per_token is more accurate on rows of different magnitude, at the cost of a few elementwise ops.
    activations: Literal["per_tensor", "per_token"] = "per_tensor"
    exclude: tuple[str, ...] = ()  # globs of module names kept in float, e.g. lm_head,*.down_proj
    embeddings: bool = True  # int8 embedding tables too (one scale per row); they are most of a small model
    outlier_threshold: float | None = None  # LLM.int8(): input features whose calibrated |x| exceeds this stay float
    # SmoothQuant migration strength in [0, 1] (the paper: 0.5 for OPT, up to 0.85 elsewhere), or "auto": the
    # alpha of 0.3..0.9 whose quantized outputs are closest to float on --calib-data.
    smoothquant_alpha: float | Literal["auto"] | None = None
    # Keep the layers that add the most error in float until every output's mean cosine similarity to
    # the float model (per position, padding left out) is >= 1 - auto_exclude. Measured on --calib-data.
    auto_exclude: float | None = None
    # How weight codes use the 8-bit range (effc.formats.int8.WEIGHT_RANGES): pairs (default) is exact on every x86
    # CPU; 7bit is ONNX Runtime's reduce_range; full needs a VNNI CPU, which the artifact then records.
    weight_range: Literal["pairs", "7bit", "full"] = "pairs"

    def __post_init__(self):
        problems = []
        if self.activations == "per_token" and self.mode != "dynamic":
            problems.append("int8.activations=per_token is for int8.mode=dynamic")
        if self.mode == "weight_only" and (self.outlier_threshold is not None or self.smoothquant_alpha is not None):
            problems.append("int8.mode=weight_only keeps activations in float: outlier_threshold and "
                            "smoothquant_alpha do not apply")
        if self.outlier_threshold is not None and self.smoothquant_alpha is not None:
            problems.append("give int8.outlier_threshold or int8.smoothquant_alpha, not both")
        if isinstance(self.smoothquant_alpha, float) and not 0 <= self.smoothquant_alpha <= 1:
            problems.append(f"int8.smoothquant_alpha={self.smoothquant_alpha} is outside [0, 1]")
        if self.auto_exclude is not None and not 0 < self.auto_exclude < 1:
            problems.append(f"int8.auto_exclude={self.auto_exclude} is not a cosine drop in (0, 1), e.g. 0.01")
        if self.weight_range != "pairs" and self.mode == "weight_only":
            problems.append("int8.weight_range is for int8 GEMMs; int8.mode=weight_only multiplies float activations")
        if problems:
            raise EffcError("; ".join(problems))


class Int8(Pass[Int8Config]):
    name = "int8"
    level = Level.FX
    config_class = Int8Config
    summary = "int8 linear layers: per-channel weights, activations quantized at run time"
    expects = frozenset({Capability.MERGED_WEIGHTS})
    provides = frozenset({Capability.QUANTIZED_WEIGHTS})
    exact = False

    def needs(self) -> set[Need]:
        c = self.config
        calibrated = c.mode == "static" or c.outlier_threshold is not None or c.smoothquant_alpha is not None
        return {Need.CALIBRATION} if calibrated else set()

    def requires(self) -> dict[str, list[str]]:
        if self.config.weight_range == "full" and self.config.mode != "weight_only":
            return {"cpu": ["vnni"]}
        return {}

    def reads_data(self) -> bool:
        # Both search on --calib-data when given (else on the example inputs).
        return self.config.auto_exclude is not None or self.config.smoothquant_alpha == "auto"

    def run(self, ep, ctx: PassContext) -> PassResult:
        score = _Scorer(ep, ctx)
        alpha, note = self.config.smoothquant_alpha, None
        if alpha == "auto":
            tried = {a: score(self._quantize(ep, ctx, self.config.exclude, a).ir) for a in AUTO_ALPHAS}
            alpha = max(tried, key=tried.get)
            note = (f"smoothquant_alpha=auto chose {alpha} on {score.where} (mean output cosine: "
                    + ", ".join(f"{a}: {c:.5f}" for a, c in tried.items()) + ")")
        if self.config.auto_exclude is None:
            result = self._quantize(ep, ctx, self.config.exclude, alpha)
        else:
            result = self._auto_exclude(ep, ctx, alpha, score)
        if note:
            result.notes.insert(0, note)
        return result

    def _quantize(self, ep, ctx: PassContext, exclude: tuple[str, ...], alpha: float | None) -> PassResult:
        edit = GraphEdit(ep, self.name)
        ranges = ctx.calibration["tensors"] if ctx.calibration else {}
        scan = LayerScan(self.name, exclude)
        embedded = 0
        if self.config.embeddings:
            tables = LayerScan(self.name, exclude, weight_index=0)
            tables.matched = scan.matched  # one set: a glob that matched a table matched something
            embedded = apply_rules(edit, [Rule("embedding", _is_embedding, self._embedding, tables.check)])

        def calibrated(edit: GraphEdit, node: torch.fx.Node) -> str | None:
            return scan.check(edit, node) or (NO_RANGE if self.needs() and module_name(node) not in ranges else None)

        chosen = edit.select(Rule("linear", is_linear, rewrite=None, check=calibrated))
        layers = {n: (module_name(n), edit.weight(n.args[1])) for n in chosen}
        counts = {"linear layers quantized": 0, "linear layers excluded": 0, "embeddings quantized": embedded}
        counts["linear layers excluded"] = sum(is_linear(n) for n in edit.refused.get(scan.excluded, []))
        if alpha is not None:
            with edit.made_by("smoothquant"):
                smoothed = smooth(edit.gm, edit.signature, edit.state_dict, layers, ranges, alpha)
            edit.count("smoothquant", smoothed.folded + smoothed.explicit)
            layers = {n: (name, smoothed.weights.get(n, w)) for n, (name, w) in layers.items()}
            ranges = {**ranges, **smoothed.stats}
            counts["SmoothQuant norms folded"] = smoothed.folded
            counts["SmoothQuant scales in the graph"] = smoothed.explicit
        outlier_features = 0

        def outliers(edit: GraphEdit, node: torch.fx.Node) -> str | None:
            return None if self._outliers(ranges.get(layers[node][0])) is not None else "no outlier features"

        def decompose(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
            nonlocal outlier_features
            name, w = layers[node]
            cols = self._outliers(ranges[name])
            outlier_features += len(cols)
            return self._decompose(edit, name, node, node.args[0], w, bias(node), ranges[name], cols)

        def int8(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
            name, w = layers[node]
            return self._int8(edit, name, node.args[0], w, bias(node), ranges.get(name))

        kind = self.config.mode if self.config.mode != "dynamic" else self.config.activations.replace("per_tensor", "dynamic")
        counts["linear layers quantized"] = apply_rules(edit, [Rule("linear_outliers", is_linear, decompose, outliers),
                                                               Rule(f"linear_{kind}", is_linear, int8)], chosen)
        counts["outlier features kept in float"] = outlier_features
        counts = {k: v for k, v in counts.items() if v or k == "linear layers quantized"}
        notes = scan.notes(exclude)
        uncalibrated = [module_name(n) for n in edit.refused.get(NO_RANGE, [])]
        if uncalibrated:
            counts["linear layers without calibration (kept in float)"] = len(uncalibrated)
            notes.append(f"no calibration range for {', '.join(uncalibrated[:5])}{'…' if len(uncalibrated) > 5 else ''}: kept in float")
        return edit.finish(counts, notes, changed=counts["linear layers quantized"] + embedded > 0)

    def _auto_exclude(self, ep, ctx: PassContext, alpha: float | None, score: _Scorer) -> PassResult:
        """Quantize everything, rank the layers by the error each adds (effc.layerwise), then keep the
        fewest worst-ranked layers in float that bring every output within the cosine budget (bisection
        over how many: the drop shrinks as more layers stay float)."""
        from effc.layerwise import LayerComparison, graph_taps, probes, tap_names

        full = self._quantize(ep, ctx, self.config.exclude, alpha)
        float_module, module = ep.module(), full.ir.module()
        float_probes, quant_probes = probes(float_module), probes(module)
        comparison = LayerComparison(float_probes, quant_probes)
        for feeds in score.data:
            mask = feeds.get("attention_mask")
            comparison.add(graph_taps(float_module, tap_names(float_probes), feeds),
                           graph_taps(module, tap_names(quant_probes), feeds), None if mask is None else mask.numpy())
        ranked = [r.name for r in comparison.report().ranked()]
        budget = 1 - self.config.auto_exclude

        def attempt(k: int) -> tuple[float, PassResult]:
            result = full if k == 0 else self._quantize(ep, ctx, self.config.exclude + tuple(ranked[:k]), alpha)
            return score(result.ir), result

        cos, result = attempt(0)
        chosen, lo, hi = 0, 0, len(ranked)  # attempt(lo) misses the budget; keeping all float meets it
        if cos < budget:
            best = None
            while hi - lo > 1:
                mid = (lo + hi) // 2
                c, r = attempt(mid)
                if c >= budget:
                    hi, best = mid, (c, r)
                else:
                    lo = mid
            chosen = hi
            cos, result = best if best is not None else attempt(hi)
        result.counts["layers kept in float by auto_exclude"] = chosen
        result.notes.append(f"auto_exclude: mean output cosine {cos:.5f} (budget >= {budget:.5f}) on {score.where}"
                            + (f"; kept in float: {', '.join(ranked[:chosen])}" if chosen else ""))
        return result

    def _outliers(self, stats: dict | None) -> torch.Tensor | None:
        """Input features whose calibrated |x| exceeds outlier_threshold (LLM.int8()), or None."""
        if self.config.outlier_threshold is None or stats is None:
            return None
        cols = torch.nonzero(torch.tensor(stats["channel_absmax"]) > self.config.outlier_threshold).flatten()
        return cols if 0 < cols.numel() < len(stats["channel_absmax"]) else None

    def _int8(self, edit: GraphEdit, name, x, w, bias, stats, amax: float | None = None) -> torch.fx.Node:
        """One int8 linear (of the configured mode) replacing linear(x, w, bias)."""
        # weight_only runs no int8 GEMM (float activations): nothing to protect, keep the full range.
        weight_range = "full" if self.config.mode == "weight_only" else self.config.weight_range
        q, scale = quantize_weight_per_channel(w, weight_range)
        q_node = edit.add_parameter(f"{name}.weight_int8", q)
        s_node = edit.add_parameter(f"{name}.weight_scale", scale)
        if self.config.mode == "static":
            amax = stats["amax"] if amax is None else amax
            x_scale = torch.tensor(max(amax / 127, 1e-12), dtype=torch.float32)
            x_node = edit.add_parameter(f"{name}.input_scale", x_scale)
            return edit.call(torch.ops.effc.int8_linear_static.default, (x, x_node, q_node, s_node, bias))
        op = {"weight_only": torch.ops.effc.int8_linear_weight_only, "per_token": torch.ops.effc.int8_linear_per_token}
        kind = self.config.mode if self.config.mode == "weight_only" else self.config.activations
        return edit.call(op.get(kind, torch.ops.effc.int8_linear_dynamic).default, (x, q_node, s_node, bias))

    def _decompose(self, edit: GraphEdit, name, node, x, w, bias, stats, outliers) -> torch.fx.Node:
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
            mask = edit.add_parameter(f"{name}.inlier_mask", inlier.to(w.dtype))
            x_in = edit.call(aten.mul.Tensor, (x, mask), node)
        y_in = self._int8(edit, name, x_in, w_in, bias, stats, amax)
        out_idx = edit.add_parameter(f"{name}.outlier_index", outliers.to(torch.int64))
        w_out = edit.add_parameter(f"{name}.outlier_weight", w[:, outliers].contiguous())
        x_out = edit.call(aten.index_select.default, (x, -1, out_idx), node)
        y_out = edit.call(aten.linear.default, (x_out, w_out), node)
        return edit.call(aten.add.Tensor, (y_in, y_out), node)

    def _embedding(self, edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
        q, scale = quantize_rows(edit.weight(node.args[0]))
        name = module_name(node)
        q_node = edit.add_parameter(f"{name}.weight_int8", q)
        s_node = edit.add_parameter(f"{name}.weight_scale", scale)
        return edit.graph.call_function(torch.ops.effc.int8_embedding.default, (node.args[1], q_node, s_node))


NO_RANGE = "no calibration range"


def _is_embedding(node: torch.fx.Node) -> bool:
    return node.target is aten.embedding.default

AUTO_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# Batches the scorer runs each candidate on: it runs many candidates (auto alpha, the exclusion search).
SCORE_BATCHES = 4


class _Scorer:
    """How close a quantized program's outputs are to the float program's: the lowest, over outputs and
    batches, of the mean per-position cosine. Measured on --calib-data batches, else the example inputs."""

    def __init__(self, ep, ctx: PassContext):
        self.data = (ctx.data or [ctx.example_inputs])[:SCORE_BATCHES]
        self.where = "--calib-data" if ctx.data else "the example inputs (random tokens; give --calib-data for real data)"
        self._references = None
        self._float = ep

    def __call__(self, program) -> float:
        if self._references is None:
            module = self._float.module()
            self._references = [_outputs(module, feeds) for feeds in self.data]
        module = program.module()
        return min(_mean_cosine(ref, _outputs(module, feeds), feeds.get("attention_mask"))
                   for ref, feeds in zip(self._references, self.data))


def _outputs(module: torch.fx.GraphModule, feeds: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = module(**feeds)
    return [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o.is_floating_point()]


def _mean_cosine(refs: list[torch.Tensor], gots: list[torch.Tensor], mask: torch.Tensor | None) -> float:
    """The lowest, over outputs, of the mean cosine per position (last dim), padding positions left out."""
    return min([1.0] + [position_cosine(ref, got, mask) for ref, got in zip(refs, gots)])
