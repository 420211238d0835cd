"""NF4 dequant-GEMM in Triton for the CUDA/TensorRT paths: y = x @ W^T (+ bias), W kept in
bitsandbytes' NF4 layout (optionally double-quantized absmax) and dequantized in registers, one W tile
at a time. Same contract as effc::nf4_linear. Without a GPU its numerics run in Triton's interpreter
and it is compile-checked to PTX/cubin for sm_80/sm_90 (tests/targets/test_triton_nf4.py); the
TensorRT target will call it as a plugin. Needs `triton` (the test and gpu extras).

Layout (effc::nf4_linear / bnb): packed uint8 [(N*K+1)//2, 1], flat row-major W, element 2j in
the HIGH nibble of byte j; one absmax per `block` consecutive flat elements; with double quant
absmax[i] = fl(fl(DYNAMIC_MAP_SIGNED[code8[i]] * absmax2[i // dq_block]) + offset).

Numerics follow effc's reference op: W_hat = fl32(NF4[q] * absmax) (one fp32 multiply), cast
to x.dtype, then the MMA with fp32 accumulation. So for fp16/bf16 x the tensor-core inputs
are bit-identical to the reference's dequantized weight.

Imports without a GPU and without TRITON_INTERPRET; only launches need a GPU or the
interpreter (set TRITON_INTERPRET=1 before `import triton` to run on CPU tensors).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import time

import torch
import triton
import triton.language as tl

from effc.formats.nf4 import DYNAMIC_MAP_SIGNED, NF4_CODE

# The NF4 table as compile-time constants for _nf4_select: float32 values held exactly in Python floats,
# so the kernel's float32 immediates are the table itself.
(_NF4_0, _NF4_1, _NF4_2, _NF4_3, _NF4_4, _NF4_5, _NF4_6, _NF4_7, _NF4_8, _NF4_9, _NF4_10, _NF4_11, _NF4_12, _NF4_13,
 _NF4_14, _NF4_15) = (tl.constexpr(v) for v in NF4_CODE.tolist())

# Codebook lookup strategies (LUT_MODE constexpr). Default GATHER: in the SASS of the main loop
# it needs the fewest instructions on sm_80 and sm_90 (docs/BENCHMARKS.md has the counts: benchmarks/triton_nf4_sass.py).
LUT_SELECT = 0  # binary tree of selects on the code bits: ~10 FSEL per element, pure ALU
LUT_LOAD = 1    # tl.load(lut + q): the pipeliner turns these into per-element cp.async into
                # shared memory (3x the smem, more registers) -- kept for comparison only
LUT_GATHER = 2  # tl.gather from the 16 values loaded once: lowered to one conflict-free
                # shared-memory load (LDS) per element


@triton.jit
def _nf4_select(q):
    # Binary select tree on the 4 code bits: 8 + 4 + 2 + 1 selects whose leaves are
    # immediates (the _NF4_i constants), so no memory traffic and no data-dependent addressing.
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v01 = tl.where(b0, _NF4_1, _NF4_0)
    v23 = tl.where(b0, _NF4_3, _NF4_2)
    v45 = tl.where(b0, _NF4_5, _NF4_4)
    v67 = tl.where(b0, _NF4_7, _NF4_6)
    v89 = tl.where(b0, _NF4_9, _NF4_8)
    vab = tl.where(b0, _NF4_11, _NF4_10)
    vcd = tl.where(b0, _NF4_13, _NF4_12)
    vef = tl.where(b0, _NF4_15, _NF4_14)
    v03 = tl.where(b1, v23, v01)
    v47 = tl.where(b1, v67, v45)
    v8b = tl.where(b1, vab, v89)
    vcf = tl.where(b1, vef, vcd)
    v07 = tl.where(b2, v47, v03)
    v8f = tl.where(b2, vcf, v8b)
    return tl.where(b3, v8f, v07).to(tl.float32)


@triton.jit
def nf4_linear_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, offset_ptr, dmap_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_om, stride_on,
    QBLOCK: tl.constexpr,        # NF4 block (64 in bnb); BLOCK_K must divide it
    DQ_BLOCK: tl.constexpr,      # double-quant block (256 in bnb)
    DOUBLE_QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LUT_MODE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 x (exact fp32 semantics), ignored for fp16/bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ROW_ALIGNED: tl.constexpr,  # K % QBLOCK == 0: one scale per row and K tile (False: per element)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N

    # Clamp out-of-range rows instead of masking inside the loop: their results are dropped
    # by the store mask, and unmasked loads keep the inner loop free of predicates.
    rn_safe = tl.where(n_mask, rn, 0)
    # int64 row offsets: N*K/2 bytes overflows int32 only for very large weights, but the cost
    # is one multiply per tile row outside the loop.
    w_row = rn_safe.to(tl.int64) * (K // 2)
    # Load the tile's BLOCK_K//2 contiguous bytes per row (vectorizable, each byte once) and
    # re-interleave the two nibbles in registers: join puts hi/lo of one byte in the same
    # thread, so the reshape back to [BLOCK_N, BLOCK_K] needs no data movement.
    w_ptrs = packed_ptr + w_row[:, None] + tl.arange(0, BLOCK_K // 2)[None, :]
    x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    blk_base = rn_safe.to(tl.int64) * (K // QBLOCK)

    if LUT_MODE == 2:
        lut = tl.load(lut_ptr + tl.arange(0, 16))
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # ROW_ALIGNED (K % QBLOCK == 0) and QBLOCK % BLOCK_K == 0: the whole K tile of a row lies in one
        # quant block, so the scale is one value per row, decoded once per tile (BLOCK_N loads, not
        # BLOCK_N*BLOCK_K). K % BLOCK_K == 0 either way, so no K masking is needed.
        if ROW_ALIGNED:
            blk = blk_base + k0 // QBLOCK
        else:
            # Blocks straddle rows (K % QBLOCK != 0, bnb's flat layout): each element's block from its flat
            # index; same decode, BLOCK_N*BLOCK_K scale loads (cached) instead of BLOCK_N.
            blk = (rn_safe.to(tl.int64)[:, None] * K + (k0 + rk)[None, :]) // QBLOCK
        if DOUBLE_QUANT:
            code8 = tl.load(absmax_ptr + blk).to(tl.int32)
            # Two separately rounded ops, as bnb; the launch disables fp fusion so this stays
            # mul.rn + add.rn instead of an fma (the fma result differs in the last bit).
            scale = tl.load(dmap_ptr + code8) * tl.load(absmax2_ptr + blk // DQ_BLOCK)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk)
        if ROW_ALIGNED:
            scale = scale[:, None]

        byte = tl.load(w_ptrs).to(tl.int32)
        # element 2j = high nibble, 2j+1 = low nibble -> join on a new last axis, then flatten
        q = tl.join(byte >> 4, byte & 0xF).reshape(BLOCK_N, BLOCK_K)
        # Codebook lookup; q is flattened for gather because tl.gather needs src and index of
        # the same rank (and equal sizes off the gather axis).
        if LUT_MODE == 0:
            v = _nf4_select(q)
        elif LUT_MODE == 1:
            v = tl.load(lut_ptr + q)
        else:
            v = tl.gather(lut, q.reshape(BLOCK_N * BLOCK_K), 0).reshape(BLOCK_N, BLOCK_K)
        w = (v * scale).to(x_ptr.dtype.element_ty)

        xt = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        acc = tl.dot(xt, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K // 2

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=None)
def _tables(device: str):
    return NF4_CODE.to(device).contiguous(), DYNAMIC_MAP_SIGNED.to(device).contiguous()


def pick_config(M: int, block: int, dtype=torch.float16, allow_tf32: bool = False) -> dict:
    """Untuned defaults, chosen from ptxas resource usage (no GPU here to time them; docs/BENCHMARKS.md).
    tl.dot needs every tile dim >= 16; BLOCK_K <= block so a K tile never straddles blocks."""
    bm = 16 if M <= 16 else (32 if M <= 32 else 64)
    # Exact fp32 dots are FMA loops in registers: BLOCK_K=64 spills on sm_80/90, 32 does not.
    bk = 32 if (dtype == torch.float32 and not allow_tf32) else 64
    return dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=min(bk, block), num_warps=4, num_stages=3)


def nf4_linear_triton(x, packed, absmax, absmax2, offset, bias, N, K, block=64, dq_block=256,
                      lut_mode=LUT_GATHER, allow_tf32=False, config=None):
    """Same contract as effc::nf4_linear. x [..., K] (fp16/bf16/fp32) -> [..., N] in x.dtype."""
    double_quant = absmax2 is not None
    problems = [
        (K % block != 0, f"K={K} is not a multiple of block {block} (a quant block must not cross rows)"),
        (block < 16 or block & (block - 1), f"block {block} is not a power of two >= 16"),
        (packed.dtype != torch.uint8 or packed.numel() != (N * K + 1) // 2, "packed must be uint8 [(N*K+1)//2]"),
        (absmax.numel() != N * K // block, "absmax must have one entry per block"),
        (double_quant and (absmax.dtype != torch.uint8 or offset is None or dq_block & (dq_block - 1)),
         "double quantization needs uint8 absmax codes, absmax2, offset and a power-of-two dq_block"),
        (x.shape[-1] != K or x.dtype not in (torch.float16, torch.bfloat16, torch.float32),
         f"x must be fp16/bf16/fp32 with {K} features"),
    ]
    for bad, why in problems:
        if bad:
            raise ValueError(f"nf4_linear_triton: {why}")

    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = dict(config or pick_config(M, block, x.dtype, allow_tf32))
    if block % cfg["BLOCK_K"]:
        raise ValueError(f"nf4_linear_triton: BLOCK_K {cfg['BLOCK_K']} must divide block {block}")
    lut, dmap = _tables(str(x.device))
    dummy = lut  # any valid pointer for the arguments that a constexpr branch never reads
    # fp32: the reference op is an fp32 matmul, so default to exact ("ieee") dots; tf32 is opt-in.
    prec = ("tf32" if allow_tf32 else "ieee") if x.dtype == torch.float32 else "ieee"
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    nf4_linear_kernel[grid](
        x2, packed.reshape(-1), absmax.reshape(-1),
        absmax2.reshape(-1) if double_quant else dummy,
        offset.reshape(-1).float() if double_quant else dummy,
        dmap, lut, bias if bias is not None else dummy, out,
        M, N, K, x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
        QBLOCK=block, DQ_BLOCK=dq_block, DOUBLE_QUANT=double_quant, HAS_BIAS=bias is not None,
        LUT_MODE=lut_mode, DOT_PRECISION=prec, ROW_ALIGNED=True, enable_fp_fusion=False, **cfg,
    )
    return out.reshape(*x.shape[:-1], N)


# --------------------------------------------------------------------------------------------
# Compile check without a GPU
# --------------------------------------------------------------------------------------------

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _resource_usage(cubin: bytes) -> dict:
    """Registers / shared / spills from the bundled cuobjdump (the driver would report n_regs
    only when loading the cubin, which needs a GPU)."""
    from triton import knobs
    try:
        tool = knobs.nvidia.cuobjdump.path
    except RuntimeError:
        tool = shutil.which("cuobjdump")
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    return {} if not m else dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]),
                                 local=int(m[4]))


def compile_check(arch: int, dtype=torch.float16, double_quant: bool = True, has_bias: bool = True,
                  lut_mode: int = LUT_GATHER, block: int = 64, M: int = 64, allow_tf32: bool = False,
                  config: dict | None = None, sass: bool = False) -> dict:
    """triton.compile for GPUTarget("cuda", arch, 32): TTIR -> TTGIR -> LLVM -> PTX -> cubin
    (cubin via triton's bundled ptxas). No GPU, no driver needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = nf4_linear_kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        # TRITON_INTERPRET=1 replaces @triton.jit with InterpretedFunction and patches
        # triton.language in-process; the code generator then rejects the kernel.
        raise RuntimeError("compile_check needs a process started without TRITON_INTERPRET=1")
    t = _DTYPES[dtype]
    cfg = dict(config or pick_config(M, block, dtype, allow_tf32))
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    prec = "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"
    sig = {
        "x_ptr": f"*{t}", "packed_ptr": "*u8", "absmax_ptr": "*u8" if double_quant else "*fp32",
        "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "dmap_ptr": "*fp32", "lut_ptr": "*fp32",
        "bias_ptr": f"*{t}", "out_ptr": f"*{t}",
        "M": "i32", "N": "i32", "K": "i32",
        "stride_xm": "i32", "stride_xk": "i32", "stride_om": "i32", "stride_on": "i32",
    }
    const = dict(QBLOCK=block, DQ_BLOCK=256, DOUBLE_QUANT=double_quant, HAS_BIAS=has_bias,
                 LUT_MODE=lut_mode, DOT_PRECISION=prec, ROW_ALIGNED=True, **cfg)
    for k in const:
        sig[k] = "constexpr"
    # Unit strides as the JIT would specialize them (stride 1 -> constant), plus 16-byte
    # alignment of every pointer, so the PTX matches what a real launch would build.
    const.update(stride_xk=1, stride_on=1)
    sig.update(stride_xk="constexpr", stride_on="constexpr")
    # As the JIT specializes for N, K and row strides that are multiples of 16 (the LLM case).
    aligned = [a for a in sig if a.endswith("_ptr")] + ["N", "K", "stride_xm", "stride_om"]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    t0 = time.perf_counter()
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False))
    secs = time.perf_counter() - t0
    ptx, cubin = ck.asm["ptx"], ck.asm.get("cubin", b"")
    info = dict(arch=arch, name=ck.metadata.name, compile_s=round(secs, 3), ptx_bytes=len(ptx),
                cubin_bytes=len(cubin), shared_mem=ck.metadata.shared, num_warps=ck.metadata.num_warps,
                ptx_has_entry=f".entry {ck.metadata.name}" in ptx,
                mma=sorted(set(re.findall(r"\b(mma\.sync\.\S+|wgmma\.mma_async\.\S+)", ptx)))[:4])
    info.update(_resource_usage(cubin))
    from triton.backends.nvidia.compiler import get_ptxas
    tool = get_ptxas(arch)  # bundled bin/ptxas (<sm_90) or bin/ptxas-blackwell, unless TRITON_PTXAS*_PATH
    info.update(ptxas=tool.path, ptxas_version=tool.version)
    if sass:
        info["ptx"], info["cubin"] = ptx, cubin
    return info



# --------------------------------------------------------------------------------------------
# The TensorRT plugin's kernels (targets/trt_plugins.py: nf4_gemm, nf4_gemm_dq)
# --------------------------------------------------------------------------------------------
# tensorrt.plugin launches an AOT kernel with its arguments in the order: plugin input pointers, the scalar
# SymInt32 expressions the aot_impl returns, output pointers (TensorRT samples/python/quickly_deployable_plugins,
# circ_pad_kernel). So each plugin row gets a thin entry point in that order around nf4_linear_kernel (inlined:
# same numerics); x and out are contiguous [M, K] / [M, N], so the strides are K and N. The packed bytes (and
# the double-quant codes) arrive as INT32 tensors and are read through *u8 pointers: same bytes, little-endian.
_PLUGIN_LUT = tl.constexpr(LUT_GATHER)  # the default lookup (fewest instructions, see LUT_GATHER)


@triton.jit
def nf4_gemm_plugin_kernel(x_ptr, packed_ptr, absmax_ptr, lut_ptr, M, N, K, out_ptr,
                           QBLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr, ROW_ALIGNED: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nf4_linear_kernel(x_ptr, packed_ptr, absmax_ptr, lut_ptr, lut_ptr, lut_ptr, lut_ptr, lut_ptr, out_ptr,
                      M, N, K, K, 1, N, 1, QBLOCK=QBLOCK, DQ_BLOCK=256, DOUBLE_QUANT=False, HAS_BIAS=False,
                      LUT_MODE=_PLUGIN_LUT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_K=BLOCK_K, ROW_ALIGNED=ROW_ALIGNED)


@triton.jit
def nf4_gemm_dq_plugin_kernel(x_ptr, packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, lut_ptr, dmap_ptr, M, N, K,
                              out_ptr, QBLOCK: tl.constexpr, DQ_BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              ROW_ALIGNED: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    nf4_linear_kernel(x_ptr, packed_ptr, codes_ptr, absmax2_ptr, offset_ptr, dmap_ptr, lut_ptr, lut_ptr, out_ptr,
                      M, N, K, K, 1, N, 1, QBLOCK=QBLOCK, DQ_BLOCK=DQ_BLOCK, DOUBLE_QUANT=True, HAS_BIAS=False,
                      LUT_MODE=_PLUGIN_LUT, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_K=BLOCK_K, ROW_ALIGNED=ROW_ALIGNED)


# Tactics TensorRT times per profile (autotune): a decode tile (few rows) and a prefill tile.
PLUGIN_TACTICS = {1: 16, 2: 64}  # tactic -> BLOCK_M


def plugin_config(tactic: int, block: int, dtype, K: int) -> dict:
    """Tile sizes of a tactic: pick_config's rules at the tactic's BLOCK_M; where blocks straddle rows
    (K % block != 0) BLOCK_K is the largest of pick_config's, 32, 16 that divides K (K % 16 == 0 needed)."""
    if K % 16:
        raise ValueError(f"plugin kernel: K={K} is not a multiple of 16")
    cfg = pick_config(PLUGIN_TACTICS[tactic], block, dtype)
    if K % block:
        widest = 32 if dtype == torch.float32 else 64  # pick_config's rule before its clamp to the block
        cfg["BLOCK_K"] = next(bk for bk in (64, 32, 16) if bk <= widest and K % bk == 0)
    return cfg


def plugin_launch(double_quant: bool, x, packed_words, absmax, absmax2, offset, N, K, block=64, dq_block=256,
                  tactic=1):
    """Launch the plugin kernel with TensorRT's argument convention on torch tensors (the GPU, or Triton's
    interpreter): x [..., K], packed_words/absmax codes as INT32 words; returns [..., N] in x.dtype."""
    x2 = x.reshape(-1, K).contiguous()
    M = x2.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = plugin_config(tactic, block, x.dtype, K)
    lut, dmap = _tables(str(x.device))
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
                 num_stages=cfg["num_stages"], enable_fp_fusion=False, ROW_ALIGNED=K % block == 0)
    as_bytes = packed_words.contiguous().view(torch.uint8)
    if double_quant:
        nf4_gemm_dq_plugin_kernel[grid](x2, as_bytes, absmax.contiguous().view(torch.uint8), absmax2,
                                        offset.reshape(-1).float(), lut, dmap, M, N, K, out, QBLOCK=block,
                                        DQ_BLOCK=dq_block, DOT_PRECISION="ieee", **tiles)
    else:
        nf4_gemm_plugin_kernel[grid](x2, as_bytes, absmax, lut, M, N, K, out, QBLOCK=block, DOT_PRECISION="ieee",
                                     **tiles)
    return out.reshape(*x.shape[:-1], N)


def plugin_kernel(arch: int, dtype, double_quant: bool, tactic: int, N: int, K: int, block: int = 64,
                  dq_block: int = 256) -> dict:
    """Compile the plugin's kernel for GPUTarget("cuda", arch, 32) without a GPU: {name, ptx, cubin,
    num_warps, shared, block_m, block_n, scalars (the SymInt32 arguments, in order), global_scratch}.
    N and K are the plugin node's attributes, so their 16-divisibility is known here; M (the product of x's
    leading dims) is dynamic. Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = nf4_gemm_dq_plugin_kernel if double_quant else nf4_gemm_plugin_kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("plugin_kernel needs a process started without TRITON_INTERPRET=1")
    if block < 16 or block & (block - 1):
        raise ValueError(f"plugin_kernel: block {block} is not a power of two >= 16")
    t = _DTYPES[dtype]
    cfg = plugin_config(tactic, block, dtype, K)
    sig = {"x_ptr": f"*{t}", "packed_ptr": "*u8"}
    if double_quant:
        sig.update(codes_ptr="*u8", absmax2_ptr="*fp32", offset_ptr="*fp32", lut_ptr="*fp32", dmap_ptr="*fp32")
    else:
        sig.update(absmax_ptr="*fp32", lut_ptr="*fp32")
    sig.update(M="i32", N="i32", K="i32", out_ptr=f"*{t}")
    const = dict(QBLOCK=block, DOT_PRECISION="ieee", ROW_ALIGNED=K % block == 0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_K=cfg["BLOCK_K"], **({"DQ_BLOCK": dq_block} if double_quant else {}))
    for k in const:
        sig[k] = "constexpr"
    # TensorRT allocates every plugin tensor 256-byte aligned; N, K divisibility only where it holds.
    aligned = [a for a in sig if a.endswith("_ptr")] + [a for a, v in (("N", N), ("K", K)) if v % 16 == 0]
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                        target=GPUTarget("cuda", arch, 32),
                        options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], enable_fp_fusion=False))
    return dict(name=ck.metadata.name, ptx=ck.asm["ptx"], cubin=ck.asm.get("cubin", b""),
                num_warps=ck.metadata.num_warps, shared=ck.metadata.shared, block_m=cfg["BLOCK_M"],
                block_k=cfg["BLOCK_K"], row_aligned=K % block == 0,
                block_n=cfg["BLOCK_N"], scalars=("M", "N", "K"),
                global_scratch=getattr(ck.metadata, "global_scratch_size", 0),
                profile_scratch=getattr(ck.metadata, "profile_scratch_size", 0))
