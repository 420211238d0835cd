"""Calibration data: text (.txt, one sample per line; .jsonl with a "text" field) tokenized with the
model directory's tokenizer, .npz files of input arrays (first dim = samples), or a directory of them.
Batches are produced lazily, so a large dataset is never held in memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from effc.errors import EffcError
from effc.inputs import load_npz

TEXT_SUFFIXES = (".txt", ".jsonl")


def _files(data: Path) -> list[Path]:
    if not data.exists():
        raise EffcError(f"calibration data {data}: no such file or directory")
    files = sorted(p for p in data.iterdir() if p.suffix in TEXT_SUFFIXES + (".npz",)) if data.is_dir() else [data]
    if data.is_dir() and not files:
        raise EffcError(f"calibration data {data} holds no .txt, .jsonl or .npz files")
    for f in files:
        if f.suffix not in TEXT_SUFFIXES + (".npz",):
            raise EffcError(f"calibration data {f}: give .txt, .jsonl or .npz files")
    return files


def _texts(path: Path) -> Iterator[str]:
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    line = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise EffcError(f"{path}:{i} is not a JSON object with a \"text\" field") from None
            yield line


def batches(data: str | Path, input_names: list[str], model_dir: str | None, max_length: int = 128,
            batch_size: int = 8, samples: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Feed dicts of at most batch_size samples, samples in all at most `samples`."""
    files = _files(Path(data))
    left = samples if samples is not None else float("inf")
    tokenizer = None
    for f in files:
        if f.suffix == ".npz":
            arrays = load_npz(f)
            missing = sorted(set(input_names) - set(arrays))
            if missing:
                raise EffcError(f"calibration data {f} has arrays {', '.join(sorted(arrays)) or '(none)'}; "
                                f"the model takes {', '.join(input_names)} (missing {', '.join(missing)})")
            n = min(len(arrays[k]) for k in input_names)
            for start in range(0, n, batch_size):
                take = int(min(batch_size, n - start, left))
                if take <= 0:
                    return
                yield {k: torch.from_numpy(np.ascontiguousarray(arrays[k][start:start + take])) for k in input_names}
                left -= take
            continue
        if tokenizer is None:
            tokenizer = _tokenizer(model_dir, f)
        chunk: list[str] = []
        for text in _texts(f):
            if left <= 0:
                return
            chunk.append(text)
            left -= 1
            if len(chunk) == batch_size:
                yield _tokenize(tokenizer, chunk, input_names, max_length)
                chunk = []
        if chunk:
            yield _tokenize(tokenizer, chunk, input_names, max_length)


def _tokenizer(model_dir: str | None, data_file: Path):
    if not model_dir or not Path(model_dir).is_dir() or not any(Path(model_dir).glob("tokenizer*")):
        raise EffcError(f"calibration data {data_file} is text, but the model has no tokenizer files; "
                        "give an .npz of input arrays instead")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _tokenize(tokenizer, texts: list[str], input_names: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    out = {}
    for name in input_names:
        if name in enc:
            out[name] = enc[name].to(torch.int64)
        elif name == "token_type_ids":
            out[name] = torch.zeros_like(enc["input_ids"])
        else:
            raise EffcError(f"the tokenizer does not produce {name}, which the model takes")
    return out


def count(data: str | Path) -> int:
    """Samples in the dataset (lines of text, or rows of the first array of each .npz), for progress/ETA."""
    total = 0
    for f in _files(Path(data)):
        if f.suffix == ".npz":
            with np.load(f, allow_pickle=False) as z:
                total += len(z[z.files[0]]) if z.files else 0
        else:
            total += sum(1 for _ in _texts(f))
    return total
