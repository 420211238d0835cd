"""benchmarks/gpu_check.sh and gpu_check.py, where no GPU is: the shell script parses, a run without a GPU
stops at once with one line, and --dry-run goes through every measurement on tiny CPU shapes (the NF4
kernel in Triton's interpreter) with onnxruntime and tensorrt made unimportable, writing its tables."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
# Runs the script with onnxruntime and tensorrt unimportable (a None entry in sys.modules makes import fail).
BLOCKED = ("import runpy, sys; sys.modules['onnxruntime'] = sys.modules['tensorrt'] = None; "
           "sys.argv = [sys.argv[1]] + sys.argv[2:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def test_shell_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], check=True)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has an NVIDIA driver")
def test_shell_script_without_a_gpu_is_one_line():
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == ("gpu_check: no nvidia-smi on PATH: this needs an NVIDIA GPU with its driver "
                                "(or give --dry-run)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCKED, str(SCRIPT), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().startswith("gpu_check: no CUDA device visible to torch") and "\n" not in r.stderr.strip()
    assert not list(tmp_path.iterdir())


def test_dry_run(tmp_path):
    r = subprocess.run([sys.executable, "-c", BLOCKED, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert doc["environment"]["dry_run"] is True and doc["environment"]["device"] == "cpu"
    # every (linear, dtype, M) measured; the kernel matches the dequantized reference within its tolerance
    assert [(r["dtype"], r["M"]) for r in doc["nf4"]] == [("float16", 1), ("float16", 16)]
    for row in doc["nf4"]:
        assert row["within_tolerance"] and row["max_abs_err"] <= 2e-3 * (1 + row["max_abs_ref"])
        assert row["nf4_ms"] > 0 and row["dense_ms"] > 0 and row["nf4_over_dense"] == pytest.approx(
            row["nf4_ms"] / row["dense_ms"])
    # the fp16 pass's program against float32 at both shapes: fp16-level agreement, not float32's
    assert [(r["batch"], r["sequence"]) for r in doc["fp16_pass"]] == [(1, 8), (2, 16)]
    for row in doc["fp16_pass"]:
        assert 35 < row["sqnr_db"] < 120 and row["top1_agreement"] >= 0.9 and row["max_abs_err"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("GPU check (DRY RUN on CPU, timings meaningless")
    assert table.count("| tiny 64x128 | float16 |") == 2 and "| 2 x 16 |" in table
