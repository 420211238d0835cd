"""Example inputs for capture and verification, and the dynamic dims they have.

Text models get input_ids / attention_mask / token_type_ids (those the model's forward takes) of
shape [batch, sequence]; both dims are dynamic. `--input-shapes name:2x64` fixes the example shapes.
"""

from __future__ import annotations

import inspect
import zipfile
from pathlib import Path

import numpy as np
import torch

from effc.errors import EffcError
from effc.runtime import limits

EXAMPLE_SHAPE = (2, 16)  # batch 2, sequence 16: neither 0 nor 1, so torch.export keeps both dynamic
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
DYNAMIC_NAMES = {0: "batch", 1: "sequence"}


POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")  # GPT-2 names it n_positions


def max_positions(config) -> int | None:
    """The longest sequence the model has positions for, from its config (None when it says nothing)."""
    for key in POSITION_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_token_ids(arrays: dict[str, np.ndarray], config, what: str) -> None:
    """input_ids inside the vocabulary and no longer than the model's positions (eager PyTorch would raise
    an IndexError, or read a wrong row for negative ids)."""
    ids = arrays.get("input_ids")
    if config is None or ids is None:
        return
    limits.check_ids(ids, getattr(config, "vocab_size", None), what)
    if ids.ndim >= 2:
        limits.check_length(int(ids.shape[1]), max_positions(config), what)


def _forward_params(model: torch.nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def text_input_names(model: torch.nn.Module, config) -> list[str]:
    params = _forward_params(model)
    names = [n for n in ("input_ids", "attention_mask") if n in params]
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return names


def make_text_inputs(names: list[str], config, shape: tuple[int, int], seed: int = 0,
                     pad: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens; with pad, later rows are right-padded (attention_mask 0 at the end)."""
    g = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", 1000)
    batch, seq = shape
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "input_ids":
            out[name] = torch.randint(0, vocab, shape, generator=g)
        elif name == "attention_mask":
            mask = torch.ones(shape, dtype=torch.int64)
            if pad:
                for b in range(1, batch):
                    mask[b, max(1, seq - b * max(1, seq // (2 * batch))):] = 0
            out[name] = mask
        elif name == "token_type_ids":
            out[name] = torch.zeros(shape, dtype=torch.int64)
    return out


def example_inputs(model: torch.nn.Module, config, shapes: dict[str, tuple[int, ...]] | None = None,
                   given: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Inputs to capture with: a factory's own, else derived from the HF config, at --input-shapes if given."""
    shapes = shapes or {}
    for name, shape in shapes.items():
        if any(size < 2 for size in shape[:2 if name in TEXT_INPUTS else 1]):
            raise EffcError(f"--input-shapes {name}:{'x'.join(map(str, shape))}: batch and sequence are captured as "
                            "dynamic, and torch.export fixes a dim of size 0 or 1 to that size; give 2 or more "
                            "(the artifact still runs batch 1 and sequence 1)")
        if name in TEXT_INPUTS and len(shape) >= 2:
            limits.check_length(shape[1], max_positions(config), f"--input-shapes {name}:{'x'.join(map(str, shape))}")
    if given is not None:
        inputs = dict(given)
        for name, shape in shapes.items():
            if name not in inputs:
                raise EffcError(f"--input-shapes names {name}, which the model's example inputs do not have ({', '.join(inputs)})")
            t = inputs[name]
            inputs[name] = (torch.randint(0, int(t.max()) + 1, shape, dtype=t.dtype) if not t.is_floating_point()
                            else torch.randn(shape, dtype=t.dtype))
        return inputs
    if config is None:
        raise EffcError("the model has no Hugging Face config to derive example inputs from; "
                        "return (model, example_inputs) from the factory")
    names = text_input_names(model, config)
    if "input_ids" not in names:
        raise EffcError(f"cannot derive example inputs for {type(model).__name__} (its forward takes "
                        f"{', '.join(_forward_params(model)[:6])}); return (model, example_inputs) from a factory")
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise EffcError(f"--input-shapes names {', '.join(unknown)}; the model takes {', '.join(names)}")
    shape = shapes.get("input_ids") or next(iter(shapes.values()), EXAMPLE_SHAPE)
    if len(shape) != 2 or any(shapes.get(n, shape) != shape for n in names):
        raise EffcError(f"--input-shapes: text inputs must all be [batch, sequence] of one size, got {shapes}")
    return make_text_inputs(names, config, shape)


def dynamic_dims(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Dim 0 of every input is the batch; dim 1 of token inputs is the sequence."""
    dims: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        d = {0: "batch"} if t.dim() >= 1 else {}
        if name in TEXT_INPUTS and t.dim() >= 2:
            d[1] = "sequence"
        dims[name] = d
    return dims


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays from an .npz, never unpickling (object arrays are refused)."""
    path = Path(path)
    if not path.is_file():
        raise EffcError(f"{path}: no such file (give an .npz of named input arrays)")
    if not zipfile.is_zipfile(path):  # np.load would read it as .npy or as a pickle
        raise EffcError(f"{path} is not an .npz file (an .npz is a zip of arrays); save the arrays with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        raise EffcError(f"{path} holds pickled objects, which effc will not load ({e}); save plain arrays with numpy.savez") from None
    except Exception as e:
        raise EffcError(f"{path} is not a readable .npz file: {e}") from None
