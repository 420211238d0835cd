"""When the artifact of a lossy compile is accepted: the lossy acceptance policy.

A quantized artifact may round differently from the PyTorch graph after the passes: tiny float
differences upstream flip roundings of coarse activation steps and the two drift apart, each as far
from fp32 as the other. So an output that misses the graph's tolerance still passes when its SQNR
against eager fp32, pooled over the verification inputs, is within a margin of the graph's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from effc.runtime.compare import Comparison, output_mask, pooled_sqnr_db


@dataclass(frozen=True)
class SqnrMargin:
    """Accept an output that rounds differently from the graph when it is at most `margin_db` less
    accurate than the graph against eager fp32."""

    name: ClassVar[str] = "sqnr_margin"
    margin_db: float = 1.5

    def describe(self) -> str:
        return f"the lossy acceptance policy {self.name} (within {self.margin_db:g} dB of the graph's SQNR against eager fp32)"

    def accepts(self, artifact_db: float, graph_db: float) -> bool:
        return artifact_db >= graph_db - self.margin_db

    def judge(self, results: list[Comparison], eager: list[dict[str, np.ndarray]], graph: list[dict[str, np.ndarray]],
              artifact: list[dict[str, np.ndarray]], masks: list[np.ndarray | None]) -> list[dict]:
        """Decide each output that misses the graph's tolerance on some set (`results`: the artifact against
        the graph, one per set), and mark it so in `results`. The judgements, one per such output."""
        failing = sorted({o.name for r in results for o in r.outputs if not o.passed})
        judgements = []
        for name in failing:
            e = [s[name] for s in eager]
            laid = [output_mask(name, x.shape, m) for x, m in zip(e, masks)]  # a cache's padding too
            art = pooled_sqnr_db(e, [s[name] for s in artifact], laid)
            ref = pooled_sqnr_db(e, [s[name] for s in graph], laid)
            judgements.append({"output": name, "artifact_sqnr_db_vs_eager": art, "graph_sqnr_db_vs_eager": ref,
                               "passed": bool(self.accepts(art, ref))})
        verdicts = {j["output"]: j["passed"] for j in judgements}
        for r in results:
            for o in r.outputs:
                if o.name in verdicts:
                    o.passed = verdicts[o.name]
                    o.problem = None if o.passed else f"FAIL: less accurate than the graph ({self.name})"
        return judgements


LOSSY = SqnrMargin()
