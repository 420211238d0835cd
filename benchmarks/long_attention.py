"""Long-sequence attention through a causal window of 256 (the key itself included), 12 heads x 64, fp32,
batch 1, 2 threads, prefill over S = 1k, 4k, 16k, 32k, every candidate computing the same band:

  gqa-dense      ONNX Runtime com.microsoft::GroupQueryAttention, causal over everything (no window)
  gqa-window     the same with local_window_size=256
  sdpa-band      torch scaled_dot_product_attention with the [S, S] band as a bool mask
  flex           torch FlexAttention (torch.compile) with a sliding-window block mask
  effc-onnx      effc::window_attention's onnx/ort lowering (targets/window_attention_onnx.py) in ONNX Runtime
  effc-kernel    effc_native::window_attention (compiler/csrc/window_attention.cpp), effc's torch target kernel

Each (candidate, S) runs in its own subprocess: peak RSS is its own (VmHWM, inputs and load included).
Times are the median of the repetitions after two warm-up runs; the ratios are against gqa-dense and effc-onnx of
the same run. The compute bound is 2*2*S*w*heads*head_dim FLOPs (the band's two matmuls) at the sgemm
rate torch measures here (1024^3, 2 threads). ONNX Runtime runs without spinning, PyTorch with
OMP_WAIT_POLICY=PASSIVE. Writes docs/long_attention.png (time vs S, log-log).

    .venv/bin/python benchmarks/long_attention.py [--lengths 1024,4096,16384,32768] [--candidates ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
THREADS, WINDOW, HEADS, HEAD = 2, 256, 12, 64
CANDIDATES = ("gqa-dense", "gqa-window", "sdpa-band", "flex", "effc-onnx", "effc-kernel")
# Candidates that cannot run at a length here (O(S^2) memory past what 24 GB holds, or minutes per call).
TOO_BIG = {"sdpa-band": 32768, "flex": 32768}
# keyed by the lowering's source, so a changed lowering is re-exported
EFFC_ONNX = (Path.home() / ".cache" / "effc" / "bench-long-attention" /
             f"window_attention-{hashlib.sha256((ROOT / 'targets' / 'window_attention_onnx.py').read_bytes()).hexdigest()[:12]}.onnx")


def _inputs(s: int):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, HEADS, s, HEAD), dtype=np.float32)
    k = rng.standard_normal((1, HEADS, s, HEAD), dtype=np.float32)
    v = rng.standard_normal((1, HEADS, s, HEAD), dtype=np.float32)
    return q, k, v


def _ort_session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _gqa(window: int | None):
    from onnx import TensorProto, helper

    attrs = dict(num_heads=HEADS, kv_num_heads=HEADS, scale=HEAD ** -0.5)
    if window:
        attrs["local_window_size"] = window
    hidden = HEADS * HEAD
    node = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens_k", "total"], ["out", "pk", "pv"],
                            domain="com.microsoft", **attrs)
    graph = helper.make_graph(
        [node], "gqa",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "s", hidden]) for n in "qkv"]
        + [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
           helper.make_tensor_value_info("total", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "s", hidden])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    session = _ort_session(model)

    def prepare(q, k, v):
        s = q.shape[2]
        flat = [x.transpose(0, 2, 1, 3).reshape(1, s, HEADS * HEAD).copy() for x in (q, k, v)]
        return {"q": flat[0], "k": flat[1], "v": flat[2], "seqlens_k": np.array([s - 1], np.int32),
                "total": np.array(s, np.int32)}

    return lambda feeds: session.run(["out"], feeds), prepare


def build_effc_onnx(path: Path) -> Path:
    """The op exported with its onnx lowering, dynamic S, saved once (the workers load only ONNX Runtime)."""
    if path.is_file():
        return path
    import onnx
    import torch

    import effc.ops  # noqa: F401
    from effc.ops.registry import translations
    from effc.targets import onnx_export

    class Band(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.effc.window_attention(q, k, v, None, WINDOW, True, 1, [], 0, None, HEAD ** -0.5)

    q, k, v = (torch.from_numpy(x) for x in _inputs(512))
    s = torch.export.Dim("s", min=2, max=1 << 17)
    ep = torch.export.export(Band(), (q, k, v), dynamic_shapes=({2: s}, {2: s}, {2: s}))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(onnx_export.export(ep, {"q": q, "k": k, "v": v}, ["out"], {}, translations("onnx")), str(path))
    return path


def _effc_onnx():
    import onnx

    model = onnx.load(str(EFFC_ONNX))
    session = _ort_session(model)
    names = [i.name for i in model.graph.input]
    return lambda feeds: session.run(None, feeds), lambda q, k, v: dict(zip(names, (q, k, v)))


def _torch_candidate(name: str, s: int):
    import torch

    torch.set_num_threads(THREADS)
    if name == "effc-kernel":
        from effc import native

        native.load()
        op = torch.ops.effc_native.window_attention
        return (lambda t: op(*t, None, WINDOW, True, 1, [], 0, None, HEAD ** -0.5)), None
    if name == "sdpa-band":
        i = torch.arange(s)
        band = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < WINDOW)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return (lambda t: sdpa(*t, attn_mask=band)), None
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def window(b, h, qi, kj):
        return (qi >= kj) & (qi - kj < WINDOW)

    mask = create_block_mask(window, None, None, s, s, device="cpu")
    flex = torch.compile(flex_attention, dynamic=False)
    return (lambda t: flex(*t, block_mask=mask)), None


def worker(name: str, s: int, reps: int) -> dict:
    q, k, v = _inputs(s)
    if name.startswith("gqa"):
        run, prepare = _gqa(WINDOW if name == "gqa-window" else None)
        args = prepare(q, k, v)
    elif name == "effc-onnx":
        run, prepare = _effc_onnx()
        args = prepare(q, k, v)
    else:
        import torch

        run, _ = _torch_candidate(name, s)
        args = tuple(torch.from_numpy(x) for x in (q, k, v))
        base = run
        run = lambda a: base(a)  # noqa: E731
    for _ in range(2):  # warm-up: FlexAttention compiles in the first; ONNX Runtime's arena grows through the second
        run(args)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run(args)
        times.append(time.perf_counter() - t0)
    from benchmarks.generate import peak_rss_mib

    return {"ms": 1e3 * statistics.median(times), "rss_mib": peak_rss_mib()}


def check_agreement(s: int = 2048) -> float:
    """max |effc kernel - effc onnx| on one input, against a dense masked reference: the candidates compute
    the same thing (GQA's local_window_size semantics are REFERENCE.md's: W keys including self)."""
    import torch

    import effc.ops  # noqa: F401
    from effc import native

    native.load()
    q, k, v = (torch.from_numpy(x) for x in _inputs(s))
    ref = torch.ops.effc.window_attention(q, k, v, None, WINDOW, True, 1, [], 0, None, HEAD ** -0.5)
    kernel = torch.ops.effc_native.window_attention(q, k, v, None, WINDOW, True, 1, [], 0, None, HEAD ** -0.5)
    run, prepare = _effc_onnx()
    onnx_out = run(prepare(q.numpy(), k.numpy(), v.numpy()))[0]
    return max(float((kernel - ref).abs().max()), float(np.abs(onnx_out - ref.numpy()).max()))


def sgemm_rate() -> float:
    import torch

    torch.set_num_threads(THREADS)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(10))
    return 2 * 1024 ** 3 / best


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def measure(name: str, s: int, reps: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--worker", name, "--lengths", str(s), "--reps", str(reps)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(results: dict, lengths: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, by_len in results.items():
        xs = [s for s in lengths if "ms" in by_len.get(s, {})]
        ax.plot(xs, [by_len[s]["ms"] for s in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length S (tokens)")
    ax.set_ylabel("prefill attention time (ms)")
    ax.set_title(f"causal window {WINDOW}, {HEADS} heads x {HEAD}, fp32, {THREADS} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096,16384,32768")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--worker")
    ap.add_argument("--plot", default=str(ROOT / "docs" / "long_attention.png"))
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, lengths[0], args.reps)))
        return
    build_effc_onnx(EFFC_ONNX)
    print(f"load average {os.getloadavg()}; max |Δ| effc kernel / effc onnx vs reference at 2k: "
          f"{check_agreement():.2e}")
    rate = sgemm_rate()
    print(f"sgemm {rate / 1e9:.1f} GFLOP/s (1024^3, {THREADS} threads)")
    candidates = args.candidates.split(",")
    results: dict[str, dict[int, dict]] = {c: {} for c in candidates}
    for s in lengths:
        reps = args.reps if s <= 4096 else max(3, args.reps // 2)
        for c in candidates:
            if s >= TOO_BIG.get(c, 1 << 30):
                results[c][s] = {"skipped": "O(S^2) memory / minutes per call here"}
                continue
            results[c][s] = measure(c, s, reps)
            print(f"S={s:>6} {c:<12} {results[c][s]}", flush=True)
    print("\n| S | " + " | ".join(candidates) + " | compute bound | kernel % of bound |")
    print("|---|" + "---|" * (len(candidates) + 2))
    for s in lengths:
        bound = 1e3 * 2 * 2 * s * WINDOW * HEADS * HEAD / rate
        cells = []
        for c in candidates:
            r = results[c][s]
            cells.append(f"{r['ms']:.1f} ms ({r['rss_mib']:.0f} MiB)" if "ms" in r else r.get("error", r.get("skipped")))
        kernel = results.get("effc-kernel", {}).get(s, {}).get("ms")
        print(f"| {s} | " + " | ".join(cells) + f" | {bound:.1f} ms | {100 * bound / kernel:.0f}% |" if kernel
              else f"| {s} | " + " | ".join(cells) + f" | {bound:.1f} ms | - |")
    for s in lengths:
        kernel = results.get("effc-kernel", {}).get(s, {}).get("ms")
        if not kernel:
            continue
        ratios = {c: results[c][s]["ms"] / kernel for c in candidates if "ms" in results[c][s] and c != "effc-kernel"}
        print(f"S={s}: effc kernel is " + ", ".join(f"{r:.1f}x faster than {c}" for c, r in ratios.items()))
    plot(results, lengths, Path(args.plot))
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
