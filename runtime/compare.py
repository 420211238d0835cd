"""The one home of the statistics effc compares values with: compile-time verification and the lossy
acceptance policy, golden checks, the layer-wise debugger, int8's auto_exclude and smoothquant_alpha=auto
scorer, int4's calibration statistics and the benchmarks.

An element passes when |got - ref| <= atol + rtol * |ref| (numpy.allclose semantics). Positions that
an attention_mask marks as padding are left out (`unpadded`): their values carry no meaning and
runtimes differ there (a fully masked softmax row has no defined result). Arrays may be numpy arrays
or torch tensors; statistics are computed in float64 numpy, so this module never imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from effc.runtime.kv_cache import PRESENT

# Defaults by the reference's precision, used when the user gives no tolerance for an output.
DEFAULT_TOLERANCE = {
    "float64": (1e-6, 1e-5),
    "float32": (1e-4, 1e-3),
    "float16": (1e-2, 1e-2),
    "bfloat16": (5e-2, 5e-2),
}


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


@dataclass
class OutputComparison:
    name: str
    shape: tuple
    atol: float
    rtol: float
    passed: bool
    max_abs: float
    mean_abs: float
    p99_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    mismatched: int
    compared: int
    top1_agreement: float | None = None
    problem: str | None = None


@dataclass
class Comparison:
    outputs: list[OutputComparison] = field(default_factory=list)
    ignored_positions: int = 0

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "ignored_padding_positions": self.ignored_positions,
            "outputs": [asdict(o) for o in self.outputs],
        }

    def table(self) -> str:
        head = f"{'output':<22} {'shape':<16} {'max_abs':>10} {'mean_abs':>10} {'p99_abs':>10} {'max_rel':>10} {'cosine':>9} {'SQNR dB':>8} {'top1':>6} {'atol/rtol':>15}  result"
        rows = [head]
        for o in self.outputs:
            top1 = "-" if o.top1_agreement is None else f"{o.top1_agreement:.3f}"
            verdict = "ok" if o.passed else (o.problem or f"FAIL ({o.mismatched}/{o.compared} beyond tol)")
            rows.append(
                f"{o.name:<22} {'x'.join(map(str, o.shape)):<16} {o.max_abs:>10.3g} {o.mean_abs:>10.3g} {o.p99_abs:>10.3g} "
                f"{o.max_rel:>10.3g} {o.cosine:>9.6f} {o.sqnr_db:>8.1f} {top1:>6} {o.atol:>7.0e}/{o.rtol:<7.0e}  {verdict}"
            )
        if self.ignored_positions:
            rows.append(f"({self.ignored_positions} padding positions (attention_mask == 0) left out)")
        return "\n".join(rows)


def default_tolerance(ref: np.ndarray) -> Tolerance:
    if not np.issubdtype(ref.dtype, np.floating):
        return Tolerance(0.0, 0.0)
    return Tolerance(*DEFAULT_TOLERANCE.get(str(ref.dtype), DEFAULT_TOLERANCE["float32"]))


def valid_positions(shape, mask):
    """A boolean selector (numpy or torch, as the mask) when values of `shape` are laid out like the
    attention mask in their leading dims ([B, S, ...]); None when there is no mask or the layout differs."""
    if mask is None or mask.ndim < 2 or len(shape) < mask.ndim or tuple(shape[:mask.ndim]) != tuple(mask.shape):
        return None
    return mask != 0


def output_mask(name: str, shape, mask):
    """The padding mask laid out as output `name`: a decoder's present.N.key/value is [B, heads, total, D]
    against the [B, total] mask (its values at padding positions are never attended to)."""
    if (mask is not None and name.startswith(PRESENT + ".") and len(shape) == 4 and mask.ndim == 2
            and tuple(mask.shape) == (shape[0], shape[2])):
        return np.broadcast_to(np.asarray(mask)[:, None, :], tuple(shape[:3]))
    return mask


def unpadded(values, mask):
    """`values` without the positions the attention mask marks as padding (flattened over [B, S])."""
    valid = valid_positions(values.shape, mask)
    return values if valid is None or valid.all() else values[valid]


def _f64(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-noise power ratio in dB: inf without noise, -inf without signal."""
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


@dataclass
class Pooled:
    """Signal, noise and cosine terms summed over any number of (reference, actual) pairs, padding left
    out: SQNR and cosine pooled over batches (one pair gives that pair's own)."""

    signal: float = 0.0  # sum ref^2
    noise: float = 0.0  # sum (got - ref)^2
    dot: float = 0.0  # sum ref * got
    ref_sq: float = 0.0  # ref . ref and got . got as dot products, for the cosine's norms
    got_sq: float = 0.0
    max_abs: float = 0.0

    def add(self, ref, got, mask=None) -> None:
        self.add_flat(_f64(unpadded(ref, mask)), _f64(unpadded(got, mask)))

    def add_flat(self, r: np.ndarray, g: np.ndarray) -> None:
        """Flat float64 values, already selected."""
        d = g - r
        self.signal += float(np.sum(r ** 2))
        self.noise += float(np.sum(d ** 2))
        self.dot += float(np.dot(r, g))
        self.ref_sq += float(np.dot(r, r))
        self.got_sq += float(np.dot(g, g))
        self.max_abs = max(self.max_abs, float(np.abs(d).max()) if d.size else 0.0)

    @property
    def relative_noise(self) -> float:
        """Noise power relative to the signal's (0 without noise, inf without signal)."""
        return self.noise / self.signal if self.signal > 0 else (0.0 if self.noise == 0 else float("inf"))

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.signal, self.noise)

    @property
    def cosine(self) -> float:
        norm = float(np.sqrt(self.ref_sq) * np.sqrt(self.got_sq))
        return self.dot / norm if norm > 0 else (1.0 if self.noise == 0 else 0.0)


def position_cosine(ref, got, mask=None) -> float:
    """The mean, over positions (every index but the last dim's), of the cosine along the last dim;
    padding positions left out."""
    r, g = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    mask = None if mask is None else np.asarray(mask)
    norm = np.sqrt(np.maximum(np.sum(r * r, -1) * np.sum(g * g, -1), 1e-24))
    return float(unpadded(np.sum(r * g, -1) / norm, mask).mean())


def top1_agreement(ref, got, mask=None) -> float:
    """The fraction of positions whose argmax over the last dim (e.g. the next token) agrees."""
    return float(np.mean(unpadded(ref, mask).argmax(-1) == unpadded(got, mask).argmax(-1)))


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance, mask: np.ndarray | None = None) -> tuple[OutputComparison, int]:
    shape = tuple(ref.shape)
    if got.shape != ref.shape:
        nan = float("nan")
        return OutputComparison(name, shape, tol.atol, tol.rtol, False, nan, nan, nan, nan, nan, nan, 0, 0,
                                problem=f"shape {got.shape} != reference {ref.shape}"), 0
    mask = output_mask(name, ref.shape, mask)
    valid = valid_positions(ref.shape, mask)
    ignored = 0 if valid is None else int((~valid).sum())
    r64, g64 = _f64(unpadded(ref, mask)), _f64(unpadded(got, mask))
    diff = np.abs(g64 - r64)
    finite = np.isfinite(diff)
    bad = diff > tol.atol + tol.rtol * np.abs(r64)
    # NaN in the same place in both is agreement; anywhere else it is a mismatch.
    same_nan = np.isnan(r64) & np.isnan(g64)
    bad = (bad | ~finite) & ~same_nan
    d = diff[finite] if finite.any() else np.zeros(1)
    rel = d / np.maximum(np.abs(r64[finite]), 1e-12) if finite.any() else np.zeros(1)
    pooled = Pooled()
    if finite.any():
        pooled.add_flat(r64[finite], g64[finite])
    top1 = None
    if "logits" in name and ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
        top1 = top1_agreement(ref, got, mask)
    out = OutputComparison(
        name=name, shape=shape, atol=tol.atol, rtol=tol.rtol, passed=not bad.any(),
        max_abs=float(d.max()) if d.size else 0.0, mean_abs=float(d.mean()) if d.size else 0.0,
        p99_abs=float(np.quantile(d, 0.99)) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        cosine=pooled.cosine, sqnr_db=pooled.sqnr_db, mismatched=int(bad.sum()), compared=int(bad.size), top1_agreement=top1,
    )
    return out, ignored


def pooled_sqnr_db(refs: list, gots: list, masks: list) -> float:
    """SQNR over several input sets at once (signal and noise summed), leaving out padding positions."""
    pooled = Pooled()
    for ref, got, mask in zip(refs, gots, masks):
        pooled.add(ref, got, mask)
    return pooled.sqnr_db


def compare(
    reference: dict[str, np.ndarray],
    actual: dict[str, np.ndarray],
    tolerance: Tolerance | None = None,
    per_output: dict[str, Tolerance] | None = None,
    attention_mask: np.ndarray | None = None,
) -> Comparison:
    """Compare every reference output with the actual one of the same name."""
    per_output = per_output or {}
    result = Comparison()
    for name, ref in reference.items():
        tol = per_output.get(name) or tolerance or default_tolerance(ref)
        if name not in actual:
            nan = float("nan")
            result.outputs.append(OutputComparison(name, tuple(ref.shape), tol.atol, tol.rtol, False, nan, nan, nan, nan,
                                                   nan, nan, 0, 0, problem="missing from the artifact's outputs"))
            continue
        out, ignored = compare_output(name, np.asarray(ref), np.asarray(actual[name]), tol, attention_mask)
        result.outputs.append(out)
        result.ignored_positions = max(result.ignored_positions, ignored)
    return result
