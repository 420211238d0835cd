"""Editing an ExportedProgram without touching the eager model it came from.

ep.state_dict aliases the eager model's parameters (docs/ONNXRUNTIME.md): passes never write into it; they
build a new program whose state_dict maps the changed names to new tensors.
"""

from __future__ import annotations

import copy

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind

_WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)


def rebuild(ep: ExportedProgram, graph_module: torch.fx.GraphModule, signature: ExportGraphSignature,
            state_dict: dict, constants: dict) -> ExportedProgram:
    # Output specs name the node each output comes from; a rewrite may have replaced that node.
    out_node = next(n for n in graph_module.graph.nodes if n.op == "output")
    for spec, arg in zip(signature.output_specs, torch.fx.node.map_arg(out_node.args[0], lambda n: n)):
        if isinstance(arg, torch.fx.Node) and hasattr(spec.arg, "name"):
            spec.arg.name = arg.name
    graph_module.graph.lint()
    graph_module.recompile()
    return ExportedProgram(
        root=graph_module, graph=graph_module.graph, graph_signature=signature, state_dict=state_dict,
        range_constraints=copy.copy(ep.range_constraints), module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers,
    )


def edit(ep: ExportedProgram):
    """A private copy of the graph, signature, state_dict and constants to change and then rebuild()."""
    gm = copy.deepcopy(ep.graph_module)
    return gm, copy.deepcopy(ep.graph_signature), dict(ep.state_dict), dict(ep.constants)


def drop_unused_weights(gm: torch.fx.GraphModule, signature: ExportGraphSignature,
                        state_dict: dict, constants: dict) -> int:
    """Remove parameter/buffer/constant placeholders nothing reads; returns how many."""
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    kept, dropped = [], 0
    for spec in signature.input_specs:
        node = placeholders.get(spec.arg.name) if hasattr(spec.arg, "name") else None
        if spec.kind in _WEIGHT_KINDS and node is not None and not node.users:
            gm.graph.erase_node(node)
            state_dict.pop(spec.target, None)
            constants.pop(spec.target, None)
            dropped += 1
        else:
            kept.append(spec)
    signature.input_specs[:] = kept
    return dropped


def node_count(ep: ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function")


def parameter_bytes(ep: ExportedProgram) -> int:
    """Bytes of every weight the program reads (parameters, buffers, constant tensors)."""
    total = 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind in _WEIGHT_KINDS:
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def parameter_count(ep: ExportedProgram) -> int:
    """Elements of every floating-point weight the program reads."""
    total = 0
    for spec in ep.graph_signature.input_specs:
        if spec.kind in _WEIGHT_KINDS:
            t = ep.state_dict.get(spec.target, ep.constants.get(spec.target))
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                total += t.numel()
    return total


def add_parameter(gm: torch.fx.GraphModule, signature: ExportGraphSignature, state_dict: dict,
                  fqn: str, value: torch.Tensor) -> torch.fx.Node:
    """A new parameter placeholder (after the existing weights, as export orders them) holding value."""
    from torch.export.graph_signature import InputSpec, TensorArgument

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weight_names = {s.arg.name for s in signature.input_specs if s.kind in _WEIGHT_KINDS}
    last_weight = max((i for i, n in enumerate(placeholders) if n.name in weight_names), default=-1)
    anchor = placeholders[last_weight + 1] if last_weight + 1 < len(placeholders) else None
    with (gm.graph.inserting_before(anchor) if anchor is not None else gm.graph.inserting_after(placeholders[-1])):
        node = gm.graph.placeholder("p_" + fqn.replace(".", "_"))
    fake_mode = next(n.meta["val"].fake_mode for n in placeholders if hasattr(n.meta.get("val"), "fake_mode"))
    node.meta["val"] = fake_mode.from_tensor(value, static_shapes=True)
    spec_index = sum(1 for s in signature.input_specs[: last_weight + 1])
    signature.input_specs.insert(spec_index, InputSpec(InputKind.PARAMETER, TensorArgument(node.name), fqn, None))
    state_dict[fqn] = torch.nn.Parameter(value, requires_grad=False)
    return node


def call(graph: torch.fx.Graph, target, args: tuple, meta_from: torch.fx.Node | None = None) -> torch.fx.Node:
    """A new call_function node whose meta['val'] is computed from its inputs' fake values."""
    node = graph.call_function(target, args)
    vals = torch.fx.node.map_arg(args, lambda n: n.meta["val"])
    fake_mode = next(a.meta["val"].fake_mode for a in node.all_input_nodes if hasattr(a.meta.get("val"), "fake_mode"))
    with fake_mode:
        node.meta["val"] = target(*vals)
    if meta_from is not None and "nn_module_stack" in meta_from.meta:
        node.meta["nn_module_stack"] = meta_from.meta["nn_module_stack"]
    return node


def module_name(node: torch.fx.Node) -> str:
    """The module a node was traced in, without the NamedOutputs wrapper's leading 'model.' and without
    peft's '.base_layer', so a layer has one name before and after merge_lora (calibration files match)."""
    stack = node.meta.get("nn_module_stack") or {}
    return module_path(list(stack.values())[-1][0] if stack else node.name)


def module_path(path: str) -> str:
    """A module path as the wrapper saw it (model.<name>[.base_layer]) -> the layer's name."""
    path = path.replace(".base_layer", "")
    return path[len("model."):] if path.startswith("model.") else path
