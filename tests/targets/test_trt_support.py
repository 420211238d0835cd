"""The TensorRT support checker on hand-built graphs: each restriction of the parser's support matrix
(targets/data/onnx_tensorrt_10_operators.md) is broken once and must be named; a good graph passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from effc.targets import trt_support

F = TensorProto.FLOAT


def model(nodes, inits=(), inputs=(("x", F, [2, 8]),), outputs=(("y", F, None),), opset=20, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def const(name, values, dtype=None):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def int4(name, shape):
    t = TensorProto(name=name, data_type=TensorProto.INT4, dims=shape)
    t.raw_data = bytes((int(np.prod(shape)) + 1) // 2)
    return t


def qdq_linear(zero=0, scale=(0.1,), weight_scale_shape=(4,)):
    """x -> Q/DQ (per tensor) -> MatMul with a DQ'd int8 weight per output channel: TensorRT's explicit form."""
    return model([
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="wdq", axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
    ], [const("s", np.array(scale, np.float32).reshape(() if len(scale) == 1 else -1)),
        const("z", np.array(zero, np.int8)), const("w", np.ones((8, 4)), np.int8),
        const("ws", np.ones(weight_scale_shape), np.float32)])


def one(found, *words):
    """Exactly one problem, naming all of `words`."""
    assert len(found) == 1, found
    for w in words:
        assert w in found[0], found[0]
    return found[0]


def test_matrix_is_parsed_from_the_carried_table():
    m = trt_support.matrix()
    assert len(m) > 190 and m["MatMul"].supported and not m["DynamicQuantizeLinear"].supported
    assert m["DequantizeLinear"].types == {TensorProto.INT8, TensorProto.INT4, TensorProto.FLOAT8E4M3FN}
    assert TensorProto.INT64 in m["ConstantOfShape"].types  # the table's "INF64"
    assert "Apache-2.0" in trt_support.MATRIX.read_text().splitlines()[0]


def test_explicit_int8_linear_passes():
    assert trt_support.problems(qdq_linear()) == []


@pytest.mark.parametrize("op", ["DynamicQuantizeLinear", "MatMulInteger", "BitShift"])
def test_unsupported_ops_are_named(op):
    node = helper.make_node(op, ["x"], ["y"], name="bad")
    one(trt_support.problems(model([node])), "'bad'", op, "not supported")


def test_other_domains_are_refused():
    node = helper.make_node("MatMulNBits", ["x"], ["y"], name="m", domain="com.microsoft")
    found = trt_support.problems(model([node], extra_opsets=[helper.make_opsetid("com.microsoft", 1)]))
    one(found, "'m'", "com.microsoft", "no registered effc TensorRT plugin")


def test_registered_plugin_node_passes_and_unregistered_one_does_not():
    from effc.targets import trt_plugins

    name = next(iter(trt_plugins.PLUGINS))
    good = helper.make_node(name, ["x"], ["y"], name="p", domain=trt_plugins.DOMAIN,
                            plugin_namespace=trt_plugins.PLUGINS[name].namespace)
    wrong_ns = helper.make_node(name, ["x"], ["y"], name="p", domain=trt_plugins.DOMAIN, plugin_namespace="other")
    opsets = [helper.make_opsetid(trt_plugins.DOMAIN, 1)]
    assert trt_support.problems(model([good], extra_opsets=opsets)) == []
    one(trt_support.problems(model([wrong_ns], extra_opsets=opsets)), "'p'", "effc.trt")


def test_nonzero_zero_point_is_refused():
    found = trt_support.problems(qdq_linear(zero=3))
    assert len(found) == 2 and all("zero point" in f for f in found) and "'q'" in found[0], found


def test_per_axis_scale_on_an_activation_is_refused():
    found = trt_support.problems(qdq_linear(scale=(0.1,) * 8))
    assert found and all("per-axis" in f and "activation" in f for f in found), found
    assert "'q'" in found[0]


def test_run_time_scale_is_refused():
    m = model([helper.make_node("ReduceMax", ["x"], ["s"], name="absmax", keepdims=0),
               helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
               helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq")],
              [const("z", np.array(0, np.int8))])
    found = trt_support.problems(m)
    assert any("'q'" in f and "computed at run time" in f for f in found), found


def test_uint8_quantization_is_refused():
    m = model([helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="u8"),
               helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
              [const("w", np.ones((8, 4)), np.uint8), const("s", np.array(0.1, np.float32))])
    found = trt_support.problems(m)
    assert any("'u8'" in f and "UINT8" in f for f in found), found


def test_int8_read_outside_qdq_is_refused():
    m = model([helper.make_node("Gather", ["table", "i"], ["rows"], name="g", axis=0),
               helper.make_node("Cast", ["rows"], ["y"], name="c", to=F)],
              [const("table", np.ones((16, 8)), np.int8)], inputs=(("i", TensorProto.INT64, [3]),))
    found = trt_support.problems(m)
    assert any("'g'" in f and "INT8" in f for f in found), found


def test_double_is_refused():
    m = model([helper.make_node("Cast", ["x"], ["xd"], name="to_double", to=TensorProto.DOUBLE),
               helper.make_node("Cast", ["xd"], ["y"], name="back", to=F)])
    found = trt_support.problems(m)
    assert found and any("DOUBLE" in f for f in found), found


def test_unsupported_type_of_a_data_input_is_named():
    m = model([helper.make_node("MatMul", ["a", "a"], ["y"], name="mm")],
              inputs=(("a", TensorProto.INT32, [4, 4]),), outputs=(("y", TensorProto.INT32, None),))
    one(trt_support.problems(m), "'mm'", "INT32", "FLOAT")


def blocked(shape, block=32, opset=21):
    k = shape[0]
    return model([helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], name="bdq", axis=0, block_size=block),
                  helper.make_node("MatMul", ["x", "wd"], ["y"], name="mm")],
                 [int4("w", list(shape)), const("s", np.ones((k // block, shape[1])), np.float32)],
                 inputs=(("x", F, [2, k]),), opset=opset)


def test_int4_blocked_dq_at_opset_21_passes():
    assert trt_support.problems(blocked((64, 8))) == []


def test_int4_odd_last_dim_is_refused():
    one(trt_support.problems(blocked((64, 7))), "'bdq'", "odd last dim")


def test_opset_rule():
    assert trt_support.problems(qdq_linear()) == []
    found = trt_support.problems(model([helper.make_node("Relu", ["x"], ["y"])], opset=21))
    one(found, "opset 21", "INT4 blocked DequantizeLinear")
    one(trt_support.problems(model([helper.make_node("Relu", ["x"], ["y"])], opset=8)), "opset 8", "9..20")
    one(trt_support.problems(model([helper.make_node("Relu", ["x"], ["y"])], opset=22)), "opset 22")


def test_blocked_dq_on_an_activation_is_refused():
    m = model([helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q", axis=1, block_size=4),
               helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq", axis=1, block_size=4)],
              [const("s", np.ones((2, 2)), np.float32)], opset=21)
    found = trt_support.problems(m)
    assert any("'dq'" in f and "blocked" in f for f in found), found


@pytest.mark.parametrize("op,axes_at", [("Squeeze", 1), ("Unsqueeze", 1), ("ReduceSum", 1), ("Slice", 3)])
def test_axes_from_a_run_time_value_are_refused(op, axes_at):
    shape = helper.make_node("Shape", ["x"], ["dyn"], name="shape", start=0, end=1)
    inputs = ["x"] + [f"c{i}" for i in range(1, axes_at)] + ["dyn"]
    inits = [const(f"c{i}", [0], np.int64) for i in range(1, axes_at)]
    node = helper.make_node(op, inputs, ["y"], name="n")
    found = trt_support.problems(model([shape, node], inits))
    assert any("'n'" in f and "axes" in f and "initializer" in f for f in found), found


def test_axes_from_a_constant_node_pass():
    m = model([helper.make_node("Constant", [], ["ax"], name="ax", value=const("v", [0], np.int64)),
               helper.make_node("Unsqueeze", ["x", "ax"], ["y"], name="n")])
    assert trt_support.problems(m) == []


def test_topk_rules():
    def topk(k, sorted_=1, k_input=None):
        nodes = [helper.make_node("TopK", ["x", k_input or "k"], ["y", "i"], name="t", sorted=sorted_)]
        if k_input:
            nodes.insert(0, helper.make_node("Shape", ["x"], [k_input], name="shape", start=1))
        return model(nodes, [] if k_input else [const("k", [k], np.int64)],
                     inputs=(("x", F, [2, 5000]),), outputs=(("y", F, None), ("i", TensorProto.INT64, None)))
    assert trt_support.problems(topk(4)) == []
    one(trt_support.problems(topk(4000)), "'t'", "less than 3840")
    one(trt_support.problems(topk(4, sorted_=0)), "'t'", "sorted must be 1")
    assert any("'t'" in f and "K" in f for f in trt_support.problems(topk(0, k_input="dyn")))


def test_dropout_training_mode():
    def dropout(flag):
        return model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="d")],
                     [const("r", np.array(0.1, np.float32)), const("t", np.array(flag))])
    assert trt_support.problems(dropout(False)) == []
    one(trt_support.problems(dropout(True)), "'d'", "training_mode")


def test_resize_mode():
    m = model([helper.make_node("Resize", ["x", "", "sc"], ["y"], name="r", mode="cubic")],
              [const("sc", [1.0, 2.0], np.float32)])
    one(trt_support.problems(m), "'r'", "mode='cubic'")


def test_layer_norm_extra_outputs():
    def ln(use_mean):
        outs = (("y", F, None),) + ((("mean", F, None),) if use_mean else ())
        return model([helper.make_node("LayerNormalization", ["x", "g"], ["y", "mean" if use_mean else ""],
                                       name="ln")], [const("g", np.ones(8), np.float32)], outputs=outs)
    assert trt_support.problems(ln(False)) == []
    one(trt_support.problems(ln(True)), "'ln'", "only the first output")


def test_constant_string_value():
    m = model([helper.make_node("Constant", [], ["c"], name="c", value_strings=["a"]),
               helper.make_node("Identity", ["x"], ["y"])], outputs=(("y", F, None),))
    assert any("'c'" in f and "value_strings" in f for f in trt_support.problems(m))


def test_if_branches_are_walked():
    bad = helper.make_graph([helper.make_node("BitShift", ["x", "x"], ["o"], name="inner")], "then", [],
                            [helper.make_tensor_value_info("o", F, None)])
    ok = helper.make_graph([helper.make_node("Identity", ["x"], ["o2"], name="fine")], "else", [],
                           [helper.make_tensor_value_info("o2", F, None)])
    m = model([helper.make_node("If", ["c"], ["y"], name="if", then_branch=bad, else_branch=ok)],
              inputs=(("x", F, [2, 8]), ("c", TensorProto.BOOL, [])))
    one(trt_support.problems(m), "'inner'", "BitShift")


def test_summary_line():
    assert trt_support.summary(["a", "b", "c"]) == "the graph is not TensorRT-ready: a (and 2 more)"
    assert "\n" not in trt_support.summary(["only"])
