"""4-bit weights on decode-shaped work, ONNX Runtime CPU, 2 threads, all ratios from one run:

1. One linear layer, M=1 (decode) and M=128 (prefill), K=N=4096 and K=768,N=3072: fp32 MatMul against
   effc's int4 lowering (MatMulNBits, float activations), its accuracy_level 4 variant (int8
   activations), NF4 on MatMulBnb4 (the exact NF4 kernel ONNX Runtime has) and effc's own exact NF4
   kernel (effc_native::nf4_linear, called from PyTorch), with PyTorch's fp32 matmul beside it.
2. A whole random-weight Llama (8 layers, hidden 1024) run on one token (batch 1 x 1, no KV cache: the
   decode-shaped forward): fp32 vs int4 (float or int8 activations) and nf4 `ort` artifacts, and fp32
   vs nf4 `torch` artifacts (AOTInductor + effc's kernel).

    .venv/bin/python benchmarks/quant4_decode.py [--iters 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
from effc import native  # noqa: E402
from effc.formats.nbits import pack, rtn  # noqa: E402
from effc.formats.nf4 import dequantize_absmax, quantize_nf4  # noqa: E402
from effc.runtime import open as open_artifact  # noqa: E402


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def one_node(node, inits, k: int) -> onnx.ModelProto:
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, n) for n, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])


def layer_candidates(k: int, n: int) -> dict[str, onnx.ModelProto]:
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    codes, scales, zeros = rtn(w, 32, True)
    packed, _ = pack(codes, zeros, 32, True)
    state = quantize_nf4(w)
    out = {"fp32 MatMul": one_node(helper.make_node("MatMul", ["x", "w"], ["y"]), {"w": w.t().contiguous().numpy()}, k)}
    for level in (0, 4):
        out[f"int4 MatMulNBits block 32, accuracy_level {level}"] = one_node(helper.make_node(
            "MatMulNBits", ["x", "b", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=32,
            accuracy_level=level), {"b": packed.numpy(), "s": scales.reshape(-1).numpy()}, k)
    out["nf4 MatMulBnb4 block 64 (exact)"] = one_node(helper.make_node(
        "MatMulBnb4", ["x", "b", "a"], ["y"], domain="com.microsoft", K=k, N=n, block_size=64, quant_type=1),
        {"b": state["packed"].reshape(-1).numpy(), "a": dequantize_absmax(state).numpy()}, k)
    return out


def torch_candidates(k: int, n: int) -> dict:
    """Callables on {"x": array}: PyTorch's fp32 x @ W^T and effc's native NF4 kernel on the same W."""
    native.load()
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.02
    wt = w.t().contiguous()
    s = quantize_nf4(w)
    args = (s["packed"], s["absmax_codes"], s["absmax2"], s["offset"].reshape(1), None, n, k, 64, 256)
    op = torch.ops.effc_native.nf4_linear
    return {"fp32 torch.mm (PyTorch)": lambda f: torch.mm(torch.from_numpy(f["x"]), wt),
            "nf4 effc_native::nf4_linear block 64 (exact)": lambda f: op(torch.from_numpy(f["x"]), *args)}


def timed(runs: dict, feeds_for, iters: int) -> dict[str, float]:
    for name, run in runs.items():
        for _ in range(5):
            run(feeds_for(name))
    times = {name: [] for name in runs}
    for _ in range(iters):  # alternate candidates so drift hits all alike
        for name, run in runs.items():
            feeds = feeds_for(name)
            t = time.perf_counter()
            run(feeds)
            times[name].append(time.perf_counter() - t)
    return {name: float(np.median(v)) * 1e3 for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()
    torch.set_num_threads(2)  # as ONNX Runtime's sessions
    print("## One linear layer (median ms, ratio to fp32 in the same run)\n")
    print("| variant | " + " | ".join(f"M={m}, {k}x{n}" for k, n in ((4096, 4096), (768, 3072)) for m in (1, 128)) + " |")
    print("|---|---|---|---|---|")
    rows: dict[str, list[str]] = {}
    for k, n in ((4096, 4096), (768, 3072)):
        runs = {name: (lambda feeds, s=session(m): s.run(None, feeds)) for name, m in layer_candidates(k, n).items()}
        runs.update(torch_candidates(k, n))
        for m in (1, 128):
            x = np.random.default_rng(0).standard_normal((m, k)).astype(np.float32)
            res = timed(runs, lambda _name: {"x": x}, a.iters if m == 1 else max(20, a.iters // 10))
            for name, ms in res.items():
                rows.setdefault(name, []).append(f"{ms:.3f} ({ms / res['fp32 MatMul']:.2f})")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")

    print("\n## Random-weight Llama, 8 layers, hidden 1024, one token (batch 1 x 1)\n")
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816,
                                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                                          architectures=["LlamaForCausalLM"])
        transformers.LlamaForCausalLM(config).save_pretrained(tmp / "llama")
        # name -> (target, passes, pass config); each is compared with its own target's fp32 artifact
        variants = {"ort fp32": ("ort", [], []), "ort int4 (rtn, block 32)": ("ort", ["int4"], []),
                    "ort int4 (rtn, block 32, int8 activations)": ("ort", ["int4"], ["int4.int8_activations=true"]),
                    "ort nf4 (MatMulBnb4)": ("ort", ["nf4"], []),
                    "ort nf4 re-expressed as 8-bit blocks (MatMulNBits)": ("ort", ["nf4"], ["nf4.kernel=int8_blocks"]),
                    "torch fp32 (AOTInductor)": ("torch", [], []),
                    "torch nf4 (AOTInductor + effc_native::nf4_linear, exact)": ("torch", ["nf4"], [])}
        for i, (name, (target, passes, config)) in enumerate(variants.items()):
            print(f"compiling {name}...", file=sys.stderr, flush=True)
            effc.compile(str(tmp / "llama"), tmp / f"v{i}", passes=passes, pass_config=config, target=target)
        runners = {name: open_artifact(tmp / f"v{i}", threads=2) for i, name in enumerate(variants)}
        feeds = {"input_ids": np.array([[42]], np.int64), "attention_mask": np.ones((1, 1), np.int64)}
        res = timed({name: r.run for name, r in runners.items()}, lambda _name: feeds, max(20, a.iters // 4))
        sizes = {name: sum(f.stat().st_size for f in (tmp / f"v{i}").rglob("*")) for i, name in enumerate(variants)}
        print("| artifact | p50 ms | latency / its target's fp32 | latency / ort fp32 | size MB | size / fp32 |\n"
              "|---|---|---|---|---|---|")
        for name, ms in res.items():
            fp32 = f"{variants[name][0]} fp32" + (" (AOTInductor)" if variants[name][0] == "torch" else "")
            print(f"| {name} | {ms:.2f} | {ms / res[fp32]:.3f} | {ms / res['ort fp32']:.3f} | {sizes[name] / 1e6:.1f} | "
                  f"{sizes[name] / sizes[fp32]:.3f} |")


if __name__ == "__main__":
    main()
