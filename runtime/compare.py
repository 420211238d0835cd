"""One comparison of outputs against a reference: used by compile-time verification, golden checks
and (later) the layer-wise debugger.

An element passes when |got - ref| <= atol + rtol * |ref| (numpy.allclose semantics). Positions that
an attention_mask marks as padding are left out: their values carry no meaning and runtimes differ
there (a fully masked softmax row has no defined result).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

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


def _valid_positions(ref: np.ndarray, mask: np.ndarray | None) -> np.ndarray | None:
    """A boolean [B, S] selector when the output is laid out [B, S, ...] like the attention mask."""
    if mask is None or mask.ndim != 2 or ref.ndim < 2 or ref.shape[:2] != mask.shape:
        return None
    return mask != 0


def compare_output(name: str, ref: np.ndarray, got: np.ndarray, tol: Tolerance, mask: np.ndarray | None = None) -> tuple[OutputComparison, int]:
    shape = tuple(ref.shape)
    if got.shape != ref.shape:
        nan = float("nan")
        return OutputComparison(name, shape, tol.atol, tol.rtol, False, nan, nan, nan, nan, nan, nan, 0, 0,
                                problem=f"shape {got.shape} != reference {ref.shape}"), 0
    valid = _valid_positions(ref, mask)
    ignored = 0
    r, g = ref, got
    if valid is not None and not valid.all():
        ignored = int((~valid).sum())
        r, g = ref[valid], got[valid]
    r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
    diff = np.abs(g64 - r64)
    finite = np.isfinite(diff)
    bad = diff > tol.atol + tol.rtol * np.abs(r64)
    # NaN in the same place in both is agreement; anywhere else it is a mismatch.
    same_nan = np.isnan(r64) & np.isnan(g64)
    bad = (bad | ~finite) & ~same_nan
    d = diff[finite] if finite.any() else np.zeros(1)
    rel = d / np.maximum(np.abs(r64[finite]), 1e-12) if finite.any() else np.zeros(1)
    signal = float(np.sum(r64[finite] ** 2)) if finite.any() else 0.0
    noise = float(np.sum(d ** 2))
    norm = float(np.linalg.norm(r64[finite]) * np.linalg.norm(g64[finite])) if finite.any() else 0.0
    cosine = float(np.dot(r64[finite], g64[finite]) / norm) if norm > 0 else (1.0 if noise == 0 else 0.0)
    sqnr = float("inf") if noise == 0 else (float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf"))
    top1 = None
    if "logits" in name and ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
        rr = ref if valid is None else ref[valid]
        gg = got if valid is None else got[valid]
        top1 = float(np.mean(rr.argmax(-1) == gg.argmax(-1)))
    out = OutputComparison(
        name=name, shape=shape, atol=tol.atol, rtol=tol.rtol, passed=not bad.any(),
        max_abs=float(d.max()) if d.size else 0.0, mean_abs=float(d.mean()) if d.size else 0.0,
        p99_abs=float(np.quantile(d, 0.99)) if d.size else 0.0, max_rel=float(rel.max()) if rel.size else 0.0,
        cosine=cosine, sqnr_db=sqnr, mismatched=int(bad.sum()), compared=int(bad.size), top1_agreement=top1,
    )
    return out, ignored


def pooled_sqnr_db(refs: list[np.ndarray], gots: list[np.ndarray], masks: list[np.ndarray | None]) -> float:
    """SQNR over several input sets at once (signal and noise summed), leaving out padding positions."""
    signal = noise = 0.0
    for ref, got, mask in zip(refs, gots, masks):
        valid = _valid_positions(ref, mask)
        r, g = (ref, got) if valid is None else (ref[valid], got[valid])
        r, g = r.astype(np.float64), g.astype(np.float64)
        signal += float(np.sum(r ** 2))
        noise += float(np.sum((g - r) ** 2))
    return float("inf") if noise == 0 else float(10 * np.log10(signal / noise)) if signal > 0 else float("-inf")


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
