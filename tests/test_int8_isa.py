"""int8 on every x86 CPU: ONNX Runtime's int8 kernels against numpy on this CPU, with weights at full
magnitude; the same on an emulated AVX2-only CPU (qemu-user, when installed); the int16 pair
saturation that effc's default weight range avoids; and the refusal of a full-range artifact on a CPU
without VNNI.

ONNX Runtime picks its kernels from CPUID at run time: with VNNI (vpdpbusd) u8 x s8 products are added
in int32; without (AVX2, AVX-512 without VNNI) vpmaddubsw adds K-adjacent pairs in int16 first and
saturates when |w[2i] + w[2i+1]| > 128 at activations up to 255.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import effc
import effc.formats.int8
from effc.errors import EffcError
from effc.runtime import cpu
from tests.passes.test_int8 import numpy_weight_codes

VNNI = bool(cpu.flags() & {"avx512_vnni", "avx_vnni"})
QEMU = shutil.which("qemu-x86_64")
M, K, N = 16, 768, 256

# One layer per effc int8 lowering as ONNX Runtime sees it, built from numpy arrays only (so the same
# script runs in an emulated process that does not import torch). Activations have a large positive
# feature; weight column 0 is at full magnitude everywhere, so each of its pairs sums to +-2*127 at full range.
ONE_OP = textwrap.dedent('''
    import numpy as np, onnxruntime as ort
    from onnx import TensorProto as T, helper as h, numpy_helper as nh

    def layers(x, q, ws):
        """name -> ONNX model of one int8 layer y = x @ dequant(q) (q: int8 [K, N], ws: scale [N])."""
        xs = np.float32(np.abs(x).max() / 127)
        inits = [nh.from_array(q, "w"), nh.from_array(ws, "ws"), nh.from_array(np.array(xs, np.float32), "xs"),
                 nh.from_array(np.array(128, np.uint8), "z8"), nh.from_array(np.array(0, np.int8), "z0")]
        dq_w = h.make_node("DequantizeLinear", ["w", "ws"], ["wd"], axis=1)
        graphs = {
            "DynamicQuantizeMatMul (ort dynamic)": [
                h.make_node("DynamicQuantizeMatMul", ["x", "w", "ws"], ["y"], domain="com.microsoft")],
            "MatMulIntegerToFloat u8 zp 128 (ort static, per-token)": [
                h.make_node("QuantizeLinear", ["x", "xs", "z8"], ["q"]),
                h.make_node("MatMulIntegerToFloat", ["q", "w", "xs", "ws", "z8"], ["y"], domain="com.microsoft")],
            "DynamicQuantizeLinear QDQ (onnx dynamic)": [
                h.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
                h.make_node("DequantizeLinear", ["q", "s", "z"], ["xd"]), dq_w, h.make_node("MatMul", ["xd", "wd"], ["y"])],
            "int8 QDQ zp 0 (onnx static)": [
                h.make_node("QuantizeLinear", ["x", "xs", "z0"], ["q"]),
                h.make_node("DequantizeLinear", ["q", "xs", "z0"], ["xd"]), dq_w, h.make_node("MatMul", ["xd", "wd"], ["y"])],
        }
        out = {}
        for name, nodes in graphs.items():
            used = {i for n in nodes for i in n.input}
            g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, list(x.shape))],
                             [h.make_tensor_value_info("y", T.FLOAT, None)], [t for t in inits if t.name in used])
            m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
            m.ir_version = 10
            out[name] = (m, xs)
        return out

    def run(model, x):
        o = ort.SessionOptions()
        o.intra_op_num_threads = 1
        return ort.InferenceSession(model.SerializeToString(), o, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    def nbits_layers():
        """MatMulNBits at accuracy_level 4 (int8 activations per block: effc's int4, and nf4's int8_blocks
        at 8 bits) with every code at the top of its range in column 0."""
        rng = np.random.default_rng(3)
        out = {}
        for bits in (4, 8):
            codes = rng.integers(0, 2 ** bits, (256, 768 // 32, 32)).astype(np.uint8)
            codes[0] = 2 ** bits - 1
            packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8) if bits == 4 else codes
            scales = ((rng.random(256 * 24) + 0.5) / 10).astype(np.float32)
            g = h.make_graph([h.make_node("MatMulNBits", ["x", "b", "sc"], ["y"], domain="com.microsoft", K=768, N=256,
                                          bits=bits, block_size=32, accuracy_level=4)], "g",
                             [h.make_tensor_value_info("x", T.FLOAT, [16, 768])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                             [nh.from_array(packed, "b"), nh.from_array(scales, "sc")])
            m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
            m.ir_version = 10
            out[f"nbits{bits}"] = m
        return out

    def inputs(seed=0):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((16, 768)).astype(np.float32)
        x[:, 5] = 40
        w = (rng.standard_normal((256, 768)) * 0.02).astype(np.float32)
        w[0] = 0.05  # a row at full magnitude: every K-adjacent pair of its codes sums to 254 at full range
        return x, w
''')
exec(ONE_OP)  # defines layers, run, inputs here too


def reference(x, q, ws, xs, name):
    """numpy: the layer's activation quantization, exact integer products, both scales."""
    if "Dynamic" in name:
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        s = np.float32((hi - lo) / 255)
        zp = np.clip(np.round(-lo / s), 0, 255)
        xq = np.clip(np.round(x / s) + zp, 0, 255) - zp
    else:
        s = xs
        xq = np.clip(np.round(x / s), -128, 127)
    return (xq.astype(np.int64) @ q.astype(np.int64)) * (np.float64(s) * ws.astype(np.float64)), np.float64(s)


def worst_steps(x, q, ws) -> dict[str, float]:
    """Per lowering: max |ORT - numpy| in units of one product step (activation scale x weight scale)."""
    out = {}
    for name, (model, xs) in layers(x, q, ws).items():
        want, s = reference(x, q, ws, xs, name)
        out[name] = float((np.abs(run(model, x) - want) / (s * ws.astype(np.float64))).max())
    return out


@pytest.mark.parametrize("weight_range", ["pairs", "7bit"])
def test_ort_int8_kernels_match_numpy_on_this_cpu(weight_range):
    """effc's default weight codes, with a row at full magnitude: every lowering within one step of numpy
    on whatever CPU this is (AVX2 or AVX-512/VNNI)."""
    x, w = inputs()
    q, ws = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w), weight_range)
    q, ws = q.numpy(), ws.numpy()
    if weight_range == "7bit":
        assert np.abs(q[:, 0]).min() == 63  # the full-magnitude row at the top of the range
    else:  # codes reach 127, and row 0's pairs sum to 128: the most an int16 pair sum holds at 255
        codes, _ = numpy_weight_codes(w)
        assert np.array_equal(q.T, codes) and np.abs(q).max() == 127
        assert (q[0::2, 0].astype(int) + q[1::2, 0]).max() == 128
    for name, steps in worst_steps(x, q, ws).items():
        assert steps <= 1.0, f"{name}: {steps:.3g} steps from numpy"


def test_full_range_weights_cost_pairs_little():
    """What the default costs: pairs keeps weight SQNR within 3 dB of the unconstrained full range, and
    at least 3 dB above 7-bit weights (ONNX Runtime's reduce_range), on Gaussian weights [255, 768]."""
    _, w = inputs(1)
    w = torch.from_numpy(w[1:])

    def sqnr(weight_range):
        q, s = effc.formats.int8.quantize_weight_per_channel(w, weight_range)
        err = q.t().double() * s[:, None].double() - w.double()
        return float(10 * torch.log10((w.double() ** 2).sum() / (err ** 2).sum()))

    full, pairs, seven = sqnr("full"), sqnr("pairs"), sqnr("7bit")
    assert full - 3 < pairs < full and pairs > seven + 3


def test_full_range_is_exact_with_vnni():
    if not VNNI:
        pytest.skip("this CPU has no VNNI: full-range int8 saturates here (test_full_range_saturates_without_vnni)")
    x, w = inputs()
    q, ws = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w), "full")
    for name, steps in worst_steps(x, q.numpy(), ws.numpy()).items():
        assert steps <= 1.0, name


def test_full_range_saturates_without_vnni():
    """The failure the default avoids, on this CPU when it lacks VNNI."""
    if not cpu.is_x86() or VNNI:
        pytest.skip("needs an x86 CPU without VNNI (this one computes full-range int8 exactly); "
                    "test_emulated_avx2_cpu shows it under qemu")
    x, w = inputs()
    q, ws = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w), "full")
    assert max(worst_steps(x, q.numpy(), ws.numpy()).values()) > 100


EMULATED = ONE_OP + textwrap.dedent('''
    import sys
    from numpy._core._multiarray_umath import __cpu_features__ as f
    assert f["AVX2"] and not f["AVX512F"] and not f["AVX512VNNI"], "the emulated CPU is not AVX2-only"
    x, w = inputs()
    codes = np.load(sys.argv[1])
    for weight_range in ("full", "pairs", "7bit"):
        q, ws = codes[weight_range + "_q"], codes[weight_range + "_s"]
        for name, (model, xs) in layers(x, q, ws).items():
            np.save(sys.argv[2] + "/" + weight_range + "__" + name.split()[0] + "_" + str(len(name)) + ".npy", run(model, x))
    for name, model in nbits_layers().items():
        np.save(sys.argv[2] + "/" + name + ".npy", run(model, x))
''')


@pytest.mark.skipif(not QEMU, reason="qemu-user is not installed (apt-get install qemu-user): it emulates an "
                                      "AVX2-only CPU, the kind without VNNI")
@pytest.mark.skipif(not cpu.is_x86(), reason="emulates an x86 CPU with qemu-x86_64")
def test_emulated_avx2_cpu(tmp_path):
    """The same layers in a process on an emulated Haswell (AVX2, no AVX-512, no VNNI): ONNX Runtime
    dispatches to its vpmaddubsw kernels there. Unconstrained full-range weights are far off (the
    saturation the issue reports), effc's pairs and 7bit codes are within one step of numpy, and
    MatMulNBits with int8 activations (int4, nf4 int8_blocks) gives what it gives on this CPU."""
    x, w = inputs()
    codes = {}
    for weight_range in ("full", "pairs", "7bit"):
        q, s = effc.formats.int8.quantize_weight_per_channel(torch.from_numpy(w), weight_range)
        codes[weight_range + "_q"], codes[weight_range + "_s"] = q.numpy(), s.numpy()
    np.savez(tmp_path / "codes.npz", **codes)
    (tmp_path / "emulated.py").write_text(EMULATED)
    (tmp_path / "out").mkdir()
    r = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(tmp_path / "emulated.py"),
                        str(tmp_path / "codes.npz"), str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for weight_range in ("full", "pairs", "7bit"):
        q, ws = codes[weight_range + "_q"], codes[weight_range + "_s"]
        for name, (_, xs) in layers(x, q, ws).items():
            got = np.load(tmp_path / "out" / f"{weight_range}__{name.split()[0]}_{len(name)}.npy")
            want, s = reference(x, q, ws, xs, name)
            steps = float((np.abs(got - want) / (s * ws.astype(np.float64))).max())
            if weight_range == "full":
                assert steps > 100, f"{name}: full range did not saturate on the emulated AVX2 CPU"
            else:
                assert steps <= 1.0, f"{weight_range} {name}: {steps:.3g} steps from numpy on AVX2"
    # MatMulNBits' int8-activation kernels: the same numbers as on this CPU (whose results the int4/nf4
    # tests check against effc's reference ops), up to float summation order
    for name, model in nbits_layers().items():
        here = run(model, x)
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{name}.npy"), here, rtol=0, atol=1e-5 * np.abs(here).max())


@pytest.fixture(scope="module")
def full_range_artifact(tmp_path_factory, default_model):
    """A full-range artifact; not verified, since a CPU without VNNI could not run it (and refuses to)."""
    out = tmp_path_factory.mktemp("full") / "a"
    effc.compile(str(default_model[0]), out, passes=["int8"], pass_config=["int8.weight_range=full"], target="ort",
                 verify=VNNI)
    return out


def test_full_range_artifact_records_vnni(full_range_artifact, tmp_path, default_model):
    from effc.runtime.manifest import read_manifest

    assert read_manifest(full_range_artifact)["requires"] == {"cpu": ["vnni"]}
    default = effc.compile(str(default_model[0]), tmp_path / "d", passes=["int8"], target="ort")
    assert "requires" not in read_manifest(tmp_path / "d") and default.verification["outputs"]


def test_full_range_artifact_refused_without_vnni(full_range_artifact, monkeypatch, tmp_path):
    """A planted full-range artifact on a CPU whose probe reports AVX2 only: one line naming VNNI and
    the recompile; the same probe with VNNI opens it."""
    import effc.runtime
    from click.testing import CliRunner

    from effc.cli import main

    monkeypatch.setattr(cpu, "is_x86", lambda: True)
    monkeypatch.setattr(cpu, "flags", lambda: {"avx2", "fma3"})
    with pytest.raises(EffcError, match=r"needs a CPU with VNNI .*recompile without int8.weight_range=full"):
        effc.runtime.open(full_range_artifact)
    np.savez(tmp_path / "in.npz", input_ids=np.zeros((1, 8), np.int64), attention_mask=np.ones((1, 8), np.int64))
    r = CliRunner().invoke(main, ["run", str(full_range_artifact), "--inputs", str(tmp_path / "in.npz")])
    assert r.exit_code == 2 and "needs a CPU with VNNI" in r.output and "Traceback" not in r.output
    monkeypatch.setattr(cpu, "flags", lambda: {"avx2", "avx_vnni"})
    effc.runtime.open(full_range_artifact).close()


def test_cpu_flags_come_from_cpuid():
    """The probe agrees with numpy's CPUID reading on AVX2 / AVX-512F (under an emulator /proc/cpuinfo
    describes the host, not the CPU the process sees)."""
    from numpy._core._multiarray_umath import __cpu_features__ as f

    have = cpu.flags()
    for flag, numpy_name in (("avx2", "AVX2"), ("avx512f", "AVX512F"), ("avx512_vnni", "AVX512VNNI")):
        assert (flag in have) == f.get(numpy_name, False), flag


RUN_ARTIFACTS = textwrap.dedent('''
    import sys, numpy as np, effc.runtime
    from effc.errors import EffcError
    feeds = dict(np.load(sys.argv[1]))
    for path in sys.argv[3:]:
        try:
            with effc.runtime.open(path, threads=1) as s:
                np.save(sys.argv[2] + "/" + path.rsplit("/", 1)[1] + ".npy", s.run(feeds)["logits"])
        except EffcError as e:
            print("refused", path.rsplit("/", 1)[1], e)
''')


@pytest.mark.skipif(not QEMU, reason="qemu-user is not installed (apt-get install qemu-user): it emulates an "
                                      "AVX2-only CPU, the kind without VNNI")
@pytest.mark.skipif(not cpu.is_x86(), reason="emulates an x86 CPU with qemu-x86_64")
def test_artifacts_on_emulated_avx2_cpu(full_range_artifact, default_model, tmp_path):
    """Whole int8 artifacts of the default Llama compiled here, run by effc.runtime on an emulated AVX2
    CPU: dynamic (ort) and static (onnx) give this CPU's logits, and the full-range artifact is refused
    by the real CPUID probe (no monkeypatching)."""
    data = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(data, input_ids=rng.integers(0, 512, (8, 32)), attention_mask=np.ones((8, 32), np.int64))
    effc.compile(str(default_model[0]), tmp_path / "dynamic", passes=["int8"], target="ort")
    effc.compile(str(default_model[0]), tmp_path / "static", passes=["int8"], pass_config=["int8.mode=static"],
                 calib_data=str(data), target="onnx")
    feeds = {"input_ids": rng.integers(0, 512, (2, 24)), "attention_mask": np.ones((2, 24), np.int64)}
    np.savez(tmp_path / "feeds.npz", **feeds)
    (tmp_path / "run.py").write_text(RUN_ARTIFACTS)
    (tmp_path / "out").mkdir()
    r = subprocess.run([QEMU, "-cpu", "Haswell", sys.executable, str(tmp_path / "run.py"), str(tmp_path / "feeds.npz"),
                        str(tmp_path / "out"), str(tmp_path / "dynamic"), str(tmp_path / "static"),
                        str(full_range_artifact)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"refused {full_range_artifact.name}" in r.stdout and "needs a CPU with VNNI" in r.stdout
    for name in ("dynamic", "static"):
        with effc.runtime.open(tmp_path / name) as s:
            here = s.run(feeds)["logits"]
        np.testing.assert_allclose(np.load(tmp_path / "out" / f"{name}.npy"), here, rtol=0, atol=1e-5)
