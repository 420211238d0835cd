"""The ort target's rewrite of a decoder's rotary position embedding into effc::rotary (lowered to
com.microsoft::RotaryEmbedding). Applied inside OrtTarget.build, not a user pass: the op has only an "ort"
column, and the program the pipeline verifies against stays the captured one.

Per layer the captured graph (transformers' apply_rotary_pos_emb, unsqueeze_dim=1) has, for q and for k,
    out = x * unsqueeze(cos, 1) + cat([-x[..., R/2:], x[..., :R/2]], -1) * unsqueeze(sin, 1)
where x is the head tensor [B, N, S, H] (R = H), or its first R dims with
    cat([out, x_full[..., R:]], -1)
after it (partial rotary, Phi-3). cos and sin [B, S, R] are what the model's rotary module computed from
position_ids: elementwise functions (cos/sin, the attention scaling, casts) of cat([freqs, freqs], -1),
so their two halves are equal and R/2 columns carry them. Each chain becomes one effc::rotary reading the
tables' first halves flattened to [B * S, R/2] and the row index b * S + s, built once per rotary module
output (Gemma-3's local and global rotaries get one each). The graph keeps computing cos/sin from the
position ids as before (once per step, not per layer), so left-padded positions, positions past
max_position_embeddings and whatever rope scaling the captured graph computes stay exact; the 6-8 ops per q and
per k become one kernel. Where x is the projection's transpose(view(t, [B, S, N, H]), 1, 2) the op reads
t [B, S, N*H] itself and the view + transpose follow it, so no Transpose is left around the kernel.

Not GroupQueryAttention's own do_rotary: on a prompt its CPU kernel takes position_ids' first element for
every row (ORT 1.32, measured: |Δ| ~2 on the rotated keys of left-padded rows).
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram
from torch.fx.experimental.symbolic_shapes import statically_known_true

import effc.ops  # noqa: F401  (registers effc::rotary)
from effc.passes.rewrite import GraphEdit, Rule, apply_rules

NAME = "rotary"
_aten = torch.ops.aten
_ROTARY = torch.ops.effc.rotary.default
_END = 9223372036854775807
# Elementwise ops of one tensor (the other arguments numbers or dtypes) between cat([freqs, freqs]) and
# the cos/sin a layer reads: the two halves of their output stay equal.
_ELEMENTWISE = {_aten.cos.default, _aten.sin.default, _aten.to.dtype, _aten.to.dtype_layout, _aten.to.device,
                _aten._to_copy.default, _aten.clone.default, _aten.alias.default, _aten.contiguous.default,
                _aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar}


def _call(node, *targets) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in targets


def _val(node):
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same(a, b) -> bool:
    return statically_known_true(a == b)


def _last_dim(node: torch.fx.Node, dim) -> bool:
    val = _val(node)
    return val is not None and isinstance(dim, int) and dim in (-1, val.dim() - 1)


def _slice(node, dim_of: torch.fx.Node | None = None) -> tuple[torch.fx.Node, int, int] | None:
    """(source, start, end) of a last-dim aten.slice with step 1, end clamped to the source's size."""
    if not _call(node, _aten.slice.Tensor):
        return None
    src, dim, start, end, step = (*node.args, *(0, None, None, 1)[len(node.args) - 1:])
    if not _last_dim(src, dim) or step != 1 or not isinstance(start, int):
        return None
    size = _val(src).shape[-1]
    end = size if end is None or end == _END else end
    return (src, start, end) if isinstance(end, int) and isinstance(size, int) else None


def _mul_operands(node) -> tuple | None:
    return tuple(node.args[:2]) if _call(node, _aten.mul.Tensor) else None


def _rotate_half(node) -> torch.fx.Node | None:
    """x where node is cat([-x[..., h:], x[..., :h]], -1) with h half x's last dim."""
    if not _call(node, _aten.cat.default) or len(node.args[0]) != 2:
        return None
    if not _last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return None
    neg, first = node.args[0]
    if not _call(neg, _aten.neg.default):
        return None
    second, first = _slice(neg.args[0]), _slice(first)
    if second is None or first is None or second[0] is not first[0]:
        return None
    x, size = first[0], _val(first[0]).shape[-1]
    if not isinstance(size, int) or size % 2 or first[1:] != (0, size // 2) or second[1:] != (size // 2, size):
        return None
    return x


def _parts(node: torch.fx.Node):
    """(x, cos_u, sin_u) of add(mul(x, cos_u), mul(rotate_half(x), sin_u)), either operand order, or None."""
    if not _call(node, _aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    for plain, turned in (node.args, node.args[::-1]):
        p, t = _mul_operands(plain), _mul_operands(turned)
        if p is None or t is None:
            continue
        for rot, sin_u in (t, t[::-1]):
            x = _rotate_half(rot)
            if x is None:
                continue
            for xx, cos_u in (p, p[::-1]):
                if xx is x:
                    return x, cos_u, sin_u
    return None


def _table(node) -> torch.fx.Node | None:
    """cos/sin [B, S, R] from its unsqueeze(·, 1) over the heads."""
    if not _call(node, _aten.unsqueeze.default) or node.args[1] != 1:
        return None
    return node.args[0]


def _halves_equal(node) -> bool:
    """node is elementwise functions of cat([f, f], -1): its two halves along the last dim are equal."""
    while _call(node, *_ELEMENTWISE):
        if node.target in (_aten.mul.Tensor, _aten.mul.Scalar, _aten.div.Tensor, _aten.div.Scalar):
            if not isinstance(node.args[1], (int, float)) or isinstance(node.args[1], bool):
                return False  # a tensor factor may differ between the halves
        node = node.args[0]
    if not _call(node, _aten.cat.default) or not _last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        return False
    parts = node.args[0]
    return len(parts) == 2 and parts[0] is parts[1]


def _partial(node: torch.fx.Node, x: torch.fx.Node):
    """(x_full, cat node) when x = x_full[..., :R] and node's one user is cat([node, x_full[..., R:]], -1)."""
    rot = _slice(x)
    users = list(node.users)
    if rot is None or rot[1] != 0 or len(users) != 1 or not _call(users[0], _aten.cat.default):
        return None
    cat = users[0]
    parts = cat.args[0]
    if not _last_dim(cat, cat.args[1] if len(cat.args) > 1 else 0) or len(parts) != 2 or parts[0] is not node:
        return None
    rest = _slice(parts[1])
    if rest is None or rest[0] is not rot[0] or rest[1:] != (rot[2], _val(rot[0]).shape[-1]):
        return None
    return rot[0], cat


def _match(node: torch.fx.Node):
    """(input [B, N, S, H], cos, sin [B, S, R], the node to replace), or (None, reason)."""
    x, cos_u, sin_u = _parts(node)
    cos, sin = _table(cos_u), _table(sin_u)
    if cos is None or sin is None:
        return None, "cos/sin not unsqueezed over the heads (unsqueeze_dim=1)"
    xv, cv, sv = _val(x), _val(cos), _val(sin)
    if xv is None or cv is None or sv is None or xv.dim() != 4 or cv.dim() != 3 or sv.dim() != 3:
        return None, "not x [B, N, S, H] with cos/sin [B, S, R]"
    if any(v.dtype != torch.float32 for v in (xv, cv, sv)):
        return None, "not float32"
    rot_dim = xv.shape[-1]
    if not (_same(cv.shape[0], xv.shape[0]) and _same(cv.shape[1], xv.shape[2]) and cv.shape[2] == rot_dim
            and tuple(sv.shape) == tuple(cv.shape)) or not isinstance(xv.shape[1], int):
        return None, "cos/sin not one row per token of x (batch, sequence, rotary dims), or heads not static"
    if not (_halves_equal(cos) and _halves_equal(sin)):
        return None, "cos/sin not elementwise functions of cat([freqs, freqs], -1)"
    partial = _partial(node, x)  # else x itself is what is rotated, all of its last dim
    return ((partial[0], cos, sin, partial[1]) if partial else (x, cos, sin, node)), None


def _projection(x: torch.fx.Node) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """(t [B, S, N*H], the view) when x [B, N, S, H] is transpose(view(t, [B, S, N, H]), 1, 2): the op then
    reads t and the view + transpose are redone after it, so the Transposes cancel in ORT's optimizer
    (compiler/ops/rotary.py)."""
    if not _call(x, _aten.transpose.int) or set(x.args[1:3]) != {1, 2}:
        return None
    view = x.args[0]
    if not _call(view, _aten.view.default, _aten.reshape.default):
        return None
    t, xv = view.args[0], _val(x)
    tv = _val(t)
    if tv is None or tv.dim() != 3 or tv.dtype != torch.float32 or not isinstance(tv.shape[2], int):
        return None
    batch, heads, seq, head_size = xv.shape
    if not (_same(tv.shape[0], batch) and _same(tv.shape[1], seq)) or tv.shape[2] != heads * head_size:
        return None
    return t, view


def _pattern(node: torch.fx.Node) -> bool:
    return _parts(node) is not None


def _check(edit: GraphEdit, node: torch.fx.Node) -> str | None:
    return _match(node)[1]


def _symint(graph: torch.fx.Graph, target, args: tuple, val) -> torch.fx.Node:
    node = graph.call_function(target, args)
    node.meta["val"] = val
    return node


class _Rewrite:
    """The rewrite, keeping the [B * S, R/2] tables and row index made for each (cos, sin) pair."""

    def __init__(self):
        self.tables: dict[tuple[torch.fx.Node, torch.fx.Node], tuple[torch.fx.Node, ...]] = {}

    def _tables(self, edit: GraphEdit, cos: torch.fx.Node, sin: torch.fx.Node) -> tuple[torch.fx.Node, ...]:
        if (cos, sin) in self.tables:
            return self.tables[(cos, sin)]
        graph, val = edit.graph, _val(cos)
        half = val.shape[-1] // 2
        order = {n: i for i, n in enumerate(graph.nodes)}
        with graph.inserting_before(max(cos, sin, key=order.__getitem__).next):  # in order, before any use
            batch = _symint(graph, _aten.sym_size.int, (cos, 0), val.shape[0])
            seq = _symint(graph, _aten.sym_size.int, (cos, 1), val.shape[1])
            rows = _symint(graph, operator.mul, (batch, seq), val.shape[0] * val.shape[1])
            arange = graph.call_function(_aten.arange.default, (rows,), {"dtype": torch.int64, "device": val.device})
            with val.fake_mode:
                arange.meta["val"] = torch.arange(rows.meta["val"], dtype=torch.int64, device=val.device)
            index = edit.call(_aten.view.default, (arange, [batch, seq]))
            flat = [edit.call(_aten.reshape.default, (edit.call(_aten.slice.Tensor, (t, 2, 0, half)), [-1, half]))
                    for t in (cos, sin)]
        for made in (batch, seq, rows, arange, index, *flat, *(f.args[0] for f in flat)):
            made.meta.setdefault("nn_module_stack", cos.meta.get("nn_module_stack", {}))
        self.tables[(cos, sin)] = (index, *flat)
        return self.tables[(cos, sin)]

    def __call__(self, edit: GraphEdit, node: torch.fx.Node) -> torch.fx.Node | None:
        (x, cos, sin, replaced), _ = _match(node)
        index, cos_cache, sin_cache = self._tables(edit, cos, sin)
        heads, projection = _val(x).shape[1], _projection(x)
        with edit.graph.inserting_before(node):
            if projection is None:
                fused = edit.call(_ROTARY, (x, index, cos_cache, sin_cache, heads), node)
            else:  # on the projection's [B, S, N*H], then its view + transpose again
                t, view = projection
                fused = edit.call(_ROTARY, (t, index, cos_cache, sin_cache, heads), node)
                fused = edit.call(_aten.view.default, (fused, view.args[1]), node)
                fused = edit.call(_aten.transpose.int, (fused, 1, 2), node)
        if replaced is node:
            return fused
        fused.meta.update(val=replaced.meta["val"], nn_module_stack=replaced.meta.get("nn_module_stack", {}))
        replaced.replace_all_uses_with(fused)  # the partial chain's cat; the rest dies with it
        return None


def lower(program: ExportedProgram, keep: frozenset[str] = frozenset()) -> tuple[ExportedProgram, int,
                                                                              dict[str, int]]:
    """(program with each rotary embedding fused, how many, refused candidates by reason); reads no
    parameters, so `keep` does not matter."""
    edit = GraphEdit(program, NAME)
    done = apply_rules(edit, [Rule("rope", _pattern, _Rewrite(), _check)])
    refused = {r: len(n) for r, n in edit.refused.items()}
    if not done:
        return program, 0, refused
    edit.graph.eliminate_dead_code()
    result = edit.finish({}, dropped=None)
    return result.ir, done, refused
