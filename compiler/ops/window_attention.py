"""effc::window_attention: attention where each query sees only the keys its pattern allows: a band
(sliding window, causal or both sides, optionally dilated), global token positions, and a block-sparse
layout. passes/sparse_attention.py puts it where the model's own mask is such a band (exact) or where a
pattern is asked for (approximate).

Positions: key j sits at j; query i of S sits at p = T - S + i (the queries are the last S of the T
keys: the whole sequence in a prefill, the new tokens over a KV cache). Query p sees key j when
    (band: r = p - j, r % dilation == 0, 0 <= r < window*dilation causal, |r| < window*dilation both sides
     | j in global_tokens | p in global_tokens | layout[p // block, j // block])
    & (j <= p if causal) & key_valid[b, j]
so `window` counts the keys on a side including the query itself (HF's sliding_window, GQA's
local_window_size). Heads map GQA-style: query head n reads key/value head n // (N // KV). A row that
sees no key comes out 0, as PyTorch's SDPA gives for a fully masked row.

The reference builds the [B, 1, S, T] mask (allowed_mask) and runs SDPA: plainly right, O(S*T). The
targets compute only the allowed blocks: targets/window_attention_onnx.py (blocked band in standard ops)
and effc_native::window_attention (compiler/csrc/window_attention.cpp, flash-style).
"""

from __future__ import annotations

import torch

from effc.ops.registry import Op, register


def allowed_mask(batch: int, queries: int, keys: int, key_valid: torch.Tensor | None, window: int, causal: bool,
                 dilation: int, global_tokens: list[int], block: int, layout: torch.Tensor | None,
                 device=None) -> torch.Tensor:
    """The op's pattern as a bool mask [B, 1, S, T] (True = attend), straight from the definition above."""
    p = torch.arange(keys - queries, keys, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    r = p - j
    allowed = torch.zeros(queries, keys, dtype=torch.bool, device=device)
    if window > 0:
        span = window * dilation
        inside = (r >= 0) & (r < span) if causal else r.abs() < span
        allowed |= inside & (r % dilation == 0)
    if global_tokens:
        g = torch.tensor(global_tokens, device=device)
        allowed |= torch.isin(j, g) | torch.isin(p, g)
    if layout is not None:
        allowed |= layout[p // block, j // block]
    if causal:
        allowed &= r >= 0
    allowed = allowed[None, None].expand(batch, 1, queries, keys)
    if key_valid is not None:
        allowed = allowed & key_valid.to(torch.bool)[:, None, None, :]
    return allowed


@torch.library.custom_op("effc::window_attention", mutates_args=())
def window_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_valid: torch.Tensor | None,
                     window: int, causal: bool, dilation: int, global_tokens: list[int] | None, block: int,
                     layout: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Attention output [B, N, S, Dv] from q [B, N, S, D], k [B, KV, T, D], v [B, KV, T, Dv] over the
    pattern the module docstring defines. global_tokens None = none (AOTInductor passes an empty
    int list on as None, so effc's graphs carry None)."""
    b, heads, s, _ = query.shape
    t, repeat = key.shape[2], heads // key.shape[1]
    mask = allowed_mask(b, s, t, key_valid, window, causal, dilation, list(global_tokens or []), block, layout,
                        query.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1), attn_mask=mask,
        scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, 0.0).to(query.dtype)


@window_attention.register_fake
def fake(query, key, value, key_valid, window, causal, dilation, global_tokens, block, layout, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


def _translations() -> dict:
    from effc.targets import window_attention_onnx, window_attention_trt

    return {"onnx": window_attention_onnx.blocked, "ort": window_attention_onnx.blocked,
            "torch": "effc_native::window_attention", "trt": window_attention_trt.band_plugin}


OP = register(Op(torch.ops.effc.window_attention.default, _translations(), fake))
