"""Shared by the ort decoder-fusion tests (GQA, rotary, RMSNorm): eager transformers over a left-padded
prefill and greedy decode steps, and an artifact checked against it step by step."""

from __future__ import annotations

import numpy as np
import torch

from effc import decoder
from effc.capture import run_torch

ATOL = 1e-4  # fp32 through ORT's kernels; measured ~1e-6


def chain(model, meta, prompt: int, steps: int) -> list[tuple[dict, dict]]:
    """(feeds, eager outputs) for a left-padded prefill of 3 rows and `steps` greedy decode steps."""
    module = decoder.WithPast(model, meta["layers"])
    feeds = decoder.prefill_inputs(meta, 3, prompt, seed=0, pad=True)
    out = []
    for _ in range(steps + 1):
        with torch.no_grad():
            result = run_torch(module, feeds, module.output_names)
        out.append((feeds, result))
        feeds = decoder.next_step(feeds, result, torch.as_tensor(result["logits"][:, -1]).argmax(-1))
    return out


def check_steps(session, steps: list[tuple[dict, dict]], label: str, atol: float = ATOL) -> None:
    """Every output of every step within atol of eager; presents and logits at padding are not compared."""
    for step, (feeds, want) in enumerate(steps):
        got = session.run({decoder.public(n): v.numpy() for n, v in feeds.items()})
        real = feeds["attention_mask"].numpy().astype(bool)
        for name, ref in want.items():
            ref = np.asarray(ref)
            diff = np.abs(got[name] - ref)
            if name.startswith("present"):
                diff = diff[real[:, None, :, None].repeat(diff.shape[1], 1).repeat(diff.shape[3], 3)]
            else:
                diff = diff[real[:, -ref.shape[1]:]]
            assert float(diff.max()) <= atol, f"{label} step {step} {name}: max |Δ| {float(diff.max()):.3g}"


def compile_ort(model, tmp_path) -> tuple[dict, list[str], dict]:
    """Compile `model` (saved as an HF directory) for ort: (decoder metadata, model.onnx's op types, manifest)."""
    import json

    import onnx

    import effc

    model.save_pretrained(tmp_path / "hf")
    effc.compile(str(tmp_path / "hf"), tmp_path / "art", target="ort")
    graph = onnx.load(str(tmp_path / "art" / "model.onnx"), load_external_data=False).graph
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    return decoder.info(model, model.config), [n.op_type for n in graph.node], manifest
