"""Decoder LMs with their KV cache (task text-generation-with-past): one graph for prefill and decode.

Inputs input_ids, attention_mask (past + new), position_ids and past_key_values.N.key/value [batch,
kv_heads, past_sequence, head_dim]; outputs logits and present.N.key/value. These are the names Optimum's
ORTModelForCausalLM and onnxruntime-genai use. The program's input names must be Python identifiers
(torch.export names placeholders after the forward's parameters), so inside the fx graph the past is
past_key_values_N_key; `public` and `internal` convert. A past of length 0 is a prefill.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from effc.errors import EffcError
from effc.runtime.kv_cache import PAST, PRESENT, complete_feeds, positions, public

TASK = "text-generation-with-past"
# The mask's length is past + new: torch.export relates it to the other two dims itself (Dim.AUTO).
TOTAL = "total_sequence"
PAST_DIM = "past_sequence"
PAST_LENGTH = 3  # the past of the capture example: 2 or more, so torch.export keeps it dynamic


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A model transformers' AutoModelForCausalLM would load (GPT2LMHeadModel is one)."""
    return _causal_name(type(model).__name__)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def info(model: torch.nn.Module, config) -> dict:
    """What a runtime needs to drive the cache: layers, KV heads, head size, positions, special tokens
    (manifest["decoder"])."""
    from effc.inputs import max_positions

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head")
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd")
    generation = getattr(model, "generation_config", None)
    eos = _ids(getattr(generation, "eos_token_id", None)) or _ids(getattr(text, "eos_token_id", None))
    pad = getattr(generation, "pad_token_id", None)
    pad = getattr(text, "pad_token_id", None) if pad is None else pad
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) else None
    window = int(window) if isinstance(window, int) else None
    kinds = getattr(text, "layer_types", None)
    every_layer = window is not None and (not kinds or all(k == "sliding_attention" for k in kinds))
    return {
        "layers": int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer")),
        "kv_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "heads": int(heads),
        "head_dim": int(getattr(text, "head_dim", None) or hidden // heads),
        "hidden_size": int(hidden),
        "vocab_size": int(text.vocab_size),
        "max_positions": max_positions(text),
        "dtype": "float32",
        "eos_token_id": eos,
        "pad_token_id": None if pad is None else int(_ids(pad)[0]),
        "bos_token_id": (_ids(getattr(text, "bos_token_id", None)) or [None])[0],
        "sliding_window": window,
        # The past a decode step reads when every layer attends within the window (a query sees itself and
        # the window - 1 keys before it): generate keeps only that much. Mixed local/global layers (Gemma-3,
        # Qwen2's max_window_layers) keep the whole cache: the global layers read all of it.
        "cache_window": window - 1 if every_layer else None,
    }


def past_names(layers: int, kind: str = PAST) -> list[str]:
    """Internal names, key then value per layer."""
    return [f"{kind}_{i}_{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits", *(public(n) for n in past_names(layers, PRESENT))]


class WithPast(torch.nn.Module):
    """The causal LM called with its past as a transformers DynamicCache, returning logits and the
    updated cache as flat tensors: what torch.export captures, and the eager reference."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        from effc.capture import _with_signature

        self.model = model
        self.layers = layers
        self.input_names = ["input_ids", "attention_mask", "position_ids", *past_names(layers)]
        self.output_names = output_names(layers)
        self.forward = _with_signature(self._forward, self.input_names)

    def _forward(self, inputs: dict):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(inputs[f"{PAST}_{i}_key"], inputs[f"{PAST}_{i}_value"], i)
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], cache=cache, use_cache=True)
        layers = out.cache.layers
        return (out.logits, *(t for layer in layers for t in (layer.keys, layer.values)))


def empty_past(meta: dict, batch: int, length: int = 0, seed: int | None = None) -> dict[str, torch.Tensor]:
    """A past of `length` per layer (zeros, or random with a seed), by internal name."""
    shape = (batch, meta["kv_heads"], length, meta["head_dim"])
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return {n: torch.randn(shape, generator=g) if g is not None else torch.zeros(shape)
            for n in past_names(meta["layers"])}


def left_padded_mask(batch: int, seq: int) -> torch.Tensor:
    """Row b has b * seq // (2 * batch) padding tokens on the left (row 0 none, at least one real token)."""
    mask = torch.ones(batch, seq, dtype=torch.int64)
    for b in range(1, batch):
        mask[b, : min(seq - 1, b * max(1, seq // (2 * batch)))] = 0
    return mask


def prefill_inputs(meta: dict, batch: int, seq: int, seed: int = 0, pad: bool = False) -> dict[str, torch.Tensor]:
    """Random tokens with an empty cache (left-padded with pad)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, meta["vocab_size"], (batch, seq), generator=g)
    mask = left_padded_mask(batch, seq) if pad else torch.ones(batch, seq, dtype=torch.int64)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), **empty_past(meta, batch)}


def example_inputs(meta: dict, shape: tuple[int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Capture inputs: a past of PAST_LENGTH (0 and 1 would be specialized) and `shape` new tokens."""
    batch, seq = shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, PAST_LENGTH + seq, dtype=torch.int64)
    return {"input_ids": torch.randint(0, meta["vocab_size"], (batch, seq), generator=g), "attention_mask": mask,
            "position_ids": positions(mask)[:, PAST_LENGTH:].contiguous(), **empty_past(meta, batch, PAST_LENGTH, seed=seed)}


def dynamic_dims(names: list[str]) -> dict[str, dict[int, str]]:
    dims: dict[str, dict[int, str]] = {}
    for name in names:
        if name.startswith(PAST):
            dims[name] = {0: "batch", 2: PAST_DIM}
        elif name == "attention_mask":
            dims[name] = {0: "batch", 1: TOTAL}
        else:
            dims[name] = {0: "batch", 1: "sequence"}
    return dims


def next_step(feeds: dict[str, torch.Tensor], outputs: dict, token: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decode feeds after `feeds`: one new token per row, the mask one longer, the presents as the past."""
    mask = feeds["attention_mask"]
    mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype)], dim=1)
    step = {"input_ids": token.reshape(-1, 1).long(), "attention_mask": mask,
            "position_ids": feeds["position_ids"][:, -1:] + 1}
    for name in feeds:
        if name.startswith(PAST):
            step[name] = torch.as_tensor(outputs[public(name.replace(PAST, PRESENT, 1))])
    return step


def verification_inputs(module: WithPast, meta: dict, shape: tuple[int, int], long: int,
                        steps: int = 2) -> list[dict[str, torch.Tensor]]:
    """A left-padded prefill, `steps` cached decode steps after it (each fed eager's greedy token and eager's
    presents), and a longer left-padded prefill of another batch size."""
    from effc.capture import run_torch

    batch, seq = shape
    sets = [prefill_inputs(meta, batch, seq, seed=0, pad=True)]
    for _ in range(steps):
        out = run_torch(module, sets[-1], module.output_names)
        token = torch.as_tensor(out["logits"][:, -1].argmax(-1))
        sets.append(next_step(sets[-1], out, token))
    sets.append(prefill_inputs(meta, batch + 1, long, seed=1, pad=True))
    return sets


# What transformers and onnxruntime-genai read a tokenizer from; copied into the artifact's root, where
# onnxruntime_genai.Model looks for them (next to genai_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "tokenizer.model", "chat_template.jinja", "generation_config.json")


def copy_tokenizer(src, out_dir: Path) -> str | None:
    """The source directory's tokenizer files copied into the artifact; "tokenizer.json" when there is one
    (what effc.runtime's generate reads), else None."""
    if src.kind != "hf_dir":
        return None
    for name in TOKENIZER_FILES:
        if (Path(src.spec) / name).is_file():
            shutil.copyfile(Path(src.spec) / name, out_dir / name)
    return "tokenizer.json" if (out_dir / "tokenizer.json").is_file() else None


def check_task(task: str | None, model: torch.nn.Module) -> str | None:
    """The task to compile for: --task as given, else text-generation-with-past for a causal LM. With --task
    the model was loaded with AutoModelForCausalLM, so the check is on what config.json says it is (a BERT
    loads as BertLMHeadModel, but is no decoder)."""
    config = getattr(model, "config", None)
    archs = getattr(config, "architectures", None) or [type(model).__name__]
    causal = is_causal_lm(model) and any(_causal_name(a) for a in archs)
    if task == TASK and not causal:
        raise EffcError(f"--task {TASK} needs a causal LM (what AutoModelForCausalLM loads); this model is "
                        f"{', '.join(archs)}: drop --task, or give --task feature-extraction")
    if task is None and causal:
        return TASK
    return task


def without_cache(src, target, task: str | None) -> None:
    """A target that cannot take the cache gets the causal LM as one forward (text-generation); asked for
    the cache explicitly, it is refused."""
    why = getattr(target, "no_kv_cache", None)
    if src.task != TASK or why is None:
        return
    if task == TASK:
        raise EffcError(f"--target {target.name} cannot build {TASK}: {why}; give --task text-generation")
    src.task = "text-generation"


def _causal_name(cls_name: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return cls_name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def filled(stream, example: dict[str, torch.Tensor]):
    """Data batches (input_ids, attention_mask) completed into prefill feeds of the program `example` is
    an input set of; other programs' batches pass through."""
    past = [n for n in example if n.startswith(PAST)]
    if not past:
        yield from stream
        return
    _, kv_heads, _, head_dim = example[past[0]].shape
    for feeds in stream:
        yield complete_feeds(feeds, kv_heads, head_dim, list(example))


def data_names(example: dict) -> list[str]:
    """The inputs data provides (tokenized text, .npz): not the cache or the positions of a decoder."""
    if not any(n.startswith(PAST) for n in example):
        return list(example)
    return [n for n in example if not n.startswith(PAST) and n != "position_ids"]
