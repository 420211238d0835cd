"""The compile report: per-stage and per-pass numbers, as JSON for machines and a table for people."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class PassRecord:
    name: str
    config: dict
    seconds: float
    changed: bool
    counts: dict[str, int]
    nodes_before: int
    nodes_after: int
    param_bytes_before: int
    param_bytes_after: int
    max_abs_vs_eager: float  # the graph after this pass, run in PyTorch, against the eager model
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileReport:
    source: dict
    target: str
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    passes: list[PassRecord] = field(default_factory=list)
    nodes_captured: int = 0
    param_bytes_captured: int = 0
    params_captured: int = 0  # weight elements: bits per parameter = 8 * bytes / params
    artifact_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)  # operator -> count in the artifact
    verification: dict | None = None
    # Set when a pass changes the numbers on purpose: the artifact's outputs against eager PyTorch (the
    # graph's after the passes with --no-verify, which does not run the artifact; "measured_on" says which).
    accuracy_vs_eager: dict | None = None
    total_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'stage':<28} {'seconds':>8}"]
        lines += [f"{k:<28} {v:>8.2f}" for k, v in self.stages.items()]
        if self.passes:
            lines.append("")
            lines.append(f"{'pass':<14} {'seconds':>8} {'nodes':>13} {'param MB':>17} {'max|Δ| vs eager':>16}  changes")
            for p in self.passes:
                changes = ", ".join(f"{k}: {v}" for k, v in p.counts.items() if v) or "none"
                lines.append(
                    f"{p.name:<14} {p.seconds:>8.2f} {p.nodes_before:>6}->{p.nodes_after:<6} "
                    f"{p.param_bytes_before / 1e6:>8.2f}->{p.param_bytes_after / 1e6:<8.2f} {p.max_abs_vs_eager:>16.3g}  {changes}"
                )
        lines.append("")
        lines.append(f"artifact size: {self.artifact_bytes / 1e6:.2f} MB (captured weights {self.param_bytes_captured / 1e6:.2f} MB); "
                     f"{bits_per_parameter(self.artifact_bytes, self.params_captured)}")
        if self.verification:
            v = self.verification
            verdict = "passed" if v["passed"] else "FAILED"
            against = "the graph after the passes (PyTorch)" if self.accuracy_vs_eager else "eager PyTorch"
            lines.append(f"verification vs {against}: {verdict}, max |Δ| {v['max_abs']:.3g} "
                         f"(atol {v['atol']:g}, rtol {v['rtol']:g}) over {len(v['shapes'])} input shapes")
            for r in v.get("quantized_rounding", []):
                lines.append(f"  {r['output']}: rounds differently from the graph; SQNR vs eager fp32 "
                             f"{r['artifact_sqnr_db_vs_eager']:.1f} dB (graph {r['graph_sqnr_db_vs_eager']:.1f} dB): "
                             + ("as accurate, accepted" if r["passed"] else "LESS accurate"))
        else:
            lines.append("verification: skipped (--no-verify)")
        if self.accuracy_vs_eager:
            on = self.accuracy_vs_eager.get("measured_on", "artifact")
            for o in self.accuracy_vs_eager["outputs"]:
                lines.append(f"accuracy of the {on} vs eager fp32, {o['name']}: cosine {o['cosine']:.5f}, SQNR {o['sqnr_db']:.1f} dB, "
                             f"max |Δ| {o['max_abs']:.3g}" + (f", top-1 agreement {o['top1_agreement']:.3f}"
                                                              if o.get("top1_agreement") is not None else ""))
        lines.append(f"total: {self.total_seconds:.1f} s")
        return "\n".join(lines)


def bits_per_parameter(artifact_bytes: int, params: int) -> str:
    """The artifact's whole size (weights, codes, scales, graph) per weight of the captured model."""
    return f"{8 * artifact_bytes / params:.2f} bits per parameter" if params else "no parameters"
