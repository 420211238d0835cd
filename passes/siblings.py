"""The ort target's fusion of linear layers that read the same input (a decoder layer's q/k/v projections,
gate/up) into one: weights concatenated along the output features, one MatMul / MatMulNBits, then a
Split. Applied inside OrtTarget.build: each output column is computed as before (MatMulNBits' int8
activations are quantized per row of the shared input, the same for every sibling), so the artifact
still matches the program verification compares against, while decode runs 4 GEMMs per Llama layer
instead of 7 (each launch costs its thread-pool round trip at batch 1).

Siblings fuse only when they agree on everything but their output features: float32 aten.linear
weights of one K, or effc::nbits_linear of one K, block, bits and activation mode, with or without bias
and zero points alike. Parameters the runtime overrides (switchable adapters) keep their own layers.
"""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram

import effc.ops  # noqa: F401  (registers effc::nbits_linear)
from effc.passes.rewrite import GraphEdit

NAME = "sibling_linears"
_aten = torch.ops.aten
_NBITS = torch.ops.effc.nbits_linear.default
# The tensor arguments concatenated along dim 0 (output features), by op; the rest must be equal.
_TENSORS = {_aten.linear.default: (1, 2), _NBITS: (1, 2, 3, 4)}


def _key(edit: GraphEdit, node: torch.fx.Node, keep: frozenset[str]):
    """What siblings must share (their input first), or None when the node cannot take part."""
    if node.op != "call_function" or node.target not in _TENSORS:
        return None
    args = list(node.args) + [None] * (3 - len(node.args))
    tensors = []
    for i in _TENSORS[node.target]:
        arg = args[i]
        if arg is None:
            tensors.append(None)
            continue
        w = edit.weight(arg)
        if w is None or edit.signature.inputs_to_parameters.get(arg.name) in keep:
            return None
        tensors.append((w.dtype, tuple(w.shape[1:])))
    if node.target is _aten.linear.default and tensors[0][0] != torch.float32:
        return None
    return (args[0], node.target, tuple(tensors), tuple(args[len(_TENSORS[node.target]) + 1:]))


def _fuse(edit: GraphEdit, group: list[torch.fx.Node]) -> None:
    first = group[0]
    args = list(first.args) + [None] * (3 - len(first.args))
    name = f"{first.name}_fused{len(group)}"
    for i in _TENSORS[first.target]:
        if args[i] is not None:
            value = torch.cat([edit.weight(n.args[i]) for n in group]).detach()
            args[i] = edit.add_parameter(f"{name}.{i}", value)
    sizes = [n.meta["val"].shape[-1] for n in group]
    with edit.graph.inserting_before(first):
        fused = edit.call(first.target, tuple(args), first)
        parts = edit.call(_aten.split_with_sizes.default, (fused, sizes, -1), first)
        for i, node in enumerate(group):
            item = edit.graph.call_function(operator.getitem, (parts, i))
            item.meta.update(val=parts.meta["val"][i], nn_module_stack=node.meta.get("nn_module_stack", {}))
            node.replace_all_uses_with(item)
    for node in group:
        edit.graph.erase_node(node)
    edit.count("concat", len(group))


def lower(program: ExportedProgram, keep: frozenset[str] = frozenset()) -> tuple[ExportedProgram, int, dict[str, int]]:
    """(program with each group of siblings fused, how many layers were fused, {}). `keep`: parameter names
    that must stay separate initializers."""
    edit = GraphEdit(program, NAME)
    groups: dict = {}
    for node in edit.graph.nodes:
        key = _key(edit, node, keep)
        if key is not None:
            groups.setdefault(key, []).append(node)
    done = 0
    with edit.made_by("concat"):
        for group in groups.values():
            if len(group) > 1:
                _fuse(edit, group)
                done += len(group)
    if not done:
        return program, 0, {}
    result = edit.finish({})
    return result.ir, done, {}
