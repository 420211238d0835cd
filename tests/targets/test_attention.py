"""SDPA -> com.microsoft::MultiHeadAttention on the ort target: single attention calls exported with the
translation and run in ONNX Runtime, against eager PyTorch, for the masks models produce and the edge
cases (fully masked rows, -inf float masks, cross-attention, other value head size); unsupported calls
fall back to the standard decomposition."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from effc.targets.attention import sdpa_to_multihead_attention

B, H, S, D = 3, 4, 10, 8


class Attend(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kw)


def padding_mask(s, t, causal=False, empty_row=False):
    """bool [B, 1, s, t]: rows padded to lengths t, t-3, t-6; optionally causal; optionally one row empty."""
    keep = torch.arange(t)[None, :] < torch.tensor([t, t - 3, t - 6])[:, None]
    m = keep[:, None, None, :].expand(B, 1, s, t).clone()
    if causal:
        m &= torch.ones(s, t, dtype=torch.bool).tril(t - s)
    if empty_row:
        m[1, 0, 2, :] = False
    return m


def _inf_mask(empty_row):
    return torch.zeros(B, 1, S, S).masked_fill(~padding_mask(S, S, empty_row=empty_row), float("-inf"))


def _per_head():
    m = padding_mask(S, S).expand(B, H, S, S).clone()
    m[1, 2, 3, :] = False
    m[0, 1, :, 4:] = False
    return m


CASES = {  # name -> (sdpa kwargs, mask maker, key length, value head size, kv heads, lowered to MHA)
    "no mask": ({}, None, S, D, H, True),
    "is_causal": ({"is_causal": True}, None, S, D, H, True),
    "custom scale": ({"scale": 0.3}, None, S, D, H, True),
    "bool padding [B,1,S,S]": ({}, lambda: padding_mask(S, S), S, D, H, True),
    "bool causal + padding": ({}, lambda: padding_mask(S, S, causal=True), S, D, H, True),
    "bool fully masked row": ({}, lambda: padding_mask(S, S, empty_row=True), S, D, H, True),
    "bool key padding [B,1,1,T]": ({}, lambda: padding_mask(1, S), S, D, H, True),
    "bool per head [B,H,S,T]": ({}, _per_head, S, D, H, True),
    "float [B,H,S,T]": ({}, lambda: torch.randn(B, H, S, S), S, D, H, True),
    "float [S,T]": ({}, lambda: torch.randn(S, S), S, D, H, True),
    "float -inf padding": ({}, lambda: _inf_mask(False), S, D, H, True),
    "float -inf fully masked row": ({}, lambda: _inf_mask(True), S, D, H, True),
    "cross-attention S != T": ({}, lambda: padding_mask(S, 14), 14, D, H, True),
    "value head size != query's": ({}, lambda: padding_mask(S, S), S, 16, H, True),
    "enable_gqa (falls back)": ({"enable_gqa": True}, None, S, D, 2, False),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_eager(name, tmp_path):
    kw, make_mask, t, dv, kv_heads, lowered = CASES[name]
    torch.manual_seed(0)
    args = [torch.randn(B, H, S, D), torch.randn(B, kv_heads, t, D), torch.randn(B, kv_heads, t, dv)]
    if make_mask:
        args.append(make_mask())
    model = Attend(**kw).eval()
    with torch.no_grad():
        ref = model(*args).numpy()
    program = torch.export.export(model, tuple(args))
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=20, optimize=True, custom_translation_table={
        torch.ops.aten.scaled_dot_product_attention.default: sdpa_to_multihead_attention})
    onnx_program.save(str(tmp_path / "m.onnx"))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)})[0]
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=1e-5)  # fully masked rows: 0, as in PyTorch
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert ops["MultiHeadAttention"] == (1 if lowered else 0)
    if lowered:
        assert "Softmax" not in ops
