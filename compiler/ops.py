"""effc's custom torch operators. Each has a reference implementation (so a graph after any pass still
runs in PyTorch) and a fake implementation (so torch.export and the ONNX exporter see shapes).
Targets translate them to their own operators (targets/*.py translations()).

Importing this module registers the ops; passes and targets that use them import it.
"""

from __future__ import annotations

import torch

QMAX_WEIGHT = 127  # symmetric int8 weights: [-127, 127], zero point 0 (what TensorRT's explicit quantization reads)

# How int8 GEMM weights may use the 8-bit range. ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
# (AVX2, AVX-512 without VNNI) multiply with vpmaddubsw, which adds the products of K-adjacent pairs
# (k = 2i, 2i+1) in int16 with saturation: activations reach 255, so |w[2i] + w[2i+1]| > 128 overflows and
# the outputs are wrong (measured on an emulated AVX2 CPU: tests/test_int8_isa.py). Every int8 GEMM with
# activations quantized at run time or calibrated goes through those kernels.
#   pairs: the per-channel scale also fits every pair sum into +-128 (scale = max(absmax / 127,
#          max |w[2i] + w[2i+1]| / 128)). Exact on every x86 CPU; costs 0.4-2.5 dB weight SQNR against
#          full on all-MiniLM-L6-v2's weights (7bit costs 4-6 dB).
#   7bit:  [-63, 63] (ONNX Runtime quantize_dynamic's reduce_range): exact whatever a kernel pairs.
#   full:  [-127, 127] unconstrained; right only on VNNI CPUs (vpdpbusd adds in int32), so the
#          artifact records that it needs VNNI and effc.runtime refuses it elsewhere.
WEIGHT_RANGES = ("pairs", "7bit", "full")
PAIR_LIMIT = 128  # 255 * 128 = 32640 <= 32767: the largest pair sum an int16 holds at activation 255


def quantize_weight_per_channel(weight: torch.Tensor, weight_range: str = "pairs") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight [N, K] -> (int8 transposed [K, N], scale [N]).
    `weight_range` (WEIGHT_RANGES) says how codes may use the range: see the comment above."""
    if weight_range not in WEIGHT_RANGES:
        raise ValueError(f"weight_range {weight_range!r} is not one of {WEIGHT_RANGES}")
    qmax = 63 if weight_range == "7bit" else QMAX_WEIGHT
    w = weight.detach().double()
    scale = w.abs().amax(dim=1) / qmax
    if weight_range == "pairs":
        scale = torch.maximum(scale, _pair_sums(w).abs().amax(dim=1) / PAIR_LIMIT)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)
    if weight_range == "pairs" and _pair_sums(q).abs().max() > PAIR_LIMIT:  # rounding cannot push past it
        raise RuntimeError("int8 weight pair past the int16 limit")  # a bug, not bad input
    return q.to(torch.int8).t().contiguous(), scale.float()


def _pair_sums(w: torch.Tensor) -> torch.Tensor:
    """w[:, 2i] + w[:, 2i+1] for every K-adjacent pair (a last odd column pairs with the kernel's zero padding)."""
    if w.shape[1] % 2:
        w = torch.nn.functional.pad(w, (0, 1))
    return w[:, 0::2] + w[:, 1::2]


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
def _(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row (one scale per vocabulary entry): [V, D] -> (int8 [V, D], scale [V])."""
    q_t, scale = quantize_weight_per_channel(weight, "full")  # a table lookup: no GEMM pairs to protect
    return q_t.t().contiguous(), scale


@torch.library.custom_op("effc::int8_embedding", mutates_args=())
def int8_embedding(indices: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Embedding lookup in an int8 table with one scale per row: weight[indices] * scale[indices]."""
    return weight[indices].float() * scale[indices].unsqueeze(-1)


@int8_embedding.register_fake
def _(indices, weight, scale):
    return scale.new_empty(*indices.shape, weight.shape[1])


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
def _(x, x_scale, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


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
def _(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])


@torch.library.custom_op("effc::int8_linear_weight_only", mutates_args=())
def int8_linear_weight_only(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None = None) -> torch.Tensor:
    """int8 weights per output channel, float activations: y = x @ (weight_t * weight_scale) + bias."""
    y = x @ (weight_t.to(x.dtype) * weight_scale.to(x.dtype))
    return y if bias is None else y + bias


@int8_linear_weight_only.register_fake
def _(x, weight_t, weight_scale, bias=None):
    return x.new_empty(*x.shape[:-1], weight_t.shape[1])

from effc import nf4  # noqa: E402,F401  (registers effc::nf4_linear)
from effc import int4  # noqa: E402,F401  (registers effc::nbits_linear)
