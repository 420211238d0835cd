"""effc_native::nf4_linear, the C++ NF4 kernel: every SIMD path this CPU has against the reference op
effc::nf4_linear (dequantize in float32, then matmul), over decode (GEMV) and prefill (tiled GEMM)
shapes, blocks that straddle rows, odd K, with and without double quantization; its tables against
effc.formats.nf4; and its fake implementation under torch.export with a dynamic batch."""

from __future__ import annotations

import pytest
import torch

from effc import native
from effc.errors import EffcError
from effc.formats.nf4 import DYNAMIC_MAP_SIGNED, NF4_CODE, quantize_nf4
from effc.ops.nf4_linear import nf4_linear

try:
    native.load()
except EffcError as e:  # no C++ compiler here
    pytest.skip(str(e), allow_module_level=True)
kernel = torch.ops.effc_native
BEST = kernel.nf4_kernel_isa("auto")
ISAS = ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(BEST) + 1]


@pytest.fixture(params=["scalar", "avx2", "avx512"])
def isa(request):
    if request.param not in ISAS:
        pytest.skip(f"this CPU has no {request.param} (best: {BEST})")
    kernel.nf4_kernel_isa(request.param)
    yield request.param
    kernel.nf4_kernel_isa("auto")


def _args(state, double_quant: bool):
    if double_quant:
        return state["packed"], state["absmax_codes"], state["absmax2"], state["offset"].reshape(1)
    return state["packed"], state["absmax"], None, None


def test_tables_equal_effc_nf4():
    tables = kernel.nf4_tables()
    assert torch.equal(tables[:16], NF4_CODE) and torch.equal(tables[16:], DYNAMIC_MAP_SIGNED)


# (N, K, block): SIMD-shaped; block 16 (below the AVX-512 chunk); K % block != 0 (blocks straddle rows);
# odd K (rows start mid-byte); N above one GEMM tile (128 rows).
SHAPES = [(48, 256, 64), (40, 96, 32), (24, 48, 16), (17, 100, 64), (9, 7, 64), (300, 128, 128)]


@pytest.mark.parametrize("n,k,block", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 64])  # <= 4: register GEMV; more: decoded tiles + GEMM
def test_matches_reference_op(isa, n, k, block, rows):
    torch.manual_seed(n * k + rows)
    w = torch.randn(n, k) * 0.05
    w[0, :3] = 2.0  # an outlier block
    x, bias = torch.randn(rows, k), torch.randn(n)
    for double_quant in (True, False):
        args = _args(quantize_nf4(w, block, double_quant), double_quant)
        want = nf4_linear(x, *args, bias, n, k, block, 256)
        got = kernel.nf4_linear(x, *args, bias, n, k, block, 256)
        # Same products, summed in another order: float32 rounding only.
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_batched_input():
    torch.manual_seed(0)
    w, x = torch.randn(64, 128), torch.randn(2, 3, 128)
    args = _args(quantize_nf4(w), True)
    got = kernel.nf4_linear(x, *args, None, 64, 128, 64, 256)
    assert got.shape == (2, 3, 64)
    torch.testing.assert_close(got, nf4_linear(x, *args, None, 64, 128, 64, 256), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 9])
def test_half_precision_follows_the_reference(isa, dtype, rows):
    """nf4.compute_dtype: the weight is rounded to x's dtype and the matmul runs in it, as in the
    reference op; the two differ only in GEMM blocking (float32 accumulation, one rounding)."""
    torch.manual_seed(rows)
    w, x, bias = torch.randn(160, 256), torch.randn(rows, 256).to(dtype), torch.randn(160).to(dtype)
    args = _args(quantize_nf4(w), True)
    want = nf4_linear(x, *args, bias, 160, 256, 64, 256)
    got = kernel.nf4_linear(x, *args, bias, 160, 256, 64, 256)
    assert got.dtype == dtype
    ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    torch.testing.assert_close(got.float(), want.float(), rtol=2 * ulp, atol=2 * ulp * want.abs().max().item())


def test_isa_requests_are_checked():
    with pytest.raises(RuntimeError, match="unknown ISA"):
        kernel.nf4_kernel_isa("neon")
    assert kernel.nf4_kernel_isa("") == kernel.nf4_kernel_isa("auto") == BEST


def test_export_with_dynamic_batch():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    args = _args(quantize_nf4(w), True)

    class Layer(torch.nn.Module):
        def forward(self, x):
            return kernel.nf4_linear(x, *args, None, 32, 64, 64, 256)

    ep = torch.export.export(Layer(), (torch.randn(3, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert sum(n.target is kernel.nf4_linear.default for n in ep.graph.nodes) == 1
    x = torch.randn(5, 64)
    torch.testing.assert_close(ep.module()(x), nf4_linear(x, *args, None, 32, 64, 64, 256), rtol=1e-5, atol=1e-5)
