"""effc::int8_linear_static: W8A8 with a calibrated activation scale (symmetric int8, zero point 0) and int8
weights per output channel, the explicit-quantization form TensorRT reads."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

from effc.ops.onnx_helpers import zero_point
from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft


def quantize_activation_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ONNX QuantizeLinear to int8 with zero point 0: saturate(round_half_even(x / scale)) in [-128, 127]."""
    return torch.clamp(torch.round(x.float() / scale.float()), -128, 127)


@torch.library.custom_op("effc::int8_linear_static", mutates_args=())
def int8_linear_static(x: torch.Tensor, x_scale: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 with a calibrated activation scale: symmetric int8 activations (zero point 0) and int8 weights
    per output channel, the explicit-quantization form TensorRT reads. Exact integer accumulation."""
    acc = quantize_activation_static(x, x_scale).double() @ weight_t.double()
    y = (acc * (x_scale.double() * weight_scale.double())).to(x.dtype)
    return y if bias is None else y + bias


@int8_linear_static.register_fake
def fake(x, x_scale, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def int8_linear_static_qdq(x, x_scale, weight_t, weight_scale, bias=None):
    """QuantizeLinear/DequantizeLinear with the calibrated scale (int8, zero point 0) around MatMul: standard
    ops for any runtime, explicit quantization for TensorRT, MatMulIntegerToFloat after ORT's QDQ fusion."""
    zero = zero_point(onnx.TensorProto.INT8, 0)
    x_dq = op.DequantizeLinear(op.QuantizeLinear(x, x_scale, zero), x_scale, zero)
    w_dq = op.DequantizeLinear(weight_t, weight_scale, axis=1)
    y = op.MatMul(x_dq, w_dq)
    return y if bias is None else op.Add(y, bias)


def int8_linear_static_ort(x, x_scale, weight_t, weight_scale, bias=None):
    """Quantize once, then ONNX Runtime's integer GEMM with float output; explicit, so it does not
    depend on the QDQ fusion (which misses Q/DQ pairs shared by q/k/v after CSE). Activations go in as
    uint8 with zero point 128, the same numbers as symmetric int8 (q - 128 = clamp(round(x/s), -128, 127)):
    ONNX Runtime's CPU GEMM is fast for u8 x s8 and measured 3.7x slower than fp32 for s8 x s8."""
    zero = zero_point(onnx.TensorProto.UINT8, 128)
    q = op.QuantizeLinear(x, x_scale, zero)
    return msft.MatMulIntegerToFloat(q, weight_t, x_scale, weight_scale, zero, None, bias)


OP = register(Op(torch.ops.effc.int8_linear_static.default,
                 {"onnx": int8_linear_static_qdq, "ort": int8_linear_static_ort, "trt": int8_linear_static_qdq}, fake))
