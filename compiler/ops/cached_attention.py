"""effc::cached_attention: one decoder layer's attention over its KV cache. The new keys/values are
appended to the past (the presents), repeated to the query's heads (GQA) and attended with the layer's
boolean or additive mask, which carries the causal, padding and sliding-window structure.

The "ort" column lowers it to com.microsoft::GroupQueryAttention (passes/kv_attention.py puts it in the
graph inside the ort target's build). GQA keeps its causal mask over the whole buffer: seqlens_k is the
total length - 1 for every row, and left padding and the window come in as attention_bias (the mask as
0 / float32 min), which ORT 1.32's CPU kernel accepts and which reproduces PyTorch to ~3e-7.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
import torch
from onnxscript import opset20 as op

from effc.ops.registry import Op, register
from effc.targets.attention import _MASKED, _bnsh_to_bsh
from effc.targets.contrib_ops import msft


@torch.library.custom_op("effc::cached_attention", mutates_args=())
def cached_attention(query: torch.Tensor, past_key: torch.Tensor, key: torch.Tensor, past_value: torch.Tensor,
                     value: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """(attention output [B, N, S, Hv], present key, present value [B, KV, P + S, H]) from q [B, N, S, H],
    the past [B, KV, P, H], the new k/v [B, KV, S, H] and the mask [B|1, 1, S, P + S]: what the
    captured cat + repeat_kv + scaled_dot_product_attention computes."""
    present_key, present_value = torch.cat([past_key, key], dim=2), torch.cat([past_value, value], dim=2)
    repeat = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, present_key.repeat_interleave(repeat, dim=1), present_value.repeat_interleave(repeat, dim=1),
        attn_mask=mask, scale=scale)
    return out, present_key, present_value


@cached_attention.register_fake
def fake(query, past_key, key, past_value, value, mask, scale):
    return (query.new_empty(*query.shape[:-1], value.shape[-1]), torch.cat([past_key, key], dim=2),
            torch.cat([past_value, value], dim=2))


def _int32(x):
    return op.Cast(x, to=onnx.TensorProto.INT32)


def cached_attention_gqa(query, past_key, key, past_value, value, mask, scale: float):
    """com.microsoft::GroupQueryAttention on [B, S, N*H] / [B, S, KV*H] with the past in BNSH. Rows whose
    keys are all masked (left padding's query rows) come out 0 as in PyTorch, where GQA would average V.
    Everything but the q/k/v layout is computed from the mask [B, 1, S, T] alone (passes/kv_attention.py
    checks its shape), the same nodes in every layer, so ONNX Runtime's common-subexpression elimination
    computes it once per step rather than once per layer."""
    heads, kv_heads, head_size, v_size = query.shape[1], key.shape[1], query.shape[3], value.shape[3]
    total = op.Shape(mask, start=3, end=4)  # [1] int64: past + new
    seqlens_k = _int32(op.Expand(op.Sub(total, op.Constant(value_ints=[1])), op.Shape(mask, start=0, end=1)))
    if mask.dtype == ir.DataType.BOOL:
        bias = op.Where(mask, op.Constant(value_float=0.0), op.Constant(value_float=_MASKED))
        row_any = op.ReduceMax(op.Cast(mask, to=onnx.TensorProto.FLOAT), op.Constant(value_ints=[3]), keepdims=1)
    else:  # additive: clamp -inf (a row of -inf is NaN in ORT's softmax, 0 in PyTorch) and zero such rows
        bias = op.Max(mask, op.Constant(value_float=_MASKED))
        row_any = op.Cast(op.Not(op.IsInf(op.ReduceMax(mask, op.Constant(value_ints=[3]), keepdims=1),
                                          detect_positive=0)), to=onnx.TensorProto.FLOAT)
    out, present_key, present_value = msft.GroupQueryAttention(
        _bnsh_to_bsh(query, heads, head_size), _bnsh_to_bsh(key, kv_heads, head_size),
        _bnsh_to_bsh(value, kv_heads, v_size), past_key, past_value, seqlens_k,
        _int32(op.Squeeze(total, op.Constant(value_ints=[0]))), None, None, None, bias,
        num_heads=heads, kv_num_heads=kv_heads, scale=float(scale), _num_outputs=3)
    out = op.Mul(out, op.Squeeze(row_any, op.Constant(value_ints=[1])))  # [B, S, N*Hv] * [B, S, 1]
    # ONNX shape inference does not know the contrib op: the shape lets targets/onnx_reshapes.py see that the
    # Reshape/Transpose pairs between here and the output projection cancel.
    out.shape = ir.Shape([query.shape[0], query.shape[2], heads * v_size])
    out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, heads, v_size])), perm=[0, 2, 1, 3])
    return out, present_key, present_value

OP = register(Op(torch.ops.effc.cached_attention.default, {"ort": cached_attention_gqa}, fake))
