"""effc::rotary: rotary position embedding of one query or key tensor, transformers' apply_rotary_pos_emb
(x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)) on the first R dims of each head, the
rest passed through (Phi-3's partial rotary). cos and sin come as tables of R/2 columns, one row per
position, and position_ids picks each token's row: the tables are the first half of HF's
cos/sin = f(cat(freqs, freqs)), whose halves are equal.

x is [B, N, S, H] or, as the projection computed it, [B, S, N*H] (then num_heads splits it). The "ort"
column is com.microsoft::RotaryEmbedding (interleaved=0, explicit position_ids, x as [B, S, N*H]) on ONNX
Runtime's CPU kernel. passes/rotary.py puts the op in the graph inside the ort target's build,
with the tables the graph itself computed for this call's tokens (row b * S + s for token (b, s)), so
every position and rope type stays exact, left padding included. ONNX Runtime's kernel does not check
position_ids against the tables' rows: the op must only be given indices it has rows for. The op is not
in onnx's schemas; targets/contrib_ops.py registers its schema (from ONNX Runtime's contrib_defs) for onnxscript.
"""

from __future__ import annotations

import torch
from onnxscript import opset20 as op

from effc.ops.registry import Op, register
from effc.targets.attention import _bnsh_to_bsh
from effc.targets.contrib_ops import msft


def _rotate(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
            sin_cache: torch.Tensor) -> torch.Tensor:
    half = cos_cache.shape[-1]
    cos, sin = cos_cache[position_ids], sin_cache[position_ids]  # [B, S, R/2]
    cos, sin = torch.cat([cos, cos], dim=-1).unsqueeze(1), torch.cat([sin, sin], dim=-1).unsqueeze(1)
    x_rot, x_pass = x[..., : 2 * half], x[..., 2 * half:]
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


@torch.library.custom_op("effc::rotary", mutates_args=())
def rotary(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
           num_heads: int) -> torch.Tensor:
    """x [B, N, S, H] (or [B, S, N*H], N = num_heads) with the first R = 2 * cos_cache.shape[1] dims of each
    head rotated by the rows position_ids [B, S] picks from cos_cache / sin_cache [P, R/2]; what the
    captured rotate_half chain computes."""
    if x.dim() == 4:
        return _rotate(x, position_ids, cos_cache, sin_cache)
    batch, seq, hidden = x.shape
    heads = x.reshape(batch, seq, num_heads, hidden // num_heads).transpose(1, 2)
    return _rotate(heads, position_ids, cos_cache, sin_cache).transpose(1, 2).reshape(x.shape)


@rotary.register_fake
def fake(x, position_ids, cos_cache, sin_cache, num_heads):
    return torch.empty_like(x)


def rotary_embedding(x, position_ids, cos_cache, sin_cache, num_heads: int):
    """RotaryEmbedding, half rotation (interleaved=0), on x as [B, S, N*H]. passes/rotary.py gives the
    projection's output in that layout where it can; a 4D [B, N, S, H] input is turned into it here, as
    the kernel's own 4D form kept two Transposes per call that ORT's optimizer could not cancel (measured
    on a Llama decode step). num_heads and rotary_embedding_dim always given: the kernel's partial-rotary
    form (it copies the dims past R)."""
    bnsh = len(x.shape) == 4
    if bnsh:
        head_size = int(x.shape[3])
        x = _bnsh_to_bsh(x, num_heads, head_size)
    out = msft.RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=int(num_heads),
                               rotary_embedding_dim=2 * int(cos_cache.shape[1]))
    if bnsh:
        out = op.Transpose(op.Reshape(out, op.Constant(value_ints=[0, 0, num_heads, head_size])), perm=[0, 2, 1, 3])
    return out


OP = register(Op(torch.ops.effc.rotary.default, {"ort": rotary_embedding}, fake))
