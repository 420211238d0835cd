"""effc::int8_embedding: an embedding lookup in an int8 table with one scale per row
(effc.formats.int8.quantize_rows)."""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

from effc.ops.registry import Op, register


@torch.library.custom_op("effc::int8_embedding", mutates_args=())
def int8_embedding(indices: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Embedding lookup in an int8 table with one scale per row: weight[indices] * scale[indices]."""
    return weight[indices].float() * scale[indices].unsqueeze(-1)


@int8_embedding.register_fake
def fake(indices, weight, scale):
    return scale.new_empty(*indices.shape, weight.shape[1])


def int8_embedding_onnx(indices, weight, scale):
    """Gather the int8 rows and their scales; dequantize only what was looked up (standard ops)."""
    rows = op.Cast(op.Gather(weight, indices, axis=0), to=1)  # 1 = FLOAT
    return op.Mul(rows, op.Unsqueeze(op.Gather(scale, indices, axis=0), [-1]))


def int8_embedding_trt(indices, weight, scale):
    """TensorRT takes int8 only through DequantizeLinear: the table dequantized per row (axis 0, a weight),
    then Gather in float. Same float32 products as the reference (weight * scale per row)."""
    return op.Gather(op.DequantizeLinear(weight, scale, axis=0), indices, axis=0)


OP = register(Op(torch.ops.effc.int8_embedding.default,
                 {"onnx": int8_embedding_onnx, "ort": int8_embedding_onnx, "trt": int8_embedding_trt}, fake))
