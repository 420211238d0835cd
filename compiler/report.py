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
    rules: dict[str, int] = field(default_factory=dict)  # "<pass>/<rule>" -> nodes it rewrote


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
    # Set when a pass changes the numbers on purpose, on the example inputs against eager PyTorch: the
    # artifact's outputs (verify runs it), and beside them the graph's after the passes (in PyTorch).
    accuracy_vs_eager: dict | None = None
    graph_accuracy_vs_eager: dict | None = None
    accuracy_not_measured: str | None = None  # why the artifact's accuracy is missing (--no-verify)
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
            against = "the graph after the passes (PyTorch)" if self.graph_accuracy_vs_eager else "eager PyTorch"
            lines.append(f"verification vs {against}: {verdict}, max |Δ| {v['max_abs']:.3g} "
                         f"(atol {v['atol']:g}, rtol {v['rtol']:g}) over {len(v['shapes'])} input shapes")
            for r in v.get("quantized_rounding", []):
                lines.append(f"  {r['output']}: rounds differently from the graph; SQNR vs eager fp32 "
                             f"{r['artifact_sqnr_db_vs_eager']:.1f} dB (graph {r['graph_sqnr_db_vs_eager']:.1f} dB): "
                             + ("as accurate, accepted" if r["passed"] else "LESS accurate"))
        else:
            lines.append("verification: skipped (--no-verify)")
        lines += accuracy_lines(self.to_dict(), "accuracy of the artifact vs eager fp32, ")
        lines.append(f"total: {self.total_seconds:.1f} s")
        return "\n".join(lines)


def bits_per_parameter(artifact_bytes: int, params: int) -> str:
    """The artifact's whole size (weights, codes, scales, graph) per weight of the captured model."""
    return f"{8 * artifact_bytes / params:.2f} bits per parameter" if params else "no parameters"


def accuracy_lines(report: dict, prefix: str) -> list[str]:
    """The artifact's accuracy against eager fp32 per output, the graph's beside it; or that the artifact's
    was not measured, and the graph's, named as the graph's. `report` is a CompileReport's dict."""
    artifact, graph = report.get("accuracy_vs_eager"), report.get("graph_accuracy_vs_eager")
    if not graph:
        return []
    if not artifact:
        why = report.get("accuracy_not_measured") or "the artifact was not run"
        return [f"{prefix.rstrip(', ')}: not measured ({why})"] + [
            f"  graph after the passes (PyTorch, not the artifact), {o['name']}: cosine {o['cosine']:.5f}, "
            f"SQNR {o['sqnr_db']:.1f} dB" for o in graph["outputs"]]
    beside = {o["name"]: o for o in graph["outputs"]}
    lines = []
    for o in artifact["outputs"]:
        g = beside.get(o["name"], {})
        top1 = o.get("top1_agreement")
        lines.append(f"{prefix}{o['name']}: cosine {o['cosine']:.5f}" + _graph(g, "cosine", "{:.5f}")
                     + f", SQNR {o['sqnr_db']:.1f} dB" + _graph(g, "sqnr_db", "{:.1f} dB")
                     + f", max |Δ| {o['max_abs']:.3g}" + (f", top-1 agreement {top1:.3f}" if top1 is not None else ""))
    return lines


def _graph(beside: dict, key: str, fmt: str) -> str:
    return f" (graph {fmt.format(beside[key])})" if key in beside else ""
