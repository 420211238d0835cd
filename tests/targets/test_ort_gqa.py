"""The ort target's GroupQueryAttention lowering of a decoder's cached attention (passes/kv_attention.py,
effc::cached_attention): one GQA node per layer, and a left-padded prefill of 3 rows plus 3 chained decode
steps against eager transformers, past Mistral's sliding window."""

from __future__ import annotations

import pytest
import torch

from effc import decoder
from effc.passes import kv_attention
from effc.runtime import open as open_artifact
from examples.models import build
from tests.targets.decoder_chain import chain, check_steps, compile_ort

PROMPT, STEPS = 12, 3  # the prompt alone passes the small window below


def _model(arch: str) -> torch.nn.Module:
    model = build(arch)
    if arch == "mistral":  # a window the test goes past
        model.config.sliding_window = 8
    return model


@pytest.mark.parametrize("arch", ["llama", "mistral", *(pytest.param(a, marks=pytest.mark.slow)
                                                        for a in ("qwen2", "gpt2", "phi3"))])
def test_gqa_matches_eager(arch, tmp_path):
    model = _model(arch)
    meta, ops, _ = compile_ort(model, tmp_path)
    assert ops.count("GroupQueryAttention") == meta["layers"]
    with open_artifact(tmp_path / "art") as session:
        check_steps(session, chain(model, meta, PROMPT, STEPS), arch)


def test_refused_without_cache():
    """A program without a cache (BERT-like SDPA) is left as it was."""
    class Attend(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    x = torch.randn(1, 2, 3, 4)
    program = torch.export.export(Attend(), (x, x, x, torch.ones(1, 1, 3, 3, dtype=torch.bool)))
    same, fused, refused = kv_attention.lower(program)
    assert same is program and fused == 0 and sum(refused.values()) == 1


def test_lowered_program_runs_in_torch():
    """effc::cached_attention's reference: the rewritten program matches the captured one (1e-5) on a
    left-padded prefill and a decode step, presents included."""
    from effc.capture import capture

    model = _model("llama")
    meta = decoder.info(model, model.config)
    example = decoder.example_inputs(meta, (2, 4))
    program = capture(model, example, decoder.dynamic_dims(list(example)), decoder.WithPast(model, meta["layers"]))
    program = getattr(program, "program", program)
    lowered, fused, refused = kv_attention.lower(program)
    assert fused == meta["layers"] and not refused
    assert sum(n.target == torch.ops.aten.scaled_dot_product_attention.default for n in lowered.graph.nodes) == 0
    for feeds, _ in chain(model, meta, PROMPT, STEPS)[:2]:
        with torch.no_grad():
            want, got = program.module()(**feeds), lowered.module()(**feeds)
        for w, g in zip(want, got, strict=True):
            assert float((w - g).abs().max()) <= 1e-5
