"""The ort target's residual Add + SimplifiedLayerNormalization -> com.microsoft::SkipSimplifiedLayerNormalization,
which returns the norm and the sum (the residual stream the next Add reads) from one kernel. A decoder has two
per layer; ORT 1.32's own SkipLayerNormFusion leaves them unfused when the sum has other consumers, which in a
pre-norm decoder it always has.

Only decoders with a KV cache get it (OrtTarget.build): the CPU kernel gains per token, where launching ops
is the cost, but docs/ONNXRUNTIME.md measured its LayerNormalization sibling 5-7x slower than Add + norm on
an encoder's [8, 128, 384].
"""

from __future__ import annotations

import onnx
from onnx import helper

from effc.targets.onnx_reshapes import value_shapes

NAME = "skip_rms_norm"  # its count in manifest["target"]["fused"]
_MSFT = "com.microsoft"


def fuse(model: onnx.ModelProto) -> int:
    """Fuse each Add of two same-shape 3D tensors feeding a last-axis float32-statistics
    SimplifiedLayerNormalization; returns how many."""
    graph = model.graph
    shapes = value_shapes(graph)
    producer = {o: n for n in graph.node for o in n.output}
    norms: set[int] = set()  # the norms fused away
    fused: dict[int, onnx.NodeProto] = {}  # id(Add) -> the fused node that takes its place
    for node in graph.node:
        if node.op_type != "SimplifiedLayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        add = producer.get(node.input[0])
        if attrs.get("axis", -1) != -1 or attrs.get("stash_type", 1) != 1 or add is None or add.op_type != "Add" \
                or add.domain not in ("", "ai.onnx") or id(add) in fused:
            continue
        a, b = shapes.get(add.input[0]), shapes.get(add.input[1])
        if a is None or a != b or len(a) != 3:
            continue  # SkipSimplifiedLayerNormalization takes [B, S, H] input and skip (no general broadcast)
        new = helper.make_node(
            "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], node.input[1]],
            [node.output[0], "", "", add.output[0]], domain=_MSFT, name=node.name,
            epsilon=float(attrs.get("epsilon", 1e-5)))
        new.metadata_props.extend(node.metadata_props)
        fused[id(add)] = new
        norms.add(id(node))
    if not fused:
        return 0
    # The fused node takes the Add's place, so the sum is defined before its first consumer.
    nodes = [fused.get(id(n), n) for n in graph.node if id(n) not in norms]
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == _MSFT for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MSFT, 1))
    return len(fused)
