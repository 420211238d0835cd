"""One copy of a tied weight in an exported graph: a model that ties its LM head to its embedding reads the
[vocab, hidden] table twice, as Gather(table) and as MatMul(x, table.T), and the exporter folds table.T into
a second table when it optimizes (ONNX Runtime constant-folds the Transpose: 113 MiB of SmolLM2-135M's
621 in fp32, in the ort artifact's file and in every runtime's memory). Here MatMul(x, Transpose(table))
becomes Reshape -> Gemm(transB=1) on the table itself -> Reshape, standard ops every ONNX runtime takes.
"""

from __future__ import annotations

import onnx
from onnx import helper

_MIN_ELEMENTS = 1 << 20  # only tables worth a copy; smaller matmuls keep their layout


def share_transposed(model: onnx.ModelProto) -> int:
    """Rewrite each MatMul(x, Transpose(table)) of a 2D initializer table; returns how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}  # an overridable initializer is fed at run time: left as it is
    nodes, done = [], 0
    for node in graph.node:
        tr = producer.get(node.input[1]) if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") else None
        table = inits.get(tr.input[0]) if tr is not None and tr.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), [1, 0]) if table is not None else None
        if table is None or perm != [1, 0] or len(table.dims) != 2 or table.name in inputs \
                or table.dims[0] * table.dims[1] < _MIN_ELEMENTS:
            nodes.append(node)
            continue
        n, k = table.dims
        x, y, tag = node.input[0], node.output[0], node.name or node.output[0]
        new = [
            helper.make_node("Constant", [], [f"{tag}/rows"], value=helper.make_tensor(
                f"{tag}/rows", onnx.TensorProto.INT64, [2], [-1, k])),
            helper.make_node("Reshape", [x, f"{tag}/rows"], [f"{tag}/x2d"]),
            helper.make_node("Gemm", [f"{tag}/x2d", table.name], [f"{tag}/y2d"], transB=1),
            helper.make_node("Shape", [x], [f"{tag}/lead"], start=0, end=-1),
            helper.make_node("Constant", [], [f"{tag}/n"], value=helper.make_tensor(
                f"{tag}/n", onnx.TensorProto.INT64, [1], [n])),
            helper.make_node("Concat", [f"{tag}/lead", f"{tag}/n"], [f"{tag}/shape"], axis=0),
            helper.make_node("Reshape", [f"{tag}/y2d", f"{tag}/shape"], [y]),
        ]
        for extra in new:
            extra.name = f"{tag}/{extra.op_type}_{len(nodes)}"
            extra.metadata_props.extend(node.metadata_props)  # provenance follows the MatMul it replaces
            nodes.append(extra)
        done += 1
    if done:
        del graph.node[:]
        graph.node.extend(nodes)  # the Transpose, now unread, is left to the runtimes' dead-code removal
    return done
