"""What effc reads and writes on ONNX nodes, without torch (effc inspect reads artifacts with it):
replacing a graph's nodes after a post-export rewrite,
operator labels and the provenance tag, "<pass>/<rule>" of the rewrite rule that made a node
(passes/rewrite.py), kept in node metadata."""

from __future__ import annotations

from collections import Counter

import onnx

STANDARD_DOMAINS = ("", "ai.onnx")  # the default ONNX domain, by both of its names
PROVENANCE_KEY = "effc.provenance"  # node metadata: "<pass>/<rule>" that made the node (passes/rewrite.py)


def op_label(node: onnx.NodeProto) -> str:
    """An operator as reports name it: its type, prefixed by its domain outside the standard one."""
    return (f"{node.domain}." if node.domain not in STANDARD_DOMAINS else "") + node.op_type


def provenance(node: onnx.NodeProto) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == PROVENANCE_KEY), None)


def set_provenance(node: onnx.NodeProto, rule: str) -> None:
    if provenance(node) is None:
        node.metadata_props.add(key=PROVENANCE_KEY, value=rule)


def provenance_summary(model: onnx.ModelProto) -> dict[str | None, Counter]:
    """rule (None: untagged) -> operator counts of the nodes it made, rules first by node count."""
    made: dict[str | None, Counter] = {}
    for node in model.graph.node:
        made.setdefault(provenance(node), Counter())[op_label(node)] += 1
    return dict(sorted(made.items(), key=lambda kv: (kv[0] is None, -sum(kv[1].values()), kv[0] or "")))


def replace_nodes(model, nodes: list) -> None:
    """Make `nodes` the graph's nodes, dropping the initializers none of them reads (the ones a rewrite of
    placeholder nodes replaced with new, repacked ones)."""
    reads = {i for n in nodes for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in reads]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def standard_opset(model) -> int | None:
    """The model's opset of the default ONNX domain."""
    return next((i.version for i in model.opset_import if i.domain in STANDARD_DOMAINS), None)
