"""What the attention passes read off a captured scaled_dot_product_attention call: its arguments, the
shapes torch.export recorded, and the tensor transformers' repeat_kv expanded (GQA keys at their own heads)."""

from __future__ import annotations

import torch

_aten = torch.ops.aten
SDPA = _aten.scaled_dot_product_attention.default
_FULL_SLICE = (0, 9223372036854775807)


def shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def through_repeat(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor repeat_kv started from: back over full slices, one unsqueeze(2), expand and reshape."""
    while node.op == "call_function":
        if node.target == _aten.slice.Tensor and tuple(node.args[2:4]) in (_FULL_SLICE, (0, None)):
            node = node.args[0]
        elif node.target in (_aten.reshape.default, _aten.view.default, _aten.expand.default):
            node = node.args[0]
        elif node.target == _aten.unsqueeze.default and node.args[1] == 2:
            node = node.args[0]
        else:
            break
    return node


def arguments(node: torch.fx.Node):
    args = list(node.args) + [None] * (7 - len(node.args))
    q, k, v, mask, dropout, causal, *_ = args
    kw = node.kwargs
    return (q, k, v, kw.get("attn_mask", mask), kw.get("dropout_p", dropout or 0.0),
            kw.get("is_causal", causal or False), kw.get("scale"), kw.get("enable_gqa", False))
