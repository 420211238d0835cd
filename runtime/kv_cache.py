"""The KV-cache inputs and outputs of a decoder artifact (compiler/decoder.py makes them), for every runtime
path: names, transformers' position ids, and the empty cache a plain prefill runs with. numpy first; torch
tensors work too, without this module importing torch."""

from __future__ import annotations

import re

import numpy as np

PAST = "past_key_values"
PRESENT = "present"
_INTERNAL = re.compile(rf"^({PAST}|{PRESENT})_(\d+)_(key|value)$")
_PUBLIC = re.compile(rf"^({PAST}|{PRESENT})\.(\d+)\.(key|value)$")


def _torch():
    import torch

    return torch


def public(name: str) -> str:
    """past_key_values_3_key -> past_key_values.3.key (other names unchanged)."""
    m = _INTERNAL.match(name)
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else name


def internal(name: str) -> str:
    """past_key_values.3.key -> past_key_values_3_key (other names unchanged)."""
    m = _PUBLIC.match(name)
    return f"{m.group(1)}_{m.group(2)}_{m.group(3)}" if m else name


def positions(mask):
    """transformers generate's position ids: the count of real tokens before each, 1 on padding
    (numpy or torch, as the mask)."""
    if type(mask).__module__.startswith("torch"):
        pos = mask.long().cumsum(-1) - 1
        return pos.masked_fill(mask == 0, 1)
    pos = np.cumsum(mask.astype(np.int64), axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def pairs(layers: int) -> dict[str, str]:
    """Each cache input's name -> the output that carries it to the next step (past_key_values.N.key ->
    present.N.key), layer by layer."""
    return {f"{PAST}.{i}.{kv}": f"{PRESENT}.{i}.{kv}" for i in range(layers) for kv in ("key", "value")}


def shares_buffer(manifest: dict) -> bool:
    """Whether a decoder artifact's cache can be one max-length buffer per tensor, written in place
    (targets/kv_buffer.py): an ort graph built for it, and no window whose oldest columns are dropped."""
    return bool(manifest["target"].get("shared_kv_buffer")) and not manifest["decoder"].get("cache_window")


def complete_feeds(feeds: dict, kv_heads: int, head_dim: int, input_names: list[str]) -> dict:
    """Feeds of a decoder (numpy or torch, as input_ids) with what a plain prefill leaves out (effc run,
    golden, bench, debug and calibration data give input_ids and maybe attention_mask): an all-ones mask,
    transformers' positions, an empty cache. Feeds that already have them are returned as they are."""
    if "input_ids" not in feeds or all(n in feeds for n in input_names):
        return feeds
    ids = feeds["input_ids"]
    torch_in = type(ids).__module__.startswith("torch")
    out = dict(feeds)
    if "attention_mask" not in out and ids.ndim == 2:
        out["attention_mask"] = _torch().ones_like(ids) if torch_in else np.ones(ids.shape, dtype=np.int64)
    has_past = any(n.startswith(PAST) and n in feeds for n in input_names)
    if "position_ids" not in out and not has_past and "attention_mask" in out:
        out["position_ids"] = positions(out["attention_mask"])
    if not has_past:
        shape = (ids.shape[0], kv_heads, 0, head_dim)
        for name in input_names:
            if name.startswith(PAST):
                out[name] = _torch().zeros(shape) if torch_in else np.zeros(shape, dtype=np.float32)
    return out
