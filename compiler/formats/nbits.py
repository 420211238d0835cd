"""ONNX Runtime's MatMulNBits block layout (4- and 8-bit codes in blocks along K), and uniform 4-bit
quantization into it: round-to-nearest and GPTQ.

Blocks run along K (the input features) for each output row: weight[n, k] = (q[n, k] - zero[n, k // B])
* scale[n, k // B]. Symmetric: zero point 8 (codes 0..15 stand for -8..7) and, per block, the scale
absmax / d for d in SEARCH with the least squared weight error (clipping the block's largest weight
when that rounds the rest closer: +1 dB SQNR over absmax / 7 on Gaussian blocks, as good as ONNX
Runtime's quantizer, whose negative scales TensorRT refuses), or absmax / 7 without the search;
asymmetric: the block's [min, max] (widened to hold 0) over 15 steps, zero point round(-min / scale).
K is padded with zeros to a whole number of blocks (padded codes equal the zero point, so they
dequantize to 0).

Storage, as MatMulNBits reads it: codes uint8 [N, K/B, B/2] with element k in the LOW nibble when k
is even; scales float [N, K/B]; zero points packed two per byte, low nibble first, [N, ceil(K/B / 2)].
"""

from __future__ import annotations

import math

import torch


def _blocks(k: int, block: int) -> int:
    return -(-k // block)


SEARCH = tuple(7 + 0.25 * i for i in range(13))  # divisors of absmax tried: 7 (nothing clips) .. 10


def block_params(w: torch.Tensor, symmetric: bool, search: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) for each row of w [..., B] (one block per row)."""
    if symmetric:
        absmax = w.abs().amax(-1)
        scale, best = absmax / 7, None
        for d in SEARCH if search else ():
            s = torch.where(absmax == 0, torch.ones_like(absmax), absmax / d)[..., None]
            err = ((torch.clamp(torch.round(w / s), -8, 7) * s - w) ** 2).sum(-1)
            if best is None:
                best = err
            else:  # strictly better only: ties keep the smaller divisor
                scale, best = torch.where(err < best, absmax / d, scale), torch.minimum(err, best)
        zero = torch.full_like(scale, 8)
    else:
        lo = w.amin(-1).clamp(max=0)
        hi = w.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        zero = torch.clamp(torch.round(-lo / torch.where(scale == 0, torch.ones_like(scale), scale)), 0, 15)
    return torch.where(scale == 0, torch.ones_like(scale), scale), zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, 15)


def rtn(weight: torch.Tensor, block: int, symmetric: bool, search: bool = True) -> tuple[torch.Tensor, torch.Tensor,
                                                                                        torch.Tensor]:
    """Round to nearest: codes [N, K_padded] (0..15), scales [N, K/B], zeros [N, K/B]."""
    n, k = weight.shape
    w = torch.nn.functional.pad(weight.detach().float(), (0, _blocks(k, block) * block - k))
    wb = w.reshape(n, -1, block)
    scale, zero = block_params(wb, symmetric, search)
    return quantize_codes(wb, scale[..., None], zero[..., None]).reshape(n, -1), scale, zero


def gptq(weight: torch.Tensor, hessian: torch.Tensor, block: int, symmetric: bool, damp: float = 0.01,
         act_order: bool = False, chunk: int = 128,
         search: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ (Frantar et al. 2023): quantize the columns of W one at a time and spread each column's
    rounding error over the columns not yet quantized, weighted by the inverse Hessian of the layer's
    reconstruction loss (H = 2 X^T X over calibration inputs), so the layer's OUTPUT error is what is
    minimized. Block scales come from the weights as updated so far when a block starts (or, with
    act_order, from the original weights, since columns are then visited by decreasing H diagonal).
    Returns what rtn() returns."""
    n, k = weight.shape
    W = weight.detach().double().clone()
    H = hessian.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = _blocks(k, block)
    scales = torch.zeros(n, groups, dtype=torch.float64)
    zeros = torch.zeros(n, groups, dtype=torch.float64)
    if act_order:
        padded = torch.nn.functional.pad(W, (0, groups * block - k)).reshape(n, groups, block)
        scales, zeros = block_params(padded, symmetric, search)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(n, k, dtype=torch.float64)
    for c1 in range(0, k, chunk):
        c2 = min(c1 + chunk, k)
        W1, Hinv1 = W[:, c1:c2].clone(), Hinv[c1:c2, c1:c2]
        err = torch.zeros_like(W1)
        for i in range(c2 - c1):
            col = int(perm[c1 + i])
            g = col // block
            if not act_order and col % block == 0:  # a block starts: its scale from the updated weights
                end = min(col + block, k)
                cur = torch.cat([W1[:, i:i + end - col], W[:, c2:c2 + max(0, end - c2)]], 1)[:, : end - col]
                scales[:, g], zeros[:, g] = block_params(cur, symmetric, search)
            q = quantize_codes(W1[:, i], scales[:, g], zeros[:, g])
            codes[:, c1 + i] = q
            e = (W1[:, i] - (q - zeros[:, g]) * scales[:, g]) / Hinv1[i, i]
            W1[:, i:] -= e[:, None] * Hinv1[i, i:][None, :]
            err[:, i] = e
        W[:, c2:] -= err @ Hinv[c1:c2, c2:]
    codes = codes[:, torch.argsort(perm)]
    codes = torch.nn.functional.pad(codes, (0, groups * block - k))
    pad_cols = torch.arange(groups * block) >= k
    codes[:, pad_cols] = zeros.repeat_interleave(block, 1)[:, pad_cols]
    return codes, scales.float(), zeros


def pack(codes: torch.Tensor, zeros: torch.Tensor, block: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MatMulNBits' layout: codes [N, K/B, B/2] (even k in the low nibble); zero points packed low nibble
    first [N, ceil(K/B / 2)], or None for symmetric (MatMulNBits' default zero point is 8)."""
    packed = pack_nibbles(codes.reshape(codes.shape[0], -1, block))
    return packed, None if symmetric else pack_nibbles(zeros, fill=8)


def pack_nibbles(values: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """Two 4-bit values per byte along the last dim, element 2i in the LOW nibble (MatMulNBits and ONNX's
    INT4/UINT4 alike); signed values go in as two's complement. An odd last dim is padded with `fill`."""
    v = (values.to(torch.int16) & 15).to(torch.uint8)
    if v.shape[-1] % 2:
        v = torch.nn.functional.pad(v, (0, 1), value=fill)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).contiguous()


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None, in_features: int,
               block: int, bits: int = 4) -> torch.Tensor:
    """float32 weight [N, K] from MatMulNBits' layout (4 bits: two codes per byte, even k low; 8 bits: one
    code per byte, zero point 128 by default)."""
    n, groups = scales.shape
    codes = unpack(packed, n, groups * block, bits).float().reshape(n, groups, block)
    zero = (torch.full((n, groups), float(1 << (bits - 1))) if zero_points is None else
            unpack(zero_points, n, groups, bits).float())
    w = (codes - zero[..., None]) * scales[..., None]
    return w.reshape(n, groups * block)[:, :in_features]


def unpack(packed: torch.Tensor, n: int, width: int, bits: int) -> torch.Tensor:
    """Codes [n, width] (uint8) from MatMulNBits bytes with n rows (4 bits: even index in the low nibble,
    rows padded to whole bytes), for weights and zero points alike."""
    rows = packed.reshape(n, -1)
    if bits == 4:
        rows = torch.stack([rows & 0xF, rows >> 4], -1).reshape(n, -1)
    return rows[:, :width]


def storage_bits(n: int, k: int, block: int, symmetric: bool) -> float:
    groups = _blocks(k, block)
    nbytes = n * groups * block // 2 + n * groups * 4 + (0 if symmetric else n * math.ceil(groups / 2))
    return 8 * nbytes / (n * k)


def largest_block(k: int) -> int:
    """The largest block MatMulNBits takes (a power of two, 16..128) that divides K."""
    for block in (128, 64, 32, 16):
        if k % block == 0:
            return block
    raise ValueError(f"MatMulNBits needs K divisible by 16, got {k}")
