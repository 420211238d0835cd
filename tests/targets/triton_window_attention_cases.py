"""Numerics of effc.targets.triton_window_attention in Triton's CPU interpreter, against effc::window_attention's
reference (a masked SDPA over the op's allowed_mask). Run by tests/targets/test_triton_window_attention.py in a
child process started with TRITON_INTERPRET=1 (Triton reads it when it is first imported)."""

import os

import pytest
import torch

from effc.ops.window_attention import window_attention

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run by test_triton_window_attention.py with TRITON_INTERPRET=1", allow_module_level=True)
import effc.targets.triton_window_attention as twa  # noqa: E402

# fp32: summation order only (exact "ieee" dots, fp32 softmax). fp16: the probabilities go into the P @ V
# dot in fp16, and the output is rounded to fp16.
TOL = {torch.float32: 1e-5, torch.float16: 2e-2}


def make(s, t, dtype=torch.float32, b=2, heads=4, kv=2, d=16, dv=16, padded=True, seed=0):
    g = torch.Generator().manual_seed(seed * 7919 + s * 131 + t)
    valid = torch.ones(b, t, dtype=torch.bool)
    if padded:
        valid[1, :3] = False  # a left-padded row: its first queries see no key at all
    return (torch.randn(b, heads, s, d, generator=g).to(dtype), torch.randn(b, kv, t, d, generator=g).to(dtype),
            torch.randn(b, kv, t, dv, generator=g).to(dtype), valid if padded else None)


def check(got, q, k, v, valid, window, causal, dilation, scale):
    want = window_attention(q.float(), k.float(), v.float(), valid, window, causal, dilation, [], 0, None, scale)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[q.dtype], err
    return want


# (S, T): a prefill, decode S=1, a chunk over a cache (S < T), T not a multiple of any block, T < the window.
SHAPES = [(37, 37), (1, 37), (5, 77), (20, 83), (3, 3)]
PATTERNS = {"causal": (5, True, 1), "both sides": (5, False, 1), "dilation 2": (4, True, 2),
            "dilation 2 both": (3, False, 2), "window 40 > block": (40, True, 1), "window > T": (400, False, 1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"S{s[0]}-T{s[1]}")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_matches_reference(pattern, shape, dtype):
    window, causal, dilation = PATTERNS[pattern]
    q, k, v, valid = make(*shape, dtype)
    got = twa.window_attention_triton(q, k, v, valid, window, causal, dilation, 0.3)
    want = check(got, q, k, v, valid, window, causal, dilation, 0.3)
    if shape[0] == shape[1] and causal:  # the padded row's first queries see no key: 0, as the reference
        assert torch.equal(got[1, :, :3].float(), torch.zeros_like(want[1, :, :3]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_gqa_heads_and_head_sizes(dtype):
    # N=4 over KV=2 (heads 0,1 -> 0; 2,3 -> 1), D=24 and Dv=40 padded to 32/64 in registers
    q, k, v, valid = make(19, 45, dtype, heads=4, kv=2, d=24, dv=40, seed=3)
    got = twa.window_attention_triton(q, k, v, valid, 6, True, 1, 24 ** -0.5)
    check(got, q, k, v, valid, 6, True, 1, 24 ** -0.5)
    # multi-head (KV = N) and multi-query (KV = 1)
    for kv in (4, 1):
        q, k, v, valid = make(9, 30, dtype, heads=4, kv=kv, seed=kv)
        check(twa.window_attention_triton(q, k, v, valid, 4, False, 1, 0.25), q, k, v, valid, 4, False, 1, 0.25)


def test_no_key_valid_and_batch_broadcast_valid():
    q, k, v, _ = make(11, 50, padded=False)
    check(twa.window_attention_triton(q, k, v, None, 7, True, 1, 0.3), q, k, v, None, 7, True, 1, 0.3)
    valid = torch.ones(1, 50, dtype=torch.int64)
    valid[0, 40:44] = 0  # holes inside the band, an int mask ([1, T], broadcast over the batch)
    got = twa.window_attention_triton(q, k, v, valid, 7, True, 1, 0.3)
    check(got, q, k, v, valid.expand(2, 50), 7, True, 1, 0.3)


def test_small_blocks_walk_several_key_blocks():
    # BLOCK_N 16 against a band of 3*21 positions: the loop runs over several key blocks, the first one
    # aligned below the band's start, with the online softmax rescaling across them
    q, k, v, valid = make(40, 100, seed=5)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    got = twa.window_attention_triton(q, k, v, valid, 21, False, 3, 0.3, config=cfg)
    check(got, q, k, v, valid, 21, False, 3, 0.3)


def test_empty_band_is_zero():
    q, k, v, valid = make(8, 8)
    got = twa.window_attention_triton(q, k, v, valid, 0, True, 1, 0.3)
    assert torch.equal(got, torch.zeros_like(got))


@pytest.mark.parametrize("tactic", list(twa.PLUGIN_TACTICS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_plugin_convention(dtype, tactic):
    # TensorRT's argument order, the query scaled beforehand (as targets/window_attention_trt.py does) and an
    # int32 key_valid [B, T]
    for (s, t), (window, causal, dilation) in (((37, 37), (5, True, 1)), ((1, 37), (5, False, 2)),
                                               ((5, 77), (9, True, 2))):
        q, k, v, valid = make(s, t, dtype, seed=tactic)
        got = twa.plugin_launch(q * 0.3, k, v, valid.to(torch.int32), window, int(causal), dilation, tactic)
        check(got, q, k, v, valid, window, causal, dilation, 0.3)


def test_rejects_bad_inputs():
    q, k, v, valid = make(4, 8)
    with pytest.raises(ValueError, match="multiple of key heads"):
        twa.window_attention_triton(q, k[:, :1].expand(2, 3, 8, 16), v[:, :1].expand(2, 3, 8, 16), valid, 3, True,
                                    1, 1.0)
    with pytest.raises(ValueError, match="dilation"):
        twa.window_attention_triton(q, k, v, valid, 3, True, 0, 1.0)
    with pytest.raises(ValueError, match="int32"):
        twa.plugin_launch(q, k, v, valid, 3, 1, 1)
