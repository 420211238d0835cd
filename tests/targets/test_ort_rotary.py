"""The ort target's rotary embedding lowering (passes/rotary.py, effc::rotary -> com.microsoft::RotaryEmbedding):
two RotaryEmbedding nodes per layer (q and k), the count in the manifest, and a left-padded prefill of 3
rows plus 3 chained decode steps against eager transformers; partial rotary (Phi-3) and Gemma-3's local
and global rotaries included; the lowered program equal to the captured one in torch; a refusal."""

from __future__ import annotations

import pytest
import torch
import transformers

from effc import decoder
from effc.capture import capture
from effc.passes import rotary
from effc.runtime import open as open_artifact
from examples.models import COMMON, build
from tests.targets.decoder_chain import chain, check_steps, compile_ort

PROMPT, STEPS = 12, 3


def _model(arch: str) -> torch.nn.Module:
    if arch == "phi3_partial":  # rotary on the first half of each head (partial_rotary_factor)
        torch.manual_seed(0)
        config = transformers.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2, partial_rotary_factor=0.5)
        config.architectures = ["Phi3ForCausalLM"]
        return transformers.Phi3ForCausalLM(config).eval()
    return build(arch)


@pytest.mark.parametrize("arch", ["llama", "phi3_partial", "gemma3", *(pytest.param(a, marks=pytest.mark.slow)
                                                                       for a in ("qwen2", "mistral"))])
def test_rotary_matches_eager(arch, tmp_path):
    model = _model(arch)
    meta, ops, manifest = compile_ort(model, tmp_path)
    assert ops.count("RotaryEmbedding") == 2 * meta["layers"]
    assert "Neg" not in ops  # rotate_half's negation went with the chains
    assert manifest["target"]["fused"]["rotary"] == 2 * meta["layers"]
    with open_artifact(tmp_path / "art") as session:
        check_steps(session, chain(model, meta, PROMPT, STEPS), arch)


def _program(model):
    meta = decoder.info(model, model.config)
    example = decoder.example_inputs(meta, (2, 4))
    program = capture(model, example, decoder.dynamic_dims(list(example)), decoder.WithPast(model, meta["layers"]))
    return getattr(program, "program", program), meta


@pytest.mark.parametrize("arch", ["llama", "phi3_partial"])
def test_lowered_program_equals_captured(arch):
    """effc::rotary's reference reproduces the captured chain (measured: bitwise) on a left-padded prefill
    and decode steps, presents included; each rotary module's tables are made once."""
    program, meta = _program(_model(arch))
    lowered, fused, refused = rotary.lower(program)
    assert fused == 2 * meta["layers"] and not refused
    assert not any(n.target == torch.ops.aten.neg.default for n in lowered.graph.nodes)
    made = [n.target for n in lowered.graph.nodes if n.meta.get("effc_provenance") == "rotary/rope"]
    assert made.count(torch.ops.aten.arange.default) == 1  # one row index for the model's one rotary
    for feeds, _ in chain(_model(arch), meta, PROMPT, STEPS)[:3]:
        with torch.no_grad():
            want, got = program.module()(**feeds), lowered.module()(**feeds)
        for w, g in zip(want, got, strict=True):
            assert float((w - g).abs().max()) <= 1e-6


def test_refused_when_cos_halves_are_not_provably_equal():
    """cos/sin given as inputs (not computed from cat([freqs, freqs])): RotaryEmbedding's R/2-column tables
    could not carry them, so the chain is left as it was, with the reason."""
    class Rope(torch.nn.Module):
        def forward(self, x, cos, sin):
            rotated = torch.cat([-x[..., 4:], x[..., :4]], dim=-1)
            return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)

    x, cos = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8)
    program = torch.export.export(Rope(), (x, cos, cos))
    same, fused, refused = rotary.lower(program)
    assert same is program and fused == 0
    assert refused == {"cos/sin not elementwise functions of cat([freqs, freqs], -1)": 1}


def test_no_rotary_is_no_change():
    """GPT-2 (learned positions) has no rotary chain: nothing fused, nothing refused."""
    program, _ = _program(build("gpt2"))
    assert rotary.lower(program) == (program, 0, {})
