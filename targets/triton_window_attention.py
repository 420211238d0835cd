"""effc::window_attention's band in Triton for the CUDA/TensorRT paths: a flash-attention kernel that reads
only the key blocks a query block's band can reach. Same contract as the op (compiler/ops/window_attention.py)
for the band part of its pattern: query i of S at position p = T - S + i sees key j when r = p - j satisfies
r % dilation == 0 and 0 <= r < window*dilation (causal) or |r| < window*dilation (both sides), and
key_valid[b, j]; query head n reads key/value head n // (N // KV); a row that sees no key comes out 0.
Global tokens and block-sparse layouts are not in the kernel (targets/trt_plugins.py refuses them, the
onnx/ort/torch targets run them).

Design (one program = one batch*head and one block of BLOCK_M query rows):
  - the key range the block can reach is [p_first - (window-1)*dilation, p_last] (causal) or that
    widened by (window-1)*dilation on the right (both sides), clipped to [0, T); the loop walks it in
    BLOCK_N-aligned key blocks, so the work is O(S * (window*dilation + BLOCK_M)), not O(S * T);
  - per key block: S = q K^T (fp32 accumulation), the band / key_valid mask in registers, the online
    softmax (running max m and sum l in fp32, exp2 with log2(e) folded into the scale), acc += P V with P
    in the inputs' dtype (fp32: exact "ieee" dots);
  - masked scores are a finite -1e30 and their probabilities are set to 0, so a block, or a whole row,
    without any allowed key adds nothing and needs no NaN guard; the row is 0 when l == 0;
  - D and Dv are padded to powers of two >= 16 in registers (masked loads), so any head size <= 256 works.

Without a GPU its numerics run in Triton's interpreter (tests/targets/triton_window_attention_cases.py) and
it is compile-checked to PTX/cubin for sm_80/sm_90 (tests/targets/test_triton_window_attention.py). Imports
without a GPU and without TRITON_INTERPRET; only launches need a GPU or the interpreter.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

from effc.targets.triton_nf4 import _DTYPES, _resource_usage

_LOG2E = tl.constexpr(1.4426950408889634)
_NEG = tl.constexpr(-1.0e30)  # a masked score: finite, so exp2(m_old - m_new) never sees inf - inf
MAX_HEAD = 256  # the largest head size (D, Dv) the kernel's register tiles take


@triton.jit
def window_attention_kernel(
    q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr,
    S, T, sm_scale,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    WINDOW: tl.constexpr, CAUSAL: tl.constexpr, DILATION: tl.constexpr, HAS_VALID: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (exact fp32 semantics), ignored for fp16/bf16
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q [B, HEADS, S, D], k [B, KV_HEADS, T, D], v [B, KV_HEADS, T, DV], valid int32 [B, T] (1 = attend;
    read only if HAS_VALID), out [B, HEADS, S, DV]; all contiguous. Grid (cdiv(S, BLOCK_M), B * HEADS)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HEADS
    n = pid_bh % HEADS
    kv = b * KV_HEADS + n // (HEADS // KV_HEADS)

    q_base = q_ptr + pid_bh.to(tl.int64) * S * D
    k_base = k_ptr + kv.to(tl.int64) * T * D
    v_base = v_ptr + kv.to(tl.int64) * T * DV
    o_base = out_ptr + pid_bh.to(tl.int64) * S * DV

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < S
    pos = T - S + rows  # query positions
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    dv_ok = offs_dv < DV

    q = tl.load(q_base + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    qk_scale = sm_scale * _LOG2E

    # The key positions this block's band can reach, clipped to [0, T), walked in aligned BLOCK_N blocks.
    span: tl.constexpr = WINDOW * DILATION  # |r| < span (r >= 0 too when causal)
    reach: tl.constexpr = (WINDOW - 1) * DILATION  # farthest key from its query
    p_first = T - S + pid_m * BLOCK_M
    p_last = T - S + tl.minimum(pid_m * BLOCK_M + BLOCK_M, S) - 1
    lo = tl.maximum(p_first - reach, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    if CAUSAL:
        hi = tl.minimum(p_last + 1, T)
    else:
        hi = tl.minimum(p_last + 1 + reach, T)

    m_i = tl.full((BLOCK_M,), _NEG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        col_ok = cols < T
        kt = tl.load(k_base + cols[None, :] * D + offs_d[:, None], mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], fp32

        r = pos[:, None] - cols[None, :]
        if CAUSAL:
            allowed = (r >= 0) & (r < span)
        else:
            allowed = (r < span) & (r > -span)
        if DILATION > 1:
            allowed = allowed & (r % DILATION == 0)
        allowed = allowed & col_ok[None, :]
        if HAS_VALID:
            ok = tl.load(valid_ptr + b.to(tl.int64) * T + cols, mask=col_ok, other=0)
            allowed = allowed & (ok != 0)[None, :]

        s = tl.where(allowed, s, _NEG)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(allowed, tl.exp2(s - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = tl.load(v_base + cols[:, None] * DV + offs_dv[None, :], mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(o_base + rows[:, None] * DV + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def pick_config(queries: int, head: int, v_head: int, dtype=torch.float16) -> dict:
    """Untuned defaults (no GPU here to time them), chosen so that ptxas reports no spills on sm_80 and sm_90
    for head sizes up to 256 (tests/targets/test_triton_window_attention.py checks a few): BLOCK_M 16 for
    decode-sized S, else 64; fp16/bf16 tiles feed the tensor cores (BLOCK_N 64, 32 above 128 wide heads);
    exact fp32 dots are FMA loops in registers, so their tiles are smaller and get 8 warps."""
    width = max(_pow2(head), _pow2(v_head))
    if dtype != torch.float32:
        bm = 16 if queries <= 16 else 64
        bn = 64 if width <= 128 else 32
        warps = 4 if bm == 16 or width <= 64 else 8
    elif queries <= 16:
        bm, bn, warps = 16, 32, 4 if width <= 128 else 8
    else:
        bm, bn, warps = (64, 32, 8) if width <= 64 else (64, 16, 8) if width <= 128 else (32, 16, 8)
    return dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=2)


def _problems(query, key, value, key_valid, window: int, dilation: int) -> list[tuple[bool, str]]:
    return [
        (query.dim() != 4 or key.dim() != 4 or value.dim() != 4, "query, key, value must be [B, N, S, D], "
         "[B, KV, T, D], [B, KV, T, Dv]"),
        (query.dtype not in _DTYPES or key.dtype != query.dtype or value.dtype != query.dtype,
         "query, key, value must share one dtype of fp16/bf16/fp32"),
        (key.shape[:3] != value.shape[:3] or query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3],
         "key/value batch, heads and length, and the head size of query/key, must agree"),
        (key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0, "query heads must be a multiple of key heads"),
        (max(query.shape[3], value.shape[3]) > MAX_HEAD, f"head sizes above {MAX_HEAD} are not supported"),
        (dilation < 1, f"dilation {dilation} must be >= 1"),
        (key_valid is not None and tuple(key_valid.shape) not in ((key.shape[0], key.shape[2]), (1, key.shape[2])),
         "key_valid must be [B, T] or [1, T]"),
    ]


def window_attention_triton(query, key, value, key_valid, window: int, causal: bool, dilation: int, scale: float,
                            config: dict | None = None):
    """effc::window_attention's band (no global tokens, no layout) on torch tensors: the GPU, or Triton's
    interpreter. key_valid: None, or [B, T] / [1, T] of any dtype (nonzero = attend). Returns [B, N, S, Dv]
    in query's dtype."""
    for bad, why in _problems(query, key, value, key_valid, window, dilation):
        if bad:
            raise ValueError(f"window_attention_triton: {why}")
    b, heads, s, d = query.shape
    kv_heads, t, dv = key.shape[1], key.shape[2], value.shape[3]
    q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
    out = torch.empty((b, heads, s, dv), dtype=query.dtype, device=query.device)
    if key_valid is not None:
        valid = (key_valid != 0).to(torch.int32).expand(b, t).contiguous()
    else:
        valid = torch.empty(1, dtype=torch.int32, device=query.device)  # never read (HAS_VALID=False)
    cfg = dict(config or pick_config(s, d, dv, query.dtype))
    grid = (triton.cdiv(s, cfg["BLOCK_M"]), b * heads)
    if s and grid[1]:
        window_attention_kernel[grid](
            q, k, v, valid, out, s, t, float(scale), HEADS=heads, KV_HEADS=kv_heads, D=d, DV=dv, BLOCK_D=_pow2(d),
            BLOCK_DV=_pow2(dv), WINDOW=int(window), CAUSAL=bool(causal), DILATION=int(dilation),
            HAS_VALID=key_valid is not None, DOT_PRECISION="ieee", **cfg)
    return out


# --------------------------------------------------------------------------------------------
# The TensorRT plugin's kernel (targets/trt_plugins.py: band_attention)
# --------------------------------------------------------------------------------------------
# tensorrt.plugin launches an AOT kernel with its arguments in the order: plugin input pointers, the SymInt32
# scalars the aot_impl returns, output pointers (TensorRT samples/python/quickly_deployable_plugins). The
# plugin's query arrives already scaled (targets/window_attention_trt.py multiplies it by the op's scale, since
# the placeholder and tensorrt.plugin's scalars carry integers only) and key_valid is always an int32 [B, T].

@triton.jit
def band_attention_plugin_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, S, T, out_ptr,
                                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, WINDOW: tl.constexpr,
                                 CAUSAL: tl.constexpr, DILATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    window_attention_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, S, T, 1.0, HEADS=HEADS, KV_HEADS=KV_HEADS,
                            D=D, DV=DV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV, WINDOW=WINDOW, CAUSAL=CAUSAL,
                            DILATION=DILATION, HAS_VALID=True, DOT_PRECISION=DOT_PRECISION, BLOCK_M=BLOCK_M,
                            BLOCK_N=BLOCK_N)


# Tactics TensorRT times per profile (autotune): a decode tile (few query rows) and a prefill tile.
PLUGIN_TACTICS = {1: 16, 2: 64}  # tactic -> BLOCK_M


def plugin_config(tactic: int, head: int, v_head: int, dtype) -> dict:
    """Tile sizes of a tactic: pick_config's rules at the tactic's BLOCK_M."""
    return pick_config(PLUGIN_TACTICS[tactic], head, v_head, dtype)


def _plugin_constexprs(cfg: dict, window, causal, dilation, heads, kv_heads, head, v_head) -> dict:
    return dict(HEADS=int(heads), KV_HEADS=int(kv_heads), D=int(head), DV=int(v_head), BLOCK_D=_pow2(head),
                BLOCK_DV=_pow2(v_head), WINDOW=int(window), CAUSAL=bool(causal), DILATION=int(dilation),
                DOT_PRECISION="ieee", BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])


def plugin_launch(query, key, value, key_valid, window: int, causal: int, dilation: int, tactic: int = 1):
    """Launch the plugin kernel with TensorRT's argument convention on torch tensors (the GPU, or Triton's
    interpreter): query already scaled, key_valid int32 [B, T]; returns [B, N, S, Dv] in query's dtype."""
    b, heads, s, d = query.shape
    kv_heads, t, dv = key.shape[1], key.shape[2], value.shape[3]
    if key_valid.dtype != torch.int32 or tuple(key_valid.shape) != (b, t):
        raise ValueError("plugin_launch: key_valid must be int32 [B, T]")
    out = torch.empty((b, heads, s, dv), dtype=query.dtype, device=query.device)
    cfg = plugin_config(tactic, d, dv, query.dtype)
    grid = (triton.cdiv(s, cfg["BLOCK_M"]), b * heads)
    band_attention_plugin_kernel[grid](
        query.contiguous(), key.contiguous(), value.contiguous(), key_valid.contiguous(), s, t, out,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **_plugin_constexprs(cfg, window, causal, dilation, heads, kv_heads, d, dv))
    return out


SHARED_LIMIT = 48 * 1024  # dynamic shared memory a kernel may use without the CUDA opt-in attribute


def plugin_kernel(arch: int, dtype, tactic: int, window: int, causal: int, dilation: int, heads: int,
                  kv_heads: int, head: int, v_head: int) -> dict:
    """Compile the plugin's kernel for GPUTarget("cuda", arch, 32) without a GPU: {name, ptx, cubin, num_warps,
    shared, block_m, block_n, num_stages, scalars (the SymInt32 arguments, in order), global_scratch,
    profile_scratch}. Everything but S and T (the query and key lengths) is a plugin attribute, so a constexpr
    here. The kernel's shared memory is kept within SHARED_LIMIT (whether TensorRT's AOT launcher opts a kernel
    into more is not documented): the tactic's tiles first, then one pipeline stage, then BLOCK_N and BLOCK_M
    halved down to 16. Needs a process without TRITON_INTERPRET."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = band_attention_plugin_kernel
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("plugin_kernel needs a process started without TRITON_INTERPRET=1")
    if max(head, v_head) > MAX_HEAD or heads % kv_heads or dilation < 1:
        raise ValueError(f"plugin_kernel: head sizes <= {MAX_HEAD}, heads a multiple of kv_heads, dilation >= 1")
    t = _DTYPES[dtype]
    cfg = plugin_config(tactic, head, v_head, dtype)
    while True:
        sig = {"q_ptr": f"*{t}", "k_ptr": f"*{t}", "v_ptr": f"*{t}", "valid_ptr": "*i32", "S": "i32", "T": "i32",
               "out_ptr": f"*{t}"}
        const = _plugin_constexprs(cfg, window, causal, dilation, heads, kv_heads, head, v_head)
        for k in const:
            sig[k] = "constexpr"
        # TensorRT allocates every plugin tensor 256-byte aligned; S and T are dynamic: no divisibility for them.
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in sig if a.endswith("_ptr")}
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        if ck.metadata.shared <= SHARED_LIMIT:
            break
        if cfg["num_stages"] > 1:
            cfg["num_stages"] = 1
        elif cfg["BLOCK_N"] > 16:
            cfg["BLOCK_N"] //= 2
        elif cfg["BLOCK_M"] > 16:
            cfg["BLOCK_M"] //= 2
        else:
            break
    return dict(name=ck.metadata.name, ptx=ck.asm["ptx"], cubin=ck.asm.get("cubin", b""),
                num_warps=ck.metadata.num_warps, shared=ck.metadata.shared, block_m=cfg["BLOCK_M"],
                block_n=cfg["BLOCK_N"], num_stages=cfg["num_stages"], scalars=("S", "T"),
                global_scratch=getattr(ck.metadata, "global_scratch_size", 0),
                profile_scratch=getattr(ck.metadata, "profile_scratch_size", 0))


def compile_check(arch: int, dtype=torch.float16, tactic: int = 2, window: int = 64, causal: bool = True,
                  dilation: int = 1, heads: int = 8, kv_heads: int = 2, head: int = 64, v_head: int = 64) -> dict:
    """plugin_kernel plus what the tests read: PTX entry, MMA instructions, ptxas resource usage."""
    import re

    t0 = time.perf_counter()
    k = plugin_kernel(arch, dtype, tactic, window, int(causal), dilation, heads, kv_heads, head, v_head)
    info = dict(arch=arch, name=k["name"], compile_s=round(time.perf_counter() - t0, 3), ptx_bytes=len(k["ptx"]),
                cubin_bytes=len(k["cubin"]), shared_mem=k["shared"], num_warps=k["num_warps"],
                block_m=k["block_m"], block_n=k["block_n"], num_stages=k["num_stages"], scalars=list(k["scalars"]),
                scratch=[k["global_scratch"], k["profile_scratch"]],
                ptx_has_entry=f".entry {k['name']}" in k["ptx"],
                mma=sorted(set(re.findall(r"\b(mma\.sync|wgmma\.mma_async)", k["ptx"]))))
    entry = re.search(r"\.entry\s+(\w+)\(([^)]*)\)", k["ptx"], re.S)
    info["params"] = entry.group(2).count(".param") if entry else None
    info.update(_resource_usage(k["cubin"]))
    return info
