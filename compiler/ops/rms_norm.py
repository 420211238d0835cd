"""effc::rms_norm: a decoder's RMSNorm (Llama, Mistral, Qwen2, Phi-3, Gemma's (1 + weight) form too):
weight * (x * rsqrt(mean(x², -1) + eps)), the mean taken in float32 and the normalized value cast back to
x's dtype before the weight multiplies it, as transformers' LlamaRMSNorm computes it.

The "ort" column lowers it to ONNX Runtime's SimplifiedLayerNormalization (one kernel where the export
has Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul); passes/rms_norm.py puts it in the graph inside
the ort target's build. ORT registers that op in the ONNX domain (since version 1), not com.microsoft,
and onnx has no schema for it: targets/contrib_ops.py registers one for onnxscript to build the node.
"""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

from effc.ops.registry import Op, register
import effc.targets.contrib_ops  # noqa: F401  (registers SimplifiedLayerNormalization's schema)


@torch.library.custom_op("effc::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight [H] * RMS-normalized x [..., H]: exactly the captured pow -> mean -> add -> rsqrt -> mul ->
    (cast) -> mul chain."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    return weight * hidden.to(x.dtype)


@rms_norm.register_fake
def fake(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def rms_norm_simplified(x, weight, eps: float):
    """SimplifiedLayerNormalization over the last axis, its statistics in float32 (stash_type=1). The
    lowering only fuses float32 norms, so the reference's cast back to x's dtype is the identity here."""
    y, _ = op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=float(eps), stash_type=1)
    return y


OP = register(Op(torch.ops.effc.rms_norm.default, {"ort": rms_norm_simplified}, fake))
