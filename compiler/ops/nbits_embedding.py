"""effc::nbits_embedding: an embedding lookup in a 4-bit block-wise table in MatMulNBits' layout
(effc.formats.nbits). The int4 pass makes it for an embedding tied to a quantized lm_head, so the one
table serves both: the LM head's MatMulNBits and this gather read the same initializers."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

from effc.formats.nbits import dequantize
from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft


@torch.library.custom_op("effc::nbits_embedding", mutates_args=())
def nbits_embedding(indices: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                    zero_points: torch.Tensor | None, in_features: int, block: int) -> torch.Tensor:
    """The dequantized rows weight[indices] of the table [N, K] stored as packed [N, K/B, B/2], scales
    [N, K/B] and zero points [N, ceil(K/B / 2)] (None: 8)."""
    rows = indices.reshape(-1)
    zp = None if zero_points is None else zero_points[rows]
    w = dequantize(packed[rows], scales[rows], zp, in_features, block)
    return w.reshape(*indices.shape, in_features)


@nbits_embedding.register_fake
def fake(indices, packed, scales, zero_points, in_features, block):
    return scales.new_empty(*indices.shape, in_features)


def _to_features(rows, in_features: int, padded: int):
    return rows if padded == in_features else op.Slice(rows, op.Constant(value_ints=[0]),
                                                       op.Constant(value_ints=[in_features]),
                                                       op.Constant(value_ints=[-1]))


def nbits_embedding_ort(indices, packed, scales, zero_points, in_features: int, block: int):
    """com.microsoft::GatherBlockQuantized over the uint8 table as MatMulNBits stores it (its convention for
    uint8 data, zero point 8 by default); only the looked-up rows are dequantized. Symmetric: the packed
    [N, K/B, B/2] as it is, one block per row of its last axis, so the saved model keeps one table (ORT folds a
    Reshape of an initializer into a copy; only the scales' [N, K/B, 1] view is one, 1/8 of the table).
    With zero points (packed two blocks per byte along K/B) the table is gathered as [N, K/2], a copy."""
    n, groups = scales.shape
    if zero_points is None:
        rows = msft.GatherBlockQuantized(packed, indices, op.Reshape(scales, op.Constant(value_ints=[n, groups, 1])),
                                         bits=4, block_size=block, gather_axis=0, quantize_axis=2)  # [..., G, B]
        rows = op.Reshape(rows, op.Concat(op.Shape(indices), op.Constant(value_ints=[groups * block]), axis=0))
    else:
        data = op.Reshape(packed, op.Constant(value_ints=[n, groups * block // 2]))
        rows = msft.GatherBlockQuantized(data, indices, scales, zero_points, bits=4, block_size=block,
                                         gather_axis=0, quantize_axis=1)
    return _to_features(rows, in_features, groups * block)


def _nibbles(x):
    """uint8 [..., M] -> its 4-bit values [..., 2M] as float, the low nibble first."""
    low = op.BitwiseAnd(x, op.Constant(value=onnx.helper.make_tensor("f", onnx.TensorProto.UINT8, [], [15])))
    high = op.BitShift(x, op.Constant(value=onnx.helper.make_tensor("s", onnx.TensorProto.UINT8, [], [4])),
                       direction="RIGHT")
    pairs = op.Concat(op.Unsqueeze(low, [-1]), op.Unsqueeze(high, [-1]), axis=-1)  # [..., M, 2]
    shape = op.Concat(op.Shape(x, end=-1), op.Constant(value_ints=[-1]), axis=0)
    return op.Cast(op.Reshape(pairs, shape), to=onnx.TensorProto.FLOAT)


def nbits_embedding_portable(indices, packed, scales, zero_points, in_features: int, block: int):
    """Standard ops: gather the packed rows and their scales, unpack the nibbles (BitwiseAnd, BitShift) and
    dequantize only those rows."""
    n, groups = scales.shape
    codes = _nibbles(op.Gather(packed, indices, axis=0))  # [..., G, B]
    if zero_points is None:
        zero = op.Constant(value_float=8.0)
    else:
        zero = op.Unsqueeze(_nibbles(op.Gather(zero_points, indices, axis=0)), [-1])  # [..., G', 1]
        zero = op.Slice(zero, op.Constant(value_ints=[0]), op.Constant(value_ints=[groups]),
                        op.Constant(value_ints=[-2]))
    rows = op.Mul(op.Sub(codes, zero), op.Unsqueeze(op.Gather(scales, indices, axis=0), [-1]))
    shape = op.Concat(op.Shape(indices), op.Constant(value_ints=[groups * block]), axis=0)
    return _to_features(op.Reshape(rows, shape), in_features, groups * block)


# No trt column: TensorRT has neither uint8 Gather nor bitwise ops, and --target trt implies
# int4.tied_embedding=false (targets/base.py PASS_DEFAULTS), so the pass never makes this op for it.
OP = register(Op(torch.ops.effc.nbits_embedding.default,
                 {"onnx": nbits_embedding_portable, "ort": nbits_embedding_ort}, fake))
