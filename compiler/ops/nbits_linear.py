"""effc::nbits_linear: a linear layer with 4- or 8-bit block-wise weights in MatMulNBits' layout
(effc.formats.nbits), dequantized to float32; optionally int8 activations per block at run time."""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

from effc.formats.nbits import dequantize
from effc.ops.registry import Op, register
from effc.targets.blocked_dq import effc_internal
from effc.targets.contrib_ops import msft


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int8 per block of `block` along the last dim (absmax / 127, round half to even), returned
    dequantized: what MatMulNBits does to its input at accuracy_level 4 (matched to 1e-6 here)."""
    k = x.shape[-1]
    padded = torch.nn.functional.pad(x.float(), (0, -(-k // block) * block - k))
    xb = padded.reshape(*x.shape[:-1], -1, block)
    scale = xb.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(xb / scale) * scale).reshape(padded.shape)[..., :k].to(x.dtype)


@torch.library.custom_op("effc::nbits_linear", mutates_args=())
def nbits_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
                 bias: torch.Tensor | None, in_features: int, block: int, bits: int,
                 int8_activations: bool) -> torch.Tensor:
    """y = x @ W^T + bias with W 4- or 8-bit block-wise (MatMulNBits' layout), dequantized to float32;
    with int8_activations, x is quantized per block at run time as well (the faster integer kernel)."""
    if int8_activations:
        x = quantize_activations(x, block)
    y = x @ dequantize(packed, scales, zero_points, in_features, block, bits).t().to(x.dtype)
    return y if bias is None else y + bias


@nbits_linear.register_fake
def fake(x, packed, scales, zero_points, bias, in_features, block, bits, int8_activations):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


def nbits_linear_ort(x, packed, scales, zero_points, bias, in_features: int, block: int, bits: int,
                     int8_activations: bool):
    """MatMulNBits with the layout as stored: float activations (accuracy_level 0), or int8 activations per
    block (accuracy_level 4), as the reference op says."""
    n, groups = scales.shape
    zp = None if zero_points is None else op.Reshape(zero_points, op.Constant(value_ints=[-1]))
    # scales [N, K/B] as stored (MatMulNBits takes them unflattened): a Reshape of an initializer would be
    # folded into a copy in the saved model, and a tied embedding's gather reads the same scales.
    return msft.MatMulNBits(x, packed, scales, zp, None, bias, K=in_features, N=n, bits=bits,
                            block_size=block, accuracy_level=4 if int8_activations else 0)


def _fake_quantize_blocks(x, k: int, block: int):
    """quantize_activations in standard ops: pad K, per-block absmax / 127, round, rescale."""
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


# trt takes the symmetric float-activation form only (explicit quantization): TrtTarget refuses zero
# points and int8_activations before export, in one line.
OP = register(Op(torch.ops.effc.nbits_linear.default,
                 {"onnx": nbits_linear_portable, "ort": nbits_linear_ort, "trt": nbits_linear_portable}, fake))
