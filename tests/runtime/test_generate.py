"""Session.generate on decoder artifacts against eager transformers generate (fp32, same pad id): greedy
token-for-token over 64 new tokens, one prompt and a left-padded batch of three; repetition penalty;
seeded sampling; stop strings; the streamer; the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import effc
from effc.errors import EffcError
from effc.runtime import generate as gen
from effc.runtime import open as open_artifact
from examples.models import build

NEW = 64
PROMPTS = [[5, 17, 9, 33, 2, 101, 7], [44, 12], [300, 8, 19, 250]]  # different lengths: left padding


@pytest.fixture(scope="module", params=[("llama", "onnx"), ("gpt2", "ort")], ids=lambda p: "-".join(p))
def artifact(request, tmp_path_factory):
    arch, target = request.param
    root = tmp_path_factory.mktemp(f"gen_{arch}")
    build(arch).save_pretrained(root / "hf")
    effc.compile(str(root / "hf"), root / "art", target=target)
    return build(arch).eval(), root / "art"


def _reference(model, rows, pad, **kw) -> list[list[int]]:
    """transformers generate on the left-padded batch; each row's new tokens up to and including eos."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=pad, **kw)[:, width:]
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    rows_out = []
    for r in out.tolist():
        end = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows_out.append(r[:end])
    return rows_out


def _pad(session) -> int:
    meta = session.manifest["decoder"]
    if meta["pad_token_id"] is not None:
        return meta["pad_token_id"]
    return next((e for e in sorted(meta["eos_token_id"]) if e < meta["vocab_size"]), 0)


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["one", "batch3"])
def test_greedy_matches_transformers(artifact, rows):
    model, path = artifact
    with open_artifact(path) as session:
        got = session.generate(rows, max_new_tokens=NEW)
        want = _reference(model, rows, _pad(session), do_sample=False)
    assert got.tokens == want
    assert got.steps == max(map(len, want)) - 1 and got.ttft_s > 0  # steps after the prefill


def test_repetition_penalty_matches_transformers(artifact):
    model, path = artifact
    with open_artifact(path) as session:
        got = session.generate(PROMPTS, max_new_tokens=NEW, repetition_penalty=1.3)
        want = _reference(model, PROMPTS, _pad(session), do_sample=False, repetition_penalty=1.3)
    assert got.tokens == want


def test_repetition_penalty_scores_match_transformers():
    from transformers.generation import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 50)).astype(np.float32) * 3
    seqs = rng.integers(0, 50, (3, 9))
    padding = np.array([0, 3, 5])
    want = RepetitionPenaltyLogitsProcessor(1.2, prompt_ignore_length=torch.as_tensor(padding))(
        torch.as_tensor(seqs), torch.as_tensor(scores)).numpy()
    np.testing.assert_allclose(gen._penalize(scores.copy(), seqs, 1.2, padding), want, atol=1e-6)


def test_seeded_sampling_is_reproducible(artifact):
    _, path = artifact
    with open_artifact(path) as session:
        a = session.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=1)
        b = session.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=1)
        c = session.generate(PROMPTS, max_new_tokens=16, temperature=1.0, top_k=50, top_p=0.95, seed=2)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


class _Words:
    """A stand-in tokenizer (tokenizers' interface): token t is the word " w<t>"."""

    class _Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self._Encoding([int(w[1:]) for w in text.split()])

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f" w{t}" for t in ids)


def test_stop_string_and_streamer(artifact, monkeypatch):
    _, path = artifact
    monkeypatch.setattr(gen, "tokenizer", lambda session: _Words())
    with open_artifact(path) as session:
        full = session.generate(" ".join(f"w{t}" for t in PROMPTS[0]), max_new_tokens=12)
        third = f" w{full.tokens[0][2]}"
        seen = []
        got = session.generate(PROMPTS[:1], max_new_tokens=12, stop=[third],
                               streamer=lambda row, token, piece: seen.append((row, token, piece)))
    stop_at = full.text[0].find(third)
    assert got.tokens[0] == full.tokens[0][:len(got.tokens[0])] and len(got.tokens[0]) <= 3
    assert got.text[0] == full.text[0][:stop_at] and got.stopped == ["stop"]
    assert [t for _, t, _ in seen] == got.tokens[0] and {r for r, _, _ in seen} == {0}
    assert "".join(p for _, _, p in seen) == _Words().decode(got.tokens[0])


def test_streamer_gets_every_row_token(artifact):
    _, path = artifact
    seen: dict[int, list[int]] = {}
    with open_artifact(path) as session:
        got = session.generate(PROMPTS, max_new_tokens=8, streamer=lambda r, t, _p: seen.setdefault(r, []).append(t))
    assert [seen[r] for r in range(len(PROMPTS))] == got.tokens


def test_errors(artifact):
    _, path = artifact
    with open_artifact(path) as session:
        limit = session.manifest["decoder"]["max_positions"]
        for kwargs, words in [({"max_new_tokens": 0}, "1 or more"), ({"max_new_tokens": limit}, "context"),
                              ({"adapter": "nope"}, "no adapter"), ({"stop": ["x"]}, "tokenizer")]:
            with pytest.raises(EffcError, match=words):
                session.generate(PROMPTS[:1], **kwargs)
        with pytest.raises(EffcError, match="no tokenizer"):
            session.generate("hello")
