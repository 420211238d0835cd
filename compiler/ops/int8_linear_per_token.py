"""effc::int8_linear_per_token: dynamic W8A8 with activations quantized per token at run time (symmetric
int8) and int8 weights per output channel."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

from effc.ops.onnx_helpers import zero_point
from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft


def quantize_activation_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per token (row of the last dim): scale = absmax / 127 in float32,
    q = round_half_even(x / scale) in [-127, 127]; an all-zero row gets scale 1."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round(x / scale), scale


@torch.library.custom_op("effc::int8_linear_per_token", mutates_args=())
def int8_linear_per_token(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic W8A8 with activations quantized per token at run time (symmetric int8) and int8 weights
    per output channel; exact integer accumulation."""
    q, scale = quantize_activation_per_token(x)
    acc = q.double() @ weight_t.double()
    y = (acc * (scale.double() * weight_scale.double())).to(x.dtype)
    return y if bias is None else y + bias


@int8_linear_per_token.register_fake
def fake(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def _per_token_scale(x):
    """quantize_activation_per_token's scale in ONNX: absmax over the last dim / 127 (1 for zero rows)."""
    scale = op.Div(op.ReduceMax(op.Abs(x), [-1], keepdims=1), op.CastLike(127.0, x))
    return op.Where(op.Equal(scale, op.CastLike(0.0, x)), op.CastLike(1.0, x), scale)


def int8_linear_per_token_ort(x, weight_t, weight_scale, bias=None):
    """Per-token scales computed in the graph; x / scale rounded by QuantizeLinear (uint8, zero point 128:
    the fast u8 x s8 GEMM), integer GEMM with float output, then the token scales."""
    scale = _per_token_scale(x)
    zero = zero_point(onnx.TensorProto.UINT8, 128)
    one = op.CastLike(1.0, x)
    q = op.QuantizeLinear(op.Div(x, scale), one, zero)
    y = op.Mul(msft.MatMulIntegerToFloat(q, weight_t, one, weight_scale, zero), scale)
    return y if bias is None else op.Add(y, bias)


def int8_linear_per_token_qdq(x, weight_t, weight_scale, bias=None):
    """Standard ops: per-token Q/DQ of x (int8, zero point 0) and DQ of the weights around MatMul."""
    scale = _per_token_scale(x)
    zero = zero_point(onnx.TensorProto.INT8, 0)
    one = op.CastLike(1.0, x)
    x_dq = op.Mul(op.DequantizeLinear(op.QuantizeLinear(op.Div(x, scale), one, zero), one, zero), scale)
    y = op.MatMul(x_dq, op.DequantizeLinear(weight_t, weight_scale, axis=1))
    return y if bias is None else op.Add(y, bias)


OP = register(Op(torch.ops.effc.int8_linear_per_token.default,
                 {"onnx": int8_linear_per_token_qdq, "ort": int8_linear_per_token_ort}, fake))
