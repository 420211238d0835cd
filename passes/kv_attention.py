"""The ort target's rewrite of a decoder's cached attention into effc::cached_attention (lowered to
com.microsoft::GroupQueryAttention). Applied inside OrtTarget.build, not a user pass: the op has only an
"ort" column, and the program the pipeline verifies against stays the captured one.

Per layer the captured graph (compiler/decoder.py's WithPast over a DynamicCache) has
    present_k = cat([past_k, k_new], dim=2)   (also an output: present.N.key), same for v
    k_rep = reshape(expand(unsqueeze(present_k, 2)))   (repeat_kv; absent when kv_heads == heads)
    out = scaled_dot_product_attention(q, k_rep, v_rep, mask, scale=...)
which becomes one node returning (out, present_k, present_v).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram

import effc.ops  # noqa: F401  (registers effc::cached_attention)
from effc.passes.rewrite import GraphEdit, Rule, apply_rules
from effc.passes.sdpa import SDPA, arguments, shape, through_repeat

NAME = "kv_attention"
_aten = torch.ops.aten


def _cache_cat(node: torch.fx.Node) -> torch.fx.Node | None:
    """The cat([past, new], dim=2) a key/value argument repeats, or None."""
    src = through_repeat(node)
    if src.op != "call_function" or src.target != _aten.cat.default:
        return None
    parts, dim = src.args[0], src.args[1] if len(src.args) > 1 else 0
    dims = shape(src)
    if len(parts) != 2 or dims is None or len(dims) != 4 or dim not in (2, -2):
        return None
    return src


def _check(edit: GraphEdit, node: torch.fx.Node) -> str | None:
    q, k, v, mask, dropout, causal, _, gqa = arguments(node)
    if dropout or causal or gqa:
        return "dropout, is_causal or enable_gqa"
    if not isinstance(mask, torch.fx.Node):
        return "no attention mask"
    qs, ms = shape(q), shape(mask)
    if qs is None or len(qs) != 4 or q.meta["val"].dtype != torch.float32:
        return "query not 4D float32"
    if ms is None or len(ms) != 4 or ms[1] != 1 or str(ms[0]) != str(qs[0]) or str(ms[2]) != str(qs[2]):
        return "mask not [B, 1, S, T] with the query's B and S"  # the GQA lowering reads B, S, T from it
    kc, vc = _cache_cat(k), _cache_cat(v)
    if kc is None or vc is None:
        return "keys/values are not cat([past, new]) (+ repeat_kv)"
    heads, kv_heads = qs[1], shape(kc)[1]
    if not (isinstance(heads, int) and isinstance(kv_heads, int)) or heads % kv_heads:
        return "head counts not static multiples"
    if shape(k)[1] != heads or shape(v)[1] != heads:
        return "repeat_kv does not reach the query's heads"
    return None


def _rewrite(edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node:
    q, k, v, mask, _, _, scale, _ = arguments(node)
    kc, vc = _cache_cat(k), _cache_cat(v)
    if scale is None:
        scale = shape(q)[3] ** -0.5
    fused = edit.call(torch.ops.effc.cached_attention.default,
                      (q, kc.args[0][0], kc.args[0][1], vc.args[0][0], vc.args[0][1], mask, float(scale)), node)
    items = []
    for i in range(3):  # program.call computes vals from tensor inputs; a tuple's items are set here
        item = edit.graph.call_function(operator.getitem, (fused, i))
        item.meta.update(val=fused.meta["val"][i], nn_module_stack=node.meta.get("nn_module_stack", {}))
        items.append(item)
    # The presents are outputs: they now come from the fused node (the repeat chain dies with the SDPA).
    for cat, item in ((kc, items[1]), (vc, items[2])):
        cat.replace_all_uses_with(item, delete_user_cb=lambda user: user.op == "output")
    return items[0]


RULE = Rule("gqa", lambda n: n.op == "call_function" and n.target == SDPA, _rewrite, _check)


def lower(program: ExportedProgram, keep: frozenset[str] = frozenset()) -> tuple[ExportedProgram, int, dict[str, int]]:
    """(program with each cached attention fused, how many, refused candidates by reason); reads no
    parameters, so `keep` does not matter."""
    edit = GraphEdit(program, NAME)
    done = apply_rules(edit, [RULE])
    if not done:
        return program, 0, {r: len(n) for r, n in edit.refused.items()}
    edit.graph.eliminate_dead_code()
    result = edit.finish({}, dropped=None)
    return result.ir, done, {r: len(n) for r, n in edit.refused.items()}
