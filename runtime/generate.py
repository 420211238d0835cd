"""Text generation from a decoder artifact (compiler/decoder.py's inputs and outputs): prefill, then one
cached decode step per token, each step's present.N.* fed back as past_key_values.N.*; or, where the
artifact and its runner allow (Session.shared_cache: ort), one max-length buffer per cache tensor that the
graph writes in place.

Token selection follows transformers' generate so greedy output is token-for-token the same: the
repetition penalty over every id in the sequence (left padding included), then for sampling temperature,
top-k and top-p; rows that finished keep being fed the pad token with the mask growing by 1, as
transformers does. Prompts of different lengths are left-padded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from effc.errors import EffcError
from effc.runtime.kv_cache import PAST, pairs, positions

# on_token(row, token_id, text_piece): called for every new token of an unfinished row, as it is chosen.
Streamer = Callable[[int, int, str], None]


@dataclass
class Generation:
    tokens: list[list[int]]  # the new tokens of each row (up to and including eos)
    text: list[str] | None  # their text (cut at a stop string), when the artifact has a tokenizer
    prompt_tokens: list[int]  # each row's prompt length
    ttft_s: float  # prefill and the first token
    decode_s: float  # every later token
    steps: int  # decode steps after the prefill
    stopped: list[str] = field(default_factory=list)  # per row: "eos", "stop", or "length"

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens per second of one sequence after the first (the batch decodes them together)."""
        return self.steps / self.decode_s if self.decode_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "prompt_tokens": self.prompt_tokens,
                "ttft_s": self.ttft_s, "decode_s": self.decode_s, "decode_tokens_per_s": self.decode_tokens_per_s,
                "steps": self.steps, "stopped": self.stopped}


def decoder_meta(session) -> dict:
    meta = session.manifest.get("decoder")
    if not meta:
        task = "an encoder" if "logits" not in {o.name for o in session.outputs} else "a decoder without its KV cache"
        raise EffcError(f"{session.path} is {task} (compiled without text-generation-with-past), so it cannot "
                        "generate; compile a causal LM with the default task (or --task text-generation-with-past)")
    return meta


def tokenizer(session):
    """The artifact's tokenizer (the `tokenizers` library reads tokenizer.json; no transformers), or None."""
    rel = session.manifest["decoder"].get("tokenizer")
    if not rel:
        return None
    from tokenizers import Tokenizer

    from effc.runtime.manifest import artifact_file

    return Tokenizer.from_file(str(artifact_file(session.path, session.manifest, rel, "decoder.tokenizer")))


def _prompt_ids(prompts, tok) -> list[list[int]]:
    if isinstance(prompts, str):
        prompts = [prompts]
    if prompts and all(isinstance(p, (int, np.integer)) for p in prompts):
        prompts = [list(prompts)]
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tok is None:
                raise EffcError("this artifact has no tokenizer (its source directory had no tokenizer.json); "
                                "give token ids (--prompt-ids 1,2,3)")
            p = tok.encode(p).ids
        rows.append([int(t) for t in p])
    if not rows or any(not r for r in rows):
        raise EffcError("a prompt is empty: give at least one token")
    return rows


def _penalize(logits: np.ndarray, sequence: np.ndarray, penalty: float, padding: np.ndarray | None = None) -> np.ndarray:
    """transformers' RepetitionPenaltyLogitsProcessor: every id in the sequence so far, divided if positive,
    multiplied if negative. Like generate (transformers 5) the left padding (`padding` ids per row) is left out."""
    keep = np.ones(sequence.shape, dtype=bool) if padding is None else np.arange(sequence.shape[1]) >= padding[:, None]
    seen = np.zeros(logits.shape, dtype=bool)
    rows = np.broadcast_to(np.arange(logits.shape[0])[:, None], sequence.shape)
    seen[rows[keep], sequence[keep]] = True
    return np.where(seen, np.where(logits < 0, logits * penalty, logits / penalty), logits).astype(logits.dtype)


def _sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> np.ndarray:
    """Temperature, then top-k, then top-p (keeping at least one token), then a draw per row."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p  # tokens after the nucleus is full
        np.put_along_axis(probs, order, np.where(drop, 0.0, sorted_p), -1)
        probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=p) for p in probs], dtype=np.int64)


def generate(session, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop: tuple[str, ...] | list[str] = (), streamer: Streamer | None = None,
             adapter: str | None = None) -> Generation:
    """Generate up to `max_new_tokens` after each prompt (text, token ids, or a list of either). Greedy
    when temperature is 0; sampling draws from a numpy Generator seeded with `seed`."""
    meta = decoder_meta(session)
    if max_new_tokens is None or max_new_tokens <= 0:
        raise EffcError(f"--max-new-tokens must be 1 or more, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0:
        raise EffcError("sampling settings out of range: temperature >= 0, 0 < top-p <= 1, top-k >= 0, "
                        "repetition-penalty > 0")
    if adapter is not None:
        session._weights(adapter)  # an unknown name is refused before any work
    tok = tokenizer(session)
    if stop and tok is None:
        raise EffcError("stop strings need the artifact's tokenizer, and this artifact has none")
    rows = _prompt_ids(prompts, tok)
    limit = meta.get("max_positions")
    longest = max(map(len, rows))
    if limit and longest + max_new_tokens > limit:
        raise EffcError(f"a prompt of {longest} tokens plus {max_new_tokens} new tokens is longer than the model's "
                        f"context of {limit} positions; shorten the prompt or lower --max-new-tokens")
    vocab = meta["vocab_size"]
    bad = [t for r in rows for t in r if not 0 <= t < vocab]
    if bad:
        raise EffcError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
    eos = set(meta.get("eos_token_id") or []) if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    pad = pad_token_id if pad_token_id is not None else meta.get("pad_token_id")
    # Without a pad id, the first eos as transformers does; random-weight configs' eos can lie outside a small
    # vocabulary (GPT-2's 50256), and padding is masked anyway, so 0 then.
    pad = pad if pad is not None else next((e for e in sorted(eos) if e < meta["vocab_size"]), 0)
    batch = len(rows)
    ids = np.full((batch, longest), pad, dtype=np.int64)
    mask = np.zeros((batch, longest), dtype=np.int64)
    for b, r in enumerate(rows):
        ids[b, longest - len(r):], mask[b, longest - len(r):] = r, 1
    rng = np.random.default_rng(seed)
    cache_names, window = pairs(meta["layers"]), meta.get("cache_window")
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
    empty = np.zeros((batch, meta["kv_heads"], 0, meta["head_dim"]), dtype=np.float32)
    feeds.update({past: empty for past in cache_names})
    sequence = ids
    new: list[list[int]] = [[] for _ in range(batch)]
    done = np.zeros(batch, dtype=bool)
    stopped = ["length"] * batch
    texts = [""] * batch
    t0 = time.perf_counter()
    ttft = None
    steps = 0
    weights = session._weights(adapter or session.adapter)
    # Not with a switchable adapter's weights: ORT's IOBinding cannot bind the overridable initializers they are.
    cache = None if weights else session.shared_cache(batch, longest + max_new_tokens)
    if cache is not None:
        session.validate(feeds)  # the prefill's feeds as any run checks them; the cache is bound, not fed
        feeds = {k: v for k, v in feeds.items() if not k.startswith(PAST)}
    for step in range(max_new_tokens):
        if cache is not None:
            out = {"logits": cache.run(feeds)}
        else:
            out = session.run(feeds, adapter=adapter, checked=step == 0)  # later feeds are the model's own outputs
        logits = out["logits"][:, -1].astype(np.float32)
        if repetition_penalty != 1.0:
            logits = _penalize(logits, sequence, repetition_penalty, longest - np.array([len(r) for r in rows]))
        token = logits.argmax(-1) if temperature == 0 else _sample(logits, temperature, top_k, top_p, rng)
        token = np.where(done, pad, token).astype(np.int64)
        for b in np.flatnonzero(~done):
            t = int(token[b])
            new[b].append(t)
            piece = ""
            if tok is not None:
                text = tok.decode(new[b], skip_special_tokens=True)
                piece, texts[b] = text[len(texts[b]):], text
            if streamer is not None:
                streamer(int(b), t, piece)
            if t in eos:
                done[b], stopped[b] = True, "eos"
            elif stop and any(s in texts[b] for s in stop):
                done[b], stopped[b] = True, "stop"
        if ttft is None:
            ttft = time.perf_counter() - t0
        else:
            steps += 1
        sequence = np.concatenate([sequence, token[:, None]], axis=1)
        if done.all() or step == max_new_tokens - 1:
            break
        # A windowed model's cache keeps its last `window` positions: keys and mask lose the same oldest
        # columns, the masks the graph builds see the same relative offsets, the positions are the real ones.
        drop = mask.shape[1] - window if window and mask.shape[1] > window else 0
        mask = np.concatenate([mask[:, drop:], np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": token[:, None], "attention_mask": mask, "position_ids": feeds["position_ids"][:, -1:] + 1}
        if cache is None:
            feeds.update({past: np.ascontiguousarray(out[present][:, :, drop:]) if drop else out[present]
                          for past, present in cache_names.items()})
    total = time.perf_counter() - t0
    if tok is not None and stop:
        texts = [_cut(t, stop) for t in texts]
    return Generation(new, texts if tok is not None else None, [len(r) for r in rows], ttft, total - ttft, steps, stopped)


def _cut(text: str, stop) -> str:
    """`text` up to the first stop string in it."""
    at = min((text.find(s) for s in stop if s in text), default=-1)
    return text if at < 0 else text[:at]
