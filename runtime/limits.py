"""What an artifact's inputs may hold beyond their dtypes and shapes: token ids inside the vocabulary,
sequences no longer than the model has positions for (both recorded from the model's config in the
manifest's source), and a warning for sequences longer than compile-time verification ran."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from effc.errors import EffcError

_warned: set[tuple[str, int]] = set()  # (artifact, sequence length): warn once per process


def check_ids(ids: np.ndarray | None, vocab: int | None, what: str) -> None:
    """Refuse token ids outside [0, vocab) (an embedding would raise, or read a wrong row for negative ids)."""
    if not isinstance(vocab, int) or ids is None or not ids.size or not np.issubdtype(ids.dtype, np.integer):
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise EffcError(f"{what}: input_ids holds token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                        f"0..{vocab - 1}; tokenize with the model's own tokenizer")


def check_length(length: int, limit: int | None, what: str) -> None:
    """Refuse a sequence longer than the model's positions, naming it (torch.export or the position
    embedding would fail obscurely)."""
    if isinstance(limit, int) and length > limit:
        raise EffcError(f"{what} has sequence length {length}, but the model has positions for {limit} tokens "
                        f"(max_position_embeddings or n_positions in its config); give at most {limit}")


def check_feeds(path: Path, manifest: dict, feeds: dict[str, np.ndarray]) -> None:
    """Refuse token ids outside [0, vocab_size) and sequences beyond max_positions; warn (one line on
    stderr, once) for a sequence longer than the artifact was verified at."""
    source = manifest.get("source") or {}
    check_ids(feeds.get("input_ids"), source.get("vocab_size"), "this run's input")
    length = _sequence_length(manifest, feeds)
    if length is None:
        return
    check_length(length, source.get("max_positions"), "this run's input")
    verified = _verified_length(manifest)
    key = (str(path), length)
    if verified is not None and length > verified and key not in _warned:
        _warned.add(key)
        print(f"effc: warning: sequence length {length} is longer than {path} was verified at when compiled (up to "
              f"{verified} tokens): compare its outputs with eager PyTorch at this length (effc golden record, then check), "
              "or compile with a longer --input-shapes", file=sys.stderr)


def _sequence_length(manifest: dict, feeds: dict[str, np.ndarray]) -> int | None:
    for info in manifest.get("inputs", []):
        if "sequence" in info["shape"] and info["name"] in feeds:
            arr = feeds[info["name"]]
            axis = info["shape"].index("sequence")
            if arr.ndim > axis:
                return int(arr.shape[axis])
    return None


def _verified_length(manifest: dict) -> int | None:
    """The longest sequence the compile-time verification ran the artifact at (None when it did not run)."""
    shapes = (manifest.get("verification") or {}).get("shapes") or []
    axes = {i["name"]: i["shape"].index("sequence") for i in manifest.get("inputs", []) if "sequence" in i["shape"]}
    lengths = [shape[axes[name]] for s in shapes for name, shape in s.items()
               if name in axes and len(shape) > axes[name]]
    return max(lengths) if lengths else None
