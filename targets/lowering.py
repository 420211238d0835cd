"""Translations of effc's custom ops (effc.ops) into ONNX, one table per target flavour."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

import effc.ops  # noqa: F401  (registers torch.ops.effc.*)
from effc.targets.attention import sdpa_to_multihead_attention
from effc.targets.blocked_dq import effc_internal
from effc.targets.contrib_ops import msft


def int8_linear_dynamic_ort(x, weight_t, weight_scale, bias=None):
    """ONNX Runtime's fused kernel: quantizes x per tensor and runs the int8 GEMM in one op."""
    return msft.DynamicQuantizeMatMul(x, weight_t, weight_scale, None, bias)


def int8_linear_dynamic_qdq(x, weight_t, weight_scale, bias=None):
    """Standard ops only: DynamicQuantizeLinear / DequantizeLinear around MatMul (QDQ), which any runtime
    runs and ONNX Runtime fuses to MatMulIntegerToFloat."""
    q, scale, zero_point = op.DynamicQuantizeLinear(x)
    x_dq = op.DequantizeLinear(q, scale, zero_point)
    w_dq = op.DequantizeLinear(weight_t, weight_scale, axis=1)
    y = op.MatMul(x_dq, w_dq)
    return y if bias is None else op.Add(y, bias)


def int8_linear_static_qdq(x, x_scale, weight_t, weight_scale, bias=None):
    """QuantizeLinear/DequantizeLinear with the calibrated scale (int8, zero point 0) around MatMul: standard
    ops for any runtime, explicit quantization for TensorRT, MatMulIntegerToFloat after ORT's QDQ fusion."""
    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.INT8, [], [0]))
    x_dq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, zero), x_scale, zero)
    w_dq = op.DequantizeLinear(weight_t, weight_scale, axis=1)
    y = op.MatMul(x_dq, w_dq)
    return y if bias is None else op.Add(y, bias)


def int8_linear_static_ort(x, x_scale, weight_t, weight_scale, bias=None):
    """Quantize once, then ONNX Runtime's integer GEMM with float output; explicit, so it does not
    depend on the QDQ fusion (which misses Q/DQ pairs shared by q/k/v after CSE). Activations go in as
    uint8 with zero point 128, the same numbers as symmetric int8 (q - 128 = clamp(round(x/s), -128, 127)):
    ONNX Runtime's CPU GEMM is fast for u8 x s8 and measured 3.7x slower than fp32 for s8 x s8."""
    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [128]))
    q = op.QuantizeLinear(x, x_scale, zero)
    return msft.MatMulIntegerToFloat(q, weight_t, x_scale, weight_scale, zero, None, bias)


def _per_token_scale(x):
    """Symmetric per-token scale as effc.ops computes it: absmax over the last dim / 127 (1 for zero rows)."""
    scale = op.Div(op.ReduceMax(op.Abs(x), [-1], keepdims=1), op.CastLike(127.0, x))
    return op.Where(op.Equal(scale, op.CastLike(0.0, x)), op.CastLike(1.0, x), scale)


def int8_linear_per_token_ort(x, weight_t, weight_scale, bias=None):
    """Per-token scales computed in the graph; x / scale rounded by QuantizeLinear (uint8, zero point 128:
    the fast u8 x s8 GEMM), integer GEMM with float output, then the token scales."""
    scale = _per_token_scale(x)
    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.UINT8, [], [128]))
    one = op.CastLike(1.0, x)
    q = op.QuantizeLinear(op.Div(x, scale), one, zero)
    y = op.Mul(msft.MatMulIntegerToFloat(q, weight_t, one, weight_scale, zero), scale)
    return y if bias is None else op.Add(y, bias)


def int8_linear_per_token_qdq(x, weight_t, weight_scale, bias=None):
    """Standard ops: per-token Q/DQ of x (int8, zero point 0) and DQ of the weights around MatMul."""
    scale = _per_token_scale(x)
    zero = op.Constant(value=onnx.helper.make_tensor("zero_point", onnx.TensorProto.INT8, [], [0]))
    one = op.CastLike(1.0, x)
    x_dq = op.Mul(op.DequantizeLinear(op.QuantizeLinear(op.Div(x, scale), one, zero), one, zero), scale)
    y = op.MatMul(x_dq, op.DequantizeLinear(weight_t, weight_scale, axis=1))
    return y if bias is None else op.Add(y, bias)


def int8_linear_weight_only_qdq(x, weight_t, weight_scale, bias=None):
    """Standard ops: DequantizeLinear of the int8 weights (per output channel) feeding a float MatMul."""
    y = op.MatMul(x, op.DequantizeLinear(weight_t, weight_scale, axis=1))
    return y if bias is None else op.Add(y, bias)


def int8_linear_weight_only_ort(x, weight_t, weight_scale, bias=None):
    """MatMulNBits with 8-bit weights and float activations (accuracy_level 0). Its layout is built in
    the graph from effc's [K, N] int8 weights and folded into initializers by ONNX Runtime at build
    time: codes + 128 (its default zero point) as uint8 [N, K/block, block], the per-channel scale
    repeated for each block of K."""
    k, n = weight_t.shape
    block = _nbits_block(k)
    blocks = k // block
    offset = op.Constant(value=onnx.helper.make_tensor("offset", onnx.TensorProto.INT16, [], [128]))
    codes = op.Cast(op.Add(op.Cast(op.Transpose(weight_t, perm=[1, 0]), to=onnx.TensorProto.INT16), offset),
                    to=onnx.TensorProto.UINT8)
    codes = op.Reshape(codes, op.Constant(value_ints=[n, blocks, block]))
    scales = op.Reshape(op.Expand(op.Unsqueeze(weight_scale, [1]), op.Constant(value_ints=[n, blocks])),
                        op.Constant(value_ints=[-1]))
    return msft.MatMulNBits(x, codes, scales, None, None, bias, K=k, N=n, bits=8, block_size=block,
                            accuracy_level=0)


def _nbits_block(k: int) -> int:
    """The largest block MatMulNBits takes (a power of two, 16..128) that divides K."""
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    raise ValueError(f"MatMulNBits needs K divisible by 16, got {k}")


def _nf4_absmax(absmax, absmax2, offset, dq_block: int):
    """The float block absmax: as stored, or decoded from double quantization as bitsandbytes does it,
    dynamic_map[code] * absmax2[i // dq_block] + offset (two float32 roundings). Constant: ONNX Runtime
    folds it at build time."""
    if absmax2 is None:
        return absmax
    from effc.nf4 import DYNAMIC_MAP_SIGNED

    table = op.Constant(value=onnx.numpy_helper.from_array(DYNAMIC_MAP_SIGNED.numpy(), "dynamic_map"))
    blocks = absmax.shape[0]
    per_block = op.Reshape(op.Expand(op.Unsqueeze(absmax2, [1]), op.Constant(value_ints=[absmax2.shape[0], dq_block])),
                           op.Constant(value_ints=[-1]))
    per_block = op.Slice(per_block, op.Constant(value_ints=[0]), op.Constant(value_ints=[blocks]))
    return op.Add(op.Mul(op.Gather(table, op.Cast(absmax, to=onnx.TensorProto.INT64)), per_block), offset)


def nf4_linear_ort(x, packed, absmax, absmax2, offset, bias, out_features: int, in_features: int, block: int,
                   dq_block: int):
    """ONNX Runtime's MatMulBnb4 takes bitsandbytes' packing as is (first element in the high nibble) with
    float absmax: exact NF4, but it dequantizes the whole weight on every call (REFERENCE.md: slower
    than fp32 on CPU)."""
    scales = _nf4_absmax(absmax, absmax2, offset, dq_block)
    codes = op.Reshape(packed, op.Constant(value_ints=[-1]))
    y = msft.MatMulBnb4(x, codes, scales, K=in_features, N=out_features, block_size=block, quant_type=1)
    return y if bias is None else op.Add(y, bias)


def nf4_linear_portable(x, packed, absmax, absmax2, offset, bias, out_features: int, in_features: int, block: int,
                        dq_block: int):
    """Standard ops: unpack the nibbles, look the codes up in the NF4 table, scale by the block absmax,
    MatMul. Everything before the MatMul is constant, so a runtime may fold it to a float weight at load."""
    from effc.nf4 import NF4_CODE

    n = out_features * in_features
    hi = op.BitShift(packed, op.Constant(value=onnx.helper.make_tensor("four", onnx.TensorProto.UINT8, [], [4])),
                     direction="RIGHT")
    lo = op.BitwiseAnd(packed, op.Constant(value=onnx.helper.make_tensor("low", onnx.TensorProto.UINT8, [], [15])))
    first = op.Constant(value_ints=[0])
    codes = op.Slice(op.Reshape(op.Concat(hi, lo, axis=1), op.Constant(value_ints=[-1])), first,
                     op.Constant(value_ints=[n]))
    table = op.Constant(value=onnx.numpy_helper.from_array(NF4_CODE.numpy(), "nf4_code"))
    scales = _nf4_absmax(absmax, absmax2, offset, dq_block)
    per_element = op.Reshape(op.Expand(op.Unsqueeze(scales, [1]), op.Constant(value_ints=[absmax.shape[0], block])),
                             op.Constant(value_ints=[-1]))
    w = op.Mul(op.Gather(table, op.Cast(codes, to=onnx.TensorProto.INT64)),
               op.Slice(per_element, first, op.Constant(value_ints=[n])))
    w_t = op.Transpose(op.Reshape(w, op.Constant(value_ints=[out_features, in_features])), perm=[1, 0])
    y = op.MatMul(x, w_t)
    return y if bias is None else op.Add(y, bias)


def nbits_linear_ort(x, packed, scales, zero_points, bias, in_features: int, block: int, bits: int,
                     int8_activations: bool):
    """MatMulNBits with the layout effc.int4 stores: float activations (accuracy_level 0), or int8
    activations per block (accuracy_level 4), as the reference op says."""
    n, groups = scales.shape
    flat = op.Constant(value_ints=[-1])
    zp = None if zero_points is None else op.Reshape(zero_points, flat)
    return msft.MatMulNBits(x, packed, op.Reshape(scales, flat), zp, None, bias, K=in_features, N=n, bits=bits,
                            block_size=block, accuracy_level=4 if int8_activations else 0)


def _fake_quantize_blocks(x, k: int, block: int):
    """effc.int4.quantize_activations in standard ops: pad K, per-block absmax / 127, round, rescale."""
    blocks, rank = -(-k // block), len(x.shape)
    pad = blocks * block - k
    padded = op.Pad(x, op.Constant(value_ints=[0] * (2 * rank - 1) + [pad])) if pad else x
    shape = op.Concat(op.Slice(op.Shape(x), op.Constant(value_ints=[0]), op.Constant(value_ints=[-1])),
                      op.Constant(value_ints=[blocks, block]), axis=0)
    xb = op.Reshape(padded, shape)
    scale = op.Div(op.ReduceMax(op.Abs(xb), [-1], keepdims=1), op.CastLike(127.0, x))
    scale = op.Where(op.Equal(scale, op.CastLike(0.0, x)), op.CastLike(1.0, x), scale)
    xq = op.Reshape(op.Mul(op.Round(op.Div(xb, scale)), scale), op.Shape(padded))
    if not pad:
        return xq
    return op.Slice(xq, op.Constant(value_ints=[0]), op.Constant(value_ints=[k]), op.Constant(value_ints=[-1]))


def nbits_linear_portable(x, packed, scales, zero_points, bias, in_features: int, block: int, bits: int,
                          int8_activations: bool):
    """Standard ops: the weight as block-quantized DequantizeLinear (opset 21, made from the placeholder
    by blocked_dq.to_standard after export), then MatMul (activations fake-quantized per block when
    int8_activations)."""
    if int8_activations:
        x = _fake_quantize_blocks(x, in_features, block)
    inputs = (packed, scales) if zero_points is None else (packed, scales, zero_points)
    w = effc_internal.BlockedWeight(*inputs, K=in_features, block=block, bits=bits)
    y = op.MatMul(x, w)
    return y if bias is None else op.Add(y, bias)


def int8_embedding(indices, weight, scale):
    """Gather the int8 rows and their scales; dequantize only what was looked up."""
    rows = op.Cast(op.Gather(weight, indices, axis=0), to=1)  # 1 = FLOAT
    return op.Mul(rows, op.Unsqueeze(op.Gather(scale, indices, axis=0), [-1]))


ops = torch.ops.effc
ORT = {torch.ops.aten.scaled_dot_product_attention.default: sdpa_to_multihead_attention,
       ops.int8_linear_dynamic.default: int8_linear_dynamic_ort,
       ops.int8_linear_per_token.default: int8_linear_per_token_ort,
       ops.int8_linear_static.default: int8_linear_static_ort,
       ops.int8_linear_weight_only.default: int8_linear_weight_only_ort,
       ops.int8_embedding.default: int8_embedding,
       ops.nf4_linear.default: nf4_linear_ort,
       ops.nbits_linear.default: nbits_linear_ort}
PORTABLE = {ops.int8_linear_dynamic.default: int8_linear_dynamic_qdq,
            ops.int8_linear_per_token.default: int8_linear_per_token_qdq,
            ops.int8_linear_static.default: int8_linear_static_qdq,
            ops.int8_linear_weight_only.default: int8_linear_weight_only_qdq,
            ops.int8_embedding.default: int8_embedding,
            ops.nf4_linear.default: nf4_linear_portable,
            ops.nbits_linear.default: nbits_linear_portable}
