"""effc::window_attention's onnx/ort lowering (targets/window_attention_onnx.py) in ONNX Runtime against the
op's reference (a masked SDPA over the op's definition), one exported graph run at several (S, T): prefill,
decode (S=1), a chunk over a cache, windows past and shorter than the input."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import effc.ops  # noqa: F401
from effc.ops.registry import translations
from effc.targets import onnx_export

ATOL = 2e-6
SHAPES = [(37, 37), (1, 37), (5, 77), (87, 87), (3, 3), (1, 300)]  # (S, T): queries are the last S of T


class _Op(torch.nn.Module):
    def __init__(self, window, causal, dilation, globals_, block, layout, padded):
        super().__init__()
        self.args = (window, causal, dilation, globals_, block)
        self.layout, self.padded = layout, padded

    def forward(self, q, k, v, valid):
        window, causal, dilation, globals_, block = self.args
        return torch.ops.effc.window_attention(q, k, v, valid if self.padded else None, window, causal, dilation,
                                               globals_, block, self.layout, 0.3)


def _inputs(s: int, t: int, b: int = 2, heads: int = 4, kv: int = 2, d: int = 8):
    g = torch.Generator().manual_seed(s * 1000 + t)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row: its first query rows see no key at all
    return dict(q=torch.randn(b, heads, s, d, generator=g), k=torch.randn(b, kv, t, d, generator=g),
                v=torch.randn(b, kv, t, d, generator=g), valid=valid)


CASES = {
    "causal": dict(window=5, causal=True), "both sides": dict(window=5, causal=False),
    "window 64": dict(window=64, causal=True), "window > T": dict(window=400, causal=True),
    "dilation 2": dict(window=5, causal=True, dilation=2), "dilation 3 both": dict(window=4, causal=False, dilation=3),
    "globals": dict(window=5, causal=True, globals_=[0, 7]),
    "globals dilated both": dict(window=6, causal=False, globals_=[0, 20], dilation=2),
    "no padding": dict(window=5, causal=True, padded=False),
    "layout": dict(window=0, causal=False, globals_=[1], block=4, layout="random"),
}


@pytest.mark.parametrize("case", CASES)
def test_lowering_matches_reference(case):
    c = {"dilation": 1, "globals_": [], "block": 0, "layout": None, "padded": True, **CASES[case]}
    if c["layout"] == "random":
        c["layout"] = torch.rand(128, 128, generator=torch.Generator().manual_seed(0)) > 0.7
    module = _Op(c["window"], c["causal"], c["dilation"], c["globals_"], c["block"], c["layout"], c["padded"])
    example = _inputs(37, 37)
    s, t = torch.export.Dim("s", min=1, max=512), torch.export.Dim("t", min=1, max=1024)
    ep = torch.export.export(module, (), kwargs=example,
                             dynamic_shapes=dict(q={2: s}, k={2: t}, v={2: t}, valid={1: t}))
    model = onnx_export.export(ep, example, ["out"], {}, translations("onnx"))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for shape in SHAPES:
        feeds = _inputs(*shape)
        want = module(**feeds).numpy()
        got = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
        err = float(np.abs(got - want).max())
        assert err <= ATOL, f"{case} at (S, T) = {shape}: max |Δ| {err:.3g}"
    if c["window"] and c["layout"] is None and not c["globals_"]:
        # the blocked band, not the dense fallback: no position grid over the T keys is built
        assert not any(n.op_type == "Range" for n in model.graph.node)
