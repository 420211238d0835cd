"""effc_native::window_attention, the flash-style C++ kernel, against the reference op effc::window_attention
(a masked SDPA over allowed_mask) within 1e-5, on every SIMD path this CPU has (forced through the library's
one ISA setting, effc_native::nf4_kernel_isa): causal and bidirectional bands (window 1, 5, wider than the
sequence), dilation, global tokens (a global query row, a global key inside the band), a block layout,
left-padded key_valid (fully masked rows are 0), GQA, queries at the end of a longer cache (decode), odd
head sizes and lengths that are no multiple of the blocks; then torch.export and AOTInductor."""

from __future__ import annotations

import pytest
import torch

import effc.ops  # noqa: F401  (registers effc::window_attention)
from effc import native
from effc.errors import EffcError

try:
    native.load()
except EffcError as e:  # no C++ compiler here
    pytest.skip(str(e), allow_module_level=True)

kernel = torch.ops.effc_native
reference = torch.ops.effc.window_attention
PATHS = ["scalar", "avx2", "avx512"]
BEST = kernel.nf4_kernel_isa("auto")
HAVE = PATHS[: PATHS.index(BEST) + 1]


@pytest.fixture(params=PATHS)
def isa(request):
    if request.param not in HAVE:
        pytest.skip(f"this CPU has no {request.param} (best: {BEST})")
    kernel.nf4_kernel_isa(request.param)
    yield request.param
    kernel.nf4_kernel_isa("auto")


def _inputs(b=2, heads=4, kv_heads=2, s=37, t=37, d=24, dv=20, seed=0, pad=0, layout_block=0, density=0.3):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, s, d, generator=g)
    k = torch.randn(b, kv_heads, t, d, generator=g)
    v = torch.randn(b, kv_heads, t, dv, generator=g)
    valid = None
    if pad:
        valid = torch.ones(b, t, dtype=torch.bool)
        valid[0, :pad] = False  # left padding in the first sequence only
    layout = None
    if layout_block:
        n = (t - 1) // layout_block + 1
        layout = torch.rand(n, n, generator=g) < density
    return q, k, v, valid, layout


def _both(q, k, v, valid, window, causal, dilation, globals_, block, layout, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    args = (q, k, v, valid, window, causal, dilation, list(globals_), block, layout, scale)
    return kernel.window_attention(*args), reference(*args)


def _check(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


# (window, dilation): one key, a few, dilated bands, wider than the sequence.
BANDS = [(1, 1), (5, 1), (5, 2), (4, 3), (100, 1), (30, 2)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "both_sides"])
@pytest.mark.parametrize("window,dilation", BANDS)
def test_bands(isa, window, dilation, causal):
    q, k, v, valid, layout = _inputs(seed=window * 10 + dilation)
    _check(*_both(q, k, v, valid, window, causal, dilation, [], 16, layout))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "both_sides"])
@pytest.mark.parametrize("dilation", [1, 2])
def test_global_tokens(isa, causal, dilation):
    """Global tokens 0 (a sink), 20 and 33: 33 and 20 are query rows that see every key, and 33 also sits
    inside later rows' bands (a key both global and in the band is counted once); -1 and 99 are out of
    range and mean nothing."""
    q, k, v, valid, layout = _inputs(seed=3 + dilation)
    _check(*_both(q, k, v, valid, 4, causal, dilation, [33, 0, 20, 20, -1, 99], 16, layout))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "both_sides"])
@pytest.mark.parametrize("window,dilation", [(0, 1), (3, 1), (3, 2)])
def test_block_layout(isa, window, dilation, causal):
    """A random block layout (block 4, 37 positions: the last block is partial), alone and with a band."""
    q, k, v, valid, layout = _inputs(seed=7 + window, layout_block=4)
    _check(*_both(q, k, v, valid, window, causal, dilation, [], 4, layout))


def test_layout_band_and_globals_together(isa):
    q, k, v, valid, layout = _inputs(t=70, s=70, d=64, dv=64, seed=11, layout_block=8, pad=9)
    for causal in (True, False):
        _check(*_both(q, k, v, valid, 6, causal, 2, [5, 40], 8, layout))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "both_sides"])
def test_left_padding(isa, causal):
    """key_valid False on the first 12 keys of sequence 0: with a causal window of 5 its rows 0..11 see no
    key at all and come out 0, as the reference's fully masked rows."""
    q, k, v, valid, layout = _inputs(pad=12, seed=5)
    got, want = _both(q, k, v, valid, 5, causal, 1, [], 16, layout)
    _check(got, want)
    if causal:
        assert got[0, :, :12].abs().max() == 0 and got[1, :, :12].abs().min() > 0


def test_key_valid_for_every_batch_at_once(isa):
    q, k, v, _, _ = _inputs(seed=6)
    valid = torch.rand(1, 37, generator=torch.Generator().manual_seed(1)) < 0.7  # [1, T]: all batches
    _check(*_both(q, k, v, valid, 7, True, 1, [3], 16, None))


@pytest.mark.parametrize("s,t", [(1, 37), (3, 37), (16, 45), (37, 37)], ids=["decode", "s3", "s16", "prefill"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (3, 1)], ids=["gqa", "mha", "mqa"])
def test_queries_at_the_end(isa, s, t, heads, kv_heads):
    """S < T: the queries are the last S positions of a longer cache; query heads share kv heads."""
    q, k, v, valid, layout = _inputs(heads=heads, kv_heads=kv_heads, s=s, t=t, pad=4, seed=s + t + heads)
    for window, dilation, causal in ((6, 1, True), (3, 3, True), (5, 2, False)):
        _check(*_both(q, k, v, valid, window, causal, dilation, [2, t - 1], 16, layout))


@pytest.mark.parametrize("d,dv", [(64, 64), (128, 128), (24, 24), (1, 7), (13, 33)])
def test_head_sizes(isa, d, dv):
    q, k, v, valid, layout = _inputs(b=1, heads=2, kv_heads=1, s=133, t=133, d=d, dv=dv, seed=d + dv)
    _check(*_both(q, k, v, valid, 40, True, 1, [7], 16, layout))
    _check(*_both(q, k, v, valid, 9, False, 2, [], 16, layout, scale=0.3))


def test_long_band_many_chunks(isa):
    """A band of 300 keys over 700 positions: several key chunks per tile, the online softmax across them,
    tiles fully inside the band (no mask) and on its edges."""
    q, k, v, valid, layout = _inputs(b=1, heads=2, kv_heads=1, s=700, t=700, d=64, dv=64, seed=2)
    _check(*_both(q, k, v, valid, 300, True, 1, [], 16, layout))
    _check(*_both(q * 4, k, v, valid, 150, False, 1, [], 16, layout))  # sharper softmax


def test_non_contiguous_and_half_inputs():
    q, k, v, _, _ = _inputs(seed=9)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, S, D] view of [B, S, N, D]
    assert not qt.is_contiguous()
    _check(*_both(qt, k, v, None, 5, True, 1, [], 16, None))
    got, want = _both(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, 5, True, 1, [], 16, None)
    assert got.dtype == torch.bfloat16  # computed in float32, rounded once
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=3e-2)


def test_the_library_isa_setting_reaches_this_kernel():
    """nf4_kernel_isa is the library's one SIMD setting: forcing the portable path changes the summation
    order (and the exp) of window_attention too, so its result differs in the last bits."""
    if len(HAVE) < 2:
        pytest.skip(f"only the {BEST} path here")
    q, k, v, valid, layout = _inputs(b=1, heads=2, kv_heads=1, s=200, t=200, d=64, dv=64, seed=4)
    outs = []
    try:
        for path in ("scalar", BEST):
            kernel.nf4_kernel_isa(path)
            outs.append(_both(q, k, v, valid, 64, True, 1, [], 16, layout)[0])
    finally:
        kernel.nf4_kernel_isa("auto")
    assert not torch.equal(*outs)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)


def test_bad_arguments_are_refused():
    q, k, v, _, _ = _inputs(heads=3, kv_heads=2)
    with pytest.raises(RuntimeError, match="cannot share"):
        kernel.window_attention(q, k, v, None, 4, True, 1, [], 16, None, 0.5)
    q, k, v, _, _ = _inputs(s=40, t=37)
    with pytest.raises(RuntimeError, match="last of the"):
        kernel.window_attention(q, k, v, None, 4, True, 1, [], 16, None, 0.5)
    q, k, v, _, _ = _inputs()
    with pytest.raises(RuntimeError, match="does not cover"):
        kernel.window_attention(q, k, v, None, 0, True, 1, [], 4, torch.ones(2, 2, dtype=torch.bool), 0.5)


def test_load_refuses_an_older_copy_of_the_library(monkeypatch):
    """One library holds every kernel: a copy already loaded that lacks one (an older artifact's, opened
    first) cannot be replaced (loading a second copy would abort), so load() says so."""
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setattr(native, "registered", lambda op: op == "effc_native::nf4_linear")
    with pytest.raises(EffcError, match="older copy.*without effc_native::window_attention"):
        native.load()


class _Attend(torch.nn.Module):
    def forward(self, q, k, v, valid):
        return kernel.window_attention(q, k, v, valid, 8, True, 1, [0], 16, None, 0.125)


def _exported():
    q, k, v, valid, _ = _inputs(b=1, s=24, t=24, d=16, dv=16, pad=3)
    seq = torch.export.Dim("seq", min=2, max=512)
    ep = torch.export.export(_Attend(), (q, k, v, valid),
                             dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {1: seq}))
    return ep


def test_export_captures_one_node_with_a_dynamic_length():
    ep = _exported()
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert [n.target for n in calls] == [kernel.window_attention.default]
    q, k, v, valid, _ = _inputs(b=1, s=50, t=50, d=16, dv=16, pad=5, seed=1)
    want = reference(q, k, v, valid, 8, True, 1, [0], 16, None, 0.125)
    _check(ep.module()(q, k, v, valid), want)


def test_runs_in_an_aotinductor_package(tmp_path):
    """The exported op compiled by AOTInductor (~10 s): the package calls the native kernel."""
    path = torch._inductor.aoti_compile_and_package(_exported(), package_path=str(tmp_path / "wa.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    q, k, v, valid, _ = _inputs(b=1, s=50, t=50, d=16, dv=16, pad=5, seed=1)
    want = reference(q, k, v, valid, 8, True, 1, [0], 16, None, 0.125)
    _check(runner(q, k, v, valid), want)
