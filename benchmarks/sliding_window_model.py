"""A whole sliding-window model at a long prefill: random-weight Mistral (sliding_window 256, 4 layers,
hidden 768, 12 heads / 4 KV heads, intermediate 3072), one forward over 8k tokens (--task text-generation,
no cache), batch 1, 2 threads. Candidates, each compiled once and run in its own subprocess:

  eager             transformers (SDPA with the sliding-window mask), the reference
  ort / torch       effc compiled without sparse_attention (dense masked attention)
  ort+sparse / torch+sparse   the same with --passes sparse_attention (exact mode: the model's own window)

Reports median prefill seconds, the speed-up of each +sparse artifact over the same target without the
pass, peak RSS, and max |Δ| of the logits against eager at the same 8k tokens (the pass changes no output).
ONNX Runtime without spinning, PyTorch with OMP_WAIT_POLICY=PASSIVE.

    .venv/bin/python benchmarks/sliding_window_model.py [--tokens 8192] [--reps 3] [--candidates ...]
"""

from __future__ import annotations

import argparse
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
WORK = Path.home() / ".cache" / "effc" / "bench-sliding-window"
THREADS = 2
CANDIDATES = ("eager", "ort", "ort+sparse", "torch", "torch+sparse")


def model_dir() -> Path:
    out = WORK / "mistral-sw256"
    if not (out / "model.safetensors").is_file():
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.MistralConfig(hidden_size=768, num_hidden_layers=4, num_attention_heads=12,
                                            num_key_value_heads=4, intermediate_size=3072, vocab_size=2048,
                                            sliding_window=256, max_position_embeddings=16384)
        config.architectures = ["MistralForCausalLM"]
        transformers.MistralForCausalLM(config).eval().save_pretrained(out)
    return out


def artifact(candidate: str) -> Path:
    out = WORK / candidate.replace("+", "-")
    if not (out / "manifest.json").is_file():
        import effc

        target, _, sparse = candidate.partition("+")
        effc.compile(str(model_dir()), out, target=target, task="text-generation",
                     passes=["sparse_attention"] if sparse else [], input_shapes={"input_ids": (2, 600)}, force=True)
    return out


def _ids(tokens: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, 2048, (1, tokens)).astype(np.int64)


def worker(candidate: str, tokens: int, reps: int) -> dict:
    ids = _ids(tokens)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    if candidate == "eager":
        import torch
        import transformers

        torch.set_num_threads(THREADS)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir()).eval()

        def run():
            with torch.no_grad():
                return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    else:
        from effc.runtime import open as open_artifact

        session = open_artifact(artifact(candidate), threads=THREADS)

        def run():
            return session.run(feeds)["logits"]
    logits = run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    np.save(WORK / f"logits-{candidate.replace('+', '-')}.npy", logits[0, ::64])  # every 64th position
    from benchmarks.generate import peak_rss_mib

    return {"s": statistics.median(times), "rss_mib": peak_rss_mib()}


def measure(candidate: str, tokens: int, reps: int) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(THREADS)}
    proc = subprocess.run([sys.executable, __file__, "--worker", candidate, "--tokens", str(tokens), "--reps",
                           str(reps)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.reps)))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    candidates = args.candidates.split(",")
    for c in candidates:
        if c != "eager":
            t0 = time.perf_counter()
            artifact(c)
            print(f"{c}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"load average {os.getloadavg()}")
    results = {}
    for c in candidates:
        results[c] = measure(c, args.tokens, args.reps)
        print(f"{c:<13} {results[c]}", flush=True)
    ref = np.load(WORK / "logits-eager.npy") if "eager" in results and "s" in results["eager"] else None
    print(f"\n| candidate | prefill s ({args.tokens} tokens) | x without the pass | peak RSS MiB | max abs vs eager |")
    print("|---|---|---|---|---|")
    for c in candidates:
        r = results[c]
        if "s" not in r:
            print(f"| {c} | {r.get('error')} | | | |")
            continue
        base = results.get(c.partition("+")[0], {}).get("s") if "+" in c else None
        err = float(np.abs(np.load(WORK / f"logits-{c.replace('+', '-')}.npy") - ref).max()) if ref is not None else None
        speedup = f"{base / r['s']:.1f}x" if base else ""
        print(f"| {c} | {r['s']:.2f} | {speedup} | {r['rss_mib']:.0f} | {'' if err is None else f'{err:.2e}'} |")


if __name__ == "__main__":
    main()
