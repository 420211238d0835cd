"""Symmetric int8 weights: one scale per output channel (GEMM weights) or per row (embedding tables)."""

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


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 per row (one scale per vocabulary entry): [V, D] -> (int8 [V, D], scale [V])."""
    q_t, scale = quantize_weight_per_channel(weight, "full")  # a table lookup: no GEMM pairs to protect
    return q_t.t().contiguous(), scale
