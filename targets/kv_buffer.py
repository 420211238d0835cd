"""The ort target's shared past/present buffer: each past_key_values.N.* may be a preallocated
[batch, kv_heads, max_length, head_dim] buffer that com.microsoft::GroupQueryAttention writes the new keys and
values into in place (its present output bound to the same memory), so a decode step copies no cache.

The captured graph reads the past length from the past's shape (transformers' cache_position and mask
arithmetic). With a buffer that dim is max_length, so here it is read as attention_mask's width minus the new
tokens instead: the same number for a past of exactly the past length (the concatenating use, which keeps
working), and the right one for a buffer. The graph can share its buffers when every past input then feeds
GroupQueryAttention alone. Sharing is the runner's choice (runtime/onnxruntime_runner.py SharedCache; genai's
past_present_share_buffer); a windowed cache (decoder.cache_window) keeps concatenating, since its oldest
columns are dropped each step.
"""

from __future__ import annotations

import onnx
from onnx import helper

from effc.runtime.kv_cache import PAST

_GQA = ("GroupQueryAttention", "com.microsoft")


def _slice(node: onnx.NodeProto) -> tuple[int | None, int | None]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return attrs.get("start", 0), attrs.get("end")


def past_length_from_mask(model: onnx.ModelProto) -> bool:
    """Rewrite Shape(past)[2] into width(attention_mask) - width(input_ids) and Shape(past)[0] into
    input_ids' batch; True when every past input then feeds GroupQueryAttention only (shareable)."""
    graph = model.graph
    names = {i.name for i in graph.input}
    past = {n for n in names if n.startswith(PAST + ".")}
    if not past or not {"input_ids", "attention_mask"} <= names:
        return False
    nodes, shareable, past_len = [], True, None
    for node in graph.node:
        if node.op_type == "Shape" and node.domain in ("", "ai.onnx") and node.input[0] in past:
            start, end = _slice(node)
            if (start, end) == (0, 1):
                nodes.append(helper.make_node("Shape", ["input_ids"], list(node.output), start=0, end=1,
                                              name=node.name))
                continue
            if (start, end) == (2, 3):
                if past_len is None:
                    past_len = "effc_past_length"
                    nodes += [helper.make_node("Shape", ["attention_mask"], ["effc_total_length"], start=1, end=2,
                                               name="effc_total_length"),
                              helper.make_node("Shape", ["input_ids"], ["effc_new_length"], start=1, end=2,
                                               name="effc_new_length"),
                              helper.make_node("Sub", ["effc_total_length", "effc_new_length"], [past_len],
                                               name=past_len)]
                nodes.append(helper.make_node("Identity", [past_len], list(node.output), name=node.name))
                continue
        if any(i in past for i in node.input) and (node.op_type, node.domain) != _GQA:
            shareable = False
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return shareable
