"""ExportedProgram -> ONNX with the torch dynamo exporter; shared by every ONNX-based target."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import Counter
from pathlib import Path

import onnx
import torch

from effc.errors import EffcError
from effc.targets import onnx_reshapes, tied_weights
from effc.targets.base import BuildResult, layers
from effc.targets.onnx_nodes import op_label, provenance, set_provenance

OPSET = 20  # opset 23's RotaryEmbedding was rejected by ORT 1.31 for Llama (docs/ONNXRUNTIME.md)
TWO_GB = 2 * 1024**3
DATA_SUFFIX = ".data"


def _rename_dims(model: onnx.ModelProto, dynamic: dict[str, dict[int, str]]) -> None:
    """The exporter names dynamic dims s0, s1...; give them the names the user knows (batch, sequence)."""
    names: dict[str, str] = {}
    for inp in model.graph.input:
        for axis, dim in enumerate(inp.type.tensor_type.shape.dim):
            wanted = dynamic.get(inp.name, {}).get(axis)
            if wanted and dim.dim_param:
                names.setdefault(dim.dim_param, wanted)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Save; past 2 GB (protobuf's limit) the weights go to external data beside the model. Returns files written."""
    if initializer_bytes(model) >= TWO_GB - (64 << 20):
        data = path.name + DATA_SUFFIX
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        return [path.name, data]
    onnx.save_model(model, str(path))
    return [path.name]


def export(program: torch.export.ExportedProgram, inputs: dict[str, torch.Tensor], output_names: list[str],
           dynamic: dict[str, dict[int, str]], translations: dict | None = None,
           opset: int = OPSET, overridable: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """Translate the program to ONNX (functions inlined, dims named) and return it in memory.

    Parameters named in `overridable` stay initializers (their defaults) and are also listed as graph
    inputs, so a run can feed other values (switchable weight sets)."""
    for node in program.graph.nodes:
        val = node.args[0].meta.get("val") if node.op == "call_function" and node.args and \
            isinstance(node.args[0], torch.fx.Node) else None
        if (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "effc"
                and val is not None and val.dtype.is_floating_point and val.dtype != torch.float32):
            raise EffcError(f"{node.target.name()} computes in {str(val.dtype).removeprefix('torch.')} here "
                            "(nf4.compute_dtype); the ONNX targets lower effc's ops in float32: use --target torch, "
                            "or compute_dtype=float32")
    for name in ("torch.onnx", "torch.export", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink):
            onnx_program = torch.onnx.export(
                program, (), kwargs=dict(inputs), dynamo=True, opset_version=opset, output_names=output_names,
                custom_translation_table=translations or None, optimize=True, verbose=False, report=False,
            )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EffcError(f"ONNX export failed: {type(e).__name__}: {first[:400]}") from e
    model = onnx_program.model_proto
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    _rename_dims(model, dynamic)
    onnx_reshapes.drop_noop_layouts(model)
    tied_weights.share_transposed(model)
    _public_inputs(model)
    _strip_debug_metadata(model)
    tag_provenance(model, program, onnx_program.exported_program)
    _make_overridable(model, overridable)
    return model


def _public_inputs(model: onnx.ModelProto) -> None:
    """Graph inputs under their public names (a decoder's past_key_values_0_key -> past_key_values.0.key,
    the names Optimum and onnxruntime-genai feed)."""
    from effc.runtime.kv_cache import public

    renamed = {i.name: public(i.name) for i in model.graph.input if public(i.name) != i.name}
    if not renamed:
        return
    for value in model.graph.input:
        value.name = renamed.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [renamed.get(v, v) for v in node.input]


def _make_overridable(model: onnx.ModelProto, names: frozenset[str]) -> None:
    if not names:
        return
    inits = {t.name: t for t in model.graph.initializer}
    missing = sorted(set(names) - set(inits))
    if missing:
        raise EffcError(f"the ONNX exporter renamed or folded switchable weights ({', '.join(missing[:3])}); "
                        "they cannot be fed at run time")
    for name in sorted(names):
        t = inits[name]
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))


def layer_values(model: onnx.ModelProto, layers: dict[str, str | None]) -> dict[str, dict[str, str | None]]:
    """layer (module name) -> {"input", "output"}: the ONNX values at its boundary, from the exporter's
    name scopes. The output is the last value of the layer's nodes that another module reads; the input
    is the first value its first node reads from another module's node. `layers` maps each layer to
    its input in the fx graph: layers sharing one (q/k/v) share the input value found for any of them,
    since the exporter may compute what they share (a quantized activation) once, in one of them."""
    import ast

    from effc.passes.program import module_path

    module_of, nodes = {}, {}
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        if not scopes:
            continue
        path = ast.literal_eval(scopes)
        if len(path) >= 2:
            name = module_path(path[-2])
            nodes.setdefault(name, []).append(node)
            for out in node.output:
                module_of[out] = name
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for value in node.input:
            readers.setdefault(value, set()).add(next((module_of[o] for o in node.output if o in module_of), ""))
    outputs = {o.name for o in model.graph.output}
    found = {}
    for name in layers:
        mine = nodes.get(name)
        if not mine:
            continue
        exits = [o for n in mine for o in n.output if o in outputs or readers.get(o, set()) - {name}]
        if not exits:
            continue
        entry = next((v for v in mine[0].input if v in module_of and module_of[v] != name), None)
        found[name] = {"input": entry, "output": exits[-1]}
    shared = {layers[n]: p["input"] for n, p in found.items() if p["input"] and layers[n]}
    for name, p in found.items():
        if p["input"] is None and layers[name]:
            p["input"] = shared.get(layers[name])
    return found


_MATMULS = {"MatMul", "Gemm", "FusedMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits",
            "MatMulInteger", "QLinearMatMul"}
# Steps between an activation and the matmul that do not change its values' order: quantization (Q, DQ,
# division by a run-time scale, a mask), casts, and reshapes ORT's QDQ propagation moves past a Q.
_QUANTIZE = {"QuantizeLinear", "DynamicQuantizeLinear", "DequantizeLinear", "Div", "Mul", "Cast", "Reshape"}


def activation_input(model: onnx.ModelProto, output: str) -> str | None:
    """The float activation a layer's matmul reads, found by walking back from the layer's output in a
    graph without name scopes (ORT's optimized graph): through bias Adds / scale Muls to the matmul,
    then back through its activation quantization (Q, DQ, division by a run-time scale, masks). The value
    found may be a reshape of the layer's input (same elements, same order)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    constant = {t.name for t in model.graph.initializer}
    node = producer.get(output)
    for _ in range(4):
        if node is None:
            return None
        if node.op_type in _MATMULS:
            break
        if node.op_type not in ("Add", "Mul"):
            return None
        node = producer.get(next((i for i in node.input if i in producer), ""))
    else:
        return None
    value = node.input[0]
    while value in producer and producer[value].op_type in _QUANTIZE:
        step = producer[value]
        if step.op_type == "Mul" and not any(i in constant for i in step.input[1:]):
            break  # a product of two activations is not a quantization step
        value = step.input[0]
    return value


def result(out_dir: Path, files: list[str], info: dict, exported: onnx.ModelProto, program) -> BuildResult:
    """The BuildResult of the model.onnx saved in out_dir (after any optimizer of the target's): its
    operators, user inputs and outputs, and the layer probes of `exported` that survive in it."""
    saved = onnx.load(str(out_dir / "model.onnx"), load_external_data=False)
    ops = Counter(op_label(n) for n in saved.graph.node)
    inputs, outputs = _io_metadata(saved)
    return BuildResult("model.onnx", files, info, final_probes(saved, layer_values(exported, layers(program))),
                       inputs, outputs, dict(ops.most_common()))


def _io_metadata(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """User inputs and outputs; inputs backed by an initializer (switchable weights) are not user inputs."""
    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": dtype, "shape": shape})
        return out
    inits = {t.name for t in model.graph.initializer}
    return describe([i for i in model.graph.input if i.name not in inits]), describe(model.graph.output)


def final_probes(model: onnx.ModelProto, probes: dict[str, dict]) -> dict[str, dict[str, str | None]]:
    """The layer probes that survive in the saved model (a target's optimizer may fuse or rename values).
    A layer's scope entry may be a quantized copy shared with a sibling, or gone: its float input is
    found by walking back from its output (activation_input)."""
    values = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    out = {}
    for name, p in probes.items():
        if p["output"] in values:
            found = p["input"] and (activation_input(model, p["output"]) or (p["input"] if p["input"] in values else None))
            out[name] = {"input": found or None, "output": p["output"]}
    return out


# Kept: which module / fx node each ONNX node came from (the layer-wise debugger maps by these).
# Dropped: stack traces and class lists, which hold build-machine paths and grow the file ~70%.
_DEBUG_KEYS = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy")


def _strip_debug_metadata(model: onnx.ModelProto) -> None:
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key not in _DEBUG_KEYS]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)


def _fx_node(node: onnx.NodeProto) -> str | None:
    """The fx node an exported ONNX node came from: the exporter writes "%name : ..." under fx_node."""
    text = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.fx_node"), None)
    return text.split(" ", 1)[0].removeprefix("%") if text else None


def tag_provenance(model: onnx.ModelProto, program: torch.export.ExportedProgram,
                   exported: torch.export.ExportedProgram) -> None:
    """Write each fx node's effc_provenance on the ONNX nodes exported from it. The exporter translates
    its own retrace of `program` (`exported`, nodes renamed); each of its nodes names the node of
    `program` it came from in meta["from_node"]."""
    from effc.passes.rewrite import PROVENANCE

    made = {n.name: n.meta[PROVENANCE] for n in program.graph.nodes if PROVENANCE in n.meta}
    if not made:
        return
    traced = {}
    for node in exported.graph.nodes:
        sources = list(node.meta.get("from_node") or [])
        while sources:  # the chain of nodes it was made from, nearest first
            source = sources.pop(0)
            if source.name in made:
                traced[node.name] = made[source.name]
                break
            sources.extend(getattr(source, "from_node", None) or [])
    for node in model.graph.node:
        rule = traced.get(_fx_node(node))
        if rule:
            set_provenance(node, rule)


def reattach_provenance(exported: onnx.ModelProto, path: Path) -> None:
    """ONNX Runtime's optimizer drops node metadata: copy the tags of `exported` onto its optimized model
    at `path` (re-saved in place), by node name where ORT kept it; a node ORT fused or renamed takes
    the tag of the exported node it shares an output with, else of the only tagged rule whose nodes
    read the same initializers (the rule's own weights)."""
    by_name, by_output, readers = {}, {}, {}
    for node in exported.graph.node:
        rule = provenance(node)
        by_name[node.name] = rule
        for out in node.output:
            by_output[out] = rule
        for value in node.input:
            readers.setdefault(value, set()).add(rule)
    if not any(by_name.values()):
        return
    model = onnx.load(str(path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        if node.name in by_name:
            rule = by_name[node.name]
        else:
            rule = next((by_output[o] for o in node.output if by_output.get(o)), None)
        if rule is None and node.name not in by_name:
            owners = set().union(*(readers.get(i, {None}) for i in node.input if i in initializers))
            rule = owners.pop() if len(owners) == 1 else None
        if rule:
            set_provenance(node, rule)
    onnx.save_model(model, str(path))
