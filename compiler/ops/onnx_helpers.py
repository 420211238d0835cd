"""onnxscript pieces that more than one op's translation uses."""

from __future__ import annotations

import onnx
from onnxscript import opset20 as op


def zero_point(data_type: int, value: int):
    """A scalar zero-point constant of an ONNX integer type (onnx.TensorProto.INT8, UINT8)."""
    return op.Constant(value=onnx.helper.make_tensor("zero_point", data_type, [], [value]))
