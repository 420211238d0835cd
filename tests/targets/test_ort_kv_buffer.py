"""The ort target's shared past/present buffer (targets/kv_buffer.py, runtime/onnxruntime_runner.py
SharedCache): the graph reads the past length from the mask, so one max-length buffer per cache tensor can be
bound as past and present and GroupQueryAttention writes into it in place. A left-padded prefill of 3 rows and
decode steps through the buffer match eager transformers (logits, and the cache the buffer holds), the same
graph still takes an exact-length past (the concatenating use, Optimum's), and genai_config says so. A model
whose cache is windowed keeps concatenating."""

from __future__ import annotations

import json

import numpy as np
import pytest

from effc.runtime import open as open_artifact
from effc.targets import genai_config
from examples.models import build
from tests.targets.decoder_chain import ATOL, chain, check_steps, compile_ort

PROMPT, STEPS = 10, 3


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_buffer_written_in_place_matches_eager(arch, tmp_path):
    model = build(arch)
    meta, ops, manifest = compile_ort(model, tmp_path)
    assert manifest["target"]["shared_kv_buffer"] is True
    doc = json.loads((tmp_path / "art" / genai_config.FILE).read_text())
    assert doc["search"]["past_present_share_buffer"] is True
    steps = chain(model, meta, PROMPT, STEPS)
    length = PROMPT + STEPS + 5  # longer than the sequence: the unused tail must not matter
    with open_artifact(tmp_path / "art") as session:
        check_steps(session, steps, arch)  # exact-length pasts still work on the same graph
        cache = session.shared_cache(3, length)
        assert cache is not None
        for step, (feeds, want) in enumerate(steps):
            new = {k: v.numpy() for k, v in feeds.items() if k in ("input_ids", "attention_mask", "position_ids")}
            logits = cache.run(new)
            real = feeds["attention_mask"].numpy().astype(bool)[:, -logits.shape[1]:]
            diff = np.abs(logits - np.asarray(want["logits"]))[real]
            assert float(diff.max()) <= ATOL, f"step {step}: max |Δ| {float(diff.max()):.3g}"
        # The buffer of layer 0's keys holds what eager's cache holds, at the real positions.
        key = cache._values[0][0]
        present = np.asarray(want["present_0_key"] if "present_0_key" in want else want["present.0.key"])
        width = present.shape[2]
        mask = feeds["attention_mask"].numpy().astype(bool)[:, :width]
        assert not np.any(key[:, :, width:])  # nothing written past the sequence
        diff = np.abs(key[:, :, :width] - present).transpose(0, 2, 1, 3)[mask]
        assert float(diff.max()) <= ATOL


def test_windowed_cache_keeps_concatenating(tmp_path):
    """Mistral (windowed in every layer) drops its oldest cache columns each step: no shared buffer."""
    model = build("mistral")
    meta, _, manifest = compile_ort(model, tmp_path)
    with open_artifact(tmp_path / "art") as session:
        assert session.manifest["decoder"]["cache_window"] and session.shared_cache(1, 8) is None
    doc = json.loads((tmp_path / "art" / genai_config.FILE).read_text())
    assert doc["search"]["past_present_share_buffer"] is False
