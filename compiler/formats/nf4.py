"""NF4 (QLoRA) storage: 4-bit NormalFloat codes, block-wise absmax, double quantization of the absmax
constants; bit-exact with bitsandbytes 0.50.2 on CPU:

    packed, qs = bnb.functional.quantize_4bit(W, blocksize=64,
                     compress_statistics=True, quant_type="nf4")
    W_hat     = bnb.functional.dequantize_4bit(packed, qs)

No bitsandbytes import. Every detail below was taken from bnb 0.50.2's
functional.py, backends/default/ops.py, backends/cpu/ops.py and the
disassembly of libbitsandbytes_cpu.so (the C++ 8-bit blockwise quantizer).

Pipeline (bnb semantics):
  1. NF4 stage (bnb's "default" torch kernel; bnb has no C++ CPU quantize_4bit):
     flatten W row-major to float32, blocks of 64 consecutive elements,
     absmax per block, x * (1/absmax), clamp to [-1,1], nearest NF4 code via
     float32 midpoints with ties going to the LOWER code, two codes per
     byte, FIRST element in the HIGH nibble, packed shape [(n+1)//2, 1] uint8.
  2. Double quantization (compress_statistics=True):
     offset = absmax.mean() (float32, torch reduction),
     absmax - offset -> 8-bit blockwise quantization, block 256, signed dynamic
     map. On CPU this is the C++ kernel, which does NOT do exact
     nearest-code search: it goes through a 65536-entry lookup table (see
     _quantize_blockwise_bnb_cpu).
  3. Dequant: absmax = dyn[q8] * absmax2[i//256] + offset (float32, in this
     order), W_hat = nf4[q4] * absmax[i//64] (float32), then cast to the
     output dtype.
"""

from __future__ import annotations

import math

import torch

from effc.formats.nbits import dequantize

# --------------------------------------------------------------------------
# Code tables
# --------------------------------------------------------------------------

# The 16 NF4 values, exactly as hardcoded in bnb's get_4bit_type("nf4"). They
# also match the C++ nf4_lut in libbitsandbytes_cpu.so and the CUDA
# dDequantizeNF4. Taken from create_normal_map(offset=0.9677083): quantiles of
# N(0,1), 8 positive and 7 negative, plus an exact 0, scaled to [-1, 1].
# bnb does data.div_(data.abs().max()), which divides by 1.0 and so changes nothing.
# Sorted ascending, so the code index equals the value rank.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Decision thresholds: float32 midpoints, computed like bnb's default kernel
# ((code[:-1] + code[1:]) / 2 in float32). bucketize(right=False) returns
# #{bounds < x}, so x exactly on a midpoint goes to the LOWER code. This is
# also the CUDA dQuantizeNF4 rule (`x > threshold` -> upper code); its 15
# literal thresholds round to these same float32 values (checked in
# check_against_bnb.py).
NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Same algorithm and arithmetic as bnb.functional.create_dynamic_map
    (Dettmers' 8-bit "dynamic tree" type): for each decade 10^-6 .. 10^0 it
    places 2^i bin-centres of linspace(0.1, 1) (float32 linspace, then Python
    double multiplication by the power of ten), mirrored for the sign; then
    0 and 1.0 are added, and the 256 values are sorted and cast to float32.
    With signed=True: 127 positive + 127 negative + 0 + 1.0 = 256 entries,
    min = -0.99297 (not -1), max = 1.0, sorted ascending."""
    data = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    assert len(data) == 2**total_bits
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


DYNAMIC_MAP_SIGNED = create_dynamic_map(signed=True)

# --------------------------------------------------------------------------
# Stage 1: NF4 codes + per-block absmax  (bnb backends/default/ops.py
# quantize_4bit; bnb 0.50.2 has no C++ CPU quantize_4bit, so CPU runs this)
# --------------------------------------------------------------------------


def _nf4_codes(flat: torch.Tensor, block: int):
    n = flat.numel()
    rem = n % block
    full = n - rem
    a = flat[:full].reshape(full // block, block)
    absmax = a.abs().max(dim=-1)[0]
    # Full blocks multiply by a float32 reciprocal. clamp(min=1e-38) only
    # avoids 0*inf for an all-zero block; the STORED absmax stays 0, and
    # every element of such a block gets code 7 (0.0).
    scaled = torch.clamp(a * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # bnb quirk: the tail block DIVIDES (x / am) where full blocks multiply
        # by the reciprocal (1 ulp apart now and then), and stores the
        # CLAMPED absmax (an all-zero tail stores 1e-38, not 0).
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    # Nearest NF4 value; a tie goes to the lower code (see NF4_BOUNDS).
    codes = torch.bucketize(scaled, NF4_BOUNDS.to(flat.device), out_int32=True).to(torch.uint8)
    return codes, absmax


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    # Odd count: bnb pads the *scaled* values with 0.0, which quantizes to
    # code 7, so the final low nibble is 7 (0b0111), not 0.
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.full((1,), 7, dtype=torch.uint8, device=codes.device)])
    # Element 2j -> high nibble, element 2j+1 -> low nibble (same as the CUDA
    # kernel: qvals[j] = q(v[2j]) << 4 | q(v[2j+1])). bnb's shape is [(n+1)//2, 1].
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], dim=1).reshape(-1)
    return q[:n]


# --------------------------------------------------------------------------
# Stage 2: 8-bit blockwise quantization of the absmax (double quantization)
# --------------------------------------------------------------------------

_LUT_SIZE = 65536
_lut_cache: dict = {}


def _bnb_cpu_lut(code: torch.Tensor) -> torch.Tensor:
    """Rebuilds build_quantize_lut() from libbitsandbytes_cpu.so (0.50.2),
    all in float32:
        mid[k] = (code[k] + code[k+1]) * 0.5f
        g[i]   = (2.0f*i) / 65535.0f - 1.0f          i = 0..65535
        lut[i] = #{k : mid[k] < g[i]}                (strict <, capped at 255)
    """
    key = tuple(code.tolist())
    if key not in _lut_cache:
        assert bool((code[1:] >= code[:-1]).all()), "code table must be sorted"
        mid = (code[:-1] + code[1:]) * 0.5
        i = torch.arange(_LUT_SIZE, dtype=torch.float32)
        g = (2.0 * i) / float(_LUT_SIZE - 1) - 1.0
        _lut_cache[key] = torch.searchsorted(mid, g, right=False).clamp(max=255).to(torch.uint8)
    return _lut_cache[key]


def _quantize_blockwise_bnb_cpu(x: torch.Tensor, code: torch.Tensor, block: int):
    """Same result as libbitsandbytes_cpu.so cquantize_blockwise_cpu_fp32
    (0.50.2, scalar path), which is what
    bnb.functional.quantize_blockwise(float32 CPU tensor) calls:
        absmax_b = max(0, max|x|)  over the block (short last block: its valid items)
        absmax_b == 0            -> every code 0 (code[0] = -0.99297; harmless,
                                    since dequant multiplies by 0)
        inv   = 1.0f / absmax_b
        v     = clamp(x * inv, -1, 1)
        t     = (v + 1.0f) * 0.5f
        idx   = (uint16) fmaf(t, 65535.0f, 0.5f)   # the compiler emitted vfmadd213ss
        q     = lut[idx]
    The 65536-entry LUT makes this NOT exact nearest-code: normalized values
    are first snapped to a 2/65535 grid. Near zero, where dynamic-map codes are
    closer together than the grid, some codes can never be produced.
    """
    n = x.numel()
    nb = -(n // -block)
    pad = nb * block - n
    xb = torch.nn.functional.pad(x, (0, pad)).view(nb, block)  # zero padding cannot change max|x|
    absmax = xb.abs().max(dim=-1)[0]
    safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    inv = 1.0 / safe
    v = torch.clamp(xb * inv.view(-1, 1), -1.0, 1.0)
    t = (v + 1.0) * 0.5
    # fmaf(t, 65535, 0.5) has one rounding. t*65535 is exact in float64
    # (24 + 16 significand bits), and so is +0.5 for every t where truncation
    # can come out nonzero, so float64 and then a single round to float32
    # gives the fused result.
    y = (t.double() * 65535.0 + 0.5).float()
    idx = y.to(torch.int64)  # C cast truncates; y >= 0.5 > 0
    q = _bnb_cpu_lut(code)[idx]
    q = torch.where((absmax == 0).view(-1, 1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n], absmax


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def quantize_nf4(
    w: torch.Tensor,
    block: int = 64,
    double_quant: bool = True,
    dq_block: int = 256,
) -> dict:
    """w: any shape (normally [N, K]); float32, bfloat16 or float16 (bnb
    upcasts to float32 first, and so does this). Returns a dict:
      packed        uint8 [(numel+1)//2, 1]: code of element 2j in the high nibble
      absmax        float32 [nblocks]: only when double_quant=False
      absmax_codes  uint8   [nblocks]: double_quant only
      absmax2       float32 [ceil(nblocks/dq_block)]: double_quant only
      offset        float32 0-dim tensor: double_quant only
      shape, block, dq_block, dtype (the input dtype, for dequant output)
    """
    if w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {w.dtype}")
    flat = w.reshape(-1).float()  # row-major flatten, as bnb's A.reshape(-1).float()
    codes, absmax = _nf4_codes(flat, block)
    state = {
        "packed": _pack_nibbles(codes),
        "shape": tuple(w.shape),
        "block": block,
        "dq_block": dq_block,
        "dtype": w.dtype,
    }
    if not double_quant:
        state["absmax"] = absmax
        return state
    # offset: a float32 torch mean over the float32 absmax vector. To match
    # bnb bit-exactly it must be this same torch reduction (same torch build
    # and CPU capability); a float64 mean would be 1 ulp off now and then.
    offset = absmax.mean()
    centered = absmax - offset  # float32 subtraction, as bnb does (_absmax - offset)
    q8, absmax2 = _quantize_blockwise_bnb_cpu(centered, DYNAMIC_MAP_SIGNED.to(w.device), dq_block)
    state.update(absmax_codes=q8, absmax2=absmax2, offset=offset)
    return state


def dequantize_absmax(state: dict) -> torch.Tensor:
    """Per-64-block absmax (float32). With double quant this follows bnb's
    dequantize_blockwise(C++ fp32) plus `absmax += offset`:
        absmax[i] = fl32(fl32(dyn[q8[i]] * absmax2[i // dq_block]) + offset)
    two separately rounded float32 ops, no FMA."""
    if "absmax" in state:
        return state["absmax"]
    q8 = state["absmax_codes"].long()
    n = q8.numel()
    scale = state["absmax2"].repeat_interleave(state["dq_block"])[:n]
    return DYNAMIC_MAP_SIGNED.to(q8.device)[q8] * scale + state["offset"]


def dequantize_nf4(state: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W_hat = nf4[q] * absmax[i // block], one float32 multiply (bnb C++ kernel
    and default torch kernel alike), then a round-to-nearest-even cast to
    `dtype`. Pass dtype=state["dtype"] to get what bnb returns. Follows the flat
    row-major block layout for every shape; bnb 0.50.2's AVX-512 CPU dequant
    kernel does not when K%16==0 and K%block!=0 (see report)."""
    shape = state["shape"]
    n = math.prod(shape)
    q = unpack_nibbles(state["packed"], n).long()
    absmax = dequantize_absmax(state).float()
    scale = absmax.repeat_interleave(state["block"])[:n]
    out = NF4_CODE.to(q.device)[q] * scale
    return out.reshape(shape).to(dtype)


def storage_bits_per_param(state: dict) -> float:
    """Stored payload only: packed bytes + per-block constants. Excludes the
    fixed 16- and 256-entry code tables, which are shared by all tensors."""
    n = math.prod(state["shape"])
    nbytes = state["packed"].numel()
    if "absmax" in state:
        nbytes += state["absmax"].numel() * 4
    else:
        nbytes += state["absmax_codes"].numel() + state["absmax2"].numel() * 4 + 4
    return nbytes * 8 / n


def linear_state(packed, absmax, absmax2, offset, out_features: int, in_features: int, block: int,
                 dq_block: int) -> dict:
    """The state dict of an NF4 weight from effc::nf4_linear's arguments (`absmax` is the float block absmax,
    or with double quantization its 8-bit codes, absmax2 and offset then given)."""
    state = {"packed": packed, "shape": (out_features, in_features), "block": block, "dq_block": dq_block}
    if absmax2 is None:
        state["absmax"] = absmax
    else:
        state.update(absmax_codes=absmax, absmax2=absmax2, offset=offset)
    return state


def to_int8_blocks(state: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """NF4 re-expressed as MatMulNBits 8-bit blocks along K (state's block, K a multiple of it): codes
    round(127 * nf4[c]) + 128 as uint8 [N, K/B, B], scales absmax / 127 [N, K/B], and the relative RMS
    difference of that weight from the NF4 weight."""
    n, k = state["shape"]
    block = state["block"]
    codes = unpack_nibbles(state["packed"], n * k).long()
    q8 = (torch.round(NF4_CODE[codes] * 127) + 128).to(torch.uint8).reshape(n, k // block, block)
    scales = (dequantize_absmax(state).float() / 127).reshape(n, k // block)
    nf4_w = dequantize_nf4(state)
    diff = float((dequantize(q8, scales, None, k, block, 8) - nf4_w).norm() / nf4_w.norm().clamp(min=1e-30))
    return q8, scales, diff
