"""effc bench: latency, throughput and peak memory of an artifact, and of eager PyTorch in the same run.

Each engine runs in a fresh subprocess (`python -m effc.bench`) so its peak memory is its own and one
engine's idle threads or caches cannot slow the other. Both use the same inputs and thread count.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from effc.errors import EffcError


def _rss_kb(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc (Linux); 0 elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_inputs(manifest: dict, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for the artifact's metadata: dynamic dims set to batch/sequence, token ids below the vocab size."""
    rng = np.random.default_rng(seed)
    vocab = manifest["source"].get("vocab_size") or 100
    feeds = {}
    for info in manifest["inputs"]:
        if manifest.get("decoder") and info["name"] != "input_ids":
            continue  # a decoder's prefill: effc.runtime fills in the mask, positions and empty cache
        shape = [d if isinstance(d, int) else (batch if d == "batch" else seq) for d in info["shape"]]
        if info["name"] == "input_ids":
            feeds[info["name"]] = rng.integers(0, vocab, shape).astype(info["dtype"])
        elif np.issubdtype(np.dtype(info["dtype"]), np.integer):
            ones = info["name"] == "attention_mask"
            feeds[info["name"]] = (np.ones if ones else np.zeros)(shape, dtype=info["dtype"])
        else:
            feeds[info["name"]] = rng.standard_normal(shape).astype(info["dtype"])
    return feeds


def summarize(times: list[float], batch: int) -> dict:
    t = np.array(times) * 1e3
    return {"p50_ms": float(np.median(t)), "p90_ms": float(np.quantile(t, 0.9)), "mean_ms": float(t.mean()),
            "throughput_per_s": float(batch * 1e3 / np.median(t)), "iters": len(times)}


def run_engine(engine: str, artifact: Path, inputs: Path, threads: int, warmup: int, iters: int,
               sign_key: str | Path | None = None, extra: list[str] = ()) -> dict:
    """In a child process: load one engine, time it, report JSON on stdout."""
    cmd = [sys.executable, "-m", "effc.bench", engine, str(artifact), str(inputs),
           "--threads", str(threads), "--warmup", str(warmup), "--iters", str(iters), *extra]
    cmd += ["--sign-key", str(sign_key)] if sign_key is not None else []
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EffcError(f"bench of {engine} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(artifact: str | Path, vs_eager: bool, batch: int = 1, seq: int = 128, threads: int = 2,
          warmup: int = 5, iters: int = 50, inputs_npz: str | None = None, sign_key: str | Path | None = None) -> dict:
    from effc.inputs import load_npz
    from effc.runtime.manifest import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact, sign_key=sign_key)
    feeds = load_npz(inputs_npz) if inputs_npz else bench_inputs(manifest, batch, seq)
    first = next(iter(feeds.values()))
    batch = int(first.shape[0]) if first.ndim else 1
    results = {"inputs": {k: list(v.shape) for k, v in feeds.items()}, "threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.npz"
        np.savez(path, **feeds)
        engines = ["artifact"] + (["eager"] if vs_eager else [])
        for engine in engines:
            results[engine] = run_engine(engine, artifact, path, threads, warmup, iters, sign_key)
            results[engine].update(summarize(results[engine].pop("times"), batch))
    if vs_eager:
        results["latency_ratio_artifact_over_eager"] = results["artifact"]["p50_ms"] / results["eager"]["p50_ms"]
        results["peak_memory_ratio_artifact_over_eager"] = (
            results["artifact"]["peak_rss_mb"] / results["eager"]["peak_rss_mb"] if results["eager"]["peak_rss_mb"] else None)
    return results


def bench_generate(artifact: str | Path, batch: int = 1, seq: int = 128, new_tokens: int = 64, threads: int = 2,
                   warmup: int = 1, iters: int = 5, sign_key: str | Path | None = None) -> dict:
    """Prefill ms and decode tokens/s of Session.generate, and of transformers generate on the source
    model when its directory is readable here; same prompts and threads, each in its own process."""
    from effc.runtime.manifest import read_manifest

    artifact = Path(artifact)
    manifest = read_manifest(artifact, sign_key=sign_key)
    if not manifest.get("decoder"):
        raise EffcError(f"{artifact} has no KV cache: bench --generate needs a decoder compiled with "
                        "text-generation-with-past (the default for causal LMs)")
    feeds = {"input_ids": bench_inputs(manifest, batch, seq)["input_ids"]}
    results = {"generate": {"batch": batch, "prompt_tokens": seq, "new_tokens": new_tokens}, "threads": threads}
    src = manifest["source"].get("path")
    engines = ["generate-artifact"] + (["generate-eager"] if src and Path(src).is_dir() else [])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "inputs.npz"
        np.savez(path, **feeds)
        for engine in engines:
            results[engine.split("-")[1]] = run_engine(engine, artifact, path, threads, warmup, iters, sign_key,
                                                       ["--new-tokens", str(new_tokens)])
    if "eager" not in results:
        results["eager_skipped"] = f"the source directory {src} is not readable here"
    return results


def _generate_times(run, new_tokens: int, warmup: int, iters: int) -> dict:
    """run(n) generates n tokens per row and returns (prefill_s, decode_s); medians over iters."""
    for _ in range(warmup):
        run(new_tokens)
    prefill, decode = zip(*(run(new_tokens) for _ in range(iters)))
    return {"prefill_ms": float(np.median(prefill) * 1e3),
            "decode_tokens_per_s": float((new_tokens - 1) / np.median(decode)), "iters": iters}


def table(results: dict) -> str:
    if "generate" in results:
        g = results["generate"]
        rows = [f"{'engine':<10} {'prefill ms':>11} {'decode tok/s':>13} {'peak RSS MB':>12}"]
        for engine in ("artifact", "eager"):
            if engine in results:
                r = results[engine]
                rows.append(f"{engine:<10} {r['prefill_ms']:>11.2f} {r['decode_tokens_per_s']:>13.1f} {r['peak_rss_mb']:>12.0f}")
        if "eager_skipped" in results:
            rows.append(f"eager skipped: {results['eager_skipped']}")
        rows.append(f"batch {g['batch']}, prompt {g['prompt_tokens']} tokens, {g['new_tokens']} new tokens per row "
                    f"(tokens/s per sequence), threads: {results['threads']}")
        return "\n".join(rows)
    rows = [f"{'engine':<10} {'p50 ms':>9} {'p90 ms':>9} {'items/s':>9} {'peak RSS MB':>12} {'over imports MB':>16}"]
    for engine in ("artifact", "eager"):
        r = results.get(engine)
        if r:
            rows.append(f"{engine:<10} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} {r['throughput_per_s']:>9.1f} "
                        f"{r['peak_rss_mb']:>12.0f} {r['peak_over_imports_mb']:>16.0f}")
    if "latency_ratio_artifact_over_eager" in results:
        ratio = results["latency_ratio_artifact_over_eager"]
        rows.append(f"artifact / eager latency (p50): {ratio:.3f}  ({1 / ratio:.2f}x faster)"
                    if ratio < 1 else f"artifact / eager latency (p50): {ratio:.3f}  ({ratio:.2f}x slower)")
        mem = results["peak_memory_ratio_artifact_over_eager"]
        if mem:
            rows.append(f"artifact / eager peak RSS: {mem:.3f}")
    rows.append(f"inputs: {results['inputs']}, threads: {results['threads']}")
    return "\n".join(rows)


def _child(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m effc.bench")
    ap.add_argument("engine", choices=["artifact", "eager", "generate-artifact", "generate-eager"])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("artifact")
    ap.add_argument("inputs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sign-key")
    a = ap.parse_args(argv)
    feeds = dict(np.load(a.inputs, allow_pickle=False))
    if a.engine.startswith("generate-"):
        base, result = _child_generate(a, feeds["input_ids"])
        peak = _rss_kb("VmHWM")
        print(json.dumps({**result, "peak_rss_mb": peak / 1024, "peak_over_imports_mb": (peak - base) / 1024}))
        return
    if a.engine == "artifact":
        from effc.runtime import open as open_artifact

        base = _rss_kb("VmRSS")
        session = open_artifact(a.artifact, threads=a.threads, sign_key=a.sign_key)
        session.warmup(feeds, a.warmup)
        times = session.time(feeds, a.iters)
    else:
        import torch

        from effc import sources
        from effc.capture import named_module
        from effc.runtime.manifest import read_manifest

        torch.set_num_threads(a.threads)
        manifest = read_manifest(Path(a.artifact), sign_key=a.sign_key)
        src = manifest["source"]
        base = _rss_kb("VmRSS")
        model = sources.load(src.get("path") or src["spec"], [x["path"] for x in src["adapters"]]).model
        tensors = {k: torch.from_numpy(v) for k, v in feeds.items()}
        module, _ = named_module(model, tensors)
        with torch.no_grad():
            for _ in range(a.warmup):
                module(**tensors)
            times = []
            for _ in range(a.iters):
                t = time.perf_counter()
                module(**tensors)
                times.append(time.perf_counter() - t)
    peak = _rss_kb("VmHWM")
    print(json.dumps({"times": times, "peak_rss_mb": peak / 1024, "peak_over_imports_mb": (peak - base) / 1024}))


def _child_generate(a, ids: np.ndarray) -> tuple[int, dict]:
    """Time generation of exactly --new-tokens per row (eos ignored) with one engine."""
    if a.engine == "generate-artifact":
        from effc.runtime import open as open_artifact

        base = _rss_kb("VmRSS")
        session = open_artifact(a.artifact, threads=a.threads, sign_key=a.sign_key)

        def run(n):
            g = session.generate(ids.tolist(), max_new_tokens=n, eos_token_id=[])
            return g.ttft_s, g.decode_s
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from effc.runtime.manifest import read_manifest

        torch.set_num_threads(a.threads)
        src = read_manifest(Path(a.artifact), sign_key=a.sign_key)["source"]["path"]
        base = _rss_kb("VmRSS")
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32).eval()
        tensors = torch.from_numpy(ids)

        def timed(n):
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(tensors, attention_mask=torch.ones_like(tensors), do_sample=False, max_new_tokens=n,
                               min_new_tokens=n, pad_token_id=0)
            return time.perf_counter() - t

        def run(n):  # prefill = one new token; decode = the rest
            first = timed(1)
            return first, max(timed(n) - first, 1e-9)
    return base, _generate_times(run, a.new_tokens, a.warmup, a.iters)


if __name__ == "__main__":
    _child(sys.argv[1:])
