"""targets/onnx_reshapes.py: Reshape chains that end where they started and inverse Transpose pairs are
bypassed, proven from value_info shapes (named dims), and nothing else is: a real reshape, a dim of unknown
size, a graph output. The simplified graph computes the same values in ONNX Runtime as the original."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from effc.targets.onnx_reshapes import drop_noop_layouts

F = TensorProto.FLOAT


def _vi(name, dims):
    return helper.make_tensor_value_info(name, F, dims)


def _model(out_dims=("B", "S", 576), known=True) -> onnx.ModelProto:
    """x [B, S, 576] -> view [B, S, 9, 64] (shape computed at run time) -> transpose -> transpose back ->
    view [B, S, 576] -> Relu -> y, and a real reshape of x to [B, S*9, 64] as a second output."""
    nodes = [
        helper.make_node("Shape", ["x"], ["bs"], start=0, end=2),
        helper.make_node("Constant", [], ["heads"], value=helper.make_tensor("h", TensorProto.INT64, [2], [9, 64])),
        helper.make_node("Concat", ["bs", "heads"], ["shape4"], axis=0),
        helper.make_node("Reshape", ["x", "shape4"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["t1"], perm=[0, 2, 1, 3]),
        helper.make_node("Shape", ["t1"], ["shape_t"]),
        helper.make_node("Reshape", ["t1", "shape_t"], ["t1v"]),  # an identity view between the transposes
        helper.make_node("Transpose", ["t1v"], ["t2"], perm=[0, 2, 1, 3]),
        helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("f", TensorProto.INT64, [3], [0, 0, 576])),
        helper.make_node("Reshape", ["t2", "flat"], ["v3"]),
        helper.make_node("Constant", [], ["other"], value=helper.make_tensor("o", TensorProto.INT64, [3], [0, -1, 64])),
        helper.make_node("Reshape", ["x", "other"], ["z"]),
        helper.make_node("Relu", ["v3"], ["y"]),
    ]
    info = [_vi("v4", ["B", "S", 9, 64]), _vi("t1", ["B", 9, "S", 64]), _vi("t1v", ["B", 9, "S", 64]),
            _vi("t2", ["B", "S", 9, 64]), _vi("v3", list(out_dims) if known else ["B", "S", None])]
    graph = helper.make_graph(nodes, "g", [_vi("x", ["B", "S", 576])], [_vi("y", ["B", "S", 576]),
                                                                          _vi("z", ["B", None, 64])], value_info=info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_noop_chain_and_inverse_transposes_go():
    model = _model()
    x = np.random.default_rng(0).standard_normal((2, 5, 576)).astype(np.float32)
    want = _run(model, x)
    removed = drop_noop_layouts(model)
    ops = [n.op_type for n in model.graph.node]
    assert removed == 5 and ops.count("Transpose") == 0
    assert ops == ["Constant", "Reshape", "Relu"]  # Relu reads x; the real reshape to z stays
    assert next(n for n in model.graph.node if n.op_type == "Relu").input[0] == "x"
    for w, g in zip(want, _run(model, x), strict=True):
        np.testing.assert_array_equal(w, g)


def test_unknown_dim_proves_nothing():
    model = _model(known=False)
    drop_noop_layouts(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Reshape") == 3  # x -> v4 kept for the final view; the identity view between transposes goes
    assert ops.count("Transpose") == 0 and ops.count("Relu") == 1


def test_graph_output_is_kept():
    model = _model()
    assert model.graph.node.pop().op_type == "Relu"  # the no-op view v3 itself becomes the graph's output
    model.graph.output[0].name = "v3"
    drop_noop_layouts(model)
    assert "v3" in {o for n in model.graph.node for o in n.output}
