"""Numerics of effc.targets.triton_nf4 in Triton's CPU interpreter, against effc.formats.nf4 (dequantize, then
a float32 matmul). Run by tests/targets/test_triton_nf4.py in a child process started with
TRITON_INTERPRET=1: Triton reads it when it is first imported, and effc's other imports (peft,
transformers) import triton early in the main test process."""

import os

import pytest
import torch

import effc.formats.nf4 as ref
from effc.ops.nf4_linear import nf4_linear

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_triton_nf4.py with TRITON_INTERPRET=1", allow_module_level=True)
import effc.targets.triton_nf4 as nt  # noqa: E402


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
    y_op = nf4_linear(x, *q, b, N, K, 64, 256)
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
