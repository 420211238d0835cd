"""effc::int8_linear_dynamic: W8A8 with activations quantized per tensor at run time (uint8, asymmetric),
weights int8 per output channel (effc.formats.int8)."""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft


def quantize_activation_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX DynamicQuantizeLinear: uint8, asymmetric, one scale for the whole tensor, range includes 0.
    Computed in float32 step by step as the spec writes it: a zero point rounded the other way shifts
    every value of the tensor by one step."""
    x = x.float()
    lo = torch.clamp(x.min(), max=0)
    hi = torch.clamp(x.max(), min=0)
    scale = (hi - lo) / 255
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(0 - lo / scale), 0, 255)
    q = torch.clamp(torch.round(x / scale) + zero_point, 0, 255)
    return q, scale, zero_point


@torch.library.custom_op("effc::int8_linear_dynamic", mutates_args=())
def int8_linear_dynamic(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = dequant(quant(x)) @ dequant(weight_t) + bias, as ONNX Runtime's DynamicQuantizeMatMul computes it:
    activations quantized per tensor at run time (uint8, asymmetric), weights int8 per output channel.
    Integer products are accumulated exactly (float64 holds int32 sums exactly)."""
    q, scale, zero_point = quantize_activation_dynamic(x)
    acc = (q - zero_point).double() @ weight_t.double()
    y = (acc * (scale.double() * weight_scale.double())).to(x.dtype)
    return y if bias is None else y + bias


@int8_linear_dynamic.register_fake
def fake(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


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


OP = register(Op(torch.ops.effc.int8_linear_dynamic.default,
                 {"onnx": int8_linear_dynamic_qdq, "ort": int8_linear_dynamic_ort}, fake))
