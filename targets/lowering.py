"""Translations of effc's custom ops (effc.ops) into ONNX, one table per target flavour."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

import effc.ops  # noqa: F401  (registers torch.ops.effc.*)
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


def int8_embedding(indices, weight, scale):
    """Gather the int8 rows and their scales; dequantize only what was looked up."""
    rows = op.Cast(op.Gather(weight, indices, axis=0), to=1)  # 1 = FLOAT
    return op.Mul(rows, op.Unsqueeze(op.Gather(scale, indices, axis=0), [-1]))


ORT = {torch.ops.effc.int8_linear_dynamic.default: int8_linear_dynamic_ort,
       torch.ops.effc.int8_embedding.default: int8_embedding,
       torch.ops.effc.int8_linear_static.default: int8_linear_static_ort}
PORTABLE = {torch.ops.effc.int8_linear_dynamic.default: int8_linear_dynamic_qdq,
            torch.ops.effc.int8_embedding.default: int8_embedding,
            torch.ops.effc.int8_linear_static.default: int8_linear_static_qdq}
