"""PEFT adapter directories applied on top of a base model, checked against it before loading."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from effc.errors import EffcError
from effc.preflight import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_problem
from effc.runtime.manifest import sha256_tree

# peft names adapter tensors base_model.model.<module>.<kind>.weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector|ia3_l)(\.weight)?$")


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in_features, out_features) of a layer LoRA can target, including GPT-2's Conv1D ([in, out] weights)."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    if isinstance(module, torch.nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    return None


def check_fits(base: torch.nn.Module, adapter_dir: Path) -> None:
    """Raise one clear line when the adapter names modules the base lacks or has shapes that do not fit."""
    from safetensors import safe_open

    from effc.sources import read_json

    problem = adapter_problem(adapter_dir)
    if problem:
        raise EffcError(problem)
    config = read_json(adapter_dir / ADAPTER_CONFIG)
    rank = config.get("r")
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in shapes.items():
        m = _KEY.match(key)
        if not m:
            continue
        name, kind = m["module"], m["kind"]
        try:
            module = base.get_submodule(name)
        except AttributeError:
            raise EffcError(f"adapter {adapter_dir} does not fit the base model: it has weights for module {name}, "
                            f"which the base does not have (different architecture?)") from None
        dims = _in_out(module)
        if dims is None:
            continue
        fan_in, fan_out = dims
        want = {
            "lora_A": (rank, fan_in), "lora_B": (fan_out, rank),
            "lora_embedding_A": (rank, fan_in), "lora_embedding_B": (fan_out, rank),
            "lora_magnitude_vector": (fan_out,),
        }.get(kind)
        if kind == "ia3_l":
            want = shape if shape in ((fan_out, 1), (1, fan_in)) else (fan_out, 1)
        if want is not None and rank is not None and tuple(shape) != tuple(want):
            raise EffcError(f"adapter {adapter_dir} does not fit the base model: {name}.{kind} has shape {list(shape)}, "
                            f"expected {list(want)} for a {fan_in}->{fan_out} layer at rank {rank}")


def apply_adapters(base: torch.nn.Module, adapter_dirs: list[Path]) -> tuple[torch.nn.Module, list[dict]]:
    """Load each adapter with peft (safetensors only) and activate all of them together.

    Returns the unwrapped model with adapter branches in place (exportable, unlike PeftModel) and a
    description of each adapter for the manifest.
    """
    from peft import PeftModel

    described = []
    names = []
    model = None
    for adapter_dir in adapter_dirs:
        check_fits(base, adapter_dir)
        name = _unique_name(adapter_dir, names)
        try:
            if model is None:
                model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name, is_trainable=False)
            else:
                model.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        except (RuntimeError, ValueError, KeyError) as e:
            line = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise EffcError(f"adapter {adapter_dir} does not fit the base model: {line}") from None
        names.append(name)
        described.append({"name": name, "path": str(adapter_dir), "sha256": sha256_tree(adapter_dir)})
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    return model.base_model.model, described


def _unique_name(adapter_dir: Path, taken: list[str]) -> str:
    """The adapter's directory name as a peft adapter name (no dots), made unique."""
    base = re.sub(r"\W", "_", adapter_dir.resolve().name) or "adapter"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
