"""effc.targets.triton_nf4, the NF4 dequant-GEMM for GPUs: numerics in Triton's CPU interpreter
against effc.nf4 (dequantize, then a float32 matmul), plus PTX/cubin compile checks for sm_80 and
sm_90 without a GPU.

@triton.jit decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET is set
only while the kernel module is imported here. The interpreter patches triton.language in-process,
after which triton.compile rejects the kernel; the compile checks run in a child process.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import effc.nf4 as ref

pytest.importorskip("triton", reason="pip install triton (in the test and gpu extras)")
if "effc.targets.triton_nf4" in sys.modules:
    pytest.skip("the kernel module was imported without the interpreter", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
try:
    import effc.targets.triton_nf4 as nt
finally:
    del os.environ["TRITON_INTERPRET"]

# Output-space tolerances (explicit, per x dtype). The reference feeds the MMA the same
# dequantized weights, so the only differences are summation order (fp32) and, for fp16,
# the final rounding of the output (<= 1 ulp, i.e. <= 2^-10 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=5e-5),
       torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


def make(N, K, block, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows with different magnitudes so the per-block absmax (and its double quant) matters.
    w = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, N).unsqueeze(1)
    st = ref.quantize_nf4(w, block=block, double_quant=dq, dq_block=256)
    absmax = st["absmax_codes"] if dq else st["absmax"]
    return st, (st["packed"], absmax, st.get("absmax2"), st.get("offset"))


def reference(x, st, bias):
    # dequantize_nf4 then a float32 matmul; W is first rounded to x.dtype as the kernel (and
    # effc::nf4_linear) feeds it to the MMA in x.dtype. One final rounding to x.dtype.
    w = ref.dequantize_nf4(st).to(x.dtype).float()
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("block", [64, 32])
@pytest.mark.parametrize("N,K", [(32, 64), (48, 128)])
@pytest.mark.parametrize("M", [1, 3, 16])
def test_matches_reference(M, N, K, block, dq, has_bias, dtype):
    st, q = make(N, K, block, dq, seed=M * 1000 + N + K + block)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype) if has_bias else None
    y = nt.nf4_linear_triton(x, *q, bias, N, K, block, 256)
    assert y.dtype == dtype and y.shape == (M, N)
    torch.testing.assert_close(y, reference(x, st, bias), **TOL[dtype])


@pytest.mark.parametrize("lut_mode", [nt.LUT_SELECT, nt.LUT_LOAD, nt.LUT_GATHER], ids=["select", "load", "gather"])
@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("block", [64, 32])
def test_dequant_bit_exact(lut_mode, dq, block):
    # x = I makes y = W_hat^T with exact fp32 sums (one nonzero product per output), so this
    # checks nibble order, codebook, block indexing and the unfused absmax decode bit for bit.
    N, K = 48, 128
    st, q = make(N, K, block, dq, seed=7)
    x = torch.eye(K, dtype=torch.float32)
    y = nt.nf4_linear_triton(x, *q, None, N, K, block, 256, lut_mode=lut_mode)
    assert torch.equal(y.T, ref.dequantize_nf4(st))


def test_dequant_bit_exact_fp16_and_multiple_dq_blocks():
    # 2 * 4096 / 32 = 256 NF4 blocks with dq_block 64 -> 4 absmax2 entries; fp16 output = the
    # reference weight rounded to fp16 (the kernel casts W to x.dtype before the MMA).
    N, K, block, dqb = 64, 128, 32, 64
    w = torch.randn(N, K) * 3
    st = ref.quantize_nf4(w, block=block, double_quant=True, dq_block=dqb)
    assert st["absmax2"].numel() == 4
    x = torch.eye(K, dtype=torch.float16)
    y = nt.nf4_linear_triton(x, st["packed"], st["absmax_codes"], st["absmax2"], st["offset"], None,
                             N, K, block, dqb)
    assert torch.equal(y.T, ref.dequantize_nf4(st, torch.float16))


@pytest.mark.parametrize("lut_mode", [nt.LUT_SELECT, nt.LUT_LOAD], ids=["select", "load"])
def test_lut_modes_match(lut_mode):
    st, q = make(48, 128, 64, True)
    x = torch.randn(3, 128, dtype=torch.float16)
    b = torch.randn(48, dtype=torch.float16)
    torch.testing.assert_close(nt.nf4_linear_triton(x, *q, b, 48, 128, 64, 256, lut_mode=lut_mode),
                               reference(x, st, b), **TOL[torch.float16])


def test_leading_dims_and_effc_op():
    N, K = 48, 128
    st, q = make(N, K, 64, True)
    x = torch.randn(2, 3, K).to(torch.float16)
    b = torch.randn(N).to(torch.float16)
    y = nt.nf4_linear_triton(x, *q, b, N, K, 64, 256)
    assert y.shape == (2, 3, N) and y.dtype == torch.float16
    torch.testing.assert_close(y, reference(x, st, b), **TOL[torch.float16])
    # Same contract as the graph op effc::nf4_linear (it rounds the matmul to fp16 before
    # adding the bias, the kernel adds the bias in fp32: up to ~2 ulp apart).
    y_op = ref.nf4_linear(x, *q, b, N, K, 64, 256)
    torch.testing.assert_close(y, y_op, rtol=4e-3, atol=4e-3)


@pytest.mark.xfail(strict=True, reason="Triton 3.9 interpreter: tl.dot on bf16 multiplies the raw "
                   "uint16 storage (InterpreterBuilder.create_dot), and fp32->bf16 casts truncate")
def test_bf16_interpreter():
    N, K = 32, 64
    st, q = make(N, K, 64, True)
    x = torch.randn(3, K).to(torch.bfloat16)
    y = nt.nf4_linear_triton(x, *q, None, N, K, 64, 256)
    torch.testing.assert_close(y, reference(x, st, None), **TOL[torch.bfloat16])


def test_rejects_k_not_multiple_of_block():
    st, q = make(8, 96, 64, False)  # 96 % 64 != 0: blocks straddle rows
    with pytest.raises(ValueError, match="not a multiple of block"):
        nt.nf4_linear_triton(torch.randn(1, 96), *q, None, 8, 96, 64, 256)


# ------------------------------------------------------------------------------------------
# Compile checks: one child process without TRITON_INTERPRET, all configurations at once.
# ------------------------------------------------------------------------------------------

COMPILE_CASES = {
    "fp16_dq_bias_M64": dict(dtype="float16", M=64),
    "fp16_dq_bias_M1": dict(dtype="float16", M=1),
    "bf16_nodq_M64": dict(dtype="bfloat16", M=64, double_quant=False, has_bias=False),
    "fp32_ieee_M1": dict(dtype="float32", M=1),
}
_CHILD = """
import json, sys, torch
import effc.targets.triton_nf4 as nt
cases = json.loads(sys.argv[1])
out = {}
for arch in (80, 90):
    for name, kw in cases.items():
        kw = dict(kw, dtype=getattr(torch, kw["dtype"]))
        out[f"{arch}-{name}"] = nt.compile_check(arch, **kw)
print("RESULT " + json.dumps(out))
"""


def _ptxas_missing(arch):
    from triton import knobs
    try:
        (knobs.nvidia.ptxas if arch < 90 else knobs.nvidia.ptxas_blackwell).path
        return None
    except RuntimeError as e:
        return str(e)


@pytest.fixture(scope="module")
def compiled():
    missing = [m for m in (_ptxas_missing(80), _ptxas_missing(90)) if m]
    if missing:
        pytest.skip(f"ptxas unavailable: {missing[0]}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # silence the fp-fusion default warning
    res = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(COMPILE_CASES)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("name", list(COMPILE_CASES))
@pytest.mark.parametrize("arch", [80, 90])
def test_compiles_to_ptx_and_cubin(compiled, arch, name):
    r = compiled[f"{arch}-{name}"]
    assert r["ptx_has_entry"] and r["name"] == "nf4_linear_kernel"
    assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0
    # Tensor cores: mma.sync on sm_80 (and on sm_90 for 16-row tiles), wgmma on sm_90 for
    # 64-row tiles; the exact-fp32 ("ieee") dot is an FMA loop by design.
    kw = COMPILE_CASES[name]
    if kw["dtype"] != "float32":
        want = "wgmma" if (arch == 90 and kw["M"] >= 64) else "mma.sync"
        assert any(m.startswith(want) for m in r["mma"]), r["mma"]
    # Register spills would show as stack/local bytes (counts from the bundled cuobjdump).
    if "regs" in r:
        assert r["regs"] <= 255 and r["stack"] == 0 and r["local"] == 0, r
