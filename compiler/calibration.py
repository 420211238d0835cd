"""Calibration: stream data through the captured graph and record the range of every activation that
feeds a linear layer, in memory bounded by the number of tensors (running min/max and a histogram of
|x| per tensor, never the activations themselves).

Methods turn a histogram into the clipping threshold `amax` (int8 scale = amax / 127):
    minmax      the largest |x| seen
    percentile  the |x| below which `percentile`% of values fall (default 99.99)
    entropy     TensorRT's KL-divergence calibration: the threshold whose 128-level quantized
                distribution loses the least information against the observed one
    mse         the threshold minimizing the expected squared quantization error (clipping + rounding)
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from effc import decoder
from effc.errors import EffcError
from effc.inputs import max_positions
from effc.watch import watch

FORMAT = "effc-calibration"
VERSION = 2  # 2: per-channel absmax (LLM.int8() outliers)
BINS = 2048
METHODS = ("minmax", "percentile", "entropy", "mse")


@dataclass
class Histogram:
    """Histogram of |x| over [0, edge) with BINS bins; when a larger value arrives the range doubles
    and neighbouring bins merge, so memory stays fixed whatever the number of samples."""

    counts: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.float64))
    edge: float = 0.0
    lo: float = float("inf")
    hi: float = float("-inf")
    count: int = 0

    def add(self, x: np.ndarray) -> None:
        a = np.abs(x.ravel().astype(np.float32))
        if a.size == 0:
            return
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))
        self.count += a.size
        top = float(a.max())
        if self.edge == 0.0:
            self.edge = top if top > 0 else 1.0
        while top > self.edge:
            self.counts = self.counts.reshape(-1, 2).sum(1)
            self.counts = np.concatenate([self.counts, np.zeros(BINS // 2)])
            self.edge *= 2
        idx = np.minimum((a / self.edge * BINS).astype(np.int64), BINS - 1)
        self.counts += np.bincount(idx, minlength=BINS)

    @property
    def bin_width(self) -> float:
        return self.edge / BINS


def amax_minmax(h: Histogram, **_) -> float:
    return max(abs(h.lo), abs(h.hi))


def amax_percentile(h: Histogram, percentile: float = 99.99, **_) -> float:
    cdf = np.cumsum(h.counts) / max(h.counts.sum(), 1)
    i = int(np.searchsorted(cdf, percentile / 100.0))
    return min((i + 1) * h.bin_width, amax_minmax(h))


def amax_entropy(h: Histogram, levels: int = 128, **_) -> float:
    """TensorRT's entropy calibration (KL divergence between clipped and quantized distributions)."""
    counts = h.counts
    last = int(np.nonzero(counts)[0][-1]) + 1 if counts.any() else levels
    best, best_i = float("inf"), last
    for i in range(levels, max(last, levels) + 1, 4 if last > 1024 else 1):
        p = counts[:i].copy()
        p[i - 1] += counts[i:].sum()  # clip the tail into the last bin
        # quantize p into `levels` groups, spread each group's mass over its non-empty bins
        groups = np.array_split(np.arange(i), levels)
        q = np.zeros(i)
        for g in groups:
            nonzero = counts[g] != 0
            if nonzero.any():
                q[g[nonzero]] = counts[g].sum() / nonzero.sum()
        mask = p > 0
        if not mask.any() or q[mask].min() == 0:
            continue
        pn, qn = p[mask] / p.sum(), q[mask] / q.sum()
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best:
            best, best_i = kl, i
    return min(best_i * h.bin_width, amax_minmax(h))


def amax_mse(h: Histogram, levels: int = 127, **_) -> float:
    """Threshold minimizing E[(x - Q(x))^2] over the histogram: rounding noise step^2/12 inside, the
    clipped distance outside."""
    centers = (np.arange(BINS) + 0.5) * h.bin_width
    top = amax_minmax(h)
    best, best_t = float("inf"), top
    for t in np.linspace(top / 64, top, 256):
        step = t / levels
        inside = centers <= t
        err = np.sum(h.counts[inside]) * step ** 2 / 12 + np.sum(h.counts[~inside] * (centers[~inside] - t) ** 2)
        if err < best:
            best, best_t = err, float(t)
    return best_t


AMAX: dict[str, Callable[..., float]] = {"minmax": amax_minmax, "percentile": amax_percentile,
                                         "entropy": amax_entropy, "mse": amax_mse}


def linear_inputs(module: torch.fx.GraphModule) -> dict[str, str]:
    """fx node name -> '<module>' for every aten.linear in the unlifted graph (tensor = that layer's input)."""
    from effc.passes.program import module_name

    names = {}
    for node in module.graph.nodes:
        if node.target is torch.ops.aten.linear.default:
            names[node.name] = module_name(node)
    return names


def calibrate(program: torch.export.ExportedProgram, batches: Iterator[dict[str, torch.Tensor]],
              progress: Callable[[int], None] | None = None
              ) -> tuple[dict[str, Histogram], dict[str, np.ndarray]]:
    module = program.module()
    names = linear_inputs(module)
    histograms: dict[str, Histogram] = {}
    channel_absmax: dict[str, np.ndarray] = {}  # per input feature: finds LLM.int8() outlier columns

    def add(node: torch.fx.Node, x: torch.Tensor) -> None:
        x, name = x.detach().float(), names[node.name]
        histograms.setdefault(name, Histogram()).add(x.numpy())
        cols = x.abs().reshape(-1, x.shape[-1]).amax(0).numpy()
        channel_absmax[name] = np.maximum(channel_absmax[name], cols) if name in channel_absmax else cols

    seen = 0
    for feeds in batches:
        watch(module, feeds, set(names), add, what="input")
        n = int(next(iter(feeds.values())).shape[0])
        seen += n
        if progress:
            progress(n)
    if seen == 0:
        raise EffcError("the calibration dataset is empty: give at least one sample")
    return histograms, channel_absmax


def summarize(histograms: dict[str, Histogram], channel_absmax: dict[str, np.ndarray], method: str,
              percentile: float = 99.99) -> dict[str, dict]:
    out = {}
    for name, h in histograms.items():
        amax = AMAX[method](h, percentile=percentile)
        out[name] = {"amax": amax, "scale": amax / 127, "min": h.lo, "max": h.hi, "count": h.count,
                     "p99.99": amax_percentile(h, 99.99), "histogram_edge": h.edge,
                     "channel_absmax": [float(f"{v:.4g}") for v in channel_absmax[name]]}
    return out


def write(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def read(path: Path, model_sha256: str | None = None) -> dict:
    """Load a calibration file; refuse another model's (compare the source sha256)."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EffcError(f"cannot read calibration file {path}: {e}") from None
    if doc.get("format") != FORMAT:
        raise EffcError(f"{path} is not an effc calibration file; make one with `effc calibrate`")
    if doc.get("version") != VERSION:
        raise EffcError(f"{path} is calibration format {doc.get('version')}, this effc reads {VERSION}; "
                        "calibrate again with `effc calibrate`")
    if model_sha256 and doc.get("model_sha256") != model_sha256:
        raise EffcError(f"{path} was calibrated on another model (sha256 {str(doc.get('model_sha256'))[:12]}…, "
                        f"this one {model_sha256[:12]}…); calibrate this model")
    _check_tensors(path, doc.get("tensors"))
    return doc


NUMBERS = ("amax", "scale", "min", "max", "p99.99", "histogram_edge", "count")  # checked where present


def _check_tensors(path: Path, tensors) -> None:
    """Every tensor entry has a finite amax >= 0 and only finite numbers where numbers belong."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    redo = "; it was edited or damaged: calibrate again with `effc calibrate`"
    if not isinstance(tensors, dict):
        raise EffcError(f"{path}: \"tensors\" is not an object of tensor name -> ranges{redo}")
    for name, t in tensors.items():
        if not isinstance(t, dict) or "amax" not in t:
            raise EffcError(f"{path}: tensor {name} has no \"amax\"{redo}")
        for key in NUMBERS:
            if key in t and not number(t[key]):
                raise EffcError(f"{path}: tensor {name} has {key} {json.dumps(t[key])[:40]}, not a finite number{redo}")
        if t["amax"] < 0:
            raise EffcError(f"{path}: tensor {name} has a negative amax {t['amax']}{redo}")
        cols = t.get("channel_absmax", [])
        if not isinstance(cols, list) or not all(number(v) for v in cols):
            raise EffcError(f"{path}: tensor {name} has a channel_absmax that is not a list of finite numbers{redo}")


# The header names the calibrator that reads the table, not effc's method: trtexec --calib and TensorRT's
# IInt8EntropyCalibrator2 take "TRT-<NV_TENSORRT_VERSION>-EntropyCalibration2" (version = major*10000 +
# minor*100 + patch since TensorRT 10, NvInferRuntimeBase.h; 100000 = 10.0.0, effc's oldest TensorRT).
# ModelOpt's reader (modelopt/onnx/quantization/calib_utils.py import_scales_from_calib_cache) skips it.
TRT_CACHE_HEADER = "TRT-100000-EntropyCalibration2"


def tensorrt_cache(doc: dict, tensors: dict[str, str]) -> str:
    """TensorRT's calibration cache: the header, then one `<tensor>: <hex>` line per ONNX tensor that feeds a
    calibrated linear's MatMul, <hex> the big-endian float32 bits of its int8 scale amax / 127 (what TensorRT
    writes, and what ModelOpt unpacks with struct "!f" and sets as the tensor's QuantizeLinear scale).
    `tensors`: calibrated module -> that ONNX tensor (tensorrt_tensors). Layers sharing an input (q/k/v)
    share one line."""
    scales: dict[str, float] = {}
    for module, t in doc["tensors"].items():
        name = tensors.get(module)
        if not name:
            raise EffcError(f"the TensorRT graph has no tensor for the input of {module}, so the TensorRT cache "
                            "cannot name its range; calibrate without --trt-cache and report the model")
        if ": " in name or "\n" in name:
            raise EffcError(f"ONNX tensor {name!r} (input of {module}) cannot be a TensorRT cache key "
                            "(it holds ': ' or a newline); report the model")
        scales[name] = max(scales.get(name, 0.0), t["amax"] / 127)  # one tensor, one histogram: equal
    lines = [TRT_CACHE_HEADER] + [f"{name}: {struct.pack('>f', scale).hex()}" for name, scale in scales.items()]
    return "\n".join(lines) + "\n"


def tensorrt_tensors(src, captured, example: dict) -> dict[str, str]:
    """Calibrated module -> the ONNX tensor its MatMul reads in the float TensorRT-ready graph: the model.onnx
    `effc compile MODEL --target trt` writes without passes, built by the trt target itself (so the names are
    that graph's) into a scratch directory. The layer probes (as for effc debug) give each layer's output; the
    MatMul is found walking back from it through a bias Add. Its input, not the probe's input (which may be
    the value before a Reshape), is the tensor ModelOpt and TensorRT put the activation's Q/DQ on."""
    import tempfile

    import onnx

    from effc.targets.base import get_target

    target = get_target("trt")
    target.prepare(src, None)
    with tempfile.TemporaryDirectory(prefix="effc-trt-cache-") as tmp:
        built = target.build(captured.program, example, captured.output_names, captured.dynamic, Path(tmp))
        model = onnx.load(str(Path(tmp) / built.model_file), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    found = {}
    for module, p in built.probes.items():
        node = producer.get(p["output"])
        while node is not None and node.op_type == "Add":
            node = next((producer[i] for i in node.input if i in producer), None)
        if node is not None and node.op_type in ("MatMul", "Gemm"):
            found[module] = node.input[0]
    return found


def data_sha256(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.read_bytes())
    return h.hexdigest()


def check_data(src, example: dict, data: str) -> int:
    """Refuse data that cannot calibrate `src` (unreadable, pickled, too long, wrong arrays) before the
    capture; the number of samples (collect's `total`, so the data is read through once, not twice)."""
    from effc import dataset

    return dataset.count(data, decoder.data_names(example), max_positions(src.config))


def collect(src, program, example: dict, data: str, method: str = "entropy", samples: int | None = None,
            max_length: int = 128, batch_size: int = 8, percentile: float = 99.99, progress_bar=None,
            total: int | None = None) -> dict:
    """Calibrate a loaded source's captured program on `data`; returns the calibration document. `total`:
    the samples in `data` when check_data already counted them."""
    from effc import dataset

    if method not in AMAX:
        raise EffcError(f"unknown calibration method {method!r}; methods: {', '.join(METHODS)}")
    limit = max_positions(src.config)
    if total is None:
        total = dataset.count(data, decoder.data_names(example), limit)
    if samples is not None:
        total = min(total, samples)
    if total == 0:
        raise EffcError(f"the calibration dataset {data} is empty: give at least one sample")
    stream = decoder.filled(dataset.batches(data, decoder.data_names(example), src.spec if src.kind == "hf_dir" else None,
                                            max_length, batch_size, samples, max_positions=limit,
                                            trust_remote_code=src.trust_remote_code), example)
    if progress_bar is not None:
        with progress_bar(total) as bar:
            histograms, channels = calibrate(program, stream, bar.update)
    else:
        histograms, channels = calibrate(program, stream)
    return {"format": FORMAT, "version": VERSION, "method": method, "model_sha256": src.fingerprint,
            "data_sha256": data_sha256(Path(data)), "samples": total, "inputs": list(example),
            "tensors": summarize(histograms, channels, method, percentile)}


def run(source: str, data: str, output: str | Path, method: str = "entropy", samples: int | None = None,
        max_length: int = 128, batch_size: int = 8, percentile: float = 99.99, adapters=(),
        progress_bar=None, trust_remote_code: bool = False, trt_cache: str | Path | None = None) -> dict:
    """`effc calibrate`: load and capture `source`, calibrate, write the calibration file (and with
    trt_cache, TensorRT's calibration cache for the model's trt graph; both or neither)."""
    from effc import sources
    from effc.capture import capture_source, source_example

    if method not in AMAX:
        raise EffcError(f"unknown calibration method {method!r}; methods: {', '.join(METHODS)}")
    if trt_cache is not None and not Path(trt_cache).resolve().parent.is_dir():
        raise EffcError(f"--trt-cache {trt_cache}: folder {Path(trt_cache).resolve().parent} does not exist; create it "
                        "or give a path in an existing folder")
    src = sources.load(source, adapters, trust_remote_code=trust_remote_code)
    if trt_cache is not None:  # the ranges of the graph --target trt builds (a decoder without its cache)
        from effc.targets.base import get_target

        decoder.without_cache(src, get_target("trt"), None)
    example = source_example(src)
    total = check_data(src, example, data)
    captured = capture_source(src, example)
    doc = collect(src, captured.program, example, data, method, samples, max_length, batch_size, percentile,
                  progress_bar, total=total)
    cache = tensorrt_cache(doc, tensorrt_tensors(src, captured, example)) if trt_cache else None
    write(Path(output), doc)
    if cache is not None:
        tmp = Path(trt_cache).with_name(Path(trt_cache).name + ".tmp")
        tmp.write_text(cache)
        tmp.replace(trt_cache)
    return doc
