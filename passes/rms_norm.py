"""The ort target's rewrite of a decoder's RMSNorm into effc::rms_norm (lowered to ONNX Runtime's
SimplifiedLayerNormalization). Applied inside OrtTarget.build, not a user pass: the op has only an "ort"
column, and the program the pipeline verifies against stays the captured one.

transformers' LlamaRMSNorm (Mistral, Qwen2, Phi-3, Mixtral: the same module) is captured as
    var = mean(pow(x, 2), [-1], keepdim=True); normed = x * rsqrt(var + eps)
    out = weight * to(normed, x.dtype)          (the cast is a no-op in float32, or gone after cleanup)
and Gemma's RMSNorm as out = normed * (1.0 + to(weight, float32)). Both become rms_norm(x, w, eps) where
w is the weight node the multiply read: the parameter, or Gemma's add(weight, 1.0), which stays in the
graph (ONNX Runtime folds it into one initializer at build time; a switchable weight stays switchable).

Anchored on rsqrt and strict: every rsqrt is a candidate, and one that is not exactly that chain in
float32, with a [hidden] weight computed from parameters only and no intermediate value read elsewhere,
is refused with its reason. The residual Add before a norm is left alone: ORT's SkipLayerNormFusion,
which would make it SkipSimplifiedLayerNormalization, stays disabled on CPU (targets/ort.py).
"""

from __future__ import annotations

import numbers

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

import effc.ops  # noqa: F401  (registers effc::rms_norm)
from effc.passes.rewrite import GraphEdit, Rule, apply_rules

NAME = "rms_norm"
_aten = torch.ops.aten
_ASSERT = _aten._assert_tensor_metadata.default
_CASTS = (_aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default)
_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def _val(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _is(node, target) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target == target


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The node's readers, without torch.export's dtype asserts."""
    return [u for u in node.users if u.target != _ASSERT]


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = _users(node)
    return users[0] if len(users) == 1 else None


def _is_float32_cast(node) -> bool:
    """A cast from float32 to float32 (HF's hidden_states.to(input_dtype) in a float32 model)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CASTS):
        return False
    src, out = _val(node.args[0]), _val(node)
    return (src is not None and out is not None and src.dtype == out.dtype == torch.float32
            and src.device == out.device)


def _other(node: torch.fx.Node, one: torch.fx.Node):
    """The argument of a binary node that is not `one` (mul(a, b) in either order)."""
    a, b = node.args[:2]
    return b if a is one else a


def _is_weight(edit: GraphEdit, node) -> bool:
    """A parameter, buffer or constant, through casts (Gemma's weight.float(), a kept-float32 weight of an
    fp16 program), or Gemma's 1 + that."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    if _is(node, _aten.add.Tensor) and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        if isinstance(b, torch.fx.Node):
            a, b = b, a
        return isinstance(b, numbers.Number) and b == 1 and _is_weight(edit, a)
    if not (isinstance(node, torch.fx.Node) and node.op == "placeholder"):
        return False
    return any(getattr(s.arg, "name", None) == node.name and s.kind in _WEIGHT_KINDS
               for s in edit.signature.input_specs)


def _match(rsqrt: torch.fx.Node) -> tuple[dict | None, str | None]:
    """The chain around one rsqrt: ({x, eps, chain: nodes the fused op replaces, last, weight}, None), or
    (None, the reason it is not an RMSNorm the lowering takes)."""
    add = rsqrt.args[0]
    if not (_is(add, _aten.add.Tensor) or _is(add, _aten.add.Scalar)) or add.kwargs or len(add.args) != 2:
        return None, "rsqrt of something other than mean(x²) + eps"
    mean, eps = add.args if isinstance(add.args[0], torch.fx.Node) else add.args[::-1]
    if not _is(mean, _aten.mean.dim) or not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        return None, "rsqrt of something other than mean(x²) + eps"
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    pow_, squared = mean.args[0], _val(mean.args[0])
    last_dim = [-1] if squared is None else [-1, len(squared.shape) - 1]
    if keepdim is not True or mean.kwargs.get("dtype") is not None or len(dims or []) != 1 or dims[0] not in last_dim:
        return None, "mean not over the last dim with keepdim"
    if not _is(pow_, _aten.pow.Tensor_Scalar) or pow_.args[1] != 2:
        return None, "mean of something other than x ** 2"
    x, mul = pow_.args[0], _only_user(rsqrt)
    if mul is None:
        return None, "an intermediate value is read elsewhere"
    if not _is(mul, _aten.mul.Tensor) or rsqrt not in mul.args[:2] or _other(mul, rsqrt) is not x:
        return None, "rsqrt does not scale the same x"
    last = _only_user(mul)
    chain = [pow_, mean, add, rsqrt, mul]
    if _is_float32_cast(last):  # to(input_dtype)
        chain.append(last)
        last = _only_user(last)
    if last is None or not _is(last, _aten.mul.Tensor) or len(last.args) != 2:
        return None, "normalized value not multiplied by a weight alone"
    return {"x": x, "eps": float(eps), "chain": chain, "last": last, "weight": _other(last, chain[-1])}, None


def _check(edit: GraphEdit, rsqrt: torch.fx.Node) -> str | None:
    found, reason = _match(rsqrt)
    if reason:
        return reason
    x, weight, last, chain = _val(found["x"]), _val(found["weight"]), _val(found["last"]), found["chain"]
    if x is None or weight is None or last is None or not x.dtype == weight.dtype == last.dtype == torch.float32:
        return "not float32"
    if any(len(_users(n)) != 1 for n in chain[:-1]) or len(_users(chain[-1])) != 1:
        return "an intermediate value is read elsewhere"
    if not _is_weight(edit, found["weight"]):
        return "weight not a parameter (or 1 + one)"
    if len(weight.shape) != 1 or not isinstance(x.shape[-1], int) or weight.shape[0] != x.shape[-1]:
        return "weight not [hidden]"  # (so weight * normed has x's shape)
    return None


def _rewrite(edit: GraphEdit, rsqrt: torch.fx.Node) -> None:
    found, _ = _match(rsqrt)
    last = found["last"]
    with edit.graph.inserting_before(last):  # after the weight (Gemma's 1 + w is computed after the pow)
        fused = edit.call(torch.ops.effc.rms_norm.default, (found["x"], found["weight"], found["eps"]), last)
    edit.replace(last, fused)
    for node in reversed(found["chain"]):  # the chain, its dtype asserts with it
        for user in list(node.users):
            edit.graph.erase_node(user)  # only asserts are left (checked single-use)
        edit.graph.erase_node(node)


RULE = Rule("simplified_layer_norm", lambda n: _is(n, _aten.rsqrt.default), _rewrite, _check)


def lower(program: ExportedProgram, keep: frozenset[str] = frozenset()) -> tuple[ExportedProgram, int,
                                                                              dict[str, int]]:
    """(program with each RMSNorm fused, how many, refused candidates by reason). The weights are read as
    they are, so the parameters in `keep` (overridden at run time) need nothing special."""
    edit = GraphEdit(program, NAME)
    done = apply_rules(edit, [RULE])
    refused = {r: len(n) for r, n in edit.refused.items()}
    if not done:
        return program, 0, refused
    result = edit.finish({}, dropped=None)
    return result.ir, done, refused
