"""effc::int8_linear_weight_only: int8 weights per output channel (effc.formats.int8), float activations."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

from effc.formats.nbits import largest_block
from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft


@torch.library.custom_op("effc::int8_linear_weight_only", mutates_args=())
def int8_linear_weight_only(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8 weights per output channel, float activations: y = x @ (weight_t * weight_scale) + bias."""
    y = x @ (weight_t.to(x.dtype) * weight_scale.to(x.dtype))
    return y if bias is None else y + bias


@int8_linear_weight_only.register_fake
def fake(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


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
    block = largest_block(k)
    blocks = k // block
    offset = op.Constant(value=onnx.helper.make_tensor("offset", onnx.TensorProto.INT16, [], [128]))
    codes = op.Cast(op.Add(op.Cast(op.Transpose(weight_t, perm=[1, 0]), to=onnx.TensorProto.INT16), offset),
                    to=onnx.TensorProto.UINT8)
    codes = op.Reshape(codes, op.Constant(value_ints=[n, blocks, block]))
    scales = op.Reshape(op.Expand(op.Unsqueeze(weight_scale, [1]), op.Constant(value_ints=[n, blocks])),
                        op.Constant(value_ints=[-1]))
    return msft.MatMulNBits(x, codes, scales, None, None, bias, K=k, N=n, bits=8, block_size=block,
                            accuracy_level=0)


OP = register(Op(torch.ops.effc.int8_linear_weight_only.default,
                 {"onnx": int8_linear_weight_only_qdq, "ort": int8_linear_weight_only_ort,
                  "trt": int8_linear_weight_only_qdq}, fake))
