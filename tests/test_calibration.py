"""Calibration: thresholds against numpy on heavy-tailed data, bounded memory, the file format, bad input."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from effc import calibration
from effc.calibration import Histogram
from effc.cli import main
from effc.errors import EffcError


@pytest.fixture(scope="module")
def heavy_tailed():
    """Student-t with 2 degrees of freedom: most mass near 0, rare huge values (like outlier features)."""
    rng = np.random.default_rng(0)
    h = Histogram()
    chunks = [rng.standard_t(2, 100_000).astype(np.float32) for _ in range(5)]
    for c in chunks:
        h.add(c)
    return h, np.concatenate(chunks)


def test_histogram_is_bounded_and_exact_in_count(heavy_tailed):
    h, x = heavy_tailed
    assert h.counts.size == calibration.BINS and h.count == x.size and h.counts.sum() == x.size
    assert h.lo == x.min() and h.hi == x.max() and h.edge >= np.abs(x).max()


def test_methods_on_heavy_tails(heavy_tailed):
    h, x = heavy_tailed
    amax = {m: calibration.AMAX[m](h) for m in calibration.METHODS}
    assert amax["minmax"] == pytest.approx(np.abs(x).max())
    # percentile agrees with numpy within one histogram bin
    assert abs(amax["percentile"] - np.quantile(np.abs(x), 0.9999)) <= 2 * h.bin_width
    for m in ("percentile", "entropy", "mse"):
        assert amax[m] < 0.5 * amax["minmax"], m  # they clip the tail; minmax does not
    # mse's threshold really has lower quantization error on the data than minmax's
    def mse(t):
        step = t / 127
        return np.mean((np.clip(np.round(x / step), -127, 127) * step - x) ** 2)
    assert mse(amax["mse"]) < mse(amax["minmax"])
    assert len({round(v, 6) for v in amax.values()}) == 4  # four different answers


def test_gaussian_needs_no_clipping():
    rng = np.random.default_rng(1)
    h = Histogram()
    h.add(rng.standard_normal(200_000).astype(np.float32))
    # on a light-tailed distribution the clipping methods stay near the range (> 60% of max)
    top = calibration.amax_minmax(h)
    assert calibration.amax_percentile(h) > 0.6 * top
    assert calibration.amax_entropy(h) > 0.4 * top


def write_npz(path, n, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    np.savez(path, input_ids=rng.integers(0, 512, (n, seq)), attention_mask=np.ones((n, seq), np.int64))


def test_calibrate_cli_writes_file_and_trt_cache(default_model, tmp_path):
    write_npz(tmp_path / "d.npz", 24)
    out = tmp_path / "calib.json"
    r = CliRunner().invoke(main, ["calibrate", str(default_model[0]), "--data", str(tmp_path / "d.npz"),
                                  "--method", "percentile", "-o", str(out), "--trt-cache", str(tmp_path / "trt.cache")])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["format"] == "effc-calibration" and doc["samples"] == 24 and doc["method"] == "percentile"
    assert len(doc["tensors"]) == 29  # every linear's input: 4 layers x 7 + lm_head
    lines = (tmp_path / "trt.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and len(lines) == 30
    name, hexval = lines[1].split(": ")
    assert struct.unpack(">f", bytes.fromhex(hexval))[0] == pytest.approx(doc["tensors"][name]["scale"], rel=1e-6)


def test_calibration_file_of_another_model_is_refused(default_model, tmp_path):
    write_npz(tmp_path / "d.npz", 8)
    calibration.run(str(default_model[0]), str(tmp_path / "d.npz"), tmp_path / "c.json", "minmax")
    with pytest.raises(EffcError, match="another model"):
        calibration.read(tmp_path / "c.json", model_sha256="0" * 64)


def test_bad_calibration_input(default_model, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    np.savez(tmp_path / "names.npz", tokens=np.zeros((4, 8), np.int64))
    (tmp_path / "x.txt").write_text("some text\n")
    model = str(default_model[0])
    for data, needle in [("empty.txt", "empty"), ("names.npz", "missing attention_mask, input_ids"), ("nope.npz", "no such file"),
                         ("x.txt", "no tokenizer")]:
        r = CliRunner().invoke(main, ["calibrate", model, "--data", str(tmp_path / data), "-o", str(tmp_path / "c.json")])
        assert r.exit_code == 2 and needle in r.output, (data, r.output)
        assert not (tmp_path / "c.json").exists()


def test_memory_does_not_grow_with_samples(default_model, tmp_path):
    """Peak RSS calibrating 2,000 samples stays within 10% of calibrating 200 (each in a fresh process)."""
    write_npz(tmp_path / "big.npz", 2000, seq=8)
    code = ("import sys; from effc import calibration; calibration.run(sys.argv[1], sys.argv[2], sys.argv[3], 'minmax', "
            "int(sys.argv[4]), batch_size=50); print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])")
    peaks = {}
    for n in (200, 2000):
        out = subprocess.run([sys.executable, "-c", code, str(default_model[0]), str(tmp_path / "big.npz"),
                              str(tmp_path / f"c{n}.json"), str(n)], capture_output=True, text=True, check=True)
        peaks[n] = int(out.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "c2000.json").read_text())["samples"] == 2000
    assert peaks[2000] <= 1.10 * peaks[200], peaks
