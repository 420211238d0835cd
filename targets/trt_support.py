"""Is an ONNX graph one TensorRT 10's ONNX parser takes? Every node is checked against the parser's support
matrix (targets/data/onnx_tensorrt_10_operators.md: onnx/onnx-tensorrt docs/operators.md, TensorRT 10.0,
Apache-2.0): operator, the types of its data inputs, the matrix's restrictions, the notes on quantized
types, and the opset. Torch-free: `effc inspect` and tests read it without torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from effc.targets.onnx_nodes import STANDARD_DOMAINS, standard_opset
from effc.targets.trt_plugins import plugin_of

MATRIX = Path(__file__).parent / "data" / "onnx_tensorrt_10_operators.md"
OPSETS = range(9, 21)  # the matrix: "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"
# DequantizeLinear's block_size and the INT4 type exist only from opset 21; TensorRT 10 parses blocked INT4
# DQ (the matrix lists INT4 for DequantizeLinear) and ModelOpt's INT4 export writes it at opset 21, so 21
# is accepted only for a graph that has it.
BLOCKED_OPSET = 21
TOPK_MAX = 3840  # the matrix: "`K` input must be less than 3840"

# The matrix's type names; its ConstantOfShape row spells INT64 "INF64". FP8 is TensorRT's E4M3.
_TYPES = {"FP32": TensorProto.FLOAT, "FP16": TensorProto.FLOAT16, "BF16": TensorProto.BFLOAT16,
          "INT32": TensorProto.INT32, "INT64": TensorProto.INT64, "INF64": TensorProto.INT64,
          "INT8": TensorProto.INT8, "INT4": TensorProto.INT4, "FP8": TensorProto.FLOAT8E4M3FN,
          "UINT8": TensorProto.UINT8, "BOOL": TensorProto.BOOL}
# "INT8, INT4, and FP8 are treated as Quantized Types ... available only through quantization"
QUANTIZED = {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
_QDQ = ("QuantizeLinear", "DequantizeLinear")  # may read quantized values (codes, zero points); a Constant
# may hold them (a zero point), and whoever reads it is checked
_AXES_INPUT = {"Slice": 3, "Squeeze": 1, "Unsqueeze": 1, "Pad": 3, "CumSum": 1,
               **{op: 1 for op in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax",
                                   "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")}}
_RESIZE = {"coordinate_transformation_mode": {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn",
                                              "asymmetric", "align_corners"},
           "mode": {"nearest", "linear"},
           "nearest_mode": {"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"},
           "keep_aspect_ratio_policy": {"stretch"}}


@dataclass(frozen=True)
class Entry:
    supported: bool
    types: frozenset[int]  # onnx.TensorProto element types
    restrictions: str


@functools.cache
def matrix() -> dict[str, Entry]:
    """op_type -> the matrix's row."""
    rows = {}
    for line in MATRIX.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        names = [t.strip() for t in (cells[2] if len(cells) > 2 else "").split(",") if t.strip()]
        rows[cells[0]] = Entry(cells[1] == "Y", frozenset(_TYPES[t] for t in names),
                               cells[3] if len(cells) > 3 else "")
    return rows


def _type_name(t: int) -> str:
    return TensorProto.DataType.Name(t)


def _label(node: onnx.NodeProto) -> str:
    name = node.name or (node.output[0] if node.output else "?")
    return f"node {name!r} ({node.op_type})"


class _Scope:
    """What is known about the values of one graph (and its enclosing graphs): element types, constants."""

    def __init__(self, graph: onnx.GraphProto, outer: _Scope | None = None):
        self.types: dict[str, int] = dict(outer.types) if outer else {}
        self.constants: dict[str, TensorProto | None] = dict(outer.constants) if outer else {}
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
                self.types[v.name] = v.type.tensor_type.elem_type
        for t in graph.initializer:
            self.types[t.name] = t.data_type
            self.constants[t.name] = t
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
                attr = next((a for a in node.attribute), None)
                self.constants[node.output[0]] = attr.t if attr is not None and attr.name == "value" else None
        self.initializers = {t.name for t in graph.initializer} | (outer.initializers if outer else set())
        self.io = {v.name for v in list(graph.input) + list(graph.output)} if outer is None else outer.io
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for i in node.input:
                self.readers.setdefault(i, []).append(node)
        self.graph_outputs = {v.name for v in graph.output}

    def value(self, name: str) -> np.ndarray | None:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)


def _blocked_int4(model: onnx.ModelProto) -> bool:
    types = {t.name: t.data_type for t in model.graph.initializer}
    return any(n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i for a in n.attribute)
               and types.get(n.input[0]) in (TensorProto.INT4, TensorProto.UINT4) for n in model.graph.node)


def _opset_problems(model: onnx.ModelProto) -> list[str]:
    version = standard_opset(model)
    if version is None:
        return ["the model imports no default-domain opset"]
    if version in OPSETS or (version == BLOCKED_OPSET and _blocked_int4(model)):
        return []
    extra = " (21 only with INT4 blocked DequantizeLinear)" if version == BLOCKED_OPSET else ""
    return [f"opset {version} is outside TensorRT 10's ONNX parser range {OPSETS.start}..{OPSETS.stop - 1}{extra}"]


def _checked_positions(node: onnx.NodeProto, schema) -> tuple[list[str], list[str]]:
    """The inputs and outputs whose element type the matrix's Supported Types column constrains: the data
    inputs (those typed like the first output), else the first input; Q/DQ: the input; Cast: input and output."""
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return list(node.input[:1]), []
    if node.op_type in ("Cast", "CastLike"):
        return list(node.input[:1]), list(node.output[:1])
    if node.op_type == "ConstantOfShape" or not node.input:
        return [], list(node.output[:1])
    if schema is None:
        return list(node.input[:1]), []
    formal = list(schema.inputs)
    out_type = schema.outputs[0].type_str if schema.outputs else None
    picked = [name for i, name in enumerate(node.input) if name and
              formal[min(i, len(formal) - 1)].type_str == out_type]
    return (picked or list(node.input[:1])), []


def _node_problems(node: onnx.NodeProto, scope: _Scope, opset: int, plugin_of) -> list[str]:
    label = _label(node)
    if node.domain not in STANDARD_DOMAINS:
        if plugin_of(node) is not None:
            return []
        return [f"{label}: domain {node.domain!r} is not ONNX's and the node is no registered effc TensorRT "
                "plugin (targets/trt_plugins.py)"]
    entry = matrix().get(node.op_type)
    if entry is None or not entry.supported:
        return [f"{label}: not supported by TensorRT 10's ONNX parser (support matrix)"]
    found = []
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        schema = None
    ins, outs = _checked_positions(node, schema)
    for name in dict.fromkeys(ins + outs):
        t = scope.types.get(name)
        if t is not None and t not in entry.types:
            found.append(f"{label}: {name!r} is {_type_name(t)}; TensorRT takes "
                         f"{', '.join(sorted(_type_name(x) for x in entry.types))} here")
    for name in dict.fromkeys([i for i in node.input if i] + [o for o in node.output if o]):
        t = scope.types.get(name)
        if t == TensorProto.DOUBLE:
            found.append(f"{label}: {name!r} is DOUBLE (TensorRT's support is limited: it casts down to FLOAT); "
                         "compute in float32")
        elif t == TensorProto.UINT8 and name not in scope.io:
            found.append(f"{label}: {name!r} is UINT8, which TensorRT takes only as a network input or output")
        elif t in QUANTIZED and node.op_type not in _QDQ and name in node.input:
            found.append(f"{label}: reads {_type_name(t)} {name!r}; TensorRT takes quantized types only "
                         "through QuantizeLinear/DequantizeLinear")
        elif t in QUANTIZED and node.op_type not in ("QuantizeLinear", "Constant") and name in node.output:
            found.append(f"{label}: makes {_type_name(t)} {name!r}; only QuantizeLinear may (explicit quantization)")
    return found + _restrictions(node, scope, label)


def _attr(node: onnx.NodeProto, name: str, default=None):
    a = next((a for a in node.attribute if a.name == name), None)
    return default if a is None else onnx.helper.get_attribute_value(a)


def _restrictions(node: onnx.NodeProto, scope: _Scope, label: str) -> list[str]:
    op, found = node.op_type, []

    def constant_input(i: int, what: str, rule: str = "an initializer or Constant"):
        if len(node.input) > i and node.input[i] and node.input[i] not in scope.constants:
            found.append(f"{label}: {what} {node.input[i]!r} must be {rule} (TensorRT support matrix)")

    if op in ("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) > 2 and node.input[2]:
            zero = scope.value(node.input[2])
            if zero is None or np.any(zero.astype(np.int64) != 0):
                found.append(f"{label}: zero point {node.input[2]!r} must be a constant 0 (TensorRT takes symmetric "
                             "quantization only)")
        scale = scope.value(node.input[1]) if len(node.input) > 1 else None
        if len(node.input) > 1 and node.input[1] not in scope.constants:
            found.append(f"{label}: scale {node.input[1]!r} is computed at run time; TensorRT's explicit "
                         "quantization takes constant (calibrated) scales")
        elif scale is not None and scale.size > 1 and node.input[0] not in scope.constants:
            found.append(f"{label}: a per-axis or blocked scale on activation {node.input[0]!r}: TensorRT takes "
                         "those on weights (initializers) only; activations are quantized per tensor")
        if _attr(node, "block_size", 0) and node.input[0] not in scope.constants:
            found.append(f"{label}: blocked quantization of {node.input[0]!r}, which is not an initializer")
        weight = scope.constants.get(node.input[0])
        if weight is not None and weight.data_type in (TensorProto.INT4, TensorProto.UINT4) and \
                (not weight.dims or weight.dims[-1] % 2):
            found.append(f"{label}: INT4 weight {node.input[0]!r} has an odd last dim {list(weight.dims)} "
                         "(TensorRT needs it even)")
    elif op in _AXES_INPUT:
        constant_input(_AXES_INPUT[op], "axes")
    elif op == "TopK":
        constant_input(1, "K")
        k = scope.value(node.input[1]) if len(node.input) > 1 else None
        if k is not None and int(k.reshape(-1)[0]) >= TOPK_MAX:
            found.append(f"{label}: K={int(k.reshape(-1)[0])} must be less than {TOPK_MAX}")
        if _attr(node, "sorted", 1) != 1:
            found.append(f"{label}: sorted must be 1")
    elif op == "Dropout":
        if len(node.input) > 2 and node.input[2]:
            mode = scope.value(node.input[2])
            if mode is None or bool(mode.reshape(-1)[0]):
                found.append(f"{label}: training_mode must be an initializer that is False")
    elif op == "Resize":
        for name, allowed in _RESIZE.items():
            value = _attr(node, name)
            value = value.decode() if isinstance(value, bytes) else value
            if value is not None and value not in allowed:
                found.append(f"{label}: {name}={value!r} is not one TensorRT supports ({', '.join(sorted(allowed))})")
        if _attr(node, "antialias", 0):
            found.append(f"{label}: antialiasing is not supported")
    elif op == "LayerNormalization":
        for extra in node.output[1:]:
            if extra and (scope.readers.get(extra) or extra in scope.graph_outputs):
                found.append(f"{label}: output {extra!r} is used; TensorRT supports only the first output Y")
    elif op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        if bad:
            found.append(f"{label}: attribute {bad[0]} is unsupported")
    elif op == "MaxPool" and len(node.output) > 1 and node.output[1]:
        found.append(f"{label}: the Indices output is unsupported")
    return found


def _graph_problems(graph: onnx.GraphProto, scope: _Scope, opset: int, plugin_of) -> list[str]:
    found = []
    for node in graph.node:
        found += _node_problems(node, scope, opset, plugin_of)
        for attr in node.attribute:  # If / Loop / Scan bodies
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                found += _graph_problems(sub, _Scope(sub, scope), opset, plugin_of)
    return found


def problems(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT 10's ONNX parser would refuse or mis-read `model`, one line each naming the
    node, its operator and the rule; empty when the graph is TensorRT-ready."""
    found = _opset_problems(model)
    opset = next((i.version for i in model.opset_import if i.domain in STANDARD_DOMAINS), OPSETS.stop - 1)
    try:  # element types of every value; a model past protobuf's 2 GB is checked on what it declares
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except (ValueError, onnx.shape_inference.InferenceError):
        inferred = model
    return found + _graph_problems(inferred.graph, _Scope(inferred.graph), opset, plugin_of)


def summary(found: list[str]) -> str:
    """The one-line refusal: the first problem and how many more."""
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"the graph is not TensorRT-ready: {found[0]}{more}"

