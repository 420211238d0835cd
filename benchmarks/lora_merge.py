"""LoRA deployment: merged vs base vs unmerged branches vs switchable adapters, measured in one run.

    .venv/bin/python benchmarks/lora_merge.py [--hidden 1024 --layers 4 --seq 128 --iters 40]

Builds a random-weight Llama and three LoRA adapters (rank 16, all attention and MLP projections),
compiles four ort artifacts and times them alternately in one process with one thread pool setting
(2 threads, spinning off). Prints latency ratios to the base model and artifact sizes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
from effc.runtime import open as open_artifact  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(root: Path, hidden: int, layers: int) -> tuple[Path, list[Path]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=hidden, intermediate_size=hidden * 8 // 3 // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                      num_key_value_heads=hidden // 128, architectures=["LlamaForCausalLM"])
    transformers.LlamaForCausalLM(config).save_pretrained(root / "base")
    adapters = []
    for i in range(3):
        model = get_peft_model(transformers.LlamaForCausalLM(config),
                               LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False))
        model.save_pretrained(root / f"lora{i}")
        adapters.append(root / f"lora{i}")
    return root / "base", adapters


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--iters", type=int, default=40)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, adapters = make(root, a.hidden, a.layers)
        one = [str(adapters[0])]
        builds = {
            "base": dict(),
            "merged (merge_lora)": dict(adapters=one, passes=["merge_lora"]),
            "unmerged LoRA branches": dict(adapters=one),
            "switchable, 3 adapters": dict(adapters=[str(p) for p in adapters], passes=["merge_lora"],
                                           pass_config=["merge_lora.mode=switchable"]),
        }
        for i, name in enumerate(builds):
            effc.compile(str(base), root / f"art{i}", target="ort", **builds[name])
        merged3 = 0
        for j, p in enumerate(adapters):
            effc.compile(str(base), root / f"merged{j}", target="ort", adapters=[str(p)], passes=["merge_lora"])
            merged3 += size(root / f"merged{j}")
        rng = np.random.default_rng(0)
        feeds = {"input_ids": rng.integers(0, 4096, (a.batch, a.seq)), "attention_mask": np.ones((a.batch, a.seq), np.int64)}
        sessions = {name: open_artifact(root / f"art{i}", threads=2) for i, name in enumerate(builds)}
        for s in sessions.values():
            s.warmup(feeds, 3)
        times = {name: [] for name in builds}
        for _ in range(a.iters):  # alternate, so drift and neighbours hit every candidate alike
            for name, s in sessions.items():
                times[name] += s.time(feeds, 1)
        p50 = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        print(f"Llama hidden {a.hidden}, {a.layers} layers, LoRA r=16 on q/k/v/o/gate/up/down; batch {a.batch} x seq {a.seq}; "
              f"ort target, 2 threads, {a.iters} alternating runs each\n")
        print("| artifact | p50 ms | latency / base | size MB |")
        print("|---|---|---|---|")
        for i, name in enumerate(builds):
            print(f"| {name} | {p50[name]:.2f} | {p50[name] / p50['base']:.3f} | {size(root / f'art{i}') / 1e6:.2f} |")
        switch = size(root / "art3")
        print(f"\nswitchable artifact (3 adapters) {switch / 1e6:.2f} MB vs 3 merged artifacts {merged3 / 1e6:.2f} MB: "
              f"{switch / merged3:.3f}x")
        s = sessions["switchable, 3 adapters"]
        t = time.perf_counter()
        for name in s.adapter_names():
            s.select_adapter(name)
            s.run(feeds)
        print(f"switching between 3 adapters and running once each: {(time.perf_counter() - t) * 1e3:.1f} ms total, "
              "same session (no recompile, no new session)")


if __name__ == "__main__":
    main()
