"""Drops the layout ops an exported graph carries that change nothing: a chain of Reshapes that ends in the
shape it started from, and a Transpose that undoes the Transpose before it.

Exported decoders have ~9 per layer: transformers' view(B, S, N, H) around every projection meets the [B, S, N*H]
layout com.microsoft's RotaryEmbedding and GroupQueryAttention take, and ORT cannot remove them itself because
their target shapes are computed at run time (Shape -> Concat). Here the shapes come from the exporter's
value_info: torch's symbolic shapes, so two dims with the same name are the same number. A dim without a
value or a name is unknown and proves nothing. At 1 token per step each such op costs about as much as the
arithmetic it wraps (docs/ONNXRUNTIME.md).
"""

from __future__ import annotations

import onnx

_LAYOUT = ("Reshape", "Transpose")


def value_shapes(graph: onnx.GraphProto) -> dict[str, tuple | None]:
    """Each value's shape as a tuple of ints and dim names, or None where any dim is unknown."""
    out = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tt = value.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims = None
                break
        out[value.name] = tuple(dims) if dims is not None else None
    return out


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def drop_noop_layouts(model: onnx.ModelProto) -> int:
    """Bypass no-op Reshape chains and inverse Transpose pairs in the main graph, then remove what no longer
    feeds anything; returns how many layout ops were removed. Graph outputs are never renamed."""
    graph = model.graph
    shapes = value_shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    alias: dict[str, str] = {}  # value -> the value it equals

    def resolve(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    for node in graph.node:  # topological order: a node's inputs are resolved before it is looked at
        node.input[:] = [resolve(i) if i else i for i in node.input]
        if node.op_type not in _LAYOUT or node.output[0] in outputs or node.domain not in ("", "ai.onnx"):
            continue
        y = node.output[0]
        if node.op_type == "Reshape":
            src = node.input[0]
            while src in producer and producer[src].op_type == "Reshape":
                if shapes.get(src) is not None and shapes.get(src) == shapes.get(y):
                    break
                src = producer[src].input[0]
            if shapes.get(y) is not None and shapes.get(src) == shapes.get(y):
                alias[y] = src
        else:
            before = producer.get(node.input[0])
            p2, p1 = _perm(node), _perm(before) if before is not None and before.op_type == "Transpose" else None
            if p1 is not None and p2 is not None and len(p1) == len(p2) and [p1[i] for i in p2] == list(range(len(p2))):
                alias[y] = before.input[0]
    return _remove_dead(graph, outputs)


def _remove_dead(graph: onnx.GraphProto, outputs: set[str]) -> int:
    """Remove nodes none of whose outputs is used (ONNX ops have no side effects); count the layout ops."""
    removed = 0
    while True:
        used = set(outputs) | {i for n in graph.node for i in n.input}
        used |= {i for n in graph.node for a in n.attribute if a.g for i in _subgraph_inputs(a.g)}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            return removed
        removed += sum(n.op_type in _LAYOUT for n in dead)
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(keep)


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names a subgraph (If/Loop body) reads from the enclosing scope, and so keeps alive."""
    names = {i for n in g.node for i in n.input}
    for n in g.node:
        for a in n.attribute:
            if a.g:
                names |= _subgraph_inputs(a.g)
    return names
