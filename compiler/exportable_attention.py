"""Model-specific attention modules torch.export cannot trace, swapped during capture for an equivalent
over effc::window_attention (compiler/ops/window_attention.py). The eager model effc verifies against keeps
its own code: the swap lasts only while torch.export runs (`exportable`).

Longformer (LongformerSelfAttention): a query sees the keys within attention_window/2 on each side, minus
padding, and padded query rows come out 0. HF computes it with as_strided chunks over a sequence padded
to a multiple of the window, data-dependent for torch.export (transformers' _chunk, and `.item()` on the
global-attention flag); here it is window_attention(window = attention_window/2 + 1, both sides), with no
padding needed. Global attention (global_attention_mask, or attention_mask == 2) is not an input effc
feeds, so it is not captured.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch


def _longformer_self_attention(self, hidden_states, attention_mask=None, is_index_masked=None, **_):
    batch, seq, embed = hidden_states.shape
    heads, head = self.num_heads, self.head_dim

    def split(x):
        return x.view(batch, seq, heads, head).transpose(1, 2)

    q = split(self.query(hidden_states) / math.sqrt(head))
    k, v = split(self.key(hidden_states)), split(self.value(hidden_states))
    local = attention_mask == 0  # the encoder's mask: 0 attend locally, finfo.min padding
    out = torch.ops.effc.window_attention(q, k, v, local, self.one_sided_attn_window_size + 1, False, 1, None, 0,
                                          None, 1.0)
    out = out * (~is_index_masked)[:, None, :, None].to(out.dtype)  # HF zeroes padded query rows
    return (out.transpose(1, 2).reshape(batch, seq, embed),)


def _longformer_encoder(self, hidden_states, attention_mask=None, padding_len=0, output_attentions=False,
                        output_hidden_states=False, return_dict=True):
    from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutput

    is_index_masked = attention_mask < 0
    for layer in self.layer:
        hidden_states = layer(hidden_states, attention_mask=attention_mask, is_index_masked=is_index_masked,
                              is_index_global_attn=None, is_global_attn=False)[0]
    return LongformerBaseModelOutput(last_hidden_state=hidden_states)


def _no_window_padding(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, pad_token_id):
    return 0, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds


def _swaps(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, object]]:
    """(module, attribute, replacement) for every module this file knows how to export."""
    swaps = []
    for module in model.modules():
        kind = type(module).__name__
        if kind == "LongformerSelfAttention":
            swaps.append((module, "forward", _longformer_self_attention))
        elif kind == "LongformerEncoder":
            swaps.append((module, "forward", _longformer_encoder))
        elif kind == "LongformerModel":
            swaps.append((module, "_pad_to_window_size", _no_window_padding))
    return swaps


@contextlib.contextmanager
def exportable(model: torch.nn.Module) -> Iterator[int]:
    """Swap in the export forms (instance attributes, removed afterwards); yields how many were swapped."""
    import effc.ops  # noqa: F401  (registers effc::window_attention)

    swaps = _swaps(model)
    for module, name, fn in swaps:
        setattr(module, name, types.MethodType(fn, module))
    try:
        yield len(swaps)
    finally:
        for module, name, _ in swaps:
            delattr(module, name)
