"""effc::window_attention in standard ONNX ops (the `onnx` and `ort` columns): a blocked band, so the
work is O(S * window) rather than the O(S * T) of a dense masked attention.

The keys a query needs lie in [p - (w-1)*d, p] (causal) or +-(w-1)*d. For S queries over T keys
(queries at the end, compiler/ops/window_attention.py), the graph
  1. cuts the queries into blocks of `rows` (padded to whole blocks) and takes the key frame they can
     reach: positions [T-S - back*rows*d, T-S + S_padded (+ ahead)), zero-padded and marked invalid
     outside [0, T), so a cache's old positions are never read and a decode step reads one window;
  2. with dilation d, regroups positions by residue mod d: queries of one residue see only keys of it, and
     within a group the band is a plain band of w (so dilation costs no extra work);
  3. gives each query block the `blocks` consecutive key blocks ending `ahead` after its own (shifted
     Slices, one Concat): the band mask is then the same constant [rows, blocks*rows] for every block;
  4. global keys are extra score columns (one softmax over both, a global key inside the band counted once),
     and global queries a small dense attention over all keys, put in their rows through a one-hot MatMul.
A block-sparse layout (or no band at all) lowers to a dense attention under the op's own mask (`_dense`).
Rows with no allowed key come out 0, as in the reference.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnxscript import opset20 as op

from effc.targets.attention import _MASKED

_INT64_MAX = 9223372036854775807


def _ints(*v):
    return op.Constant(value_ints=[int(x) for x in v])


def _dim(x, axis: int):
    return op.Shape(x, start=axis, end=axis + 1)  # [1] int64


def _const(name: str, array: np.ndarray):
    return op.Constant(value=onnx.numpy_helper.from_array(array, name))


def block_rows(window: int) -> int:
    """Query/key block size for a band of `window`: a quarter window (so a query block reads at most 1.25
    windows of keys beyond its own), a power of two in [16, 128]."""
    return int(min(128, max(16, 2 ** math.ceil(math.log2(max(1, math.ceil(window / 4)))))))


def band_mask(rows: int, back: int, blocks: int, window: int, causal: bool) -> np.ndarray:
    """[rows, blocks*rows] bool: query qi of a block against key ki of window block t (t = back is the
    query's own block), in units of one position within a residue group."""
    qi = np.arange(rows)[:, None]
    kj = np.arange(blocks * rows)[None, :]
    delta = qi - (kj - back * rows)
    return ((delta >= 0) & (delta < window)) if causal else (np.abs(delta) < window)


def _key_valid(key_valid, key):
    """key_valid as float 0/1 [B|1, T] (all ones when the op has none)."""
    if key_valid is None:
        return op.Expand(op.Constant(value_float=1.0), op.Concat(_ints(1), _dim(key, 2), axis=0))
    return op.Cast(key_valid, to=onnx.TensorProto.FLOAT)


def _softmax_rows(scores, mask):
    """Softmax over the last axis where mask, and 0 for rows the mask leaves empty."""
    probs = op.Softmax(op.Where(mask, scores, op.Constant(value_float=_MASKED)), axis=-1)
    any_key = op.ReduceMax(op.Cast(mask, to=onnx.TensorProto.FLOAT), _ints(-1), keepdims=1)
    return op.Mul(probs, any_key)


def _regroup(x, groups: int, rows: int, lead: list[int], rest: list[int]):
    """[*lead, Lp, *rest] -> [*lead, groups, Lp/(groups*rows), rows, *rest]: the position P0 + c + groups*m
    goes to group c, row m. `lead`/`rest`: static reshape dims (0 copies the input's dim)."""
    if groups == 1:
        return op.Reshape(x, _ints(*lead, 1, -1, rows, *rest))
    n = len(lead)
    grouped = op.Reshape(x, _ints(*lead, -1, groups, *rest))
    grouped = op.Transpose(grouped, perm=list(range(n)) + [n + 1, n] + list(range(n + 2, n + 2 + len(rest))))
    return op.Reshape(grouped, _ints(*lead, groups, -1, rows, *rest))


def _windows(x, axis: int, blocks: int):
    """Key blocks along `axis` (nb + blocks - 1 of them, rows at axis+1) -> each of the nb query blocks'
    window of `blocks` consecutive key blocks, concatenated on axis+1 (shifted Slices, one Concat)."""
    count = op.Sub(_dim(x, axis), _ints(blocks - 1))
    parts = [op.Slice(x, _ints(t), op.Add(count, _ints(t)), _ints(axis)) for t in range(blocks)]
    return op.Concat(*parts, axis=axis + 1)


def blocked(query, key, value, key_valid, window: int, causal: bool, dilation: int, global_tokens, block: int,
            layout, scale: float):
    """effc::window_attention as a blocked band (module docstring); a layout or no band: `_dense`."""
    if window <= 0 or layout is not None:
        return _dense(query, key, value, key_valid, window, causal, dilation, global_tokens, block, layout, scale)
    heads, kv_heads, head, v_head = (int(query.shape[1]), int(key.shape[1]), int(query.shape[3]),
                                     int(value.shape[3]))
    rep, w, d = heads // kv_heads, int(window), int(dilation)
    rows = block_rows(w)
    back = -(-(w - 1) // rows)
    ahead = 0 if causal else back
    blocks = back + 1 + ahead
    s, t = _dim(query, 2), _dim(key, 2)
    past = op.Sub(t, s)
    unit = d * rows
    q_len = op.Mul(op.Div(op.Add(s, _ints(unit - 1)), _ints(unit)), _ints(unit))  # S padded to whole blocks
    q_tail = op.Sub(q_len, s)
    # the key frame: positions [past - back*unit, past + q_len + ahead*unit), invalid where outside [0, T)
    front = op.Max(op.Sub(_ints(back * unit), past), _ints(0))
    start = op.Sub(op.Add(past, front), _ints(back * unit))
    k_len = op.Add(q_len, _ints((back + ahead) * unit))

    def key_frame(x, axis: int, rank: int):  # the sequence axis is the last but one (keys) or the last (valid)
        after = rank - 1 - axis
        pads = [_ints(*[0] * axis), front, *([_ints(*[0] * after)] if after else []),
                _ints(*[0] * axis), op.Add(q_tail, _ints(ahead * unit)), *([_ints(*[0] * after)] if after else [])]
        return op.Slice(op.Pad(x, op.Concat(*pads, axis=0)), start, op.Add(start, k_len), _ints(axis))

    q = op.Pad(op.Mul(query, op.Constant(value_float=float(scale))),
               op.Concat(_ints(0, 0, 0, 0, 0, 0), q_tail, _ints(0), axis=0))
    k, v = key_frame(key, 2, 4), key_frame(value, 2, 4)
    valid_t = _key_valid(key_valid, key)
    valid = key_frame(valid_t, 1, 2)

    # [B, KV, rep, d, nb, rows, D] queries against [B, KV, 1, d, nb, blocks*rows, D] keys
    qb = _regroup(op.Reshape(q, _ints(0, kv_heads, rep, -1, head)), d, rows, [0, kv_heads, rep], [head])
    kb = _windows(_regroup(k, d, rows, [0, kv_heads], [head]), 3, blocks)
    vb = _windows(_regroup(v, d, rows, [0, kv_heads], [v_head]), 3, blocks)
    kb, vb = op.Unsqueeze(kb, _ints(2)), op.Unsqueeze(vb, _ints(2))
    valid_b = _windows(_regroup(op.Unsqueeze(valid, _ints(2)), d, rows, [0], [1]), 2, blocks)
    # valid_b: [B, d, nb, blocks*rows, 1] -> [B, 1, 1, d, nb, 1, blocks*rows]
    valid_b = op.Unsqueeze(op.Squeeze(valid_b, _ints(4)), _ints(1, 2, 5))
    band = _const("window_band", band_mask(rows, back, blocks, w, causal))
    mask = op.And(band, op.Greater(valid_b, op.Constant(value_float=0.5)))
    scores = op.MatMul(qb, op.Transpose(kb, perm=[0, 1, 2, 3, 4, 6, 5]))
    globals_ = sorted({int(g) for g in global_tokens or []})
    if not globals_:
        out = op.MatMul(_softmax_rows(scores, mask), vb)
    else:
        g = _const("global_tokens", np.asarray(globals_, dtype=np.int64))
        g_in = op.Min(g, op.Sub(t, _ints(1)))  # positions past this input's end: masked below, gathered clamped
        kg = op.Unsqueeze(op.Gather(key, g_in, axis=2), _ints(2, 3, 4))  # [B, KV, 1, 1, 1, G, D]
        vg = op.Unsqueeze(op.Gather(value, g_in, axis=2), _ints(2, 3, 4))
        # each query row's position, regrouped like the queries: [d, nb, rows, 1]
        pos = op.Range(op.Squeeze(past, _ints(0)), op.Squeeze(op.Add(past, q_len), _ints(0)),
                       op.Constant(value_int=1))
        pos = op.Unsqueeze(_regroup(pos, d, rows, [], []), _ints(3))
        r = op.Sub(pos, g)
        in_band = op.And(op.Equal(op.Mod(r, _ints(d)), _ints(0)),
                         op.And(op.GreaterOrEqual(r, _ints(0)), op.Less(r, _ints(w * d))) if causal
                         else op.Less(op.Abs(r), _ints(w * d)))
        ok = op.And(op.Not(in_band), op.Less(g, t))
        if causal:
            ok = op.And(ok, op.LessOrEqual(g, pos))
        valid_g = op.Greater(op.Gather(valid_t, g_in, axis=1), op.Constant(value_float=0.5))  # [B, G]
        mask_g = op.And(ok, op.Reshape(valid_g, _ints(0, 1, 1, 1, 1, 1, -1)))
        scores_g = op.MatMul(qb, op.Transpose(kg, perm=[0, 1, 2, 3, 4, 6, 5]))
        probs = _softmax_rows(op.Concat(scores, scores_g, axis=-1), op.Concat(
            op.Expand(mask, op.Shape(scores)), op.Expand(mask_g, op.Shape(scores_g)), axis=-1))
        width, last = _ints(blocks * rows), _ints(-1)
        p_band, p_g = op.Slice(probs, _ints(0), width, last), op.Slice(probs, width, _ints(_INT64_MAX), last)
        out = op.Add(op.MatMul(p_band, vb), op.MatMul(p_g, vg))
    # [B, KV, rep, d, nb, rows, Dv] -> [B, N, Lp, Dv] -> the S real query rows
    if d > 1:
        out = op.Transpose(op.Reshape(out, _ints(0, kv_heads, rep, d, -1, v_head)), perm=[0, 1, 2, 4, 3, 5])
    out = op.Reshape(out, _ints(0, heads, -1, v_head))
    out = op.Slice(out, _ints(0), s, _ints(2))
    if globals_:
        out = _global_rows(out, query, key, value, valid_t, globals_, causal, scale, heads, kv_heads, v_head)
    return out


def _global_rows(out, query, key, value, valid_t, globals_: list[int], causal: bool, scale: float, heads: int,
                 kv_heads: int, v_head: int):
    """Rows of global queries: dense attention over every key, put in place of the band rows."""
    rep = heads // kv_heads
    s, t = _dim(query, 2), _dim(key, 2)
    g = _const("global_queries", np.asarray(globals_, dtype=np.int64))
    past = op.Sub(t, s)
    rows = op.Max(op.Min(op.Sub(g, past), op.Sub(s, _ints(1))), _ints(0))  # clamped; absent rows weigh 0 below
    qg = op.Reshape(op.Gather(op.Mul(query, op.Constant(value_float=float(scale))), rows, axis=2),
                    _ints(0, kv_heads, rep, -1, int(query.shape[3])))
    scores = op.MatMul(qg, op.Transpose(op.Unsqueeze(key, _ints(2)), perm=[0, 1, 2, 4, 3]))  # [B, KV, rep, G, T]
    j = op.Range(op.Constant(value_int=0), op.Squeeze(t, _ints(0)), op.Constant(value_int=1))
    mask = op.Greater(op.Reshape(valid_t, _ints(0, 1, 1, 1, -1)), op.Constant(value_float=0.5))
    if causal:
        mask = op.And(mask, op.LessOrEqual(j, op.Unsqueeze(g, _ints(1))))
    probs = _softmax_rows(scores, op.Expand(mask, op.Shape(scores)))
    dense = op.Reshape(op.MatMul(probs, op.Unsqueeze(value, _ints(2))), _ints(0, heads, -1, v_head))  # [B, N, G, Dv]
    i = op.Unsqueeze(op.Add(op.Range(op.Constant(value_int=0), op.Squeeze(s, _ints(0)), op.Constant(value_int=1)),
                            past), _ints(1))
    onehot = op.Cast(op.Equal(i, g), to=onnx.TensorProto.FLOAT)  # [S, G]
    keep = op.Sub(op.Constant(value_float=1.0), op.ReduceMax(onehot, _ints(1), keepdims=1))  # [S, 1]
    return op.Add(op.Mul(out, keep), op.MatMul(onehot, dense))


def _dense(query, key, value, key_valid, window: int, causal: bool, dilation: int, global_tokens, block: int,
           layout, scale: float):
    """The op's mask over every (query, key) pair, built in the graph, and one masked attention: O(S*T)."""
    heads, kv_heads, head, v_head = (int(query.shape[1]), int(key.shape[1]), int(query.shape[3]),
                                     int(value.shape[3]))
    rep = heads // kv_heads
    s, t = _dim(query, 2), _dim(key, 2)
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    j = op.Range(zero, op.Squeeze(t, _ints(0)), one)
    p = op.Unsqueeze(op.Range(op.Squeeze(op.Sub(t, s), _ints(0)), op.Squeeze(t, _ints(0)), one), _ints(1))
    r = op.Sub(p, j)  # [S, T]
    terms = []
    if window > 0:
        span = _ints(int(window) * int(dilation))
        inside = op.And(op.GreaterOrEqual(r, _ints(0)), op.Less(r, span)) if causal else op.Less(op.Abs(r), span)
        terms.append(op.And(inside, op.Equal(op.Mod(r, _ints(dilation)), _ints(0))))
    if global_tokens:
        g = _const("global_tokens", np.asarray(sorted({int(x) for x in global_tokens}), dtype=np.int64))
        hit_j = op.ReduceMax(op.Cast(op.Equal(op.Unsqueeze(j, _ints(1)), g), to=onnx.TensorProto.FLOAT), _ints(1),
                             keepdims=0)  # [T]
        hit_p = op.ReduceMax(op.Cast(op.Equal(p, g), to=onnx.TensorProto.FLOAT), _ints(1), keepdims=1)  # [S, 1]
        terms.append(op.Greater(op.Add(hit_p, hit_j), op.Constant(value_float=0.5)))
    if layout is not None:
        b = _ints(block)
        terms.append(op.Gather(op.Gather(layout, op.Squeeze(op.Div(p, b), _ints(1)), axis=0), op.Div(j, b), axis=1))
    allowed = terms[0] if terms else op.Less(r, r)  # no term: nothing allowed
    for term in terms[1:]:
        allowed = op.Or(allowed, term)
    if causal:
        allowed = op.And(allowed, op.GreaterOrEqual(r, _ints(0)))
    mask = op.Unsqueeze(allowed, _ints(0, 1, 2))  # [1, 1, 1, S, T]
    mask = op.And(mask, op.Greater(op.Reshape(_key_valid(key_valid, key), _ints(0, 1, 1, 1, -1)),
                                   op.Constant(value_float=0.5)))
    q = op.Reshape(op.Mul(query, op.Constant(value_float=float(scale))), _ints(0, kv_heads, rep, -1, head))
    scores = op.MatMul(q, op.Transpose(op.Unsqueeze(key, _ints(2)), perm=[0, 1, 2, 4, 3]))
    probs = _softmax_rows(scores, op.Expand(mask, op.Shape(scores)))
    return op.Reshape(op.MatMul(probs, op.Unsqueeze(value, _ints(2))), _ints(0, heads, -1, v_head))
