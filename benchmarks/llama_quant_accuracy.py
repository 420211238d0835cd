"""Accuracy only (no timing) of 4-bit configurations on a random-weight Llama: logits SQNR and top-1
agreement against fp32 eager PyTorch on held-out token sequences; GPTQ/AWQ calibrate on other ones.
Random weights and random tokens: this measures what the quantizers do to the numbers, not to a
task (the real-model numbers are benchmarks/minilm_accuracy.py's).

    .venv/bin/python benchmarks/llama_quant_accuracy.py nf4 int4 "int4;int4.method=gptq" --target ort

Each argument is one configuration: the pass, then its --pass-config items, separated by ';'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
from effc.runtime import open as open_artifact  # noqa: E402
from effc.runtime.compare import pooled_sqnr_db, top1_agreement  # noqa: E402


def tokens(rng, n: int, length: int, vocab: int) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(0, vocab, (n, length), dtype=np.int64),
            "attention_mask": np.ones((n, length), np.int64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--target", default="ort")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    a = ap.parse_args()
    import transformers

    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=4096, hidden_size=a.hidden, intermediate_size=a.hidden * 11 // 4,
                                      num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=8,
                                      architectures=["LlamaForCausalLM"])
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp / "llama")
    rng = np.random.default_rng(0)
    np.savez(tmp / "calib.npz", **tokens(rng, 64, 64, config.vocab_size))
    held_out = [tokens(rng, 4, 64, config.vocab_size) for _ in range(4)]
    with torch.no_grad():
        eager = [model(**{k: torch.from_numpy(v) for k, v in f.items()}).logits.numpy() for f in held_out]
    print(f"| configuration (`{a.target}` artifact) | logits SQNR dB | top-1 agreement | linear layers in float |\n"
          "|---|---|---|---|")
    for i, item in enumerate(a.configs):
        name, *items = item.split(";")
        report = effc.compile(str(tmp / "llama"), tmp / f"c{i}", target=a.target, passes=[name], pass_config=items,
                              calib_data=str(tmp / "calib.npz"), calib_samples=64)
        with open_artifact(tmp / f"c{i}", threads=2) as session:
            got = [session.run(f)["logits"] for f in held_out]
        sqnr = pooled_sqnr_db(eager, got, [None] * len(got))
        top1 = np.mean([top1_agreement(e, g) for g, e in zip(got, eager)])
        counts = report.passes[0].counts
        kept = counts.get("linear layers excluded", 0)
        print(f"| `{item}` | {sqnr:.2f} | {top1:.3f} | {kept} of {kept + counts['linear layers quantized']} |",
              flush=True)


if __name__ == "__main__":
    main()
