"""The lossy acceptance policy (effc.acceptance): an artifact that matches the graph after the passes, or
rounds differently but is as accurate against eager fp32 within the margin, passes; a worse one fails."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from effc.acceptance import LOSSY, SqnrMargin
from effc.runtime.compare import Tolerance, compare

TOL = Tolerance(1e-4, 1e-3)


def _sets(artifact_noise: float, seed: int = 1, mask: np.ndarray | None = None):
    """Eager outputs on two sets, the graph's (SQNR ~ 20 dB against eager) and an artifact's with its own
    noise, of `artifact_noise` times the graph's size."""
    rng = np.random.default_rng(0)
    eager = [{"y": rng.standard_normal((2, 8, 16)).astype(np.float32)} for _ in range(2)]
    graph = [{"y": e["y"] + 0.1 * rng.standard_normal(e["y"].shape).astype(np.float32)} for e in eager]
    other = np.random.default_rng(seed)
    artifact = [{"y": e["y"] + artifact_noise * 0.1 * other.standard_normal(e["y"].shape).astype(np.float32)}
                for e in eager]
    masks = [mask, mask]
    results = [compare(g, a, TOL, attention_mask=m) for g, a, m in zip(graph, artifact, masks)]
    return results, eager, graph, artifact, masks


def test_an_artifact_within_tolerance_of_the_graph_passes_without_judgement():
    results, eager, graph, _, masks = _sets(0.0)
    artifact = [{"y": g["y"] + 1e-6} for g in graph]
    results = [compare(g, a, TOL) for g, a in zip(graph, artifact)]
    assert LOSSY.judge(results, eager, graph, artifact, masks) == []
    assert all(r.passed for r in results)


def test_an_artifact_that_rounds_differently_but_is_as_accurate_passes():
    results, eager, graph, artifact, masks = _sets(1.0)
    assert not any(r.passed for r in results)  # beyond the graph's tolerance everywhere
    (j,) = LOSSY.judge(results, eager, graph, artifact, masks)
    assert j["passed"] and j["output"] == "y"
    assert abs(j["artifact_sqnr_db_vs_eager"] - j["graph_sqnr_db_vs_eager"]) < 0.5
    assert 19 < j["graph_sqnr_db_vs_eager"] < 21
    assert all(r.passed for r in results)


def test_a_planted_artifact_worse_than_the_graph_by_more_than_the_margin_fails():
    results, eager, graph, artifact, masks = _sets(1.5)  # noise x1.5: 3.5 dB worse than the graph
    (j,) = LOSSY.judge(results, eager, graph, artifact, masks)
    assert not j["passed"]
    assert j["graph_sqnr_db_vs_eager"] - j["artifact_sqnr_db_vs_eager"] == pytest.approx(20 * np.log10(1.5), abs=0.3)
    assert not any(r.passed for r in results)
    assert all("sqnr_margin" in r.outputs[0].problem for r in results)


def test_the_margin_is_the_policys():
    assert LOSSY.margin_db == 1.5
    assert LOSSY.accepts(28.5, 30.0) and not LOSSY.accepts(28.49, 30.0)
    assert SqnrMargin(margin_db=0.0).accepts(30.0, 30.0) and not SqnrMargin(margin_db=0.0).accepts(29.9, 30.0)
    assert "sqnr_margin" in LOSSY.describe() and "1.5 dB" in LOSSY.describe()


def test_padding_positions_do_not_count():
    mask = np.ones((2, 8), dtype=np.int64)
    mask[:, 6:] = 0
    results, eager, graph, artifact, masks = _sets(1.0, mask=mask)
    for a in artifact:
        a["y"][:, 6:] = 1e3  # garbage where the attention mask says padding
    results = [compare(g, a, TOL, attention_mask=m) for g, a, m in zip(graph, artifact, masks)]
    (j,) = LOSSY.judge(results, eager, graph, artifact, masks)
    assert j["passed"]


def test_compile_of_an_artifact_worse_than_the_graph_exits_1_and_writes_nothing(default_model, tmp_path, monkeypatch):
    """End to end: int8, with the runtime's outputs made noisier during verification than the margin allows."""
    from effc.cli import main
    from tests.artifacts import add_run_noise

    add_run_noise(monkeypatch, 0.2)
    out = tmp_path / "q"
    result = CliRunner().invoke(main, ["compile", str(default_model[0]), "--passes", "int8", "-o", str(out)])
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("effc: error:")]
    assert len(errors) == 1, result.output
    assert "fails the lossy acceptance policy sqnr_margin" in errors[0] and "nothing was written" in errors[0]
    # The policy's numbers, not an atol figure: the artifact's SQNR and the graph's, in dB.
    assert "SQNR" in errors[0] and "dB" in errors[0] and "atol" not in errors[0], errors[0]
    assert list(tmp_path.iterdir()) == []
