"""effc::window_attention's "trt" column (targets/window_attention_trt.py): the band as the TensorRT AOT plugin
node band_attention (targets/trt_plugins.py). Without TensorRT or a GPU: the exported node and its model-local
reference function, run by ONNX Runtime CPU against the op's torch reference at several sequence lengths; the
refusals (global tokens, block layout) as one EffcError line. The kernel itself is tested in
test_triton_window_attention.py; only the tensorrt.plugin glue needs TensorRT and skips here."""

import inspect
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import effc.ops  # noqa: F401  (registers torch.ops.effc.window_attention)
from effc.errors import EffcError
from effc.ops.registry import translations
from effc.ops.window_attention import window_attention
from effc.targets import onnx_export, trt_support
from effc.targets import trt_plugins as tp

ort = pytest.importorskip("onnxruntime")
SCALE = 0.3


class _Op(torch.nn.Module):
    def __init__(self, window, causal, dilation, padded=True, globals_=(), block=0, layout=None):
        super().__init__()
        self.args = (window, causal, dilation, list(globals_), block)
        self.padded, self.layout = padded, layout

    def forward(self, q, k, v, valid):
        window, causal, dilation, globals_, block = self.args
        return torch.ops.effc.window_attention(q, k, v, valid if self.padded else None, window, causal, dilation,
                                               globals_, block, self.layout, SCALE)


def _inputs(s, t, b=2, heads=4, kv=2, d=16, dv=8):
    g = torch.Generator().manual_seed(s * 1000 + t)
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :3] = False  # a left-padded row: its first queries see no key
    return dict(q=torch.randn(b, heads, s, d, generator=g), k=torch.randn(b, kv, t, d, generator=g),
                v=torch.randn(b, kv, t, dv, generator=g), valid=valid)


def trt_onnx(module):
    """The trt target's path: export with the "trt" column (dynamic S and T), then finalize()."""
    example = _inputs(37, 37)
    s, t = torch.export.Dim("s", min=1, max=512), torch.export.Dim("t", min=1, max=1024)
    program = torch.export.export(module, (), kwargs=example,
                                  dynamic_shapes=dict(q={2: s}, k={2: t}, v={2: t}, valid={1: t}))
    model = onnx_export.export(program, example, ["out"], {}, translations("trt"))
    return model, tp.finalize(model)


def run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


# window, causal, dilation, with key_valid
CASES = {"causal padded": (5, True, 1, True), "both sides dilated": (4, False, 2, True),
         "causal dilated 3, no key_valid": (6, True, 3, False)}


@pytest.fixture(scope="module", params=list(CASES))
def built(request):
    window, causal, dilation, padded = CASES[request.param]
    module = _Op(window, causal, dilation, padded)
    model, count = trt_onnx(module)
    return module, model, count, CASES[request.param]


@pytest.mark.parametrize("shape", [(37, 37), (80, 80), (1, 37), (5, 77)], ids=lambda s: f"S{s[0]}-T{s[1]}")
def test_ort_runs_the_reference_function(built, shape):
    module, model, count, _ = built
    assert count == 1
    feeds = _inputs(*shape)
    want = module(**feeds).double().numpy()
    got = run_ort(model, {k: v.numpy() for k, v in feeds.items()})
    assert got.shape == want.shape and got.dtype == np.float32
    assert float(np.abs(got - want).max()) <= 1e-5


def test_plugin_node_structure(built):
    _, model, _, (window, causal, dilation, padded) = built
    onnx.checker.check_model(model, full_check=True)
    plugin_nodes = [n for n in model.graph.node if n.domain == tp.DOMAIN]
    assert len(plugin_nodes) == 1 and not any(n.domain == tp.PENDING for n in model.graph.node)
    node = plugin_nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "band_attention" and attrs == dict(
        window=window, causal=int(causal), dilation=dilation, heads=4, kv_heads=2, head=16, v_head=8,
        plugin_namespace=b"effc", plugin_version=b"1", aot=1)  # the placeholder-only attributes are gone
    assert tp.plugin_of(node) is tp.BAND and tp.BAND.op == "effc::window_attention"
    assert model.graph.output[0].name == node.output[0]
    # the query is scaled by a standard Mul in front of the node (the plugin takes scale 1)
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[node.input[0]].op_type == "Mul"
    assert {(i.domain, i.version) for i in model.opset_import} >= {(tp.DOMAIN, 1)}
    assert tp.PENDING not in {i.domain for i in model.opset_import}
    (fn,) = [f for f in model.functions if f.domain == tp.DOMAIN]
    assert fn.name == "band_attention" and set(fn.attribute) == set(attrs)
    assert list(fn.input) == list(tp.BAND.plugin_inputs) and {n.domain for n in fn.node} == {""}
    # everything in the graph is something TensorRT's parser takes (the plugin node as a registered plugin)
    assert trt_support.problems(model) == []


def test_key_valid_is_an_int32_input(built):
    _, model, _, _ = built
    (node,) = [n for n in model.graph.node if n.domain == tp.DOMAIN]
    inferred = onnx.shape_inference.infer_shapes(tp.without_functions(model))
    values = list(inferred.graph.value_info) + list(inferred.graph.input)
    types_ = {v.name: v.type.tensor_type.elem_type for v in values}
    assert types_[node.input[3]] == TensorProto.INT32


def test_without_functions_removes_the_body(built):
    _, model, _, _ = built
    stripped = tp.without_functions(model)
    assert not [f for f in stripped.functions if f.domain == tp.DOMAIN]
    assert [f.name for f in model.functions if f.domain == tp.DOMAIN] == ["band_attention"]
    assert stripped.graph == model.graph


@pytest.mark.parametrize("pattern,reason", [
    (dict(globals_=[0, 7]), "2 global token position"),
    (dict(block=4, layout="dense"), "a block-sparse layout")])
def test_patterns_outside_the_band_are_refused(pattern, reason):
    if pattern.get("layout") == "dense":
        pattern = dict(pattern, layout=torch.ones(128, 128, dtype=torch.bool))
    with pytest.raises(EffcError) as info:
        trt_onnx(_Op(5, True, 1, **pattern))
    message = str(info.value)
    assert "\n" not in message and message.startswith("effc::window_attention at ")
    assert f"has no TensorRT plugin: {reason}" in message and message.endswith("; use --target onnx or ort")


def test_check_refuses_what_the_kernel_cannot_take():
    ok = dict(window=5, causal=1, dilation=1, heads=8, kv_heads=2, head=64, v_head=64, global_tokens=0, layout=0)
    assert tp.BAND.check(ok) is None
    assert "not >= 1" in tp.BAND.check(dict(ok, dilation=0))
    assert "not a multiple" in tp.BAND.check(dict(ok, kv_heads=3))
    assert "above the kernel's 256" in tp.BAND.check(dict(ok, v_head=320))


def test_fp16_placeholder_by_hand():
    """A placeholder written by hand (not through the exporter) with fp16 activations: the reference
    function's types (float32 softmax, fp16 matmuls) hold, against the torch reference in float32."""
    b, heads, kv, s, t, d = 2, 4, 2, 9, 20, 16
    attrs = dict(window=4, causal=0, dilation=2, heads=heads, kv_heads=kv, head=d, v_head=d, global_tokens=0,
                 layout=0)
    node = helper.make_node("band_attention", ["q", "k", "v", "valid"], ["y"], domain=tp.PENDING, **attrs)
    f16 = TensorProto.FLOAT16
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("q", f16, [b, heads, "s", d]),
                                            helper.make_tensor_value_info("k", f16, [b, kv, "t", d]),
                                            helper.make_tensor_value_info("v", f16, [b, kv, "t", d]),
                                            helper.make_tensor_value_info("valid", TensorProto.INT32, [b, "t"])],
                              [helper.make_tensor_value_info("y", f16, [b, heads, "s", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(tp.PENDING, 1)])
    assert tp.finalize(model) == 1
    feeds = _inputs(s, t, b, heads, kv, d, d)
    q, k, v = (feeds[n].half() for n in "qkv")
    got = run_ort(model, dict(q=q.numpy(), k=k.numpy(), v=v.numpy(), valid=feeds["valid"].to(torch.int32).numpy()))
    assert got.dtype == np.float16
    want = window_attention(q.float(), k.float(), v.float(), feeds["valid"], 4, False, 2, [], 0, None, 1.0)
    assert float(np.abs(got.astype(np.float64) - want.double().numpy()).max()) <= 2e-2


def test_registration_signature_follows_the_row():
    """Without TensorRT: band_attention's tensorrt.plugin functions, recorded by a stand-in module, have the
    signatures tensorrt.plugin validates (register: inputs then INT attributes, annotated; autotune: inputs,
    outputs; aot_impl: inputs, attributes, outputs, tactic)."""
    seen = {}

    def recorder(kind):
        return lambda qualified: (lambda fn: seen.setdefault(kind, fn))

    class TensorDesc:
        pass

    fake = types.SimpleNamespace(register=recorder("register"), autotune=recorder("autotune"),
                                 aot_impl=recorder("aot_impl"), TensorDesc=TensorDesc,
                                 KernelLaunchParams=type("KernelLaunchParams", (), {}),
                                 SymIntExprs=type("SymIntExprs", (), {}))
    p = tp.BAND
    p.register(fake, p)
    desc = inspect.signature(seen["register"])
    assert list(desc.parameters) == list(p.plugin_inputs) + list(p.attributes)
    assert [a.annotation for a in desc.parameters.values()] == [TensorDesc] * 4 + [int] * len(p.attributes)
    assert list(inspect.signature(seen["autotune"]).parameters) == list(p.plugin_inputs) + ["outputs"]
    aot = inspect.signature(seen["aot_impl"])
    assert list(aot.parameters) == list(p.plugin_inputs) + list(p.attributes) + ["outputs", "tactic"]


def test_register_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT is not installed here (pip install effc[gpu] "
                               "on a machine with an NVIDIA GPU)")
    tp.register_with_tensorrt()
    assert hasattr(getattr(trtp.op, tp.BAND.namespace), tp.BAND.name)
