"""Calibration data: text (.txt, one sample per line; .jsonl with a "text" field) tokenized with the
model directory's tokenizer, .npz files of input arrays (first dim = samples), or a directory of them.
Batches are produced lazily, so a large dataset is never held in memory.

Text is read as UTF-8; a file that is not UTF-8 is read as cp1252 (Windows text, as many real corpora
are), with a note on stderr. Sequences never exceed the model's positions: text is truncated to them,
and .npz arrays longer than that are refused."""

from __future__ import annotations

import codecs
import functools
import json
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from effc.errors import EffcError
from effc.inputs import TEXT_INPUTS, load_npz
from effc.runtime.limits import check_length

FALLBACK_ENCODING = "cp1252"

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


def _encoding(path: Path) -> str:
    stat = path.stat()
    return _detect_encoding(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=64)
def _detect_encoding(path: str, _mtime_ns: int, _size: int) -> str:
    """utf-8-sig (UTF-8, with or without a BOM), else cp1252 with a note; binary data is refused."""
    with open(path, "rb") as f:
        if b"\0" in f.read(1 << 16):
            raise EffcError(f"calibration data {path} is a binary file (it has NUL bytes), not text; give text "
                            "(.txt lines, .jsonl with \"text\", UTF-8 or cp1252) or an .npz of input arrays")
    for encoding in ("utf-8-sig", FALLBACK_ENCODING):
        decoder = codecs.getincrementaldecoder(encoding)()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    decoder.decode(chunk)
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            continue
        if encoding == FALLBACK_ENCODING:
            print(f"effc: note: {path} is not UTF-8; reading it as {FALLBACK_ENCODING} (Windows text)", file=sys.stderr)
        return encoding
    raise EffcError(f"calibration data {path} is neither UTF-8 nor {FALLBACK_ENCODING} text; convert it to UTF-8 "
                    "(for example with iconv) or give an .npz of input arrays")


def _npz(path: Path, input_names: list[str] | None, limit: int | None) -> dict[str, np.ndarray]:
    """An .npz of input arrays [samples, sequence, ...], checked against the model's inputs and positions."""
    arrays = load_npz(path)
    if input_names is not None:
        missing = sorted(set(input_names) - set(arrays))
        if missing:
            raise EffcError(f"calibration data {path} has arrays {', '.join(sorted(arrays)) or '(none)'}; "
                            f"the model takes {', '.join(input_names)} (missing {', '.join(missing)})")
    for name, arr in arrays.items():
        if name in TEXT_INPUTS and arr.ndim >= 2:
            check_length(int(arr.shape[1]), limit, f"calibration data {path} ({name} {list(arr.shape)})")
    return arrays


def _texts(path: Path) -> Iterator[str]:
    with open(path, encoding=_encoding(path)) as f:
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
            batch_size: int = 8, samples: int | None = None, max_positions: int | None = None,
            trust_remote_code: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Feed dicts of at most batch_size samples, samples in all at most `samples`; no sequence longer
    than `max_positions` (the model's, from its config)."""
    files = _files(Path(data))
    left = samples if samples is not None else float("inf")
    if max_positions is not None:
        max_length = min(max_length, max_positions)
    tokenizer = None
    for f in files:
        if f.suffix == ".npz":
            arrays = _npz(f, input_names, max_positions)
            n = min(len(arrays[k]) for k in input_names)
            for start in range(0, n, batch_size):
                take = int(min(batch_size, n - start, left))
                if take <= 0:
                    return
                yield {k: torch.from_numpy(np.ascontiguousarray(arrays[k][start:start + take])) for k in input_names}
                left -= take
            continue
        if tokenizer is None:
            tokenizer = _tokenizer(model_dir, f, trust_remote_code)
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


def _tokenizer(model_dir: str | None, data_file: Path, trust_remote_code: bool = False):
    if not model_dir or not Path(model_dir).is_dir() or not any(Path(model_dir).glob("tokenizer*")):
        raise EffcError(f"calibration data {data_file} is text, but the model has no tokenizer files; "
                        "give an .npz of input arrays instead")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError/OSError/its own types
        raise EffcError(f"could not load the tokenizer of {model_dir}: {str(e).splitlines()[0]}") from None


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


def count(data: str | Path, input_names: list[str] | None = None, max_positions: int | None = None) -> int:
    """Samples in the dataset (lines of text, or rows of the first array of each .npz), for progress/ETA.
    Reads all of it, so unreadable text, pickled or too long arrays are refused before any work."""
    total = 0
    for f in _files(Path(data)):
        if f.suffix == ".npz":
            arrays = _npz(f, input_names, max_positions)
            total += len(next(iter(arrays.values()))) if arrays else 0
        else:
            total += sum(1 for _ in _texts(f))
    return total
