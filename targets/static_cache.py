"""A static KV cache for the torch target: the program writes each step's keys and values in place into
preallocated buffers [batch, kv_heads, max_cache, head_dim] (index_copy_ at past_length ..) and attends
over all max_cache positions with a mask (1 = a filled, real position), so a decode step copies no cache.
torch.export keeps the in-place index_copy_ on the user inputs and AOTInductor writes into the caller's
tensors (checked by tests/targets/test_torch_decoder.py).

Program inputs: input_ids [batch, sequence], attention_mask [batch, max_cache], position_ids [batch,
sequence], past_length (0-d int64: where the new tokens go), past_key_values_N_key/value (the buffers,
mutated); output: logits. runtime/torch_program.py's StaticCache is the runner's side: it owns the buffers
and keeps Session.run's past/present contract.
"""

from __future__ import annotations

import torch
from torch.export import Dim
from transformers.cache_utils import Cache as HFCache
from transformers.cache_utils import StaticLayer

from effc.capture import _with_signature
from effc.decoder import PAST, past_names


class _Layer(StaticLayer):
    """transformers' static layer over caller-owned buffers, writing at `start` (a tensor, so one program
    serves every position)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor):
        super().__init__(keys.shape[2])
        self.keys, self.values, self.cumulative_length = keys, values, start
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim = self.v_head_dim = keys.shape[-1]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        at = torch.arange(key_states.shape[-2], device=key_states.device) + self.cumulative_length
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        return self.keys, self.values


class StaticWithPast(torch.nn.Module):
    """The causal LM over a static cache: logits out, the buffers updated in place."""

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model, self.layers = model, layers
        self.input_names = ["input_ids", "attention_mask", "position_ids", "past_length", *past_names(layers)]
        self.output_names = ["logits"]
        self.forward = _with_signature(self._forward, self.input_names)

    def _forward(self, inputs: dict):
        start = inputs["past_length"]
        cache = HFCache(layers=[_Layer(inputs[f"{PAST}_{i}_key"], inputs[f"{PAST}_{i}_value"], start)
                                for i in range(self.layers)])
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         position_ids=inputs["position_ids"], past_key_values=cache, use_cache=True)
        return (out.logits,)


def export(model: torch.nn.Module, meta: dict, max_cache: int) -> torch.export.ExportedProgram:
    """The static-cache program: batch and sequence dynamic, max_cache fixed."""
    module = StaticWithPast(model, meta["layers"])
    batch, seq = Dim("batch"), Dim("sequence", max=max_cache)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    inputs = {"input_ids": ids, "attention_mask": torch.ones(2, max_cache, dtype=torch.int64),
              "position_ids": ids.clone(), "past_length": torch.tensor(3),
              **{n: torch.zeros(2, meta["kv_heads"], max_cache, meta["head_dim"]) for n in past_names(meta["layers"])}}
    shapes = {n: ({0: batch, 1: seq} if n in ("input_ids", "position_ids") else
                  None if n == "past_length" else {0: batch}) for n in inputs}
    with torch.no_grad():
        return torch.export.export(module, (), inputs, dynamic_shapes=shapes, strict=False)
