"""fp16 / bf16: half-precision weights and compute, with the numerically sensitive ops kept in float32.

How each op computes (the policy, in the manner of torch.autocast's op lists):
- the heavy ops (linear, matmuls, convolutions, attention, embedding) compute in half;
- the kept classes (keep_fp32: norms, softmax, reductions) and every op of a keep_modules module compute in
  float32; so does the square before a kept reduction (RMSNorm's variance), which overflows fp16 first;
- effc's custom ops compute in the dtype their pass chose (float32: the ONNX targets lower them so);
- casts the model wrote to float32 are kept (HF's RMSNorm and rotary embeddings upcast on purpose, as
  they do in half-precision checkpoints), and factory ops keep their dtype;
- any other op computes in float32 when one of its float inputs is float32, else in half (torch's
  promotion), so a float32 value stays float32 until the next heavy op casts it down.
scaled_dot_product_attention runs in half: fused attention kernels (TensorRT's, FlashAttention) keep the
softmax's running max and sum in float32 inside; the unfused softmax is what keep_fp32=softmax keeps.

Weights follow their readers: a float32 weight becomes half unless an op computing in float32 reads it
(then it stays float32 and half readers read it through a cast), or, for fp16, it holds values beyond
fp16's range. TensorRT builds strongly typed, so these types decide its precision. The graph's inputs and
outputs keep their dtypes: float outputs are cast back, so the artifact's IO contract does not change.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass
from typing import ClassVar

import torch

from effc.errors import EffcError
from effc.passes.base import Capability, Level, Pass, PassConfig, PassContext, PassResult
from effc.passes.program import module_name
from effc.passes.rewrite import GraphEdit

aten = torch.ops.aten
F32 = torch.float32

# The op classes keep_fp32 may name.
KEEP_CLASSES: dict[str, frozenset] = {
    "norm": frozenset({aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
                       aten.group_norm.default, aten.native_group_norm.default, aten.batch_norm.default,
                       aten.instance_norm.default, aten._native_batch_norm_legit_no_training.default}),
    "softmax": frozenset({aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
                          aten._log_softmax.default, aten._safe_softmax.default}),
    "reduce": frozenset({aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.sum.default,
                         aten.var.correction, aten.var.dim, aten.var_mean.correction, aten.std.correction,
                         aten.std.dim, aten.std_mean.correction, aten.amax.default, aten.amin.default,
                         aten.prod.default, aten.prod.dim_int, aten.cumsum.default, aten.cumprod.default,
                         aten.logsumexp.default, aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}),
}
# Where half precision pays (autocast's lower_precision_fp list): always computed in half.
HEAVY = frozenset({aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
                   aten.baddbmm.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                   aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
                   aten.scaled_dot_product_attention.default, aten.embedding.default, aten.einsum.default})
# Ops that only move or view their input: a weight read through them is still "read by" their users.
VIEWS = frozenset({aten.view.default, aten.reshape.default, aten.unsqueeze.default, aten.squeeze.dim,
                   aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
                   aten.select.int, aten.transpose.int, aten.permute.default, aten.t.default, aten.alias.default,
                   aten.clone.default, aten.contiguous.default, aten.detach.default, aten.flatten.using_ints,
                   aten.lift_fresh_copy.default, operator.getitem})
ASSERTS = frozenset({aten._assert_tensor_metadata.default})
FP16_MAX = torch.finfo(torch.float16).max


CASTS = frozenset({aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default})


def _cast_target(node: torch.fx.Node) -> torch.dtype | None:
    """The dtype a cast node casts to, or None when it is not a cast or keeps the dtype (a device move)."""
    if node.target is aten.to.dtype:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    if node.target is aten.to.device:
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("dtype")
    if node.target in (aten.to.dtype_layout, aten._to_copy.default):
        return node.kwargs.get("dtype")
    return None


def _set_cast_target(node: torch.fx.Node, dtype: torch.dtype) -> None:
    if node.target is aten.to.dtype and len(node.args) > 1:
        node.update_arg(1, dtype)
    elif node.target is aten.to.device and len(node.args) > 2:
        node.update_arg(2, dtype)
    else:
        node.update_kwarg("dtype", dtype)


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _float_dtype(node) -> torch.dtype | None:
    v = _val(node)
    return v.dtype if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else None


@dataclass(frozen=True)
class HalfConfig(PassConfig):
    keep_fp32: tuple[str, ...] = ("norm", "softmax", "reduce")  # op classes computed in float32
    # Globs of module names computed entirely in float32, e.g. lm_head for float32 logits.
    keep_modules: tuple[str, ...] = ()

    def __post_init__(self):
        unknown = [c for c in self.keep_fp32 if c not in KEEP_CLASSES]
        if unknown:
            raise EffcError(f"keep_fp32 class {', '.join(map(repr, unknown))} is not one of {', '.join(KEEP_CLASSES)} "
                            "(give a comma-separated list, or nothing to convert them all)")


FLEX = "flex"  # a weight (or a view of one) whose dtype its readers decide


class _Half(Pass[HalfConfig]):
    """Both passes: the dtype is the class attribute."""

    dtype: ClassVar[torch.dtype]
    level = Level.FX
    config_class = HalfConfig
    expects = frozenset({Capability.MERGED_WEIGHTS, Capability.QUANTIZED_WEIGHTS})
    exact = False

    def unverifiable(self, target_column: str) -> str | None:
        """Why an artifact for this target column could not be verified on this machine, or None. ONNX
        Runtime's CPU provider has no bfloat16 kernels (MatMul, Add...), so an ONNX artifact in bf16 runs
        here only with the CUDA provider."""
        if self.dtype is not torch.bfloat16 or target_column not in ("onnx", "ort", "trt"):
            return None
        try:
            import onnxruntime
            if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                return None
        except ImportError:
            pass
        return (f"ONNX Runtime's CPU provider has no bfloat16 kernels, so a {self.name} artifact for --target "
                f"{target_column} cannot be verified on this machine; give --no-verify to build it for a GPU host "
                "(the report then says its accuracy was not measured), or use --passes fp16")

    def run(self, ep, ctx: PassContext) -> PassResult:
        edit = GraphEdit(ep, self.name)
        plan = _Plan(edit, self.dtype, self.config, frozenset(next(iter(ctx.weight_sets.values()), {})))
        counts = plan.apply()  # parameter bytes before and after: the pass instrument records them
        return edit.finish(counts, plan.notes, changed=counts["weights converted"] + plan.casts > 0, dropped=None)


class Fp16(_Half):
    name = "fp16"
    dtype = torch.float16
    summary = "float16 weights and compute; norms, softmax and reductions kept in float32"


class Bf16(_Half):
    name = "bf16"
    dtype = torch.bfloat16
    summary = "bfloat16 weights and compute; norms, softmax and reductions kept in float32"


class _Plan:
    """Decide what each op computes in (a forward walk; weights are FLEX until their readers are known),
    resolve the weights' dtypes, then rewrite: convert weights, insert casts, update each node's value."""

    def __init__(self, edit: GraphEdit, half: torch.dtype, config: HalfConfig, overridable: frozenset[str]):
        self.edit, self.half, self.config = edit, half, config
        self.gm = edit.gm
        self.kept_ops = {op: cls for cls in config.keep_fp32 for op in KEEP_CLASSES[cls]}
        self.overridable = overridable
        self.casts = 0
        self.made: dict[tuple[torch.fx.Node, torch.dtype, bool], torch.fx.Node] = {}
        self.notes: list[str] = []
        self.kept_by: dict[str, int] = {}
        self.matched_modules: set[str] = set()

    # -- policy ---------------------------------------------------------------------------------------
    def _kept_module(self, node: torch.fx.Node) -> bool:
        if not self.config.keep_modules or "nn_module_stack" not in node.meta:
            return False
        name = module_name(node)
        prefixes = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)]
        hits = {p for p in self.config.keep_modules for q in prefixes if fnmatch.fnmatchcase(q, p)}
        self.matched_modules |= hits
        return bool(hits)

    def _computes(self, node: torch.fx.Node, inputs: dict[torch.fx.Node, object]) -> tuple[object, str | None]:
        """(dtype the op computes in, or None to leave it as it is; why it is kept in float32, if it is)."""
        if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "effc":
            return None, None
        if self._kept_module(node):
            return F32, "keep_modules"
        if node.target in self.kept_ops:
            return F32, self.kept_ops[node.target]
        if node.target is aten.pow.Tensor_Scalar and node.users and all(u.target in self.kept_ops for u in node.users):
            return F32, self.kept_ops[next(iter(node.users)).target]
        if node.target in HEAVY:
            return self.half, None
        known = {d for d in inputs.values() if d is not FLEX}
        if known - {F32, self.half}:  # float64, or another pass's compute dtype: not this pass's business
            return None, None
        if (node.target in VIEWS or node.target in CASTS) and not known:
            return FLEX, None
        return (F32 if F32 in known else self.half), None

    # -- plan and rewrite -----------------------------------------------------------------------------
    def apply(self) -> dict[str, int]:
        graph = self.gm.graph
        weights = {s.arg.name: s for s in self.edit.signature.input_specs
                   if hasattr(s.arg, "name") and s.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR")}
        planned: dict[torch.fx.Node, object] = {}  # node -> its output's float dtype, FLEX, or None
        wants: dict[torch.fx.Node, dict[torch.fx.Node, torch.dtype]] = {}  # consumer -> float arg -> dtype
        demands: dict[torch.fx.Node, set] = {}  # FLEX node -> dtypes its readers want
        tuples: dict[torch.fx.Node, torch.dtype | None] = {}  # multi-output op -> its float outputs' dtype
        follows: set[torch.fx.Node] = set()  # casts that keep their input's dtype
        fp16_range = []
        for node in graph.nodes:
            dt = _float_dtype(node)
            if node.op == "placeholder":
                flex = dt is F32 and node.name in weights and weights[node.name].target not in self.overridable
                if flex and self.half is torch.float16 and self._beyond_fp16(weights[node.name].target):
                    fp16_range.append(weights[node.name].target)
                    flex = False
                planned[node] = FLEX if flex else dt
                continue
            if node.op != "call_function" or node.target in ASSERTS:
                continue
            inputs = {a: planned.get(a) for a in node.all_input_nodes if planned.get(a) is not None}
            if node.target is operator.getitem and node.args[0] in tuples:  # one output of a multi-output op
                planned[node] = tuples[node.args[0]] if dt is not None else None
                continue
            target = _cast_target(node)
            if target is not None and target.is_floating_point and _float_dtype(node.args[0]) == target:
                follows.add(node)  # a no-op cast in the float32 graph (`.to(x.dtype)` traced at float32)
                target = None
            if target is not None:  # a cast the model wrote: kept as written
                if target.is_floating_point:
                    for a in inputs:
                        if inputs[a] is FLEX:
                            demands.setdefault(a, set()).add(target)
                planned[node] = dt
                continue
            if not inputs:  # factory ops and integer/bool compute keep their dtypes
                planned[node] = dt
                continue
            computes, why = self._computes(node, inputs)
            if why:
                self.kept_by[why] = self.kept_by.get(why, 0) + 1
            if computes is None:  # each float input as it was before the pass
                wants[node] = {a: _float_dtype(a) for a in inputs}
            elif computes is FLEX:
                wants[node] = {}
            else:
                wants[node] = dict.fromkeys(inputs, computes)
            for a, want in wants[node].items():
                if inputs[a] is FLEX:
                    demands.setdefault(a, set()).add(want)
            if isinstance(_val(node), (tuple, list)):
                tuples[node] = computes if computes in (F32, self.half) else None
            if computes is FLEX:
                planned[node] = FLEX
            elif dt is None or computes is None or (dt is not F32 and dt is not self.half):
                planned[node] = dt
            else:
                planned[node] = computes if "dtype" not in node.kwargs or node in follows else dt
        out = next(n for n in graph.nodes if n.op == "output")
        # The IO contract: outputs as before the pass.
        wants[out] = {a: _float_dtype(a) for a in out.all_input_nodes if planned.get(a) is not None}
        for a, want in wants[out].items():
            if planned[a] is FLEX:
                demands.setdefault(a, set()).add(want)

        # Resolve FLEX values, readers first: float32 if an op computing in float32 reads it, else half.
        resolved: dict[torch.fx.Node, torch.dtype] = {}
        for node in reversed(list(graph.nodes)):
            if planned.get(node) is not FLEX:
                continue
            want = demands.get(node, set())
            resolved[node] = F32 if (F32 in want or not want) else self.half
            for a in node.all_input_nodes:
                if planned.get(a) is FLEX:
                    demands.setdefault(a, set()).add(resolved[node])
                    wants.setdefault(node, {})[a] = resolved[node]

        converted = kept = 0
        for node in graph.nodes:
            if node.op == "placeholder" and node in resolved:
                spec = weights[node.name]
                if resolved[node] is self.half:
                    self._convert(node, spec.target)
                    converted += 1
                else:
                    kept += 1
        fake = next(n.meta["val"].fake_mode for n in graph.nodes if hasattr(_val(n), "fake_mode"))
        changed: set[torch.fx.Node] = {n for n in graph.nodes if n.op == "placeholder" and n in resolved
                                       and resolved[n] is self.half}
        for node in list(graph.nodes):
            if node.op == "placeholder":
                continue
            for a, want in wants.get(node, {}).items():
                have = _float_dtype(a)
                if want is not None and have is not None and have != want:
                    changed.add(self._cast(node, a, want))
            if node.target in ASSERTS:
                have = _float_dtype(node.args[0])
                if have is not None and node.kwargs.get("dtype") not in (None, have):
                    node.update_kwarg("dtype", have)
                continue
            if node in follows and _float_dtype(node.args[0]) != _cast_target(node):
                _set_cast_target(node, _float_dtype(node.args[0]))
                changed.add(node.args[0])
            if node.op == "call_function" and any(a in changed for a in node.all_input_nodes):
                before = _val(node)
                self._recompute(node, fake)
                if _dtypes(_val(node)) != _dtypes(before):
                    changed.add(node)
        self.edit.count("weights", converted)
        counts = {"weights converted": converted, "weights kept in float32": kept,
                  "casts inserted": self.casts}
        counts.update({f"ops kept in float32 ({why})": n for why, n in sorted(self.kept_by.items())})
        if fp16_range:
            self.notes.append(f"{len(fp16_range)} weights hold values beyond fp16's range (±{FP16_MAX:g}) and stay "
                              f"float32: {', '.join(fp16_range[:3])}{'…' if len(fp16_range) > 3 else ''}")
        self.notes += [f"{self.edit.pass_name}.keep_modules pattern {p!r} matched no module"
                       for p in self.config.keep_modules if p not in self.matched_modules]
        return counts

    def _beyond_fp16(self, fqn: str) -> bool:
        t = self.edit.state_dict.get(fqn, self.edit.constants.get(fqn))
        return isinstance(t, torch.Tensor) and t.numel() > 0 and bool(t.detach().abs().max() > FP16_MAX)

    def _convert(self, node: torch.fx.Node, fqn: str) -> None:
        """The weight as half, in the new program's state (never in the eager model's tensors)."""
        sd, constants = self.edit.state_dict, self.edit.constants
        if fqn in sd:
            old = sd[fqn]
            new = old.detach().to(self.half)
            sd[fqn] = torch.nn.Parameter(new, requires_grad=False) if isinstance(old, torch.nn.Parameter) else new
        else:
            constants[fqn] = constants[fqn].to(self.half)
        val = node.meta["val"]
        with val.fake_mode:
            node.meta["val"] = val.to(self.half)

    def _cast(self, node: torch.fx.Node, arg: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
        """`node` reads `arg` as `dtype`: through one cast per value and dtype, made before its first reader."""
        # An additive attention mask made with float32's finfo.min would become -inf in fp16, and a fully
        # masked row (padding) NaN: it saturates to fp16's range first.
        mask = (dtype is torch.float16 and node.target is aten.scaled_dot_product_attention.default
                and len(node.args) > 3 and node.args[3] is arg)
        cast = self.made.get((arg, dtype, mask))
        if cast is None:
            rule = "output" if node.op == "output" else ("cast_to_fp32" if dtype is F32 else f"cast_to_{self.edit.pass_name}")
            rule = "mask_to_fp16" if mask else rule
            with self.edit.made_by(rule), self.gm.graph.inserting_before(node):
                src = self.edit.call(aten.clamp.default, (arg, -FP16_MAX, FP16_MAX), meta_from=node) if mask else arg
                cast = self.edit.call(aten.to.dtype, (src, dtype), meta_from=node if node.op != "output" else arg)
            self.made[(arg, dtype, mask)] = cast
            self.edit.count(rule)
            self.casts += 1
        node.replace_input_with(arg, cast)
        return cast

    @staticmethod
    def _recompute(node: torch.fx.Node, fake) -> None:
        """The node's value from its inputs' (their dtypes changed)."""
        if not isinstance(_val(node), (torch.Tensor, tuple, list)):
            return
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
        with fake:
            node.meta["val"] = node.target(*args, **kwargs)


def _dtypes(val) -> tuple:
    if isinstance(val, torch.Tensor):
        return (val.dtype,)
    if isinstance(val, (tuple, list)):
        return tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in val)
    return ()
