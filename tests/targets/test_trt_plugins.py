"""effc.targets.trt_plugins: the NF4 dequant-GEMM as TensorRT AOT plugin nodes. Without TensorRT or a GPU:
the ONNX form (node, attributes, reference function) run by ONNX Runtime CPU against effc::nf4_linear's torch
reference; the plugin kernel compiled to PTX/cubin for sm_80/sm_90 (child process without TRITON_INTERPRET);
the kernel with the plugin's argument convention in Triton's interpreter (child process with it). Only the
tensorrt.plugin glue (register_with_tensorrt) needs TensorRT and skips here."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import effc.formats.nf4 as ref
from effc.errors import EffcError
from effc.ops import registry
from effc.ops.nf4_linear import nf4_linear
from effc.targets import onnx_export
from effc.targets import trt_plugins as tp

ort = pytest.importorskip("onnxruntime")


def quantized(n, k, block, dq, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, so each block's absmax (and its double quantization) matters
    w = torch.randn(n, k, generator=g) * torch.logspace(-2, 1, n).unsqueeze(1)
    st = ref.quantize_nf4(w, block=block, double_quant=dq, dq_block=256)
    return st, (st["packed"], st["absmax_codes"] if dq else st["absmax"], st.get("absmax2"), st.get("offset"))


class Nf4Layer(torch.nn.Module):
    def __init__(self, n, k, block, dq, bias):
        super().__init__()
        _, (packed, absmax, absmax2, offset) = quantized(n, k, block, dq, seed=n + k + block)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.register_buffer("absmax2", absmax2)
        self.register_buffer("offset", offset)
        self.bias = torch.nn.Parameter(torch.randn(n)) if bias else None
        self.shape = (n, k, block)

    def forward(self, x):
        n, k, block = self.shape
        return nf4_linear(x, self.packed, self.absmax, self.absmax2, self.offset, self.bias, n, k, block, 256)


def trt_onnx(layer, x):
    """The path the trt target takes: export with the "trt" column, then finalize()."""
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}
    program = torch.export.export(layer, (x,), dynamic_shapes=(dims,))
    model = onnx_export.export(program, {"x": x}, ["y"], {"x": {0: "batch", 1: "seq"}}, registry.translations("trt"))
    return model, tp.finalize(model)


def run_ort(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def rel_err(got, want):
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


# (N, K, block, double quant, bias): N not a multiple of 64; K an odd multiple of the block, or not a multiple
# (blocks straddle rows, bnb's flat layout: the default model's 352 features with block 64)
CASES = [(40, 192, 64, True, True), (40, 192, 64, False, False), (24, 80, 32, True, False), (72, 352, 64, False, True)]


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"N{c[0]}-K{c[1]}-b{c[2]}-{'dq' if c[3] else 'nodq'}"
                f"-{'bias' if c[4] else 'nobias'}")
def built(request):
    n, k, block, dq, bias = request.param
    layer = Nf4Layer(n, k, block, dq, bias).eval()
    model, count = trt_onnx(layer, torch.randn(2, 3, k))
    return layer, model, count, request.param


def test_ort_runs_the_reference_function(built):
    layer, model, count, (n, k, block, dq, bias) = built
    assert count == 1
    onnx.checker.check_model(model, full_check=True)
    x = torch.randn(3, 5, k, generator=torch.Generator().manual_seed(3))  # other batch/seq than exported with
    with torch.no_grad():
        want = layer(x).double().numpy()
    got = run_ort(model, {"x": x.numpy()})
    assert got.shape == (3, 5, n) and got.dtype == np.float32
    assert rel_err(got, want) < 1e-5


def test_plugin_node_structure(built):
    _, model, _, (n, k, block, dq, bias) = built
    name = "nf4_gemm_dq" if dq else "nf4_gemm"
    plugin_nodes = [nd for nd in model.graph.node if nd.domain == tp.DOMAIN]
    assert len(plugin_nodes) == 1 and not any(nd.domain == tp.PENDING for nd in model.graph.node)
    node = plugin_nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    want = dict(N=n, K=k, block=block, plugin_namespace=b"effc", plugin_version=b"1", aot=1)
    if dq:
        want["dq_block"] = 256
    assert node.op_type == name and attrs == want
    assert tp.plugin_of(node) is tp.PLUGINS[name] and tp.PLUGINS[name].op == "effc::nf4_linear"
    # the bias is a standard Add after the plugin (TensorRT fuses it)
    readers = [nd.op_type for nd in model.graph.node if node.output[0] in nd.input]
    assert readers == (["Add"] if bias else []) and (bias or model.graph.output[0].name == node.output[0])
    # weights as INT32 words (TensorRT takes UINT8 only as network IO), the tables as shared float initializers
    inits = {t.name: t for t in model.graph.initializer}
    types = [inits[i].data_type for i in node.input[1:]]
    assert types == ([TensorProto.INT32, TensorProto.INT32] + [TensorProto.FLOAT] * 4 if dq
                     else [TensorProto.INT32] + [TensorProto.FLOAT] * 2)
    assert numpy_helper.to_array(inits[node.input[1]]).size == -(-((n * k + 1) // 2) // 4)
    assert {(i.domain, i.version) for i in model.opset_import} >= {(tp.DOMAIN, 1)}
    assert tp.PENDING not in {i.domain for i in model.opset_import}
    # one model-local function, named as the plugin, declaring every attribute the node carries
    (fn,) = [f for f in model.functions if f.domain == tp.DOMAIN]
    assert fn.name == name and set(fn.attribute) == set(attrs) and list(fn.input) == list(tp.PLUGINS[name].plugin_inputs)
    assert {nd.domain for nd in fn.node} == {""}


def test_plugin_of_needs_domain_name_and_namespace():
    p = tp.PLUGINS["nf4_gemm"]
    ok = helper.make_node("nf4_gemm", ["x"], ["y"], domain=tp.DOMAIN, plugin_namespace="effc")
    assert tp.plugin_of(ok) is p
    for bad in (helper.make_node("nf4_gemm", ["x"], ["y"], domain=tp.DOMAIN, plugin_namespace="other"),
                helper.make_node("nf4_gemm", ["x"], ["y"], domain=tp.DOMAIN),
                helper.make_node("nf4_gemm", ["x"], ["y"], domain="", plugin_namespace="effc"),
                helper.make_node("window_attention", ["x"], ["y"], domain=tp.DOMAIN, plugin_namespace="effc")):
        assert tp.plugin_of(bad) is None


def test_without_functions_drops_only_the_plugin_functions(built):
    _, model, _, _ = built
    other = helper.make_function("user.domain", "Keep", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                 [helper.make_opsetid("", 20)])
    model = onnx.ModelProto.FromString(model.SerializeToString())
    model.functions.append(other)
    stripped = tp.without_functions(model)
    assert [f.name for f in stripped.functions] == ["Keep"] and len(model.functions) == 2
    assert stripped.graph == model.graph and list(stripped.opset_import) == list(model.opset_import)


def test_finalize_without_placeholders_changes_nothing():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    before = model.SerializeToString()
    assert tp.finalize(model) == 0 and model.SerializeToString() == before


def _hand_made(x_type, n, k, block, dq, layers=2):
    """Placeholders written by hand (not through the exporter): fp16 activations, two layers sharing the tables."""
    nodes, inits, value = [], [], "x"
    states = []
    for i in range(layers):
        st, (packed, absmax, absmax2, offset) = quantized(n if i == layers - 1 else k, k, block, dq, seed=i)
        rows = n if i == layers - 1 else k
        names = [f"p{i}", f"a{i}"] + ([f"a2_{i}", f"o{i}"] if dq else [])
        tensors = [packed, absmax] + ([absmax2, offset] if dq else [])
        inits += [numpy_helper.from_array(t.numpy(), nm) for nm, t in zip(names, tensors)]
        attrs = dict(N=rows, K=k, block=block) | ({"dq_block": 256} if dq else {})
        nodes.append(helper.make_node("nf4_gemm_dq" if dq else "nf4_gemm", [value] + names, [f"h{i}"], domain=tp.PENDING,
                                      name=f"layer{i}", **attrs))
        value = f"h{i}"
        states.append((st, (packed, absmax, absmax2, offset), rows))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", x_type, ["m", k])],
                              [helper.make_tensor_value_info(value, x_type, ["m", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid(tp.PENDING, 1)])
    return model, states


@pytest.mark.parametrize("dq", [True, False], ids=["dq", "nodq"])
def test_fp16_activations_and_shared_tables(dq):
    n, k, block = 40, 128, 64
    model, states = _hand_made(TensorProto.FLOAT16, n, k, block, dq)
    assert tp.finalize(model) == 2
    tables = [t.name for t in model.graph.initializer if t.name in (tp.NF4_TABLE, tp.DYNAMIC_MAP)]
    assert sorted(tables) == sorted([tp.NF4_TABLE] + ([tp.DYNAMIC_MAP] if dq else []))  # once for both layers
    assert len(model.functions) == 1
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(1)).half()
    want = x
    for _, (packed, absmax, absmax2, offset), rows in states:
        want = nf4_linear(want, packed, absmax, absmax2, offset, None, rows, k, block, 256)
    got = run_ort(model, {"x": x.numpy()})
    assert got.dtype == np.float16
    # fp16 matmuls on both sides, two layers deep (summation order differs): within 3 fp16 ulps of the
    # output's scale (fp16 eps ~9.8e-4)
    assert rel_err(got, want.double().numpy()) < 3e-3


def test_int32_words_are_the_bytes_little_endian():
    data = np.arange(1, 8, dtype=np.uint8)  # 7 bytes: padded with one zero byte
    words = tp.int32_words(data)
    assert words.dtype == np.int32 and words.tobytes() == bytes(range(1, 8)) + b"\0"
    high = tp.int32_words(np.array([0xFF, 0xFF, 0xFF, 0xFF], np.uint8))
    assert high.tolist() == [-1]  # negative words: the reference body adds 2^32 before taking bytes


def test_k_not_a_multiple_of_16_is_refused():
    layer = Nf4Layer(8, 72, 64, False, False)  # the kernel's K tiles are 16 wide at least
    with pytest.raises(EffcError, match=r"^effc::nf4_linear at \S+ has no TensorRT plugin: in_features 72 is not a "
                       r"multiple of 16 .*; use --target onnx or ort$"):
        trt_onnx(layer, torch.randn(2, 3, 72))


def test_table_imports_without_torch():
    code = ("import sys, effc.targets.trt_plugins as tp; assert tp.PLUGINS; "
            "print(sorted(m for m in ('torch', 'triton', 'tensorrt') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr[-2000:]


# ------------------------------------------------------------------------------------------------------
# The plugin kernel: compiled without a GPU, and run in Triton's interpreter with TensorRT's convention
# ------------------------------------------------------------------------------------------------------

_COMPILE = """
import json, re, sys, torch
import effc.targets.triton_nf4 as nt
out = {}
for arch in (80, 90):
    for tactic in nt.PLUGIN_TACTICS:
        # fp16 with double quant where blocks straddle rows (K=352), fp32 without where they do not
        for dtype, dq, K in ((torch.float16, True, 352), (torch.float32, False, 192)):
            r = nt.plugin_kernel(arch, dtype, dq, tactic, N=40, K=K)
            entry = re.search(r"\\.entry\\s+(\\w+)\\(([^)]*)\\)", r["ptx"], re.S)
            out[f"{arch}-{tactic}-{str(dtype)[6:]}"] = dict(
                name=r["name"], entry=entry and entry.group(1), params=entry and entry.group(2).count(".param"),
                cubin=len(r["cubin"]), scratch=[r["global_scratch"], r["profile_scratch"]], block_m=r["block_m"],
                row_aligned=r["row_aligned"], block_k=r["block_k"],
                scalars=list(r["scalars"]), mma=sorted(set(re.findall(r"\\b(mma\\.sync|wgmma\\.mma_async)", r["ptx"]))))
print("RESULT " + json.dumps(out))
"""


def _child(code, env, timeout=400):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def test_plugin_kernel_compiles_for_sm80_and_sm90():
    pytest.importorskip("triton", reason="pip install triton (in the test and gpu extras)")
    from triton import knobs
    try:
        knobs.nvidia.ptxas.path
    except RuntimeError as e:
        pytest.skip(f"ptxas unavailable: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = _child(_COMPILE, env)
    assert len(out) == 8
    for key, r in out.items():
        arch, tactic, dtype = key.split("-")
        dq = dtype == "float16"
        assert r["entry"] == r["name"] == ("nf4_gemm_dq_plugin_kernel" if dq else "nf4_gemm_plugin_kernel"), key
        assert r["cubin"] > 0 and r["block_m"] == {"1": 16, "2": 64}[tactic] and r["scalars"] == ["M", "N", "K"]
        assert (r["row_aligned"], r["block_k"]) == ((False, 32) if dq else (True, 32)), (key, r)
        # TensorRT passes plugin inputs, the scalars, the output; Triton appends two scratch pointers, never
        # read when the scratch sizes are 0 (TensorRT's own Triton sample launches kernels built the same way)
        ours = len(tp.PLUGINS["nf4_gemm_dq" if dq else "nf4_gemm"].plugin_inputs) + 3 + 1
        assert r["params"] == ours + 2 and r["scratch"] == [0, 0], (key, r)
        if dq:  # fp16: tensor cores (wgmma for 64-row tiles on sm_90)
            assert r["mma"] == (["wgmma.mma_async"] if arch == "90" and tactic == "2" else ["mma.sync"]), (key, r)


_INTERPRET = """
import json, torch
import effc.formats.nf4 as ref
import effc.targets.triton_nf4 as nt
from effc.ops.nf4_linear import nf4_linear
from effc.targets.trt_plugins import int32_words
out = {}
for dq in (True, False):
    for dtype in (torch.float32, torch.float16):
        for tactic in nt.PLUGIN_TACTICS:
            for M, K in ((1, 192), (5, 192), (5, 352)):  # 352: blocks of 64 straddle rows
                N, block = 40, 64
                g = torch.Generator().manual_seed(M + tactic)
                w = torch.randn(N, K, generator=g) * torch.logspace(-2, 1, N).unsqueeze(1)
                st = ref.quantize_nf4(w, block=block, double_quant=dq)
                absmax = st["absmax_codes"] if dq else st["absmax"]
                x = torch.randn(M, K, generator=g).to(dtype)
                words = torch.from_numpy(int32_words(st["packed"].numpy()))
                codes = torch.from_numpy(int32_words(absmax.numpy())) if dq else absmax
                y = nt.plugin_launch(dq, x, words, codes, st.get("absmax2"), st.get("offset"), N, K, block, 256, tactic)
                want = nf4_linear(x, st["packed"], absmax, st.get("absmax2"), st.get("offset"), None, N, K, block, 256)
                d = (y.double() - want.double()).abs()
                out[f"{dq}-{str(dtype)[6:]}-{tactic}-{M}-{K}"] = dict(
                    shape=list(y.shape), dtype=str(y.dtype), max_abs=d.max().item(), scale=want.abs().max().item(),
                    rel=(d / (want.double().abs() + 1e-3)).max().item())
# x = I: y = W_hat^T with exact sums, so nibble order, block indexing across rows and the absmax decode
# are checked bit for bit
for dq in (True, False):
    st = ref.quantize_nf4(torch.randn(40, 352) * 3, block=64, double_quant=dq)
    absmax = st["absmax_codes"] if dq else st["absmax"]
    codes = torch.from_numpy(int32_words(absmax.numpy())) if dq else absmax
    y = nt.plugin_launch(dq, torch.eye(352), torch.from_numpy(int32_words(st["packed"].numpy())), codes,
                         st.get("absmax2"), st.get("offset"), 40, 352)
    out[f"exact-{dq}"] = torch.equal(y.T, ref.dequantize_nf4(st))
print("RESULT " + json.dumps(out))
"""


def test_plugin_convention_in_the_interpreter():
    pytest.importorskip("triton", reason="pip install triton (in the test and gpu extras)")
    out = _child(_INTERPRET, dict(os.environ, TRITON_INTERPRET="1"))
    assert out.pop("exact-True") is True and out.pop("exact-False") is True
    assert len(out) == 24
    for key, r in out.items():
        dtype = key.split("-")[1]
        assert r["shape"][1] == 40 and r["dtype"] == f"torch.{dtype}", key
        # same dequantized weights in x's dtype on both sides: summation order (fp32), and the final
        # fp16 rounding plus fp16 products (fp16: within a few ulps of the output scale)
        tol = 1e-5 if dtype == "float32" else 2e-3
        assert r["max_abs"] <= tol * r["scale"], (key, r)


def test_register_with_tensorrt():
    trtp = pytest.importorskip("tensorrt.plugin", reason="TensorRT is not installed here (pip install effc[gpu] "
                               "on a machine with an NVIDIA GPU)")
    tp.register_with_tensorrt()
    tp.register_with_tensorrt()  # idempotent
    for p in tp.PLUGINS.values():
        assert hasattr(getattr(trtp.op, p.namespace), p.name)


def test_compile_nf4_for_trt(hf_dir, tmp_path):
    """The real path: effc.compile(..., passes=["nf4"], target="trt"); verification runs the artifact in ONNX
    Runtime (the plugins through their reference functions) against the post-pass graph."""
    import effc
    from effc.targets import trt_support

    report = effc.compile(str(hf_dir("llama")), tmp_path / "trt", passes=["nf4"], target="trt", atol=1e-4, rtol=0)
    assert report.verification["passed"] and report.verification["max_abs"] < 1e-5
    target = json.loads((tmp_path / "trt" / "manifest.json").read_text())["target"]
    model = onnx.load(str(tmp_path / "trt" / "model.onnx"))
    plugins = [n for n in model.graph.node if n.domain == tp.DOMAIN]
    assert plugins and all(tp.plugin_of(n) is tp.PLUGINS["nf4_gemm_dq"] for n in plugins)
    assert target["plugins"] == {"nf4_gemm_dq": len(plugins)}
    assert {n.domain for n in model.graph.node} == {"", tp.DOMAIN} and trt_support.problems(model) == []
    assert [f.name for f in model.functions] == ["nf4_gemm_dq"]


def test_registration_signatures_follow_the_table():
    """Without TensorRT: the tensorrt.plugin functions of each row, recorded by a stand-in module, have the
    signatures tensorrt.plugin validates (TensorRT python/packaging/.../plugin/_validate.py: register = the
    input tensors then the attributes, annotated; aot_impl = inputs, attributes, outputs, tactic) and match the
    row's plugin inputs and attributes."""
    import inspect
    import types

    seen = {}

    def recorder(kind):
        return lambda qualified: (lambda fn: seen.setdefault((qualified, kind), fn))

    class TensorDesc:
        pass

    fake = types.SimpleNamespace(register=recorder("register"), autotune=recorder("autotune"),
                                 aot_impl=recorder("aot_impl"), TensorDesc=TensorDesc,
                                 KernelLaunchParams=type("KernelLaunchParams", (), {}),
                                 SymIntExprs=type("SymIntExprs", (), {}))
    for p in tp.PLUGINS.values():
        p.register(fake, p)
        desc = inspect.signature(seen[(p.qualified, "register")])
        assert list(desc.parameters) == list(p.plugin_inputs) + list(p.attributes), p.name
        assert [a.annotation for a in desc.parameters.values()] == [TensorDesc] * len(p.plugin_inputs) + \
            [int] * len(p.attributes)
        assert list(inspect.signature(seen[(p.qualified, "autotune")]).parameters) == list(p.plugin_inputs) + ["outputs"]
        aot = inspect.signature(seen[(p.qualified, "aot_impl")])
        assert list(aot.parameters) == list(p.plugin_inputs) + list(p.attributes) + ["outputs", "tactic"]
        assert aot.return_annotation.__args__[2:] == (fake.KernelLaunchParams, fake.SymIntExprs)
