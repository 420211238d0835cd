"""The ort target's GroupQueryAttention lowering of a decoder's cached attention (passes/kv_attention.py,
effc::cached_attention): one GQA node per layer, and a left-padded prefill of 3 rows plus 3 chained decode
steps against eager transformers, past Mistral's sliding window."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import effc
from effc import decoder
from effc.capture import run_torch
from effc.passes import kv_attention
from effc.runtime import open as open_artifact
from examples.models import build

ATOL = 1e-4  # fp32 through ORT's kernels; measured ~1e-6
PROMPT, STEPS = 12, 3  # the prompt alone passes the small window below


def _model(arch: str) -> torch.nn.Module:
    model = build(arch)
    if arch == "mistral":  # a window the test goes past
        model.config.sliding_window = 8
    return model


def _chain(model, meta) -> list[tuple[dict, dict]]:
    """(feeds, eager outputs) for a left-padded prefill of 3 rows and STEPS greedy decode steps."""
    module = decoder.WithPast(model, meta["layers"])
    feeds = decoder.prefill_inputs(meta, 3, PROMPT, seed=0, pad=True)
    chain = []
    for _ in range(STEPS + 1):
        with torch.no_grad():
            out = run_torch(module, feeds, module.output_names)
        chain.append((feeds, out))
        feeds = decoder.next_step(feeds, out, torch.as_tensor(out["logits"][:, -1]).argmax(-1))
    return chain


@pytest.mark.parametrize("arch", ["llama", "mistral", *(pytest.param(a, marks=pytest.mark.slow)
                                                        for a in ("qwen2", "gpt2", "phi3"))])
def test_gqa_matches_eager(arch, tmp_path):
    model = _model(arch)
    model.save_pretrained(tmp_path / "hf")
    effc.compile(str(tmp_path / "hf"), tmp_path / "art", target="ort")
    meta = decoder.info(model, model.config)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("GroupQueryAttention") == meta["layers"]
    with open_artifact(tmp_path / "art") as session:
        for step, (feeds, want) in enumerate(_chain(model, meta)):
            got = session.run({decoder.public(n): v.numpy() for n, v in feeds.items()})
            real = feeds["attention_mask"].numpy().astype(bool)  # presents at padding are not compared
            for name, ref in want.items():
                ref = np.asarray(ref)
                diff = np.abs(got[name] - ref)
                if name.startswith("present"):
                    diff = diff[real[:, None, :, None].repeat(diff.shape[1], 1).repeat(diff.shape[3], 3)]
                else:
                    diff = diff[real[:, -ref.shape[1]:]]
                assert float(diff.max()) <= ATOL, f"{arch} step {step} {name}: max |Δ| {float(diff.max()):.3g}"


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
    for feeds, _ in _chain(model, meta)[:2]:
        with torch.no_grad():
            want, got = program.module()(**feeds), lowered.module()(**feeds)
        for w, g in zip(want, got, strict=True):
            assert float((w - g).abs().max()) <= 1e-5
