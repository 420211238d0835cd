"""aten.scaled_dot_product_attention -> com.microsoft::MultiHeadAttention on the `ort` target.

The exporter's own decomposition (MatMul, Softmax, and a Where over the whole [B, H, S, S] score
tensor for the mask) was ~35% of int8 MiniLM's time; ORT's fused CPU kernel replaces it, and the
Transposes around it cancel with the projections' view + transpose. Calls MultiHeadAttention cannot
compute exactly (dropout, GQA left to enable_gqa, non-4D, not float32, heads not static) keep the
exporter's decomposition (onnxscript's torchlib function, what opset 20 export uses anyway).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset20 as op
from onnxscript.function_libs.torch_lib.ops.nn import aten_scaled_dot_product_attention as _torchlib_sdpa

from effc.targets.contrib_ops import msft

# Bool masks become an additive bias. Not -inf: ORT's softmax would turn an all-masked row into NaN. The
# lowest float keeps such a row finite (uniform weights); it is then zeroed to match PyTorch (see below).
_MASKED = float(torch.finfo(torch.float32).min)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _same_dim(a, b) -> bool:
    """Both static and equal, or the same named symbolic dim (the exporter names dynamic dims s0, s1, ...)."""
    if isinstance(a, int) or isinstance(b, int):
        return a == b
    return getattr(a, "value", None) is not None and a.value == getattr(b, "value", None)


def _mha_plan(query, key, value, attn_mask, dropout_p, is_causal):
    """(num_heads, head_size, v_head_size) when MultiHeadAttention computes exactly this SDPA call, else None."""
    if dropout_p or query.dtype != ir.DataType.FLOAT:
        return None  # fp16 would work on CUDA; ORT's CPU MultiHeadAttention kernel is float only
    shapes = [t.shape for t in (query, key, value)]
    if any(s is None or len(s) != 4 for s in shapes):
        return None  # MHA is 4D-BNSH only here; 3D / 5D SDPA calls keep the decomposition
    qs, ks, vs = shapes
    heads, head_size, v_head_size = _static(qs[1]), _static(qs[3]), _static(vs[3])
    if heads is None or head_size is None or v_head_size is None:
        return None
    if _static(ks[1]) != heads or _static(vs[1]) != heads or _static(ks[3]) != head_size:
        return None  # GQA without repeat_kv (enable_gqa) or unusual shapes
    if is_causal and attn_mask is not None:
        return None
    if attn_mask is not None and (attn_mask.shape is None or len(attn_mask.shape) > 4):
        return None
    return heads, head_size, v_head_size


def _bnsh_to_bsh(x, heads: int, head_size: int):
    """[B, N, S, H] -> [B, S, N*H]: Transpose then Reshape; cancels with the projection's view+transpose."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, heads * head_size]))


def sdpa_to_multihead_attention(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
             scale: float | None = None, enable_gqa: bool = False):
    """aten.scaled_dot_product_attention on 4D [B, N, S, H] q/k/v -> com.microsoft::MultiHeadAttention.

    Bool masks -> additive attention_bias (0 / float32 min), float masks -> attention_bias clamped at float32
    min; both [B|1, N|1, S, T] (Expand only when the last two dims are not provably full); is_causal without
    a mask -> unidirectional=1. Rows whose keys are all masked come out 0 as in PyTorch. Anything else (dropout, GQA with enable_gqa, non-4D, fp16/bf16, unknown
    head count) falls back to the exporter's own decomposition (onnxscript torchlib)."""
    plan = _mha_plan(query, key, value, attn_mask, dropout_p, is_causal)
    if plan is None:
        return _torchlib_sdpa(query, key, value, attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              enable_gqa=enable_gqa)
    heads, head_size, v_head_size = plan
    if scale is None:
        scale = head_size ** -0.5
    q = _bnsh_to_bsh(query, heads, head_size)
    k = _bnsh_to_bsh(key, heads, head_size)
    v = _bnsh_to_bsh(value, heads, v_head_size)
    bias = None
    row_any = None
    if attn_mask is not None:
        mshape = [1] * (4 - len(attn_mask.shape)) + list(attn_mask.shape)  # rank checked in _mha_plan
        if len(attn_mask.shape) < 4:
            attn_mask = op.Unsqueeze(attn_mask, op.Constant(value_ints=list(range(4 - len(attn_mask.shape)))))
        if attn_mask.dtype == ir.DataType.BOOL:
            bias = op.Where(attn_mask, op.Constant(value_float=0.0), op.Constant(value_float=_MASKED))
            # PyTorch gives 0 for a query row whose keys are all masked; MHA would average V there.
            row_any = op.ReduceMax(op.Cast(attn_mask, to=onnx.TensorProto.FLOAT), op.Constant(value_ints=[3]),
                                   keepdims=1)  # [B|1, N|1, S|1, 1]: 1 where the query row sees some key
        else:
            # A float mask may hold -inf: ORT's softmax gives NaN for a row that is all -inf, PyTorch gives 0.
            # Clamp to the lowest float (same weights elsewhere) and zero such rows as for bool masks.
            bias = op.Max(attn_mask, op.Constant(value_float=_MASKED))
            row_any = op.Cast(op.Not(op.IsInf(op.ReduceMax(attn_mask, op.Constant(value_ints=[3]), keepdims=1),
                                              detect_positive=0)), to=onnx.TensorProto.FLOAT)
        full = _same_dim(mshape[2], query.shape[2]) and _same_dim(mshape[3], key.shape[2])
        if not full:  # MHA wants the last two dims full: [B|1, N|1, S, T]
            s_t = op.Concat(op.Constant(value_ints=[1, 1]), op.Slice(op.Shape(query), [2], [3]),
                            op.Slice(op.Shape(key), [2], [3]), axis=0)
            bias = op.Expand(bias, s_t)
    out = msft.MultiHeadAttention(q, k, v, None, None, bias, num_heads=heads, scale=float(scale),
                                  unidirectional=1 if is_causal else 0)
    per_head = row_any is not None and mshape[1] != 1
    if row_any is not None and not per_head:  # zero in [B, S, N*Hv] layout: keeps the Transposes cancellable
        out = op.Mul(out, op.Squeeze(row_any, op.Constant(value_ints=[1])))  # * [B|1, S|1, 1]
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, v_head_size])), perm=[0, 2, 1, 3])
    if per_head:
        out = op.Mul(out, row_any)  # [B, N, S, Hv] * [B|1, N, S|1, 1]
    return out
