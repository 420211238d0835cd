"""effc::nf4_linear: a linear layer with NF4 weights (effc.formats.nf4: bitsandbytes' codes, packing and
double-quantized absmax), dequantized to float32 for the matmul as QLoRA computes. The torch target runs
it as effc_native::nf4_linear (compiler/csrc), which never builds the float weight."""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset20 as op

from effc.formats.nf4 import DYNAMIC_MAP_SIGNED, NF4_CODE, dequantize_nf4, linear_state
from effc.ops.registry import Op, register
from effc.targets.contrib_ops import msft
from effc.targets.trt_plugins import placeholder_opset

_pending = placeholder_opset()


@torch.library.custom_op("effc::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
               offset: torch.Tensor | None, bias: torch.Tensor | None, out_features: int, in_features: int,
               block: int, dq_block: int) -> torch.Tensor:
    """y = x @ W^T + bias with W stored as NF4 (bitsandbytes layout) and dequantized in float32 for the
    matmul, as QLoRA computes. `absmax` is the float block absmax, or with double quantization its
    8-bit codes (then absmax2 and offset are given)."""
    w = dequantize_nf4(linear_state(packed, absmax, absmax2, offset, out_features, in_features, block, dq_block))
    y = x @ w.t().to(x.dtype)
    return y if bias is None else y + bias


@nf4_linear.register_fake
def fake(x, packed, absmax, absmax2, offset, bias, out_features, in_features, block, dq_block):
    return x.new_empty(*x.shape[:-1], out_features)


def _nf4_absmax(absmax, absmax2, offset, dq_block: int):
    """The float block absmax: as stored, or decoded from double quantization as bitsandbytes does it,
    dynamic_map[code] * absmax2[i // dq_block] + offset (two float32 roundings). Constant: ONNX Runtime
    folds it at build time."""
    if absmax2 is None:
        return absmax
    table = op.Constant(value=onnx.numpy_helper.from_array(DYNAMIC_MAP_SIGNED.numpy(), "dynamic_map"))
    blocks = absmax.shape[0]
    per_block = op.Reshape(op.Expand(op.Unsqueeze(absmax2, [1]), op.Constant(value_ints=[absmax2.shape[0], dq_block])),
                           op.Constant(value_ints=[-1]))
    per_block = op.Slice(per_block, op.Constant(value_ints=[0]), op.Constant(value_ints=[blocks]))
    return op.Add(op.Mul(op.Gather(table, op.Cast(absmax, to=onnx.TensorProto.INT64)), per_block), offset)


def nf4_linear_ort(x, packed, absmax, absmax2, offset, bias, out_features: int, in_features: int, block: int,
                   dq_block: int):
    """ONNX Runtime's MatMulBnb4 takes bitsandbytes' packing as is (first element in the high nibble) with
    float absmax: exact NF4, but it dequantizes the whole weight on every call (docs/ONNXRUNTIME.md:
    slower than fp32 on CPU)."""
    scales = _nf4_absmax(absmax, absmax2, offset, dq_block)
    codes = op.Reshape(packed, op.Constant(value_ints=[-1]))
    y = msft.MatMulBnb4(x, codes, scales, K=in_features, N=out_features, block_size=block, quant_type=1)
    return y if bias is None else op.Add(y, bias)


def nf4_linear_portable(x, packed, absmax, absmax2, offset, bias, out_features: int, in_features: int, block: int,
                        dq_block: int):
    """Standard ops: unpack the nibbles, look the codes up in the NF4 table, scale by the block absmax,
    MatMul. Everything before the MatMul is constant, so a runtime may fold it to a float weight at load."""
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


def nf4_linear_trt(x, packed, absmax, absmax2, offset, bias, out_features: int, in_features: int, block: int,
                   dq_block: int):
    """TensorRT: effc's Triton NF4 dequant-GEMM as a plugin (targets/trt_plugins.py). This emits the
    placeholder that trt_plugins.finalize() turns into the nf4_gemm / nf4_gemm_dq plugin node, its INT32
    weight initializers and its reference function (and refuses layouts the kernel cannot take); the bias
    is a standard Add that TensorRT fuses."""
    if absmax2 is None:
        y = _pending.nf4_gemm(x, packed, absmax, N=out_features, K=in_features, block=block)
    else:
        y = _pending.nf4_gemm_dq(x, packed, absmax, absmax2, offset, N=out_features, K=in_features, block=block,
                                 dq_block=dq_block)
    return y if bias is None else op.Add(y, bias)


OP = register(Op(torch.ops.effc.nf4_linear.default,
                 {"onnx": nf4_linear_portable, "ort": nf4_linear_ort, "torch": "effc_native::nf4_linear",
                  "trt": nf4_linear_trt}, fake))
