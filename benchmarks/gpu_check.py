"""The GPU check (benchmarks/gpu_check.sh runs it): for a machine with an NVIDIA GPU, CUDA, PyTorch and
Triton, no network. It imports neither TensorRT nor onnxruntime (neither is on such machines here).

1. effc's NF4 Triton kernel (targets/triton_nf4.py nf4_linear_triton) against torch's fp16 and bf16
   matmul with a dense half weight (x @ W^T), at decode (M = 1, 8) and prefill (M = 512, 2048) rows, for
   the linears of a 7B Llama (4096x4096, 11008x4096, 4096x11008 as N x K): median time over --iters runs
   (CUDA events), the NF4/dense ratio, TFLOP/s and GB/s (bytes the kernel must read and write: weights,
   scales, x, y), and the max error against the reference (the dequantized weight in x's dtype, an fp32
   matmul, rounded once to x's dtype: the same MMA inputs the kernel feeds).
2. The fp16 pass (effc.passes.half, through the pass registry) on a random-weight HF Llama built from a
   config (hidden 2048, 8 layers, vocab 32000; no download), captured as `effc compile` captures it: the
   pass's ExportedProgram against the float32 one, both moved to the GPU and run by torch: latency at
   batch 1 x 128 and batch 8 x 512, speed-up, and the logits' SQNR, cosine, max |diff| and top-1
   agreement against float32 (runtime/compare.py).

    bash benchmarks/gpu_check.sh [--iters 50] [--out DIR]       # on the GPU host, under 10 minutes
    .venv/bin/python benchmarks/gpu_check.py --dry-run          # here: the same code on tiny shapes, CPU

--dry-run runs every path on CPU at tiny shapes, the Triton kernel in Triton's interpreter (it has no
CPU backend), so the script is checked where there is no GPU; its timings mean nothing.
It writes DIR/gpu_check.json and DIR/gpu_check.md (the tables for docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os
import sys

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:  # read by triton when it is first imported, so before anything imports it
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (label, N, K) of y = x @ W^T, W [N, K]: a 7B Llama's attention projection, MLP up/gate and MLP down.
LINEARS = [("attn 4096x4096", 4096, 4096), ("mlp up 11008x4096", 11008, 4096), ("mlp down 4096x11008", 4096, 11008)]
ROWS = [("decode", 1), ("decode", 8), ("prefill", 512), ("prefill", 2048)]
LLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048)
LLAMA_SHAPES = [(1, 128), (8, 512)]
# Output tolerance of the kernel against the reference, atol = rtol (tests/targets/triton_nf4_cases.py TOL):
# the MMA inputs are the same, so only summation order and the final rounding to x's dtype differ.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Triton 3.9's interpreter multiplies bf16's raw uint16 storage in tl.dot (tests/targets/triton_nf4_cases.py
# test_bf16_interpreter), so --dry-run checks the kernel in fp16 only.
NF4_DTYPES = (torch.float16,) if DRY_RUN else (torch.float16, torch.bfloat16)
# --dry-run: the same paths on shapes the interpreter and a CPU get through in seconds
DRY_LINEARS = [("tiny 64x128", 64, 128)]
DRY_ROWS = [("decode", 1), ("prefill", 16)]
DRY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=128)
DRY_LLAMA_SHAPES = [(1, 8), (2, 16)]


class Fail(Exception):
    """One line for the user, exit 2."""


def timer(device: str, fn, iters: int, warmup: int) -> float:
    """Median seconds of fn() over iters runs: CUDA events around each run on the GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        # Each run starts with a cold L2 (as triton.testing.do_bench does): a 4096x4096 fp16 weight (32 MiB)
        # would otherwise stay in an H100/H200's 50 MiB L2 between runs and decode would not read DRAM.
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        torch.cuda.synchronize()
        for _ in range(iters):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def environment(device: str) -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    env = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "commit": commit, "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "dry_run": DRY_RUN}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), driver_cuda=_driver())
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------
# 1. NF4 kernel against dense half matmul
# ------------------------------------------------------------------------------------------------

def nf4_rows(device: str, iters: int, linears, rows) -> list[dict]:
    from effc.formats.nf4 import dequantize_nf4, quantize_nf4
    from effc.targets.triton_nf4 import nf4_linear_triton

    out = []
    g = torch.Generator().manual_seed(0)
    for label, n, k in linears:
        w = torch.randn(n, k, generator=g) * 0.02
        st = quantize_nf4(w, block=64, double_quant=True, dq_block=256)
        args = [t.to(device) if t is not None else None
                for t in (st["packed"], st["absmax_codes"], st.get("absmax2"), st.get("offset"))]
        w_hat = dequantize_nf4(st).to(device)  # the reference weight, fp32
        nf4_bytes = sum(t.numel() * t.element_size() for t in args if t is not None)
        for dtype in NF4_DTYPES:
            dense = w_hat.to(dtype)  # what torch's matmul reads: the same weight, dense in half
            for phase, m in rows:
                x = (torch.randn(m, k, generator=g) * 0.5).to(dtype).to(device)
                ref = (x.float() @ dense.float().T).to(dtype)
                got = nf4_linear_triton(x, *args, None, n, k, 64, 256)
                diff, atol_rtol = (got.float() - ref.float()).abs(), TOL[dtype]
                within = bool((diff <= atol_rtol + atol_rtol * ref.float().abs()).all())
                err, scale = float(diff.max()), float(ref.float().abs().max())
                t_nf4 = timer(device, lambda: nf4_linear_triton(x, *args, None, n, k, 64, 256), iters, 3)
                t_dense = timer(device, lambda: x @ dense.T, iters, 3)
                io = (m * k + m * n) * x.element_size()
                flops = 2 * m * n * k
                out.append({"linear": label, "N": n, "K": k, "phase": phase, "M": m,
                            "dtype": str(dtype).removeprefix("torch."),
                            "nf4_ms": t_nf4 * 1e3, "dense_ms": t_dense * 1e3, "nf4_over_dense": t_nf4 / t_dense,
                            "nf4_tflops": flops / t_nf4 / 1e12, "dense_tflops": flops / t_dense / 1e12,
                            "nf4_gbps": (nf4_bytes + io) / t_nf4 / 1e9,
                            "dense_gbps": (dense.numel() * dense.element_size() + io) / t_dense / 1e9,
                            "max_abs_err": err, "max_abs_ref": scale, "within_tolerance": within})
                print(f"nf4 {label:<20} {out[-1]['dtype']:<8} {phase:<7} M={m:<5} nf4 {t_nf4 * 1e3:8.3f} ms  "
                      f"dense {t_dense * 1e3:8.3f} ms  ratio {t_nf4 / t_dense:5.2f}  "
                      f"{out[-1]['nf4_gbps']:7.1f} GB/s  max|err| {err:.2e} (|ref| {scale:.2e}) "
                      f"{'ok' if within else 'OUTSIDE TOLERANCE'}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------
# 2. fp16 pass on a Llama, torch on the GPU
# ------------------------------------------------------------------------------------------------

def fp16_rows(device: str, iters: int, llama: dict, shapes) -> list[dict]:
    from torch.export.passes import move_to_device_pass
    from transformers import LlamaConfig, LlamaForCausalLM

    from effc.capture import capture
    from effc.inputs import dynamic_dims, make_text_inputs
    from effc.passes.base import PassContext
    from effc.passes.registry import resolve
    from effc.runtime.compare import Tolerance, compare_output

    torch.manual_seed(0)
    config = LlamaConfig(**llama)
    model = LlamaForCausalLM(config).eval()
    example = make_text_inputs(["input_ids", "attention_mask"], config, (2, 16))
    t = time.perf_counter()
    captured = capture(model, example, dynamic_dims(example))  # on CPU, as effc compile captures
    fp16 = resolve(["fp16"])[0].run(captured.program, PassContext(example_inputs=example, log=lambda *_: None)).ir
    print(f"llama: captured and fp16 pass in {time.perf_counter() - t:.1f} s", flush=True)
    programs = {"fp32": captured.program, "fp16": fp16}
    modules = {name: move_to_device_pass(p, device).module() for name, p in programs.items()}
    index = captured.output_names.index("logits")
    del model, captured, programs
    out = []
    for batch, seq in shapes:
        feeds = {k: v.to(device) for k, v in make_text_inputs(["input_ids", "attention_mask"], config,
                                                                (batch, seq), seed=seq).items()}
        results, times = {}, {}
        with torch.no_grad():
            for name, module in modules.items():
                results[name] = module(**feeds)[index]
                times[name] = timer(device, lambda: module(**feeds), iters, 2)
        ref, got = (results[n].float().cpu().numpy() for n in ("fp32", "fp16"))
        cmp, _ = compare_output("logits", ref, got, Tolerance(float("inf"), 0.0))
        out.append({"batch": batch, "sequence": seq, "fp32_ms": times["fp32"] * 1e3, "fp16_ms": times["fp16"] * 1e3,
                    "speedup": times["fp32"] / times["fp16"], "sqnr_db": cmp.sqnr_db, "cosine": cmp.cosine,
                    "max_abs_err": cmp.max_abs, "top1_agreement": cmp.top1_agreement,
                    "max_abs_ref": float(np.abs(ref).max())})
        r = out[-1]
        print(f"llama fp16 pass  batch {batch} x {seq}: fp32 {r['fp32_ms']:.2f} ms, fp16 {r['fp16_ms']:.2f} ms, "
              f"speed-up {r['speedup']:.2f}x; logits SQNR {r['sqnr_db']:.1f} dB, max|err| {r['max_abs_err']:.3g}, "
              f"top-1 {r['top1_agreement']:.4f}", flush=True)
    return out


# ------------------------------------------------------------------------------------------------

def markdown(env: dict, nf4: list[dict], fp16: list[dict], llama: dict) -> str:
    head = (f"GPU check ({'DRY RUN on CPU, timings meaningless' if env['dry_run'] else env.get('gpu')}"
            f"{', sm_' + env['compute_capability'].replace('.', '') if 'compute_capability' in env else ''}; "
            f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, commit {env['commit']})")
    lines = [head, "", "NF4 Triton kernel (block 64, double-quantized absmax) vs torch dense half matmul, "
             "median of CUDA-event timings:", "",
             "| linear (N x K) | x dtype | phase | M | NF4 ms | dense ms | NF4 / dense | NF4 TFLOP/s | dense TFLOP/s "
             "| NF4 GB/s | dense GB/s | max abs err (max abs ref) | within tol |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in nf4:
        lines.append(f"| {r['linear']} | {r['dtype']} | {r['phase']} | {r['M']} | {r['nf4_ms']:.3f} | "
                     f"{r['dense_ms']:.3f} | {r['nf4_over_dense']:.2f} | {r['nf4_tflops']:.1f} | "
                     f"{r['dense_tflops']:.1f} | {r['nf4_gbps']:.0f} | {r['dense_gbps']:.0f} | "
                     f"{r['max_abs_err']:.2e} ({r['max_abs_ref']:.2e}) | {'yes' if r['within_tolerance'] else 'NO'} |")
    lines += ["", f"fp16 pass on a random-weight Llama (hidden {llama['hidden_size']}, {llama['num_hidden_layers']} "
              f"layers, vocab {llama['vocab_size']}), the ExportedProgram run by torch, against float32:", "",
              "| batch x sequence | fp32 ms | fp16 ms | speed-up | logits SQNR dB | cosine | max abs err | top-1 |",
              "|---|---|---|---|---|---|---|---|"]
    for r in fp16:
        lines.append(f"| {r['batch']} x {r['sequence']} | {r['fp32_ms']:.2f} | {r['fp16_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['sqnr_db']:.1f} | {r['cosine']:.6f} | {r['max_abs_err']:.3g} | "
                     f"{r['top1_agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out", help="where the JSON and markdown go")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton's interpreter")
    ap.add_argument("--only", choices=["nf4", "fp16"], help="run one of the two parts")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, iters, linears, rows, llama, shapes = "cpu", min(args.iters, 2), DRY_LINEARS, DRY_ROWS, DRY_LLAMA, DRY_LLAMA_SHAPES
    else:
        if not torch.cuda.is_available():
            raise Fail(f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
                       "run this on an NVIDIA GPU host with a CUDA build of PyTorch, or give --dry-run")
        device, iters, linears, rows, llama, shapes = "cuda", args.iters, LINEARS, ROWS, LLAMA, LLAMA_SHAPES
    try:
        import triton  # noqa: F401
    except ImportError:
        raise Fail("triton is not installed; pip install 'effc[gpu]' (or triton>=3.9)") from None
    env = environment(device)
    print(json.dumps(env), flush=True)
    t0 = time.perf_counter()
    nf4 = nf4_rows(device, iters, linears, rows) if args.only in (None, "nf4") else []
    fp16 = fp16_rows(device, max(3, iters // 5), llama, shapes) if args.only in (None, "fp16") else []
    env["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"environment": env, "nf4": nf4, "fp16_pass": fp16,
                                                         "llama": llama}, indent=1) + "\n")
    (args.out / "gpu_check.md").write_text(markdown(env, nf4, fp16, llama))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} in {env['seconds']} s")
    bad = [r for r in nf4 if not r["within_tolerance"]]
    if bad:
        print(f"gpu_check: the NF4 kernel is outside tolerance against the reference in {len(bad)} of {len(nf4)} "
              f"cases (first: {bad[0]['linear']} {bad[0]['dtype']} M={bad[0]['M']})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Fail as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        sys.exit(2)
