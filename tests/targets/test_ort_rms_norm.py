"""The ort target's SimplifiedLayerNormalization lowering of a decoder's RMSNorm (passes/rms_norm.py,
effc::rms_norm): one node per norm and none of the Pow/ReduceMean chain left, the count in the manifest,
and a left-padded prefill of 3 rows plus decode steps against eager transformers; the lowered fx program
against the captured one in PyTorch (Gemma's 1 + weight included), and refusals that change nothing."""

from __future__ import annotations

import pytest
import torch

from effc import decoder
from effc.passes import rms_norm
from effc.runtime import open as open_artifact
from examples.models import build
from tests.targets.decoder_chain import chain, check_steps, compile_ort

ATOL = 1e-4  # fp32 through ORT's kernels; measured ~3e-7 (llama), ~3e-6 (gemma3)
EXACT = 1e-5  # the reference implementation against the captured chain; measured 0
PROMPT, STEPS = 12, 2


def _model(arch: str) -> torch.nn.Module:
    """The architecture with its norm weights moved off their init (ones, Gemma's zeros), so a weight
    read from the wrong place, or Gemma's 1 + weight lost, shows."""
    model = build(arch)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def _norms(model) -> int:
    return sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "gemma3", *(pytest.param(a, marks=pytest.mark.slow)  # ~8 s each
                                                      for a in ("qwen2", "mistral", "phi3"))])
def test_norms_fused_and_match_eager(arch, tmp_path):
    model = _model(arch)
    meta, ops, manifest = compile_ort(model, tmp_path)
    norms = _norms(model)
    if arch != "gemma3":  # Gemma-3 adds pre/post feed-forward norms and q/k norms per layer
        assert norms == 2 * meta["layers"] + 1
    # The residual Add before a norm joins it (targets/skip_rms_norm.py): both norms of every layer but the first.
    skip = ops.count("SkipSimplifiedLayerNormalization")
    assert skip == manifest["target"]["fused"]["skip_rms_norm"] and skip >= 2 * meta["layers"] - 1
    assert ops.count("SimplifiedLayerNormalization") + skip == norms
    assert "Pow" not in ops and "ReduceMean" not in ops and "Sqrt" not in ops and "Reciprocal" not in ops
    assert manifest["target"]["fused"]["rms_norm"] == norms
    with open_artifact(tmp_path / "art") as session:
        check_steps(session, chain(model, meta, PROMPT, STEPS), arch, ATOL)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_lowered_program_matches_captured(arch):
    """effc::rms_norm's reference: the rewritten program equals the captured one (1e-5) on a left-padded
    prefill and a decode step, presents included."""
    from effc.capture import capture

    model = _model(arch)
    meta = decoder.info(model, model.config)
    example = decoder.example_inputs(meta, (2, 4))
    program = capture(model, example, decoder.dynamic_dims(list(example)), decoder.WithPast(model, meta["layers"]))
    program = getattr(program, "program", program)
    lowered, fused, refused = rms_norm.lower(program)
    assert fused == _norms(model) and not refused
    targets = [n.target for n in lowered.graph.nodes]
    assert torch.ops.aten.pow.Tensor_Scalar not in targets and torch.ops.aten.rsqrt.default not in targets
    assert targets.count(torch.ops.effc.rms_norm.default) == fused
    for feeds, _ in chain(model, meta, PROMPT, STEPS)[:2]:
        with torch.no_grad():
            want, got = program.module()(**feeds), lowered.module()(**feeds)
        for w, g in zip(want, got, strict=True):
            assert float((w - g).abs().max()) <= EXACT


class _Norm(torch.nn.Module):
    """LlamaRMSNorm's forward, with the knobs the refusals below turn."""

    def __init__(self, weight_input=False, dim=-1, also_variance=False, affine=True):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(8, generator=torch.Generator().manual_seed(0)))
        self.weight_input, self.dim, self.also_variance, self.affine = weight_input, dim, also_variance, affine

    def forward(self, x, w):
        variance = x.pow(2).mean(self.dim, keepdim=True)
        normed = x * torch.rsqrt(variance + 1e-6)
        out = (w if self.weight_input else self.weight) * normed if self.affine else normed
        return (out, variance) if self.also_variance else out


def _export(module, dtype=torch.float32):
    x = torch.randn(2, 3, 8, dtype=dtype)
    return torch.export.export(module.to(dtype), (x, torch.randn(8, dtype=dtype))), x


def test_plain_norm_is_fused_exactly():
    program, x = _export(_Norm())
    lowered, fused, refused = rms_norm.lower(program)
    assert fused == 1 and not refused
    node = next(n for n in lowered.graph.nodes if n.target == torch.ops.effc.rms_norm.default)
    assert node.meta["effc_provenance"] == "rms_norm/simplified_layer_norm"
    w = torch.randn(8)
    torch.testing.assert_close(lowered.module()(x, w), program.module()(x, w), rtol=0, atol=EXACT)


@pytest.mark.parametrize(("module", "dtype", "reason"), [
    (_Norm(weight_input=True), torch.float32, "weight not a parameter (or 1 + one)"),
    (_Norm(dim=0), torch.float32, "mean not over the last dim with keepdim"),
    (_Norm(also_variance=True), torch.float32, "an intermediate value is read elsewhere"),
    (_Norm(affine=False), torch.float32, "normalized value not multiplied by a weight alone"),
    (_Norm(), torch.float64, "not float32"),
])
def test_refused_leaves_program_unchanged(module, dtype, reason):
    program, _ = _export(module, dtype)
    same, fused, refused = rms_norm.lower(program)
    assert same is program and fused == 0 and refused == {reason: 1}


def test_layer_norm_is_no_candidate():
    """Encoders' LayerNorm stays aten.layer_norm (the ort target's own LayerNormalization)."""
    program = torch.export.export(torch.nn.LayerNorm(8), (torch.randn(2, 8),))
    same, fused, refused = rms_norm.lower(program)
    assert same is program and fused == 0 and refused == {}
