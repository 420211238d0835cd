"""Helpers for tests that change an artifact, or what it computes, on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from effc.runtime.manifest import MANIFEST, file_hashes, seal


def rewrite_manifest_hashes(artifact: Path) -> None:
    """Re-hash every file and the manifest itself, so only the numbers (not the integrity check) can tell a change."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = file_hashes(artifact)
    (artifact / MANIFEST).write_text(json.dumps(seal(manifest)))


def add_run_noise(monkeypatch, scale: float) -> None:
    """Make every Session.run return its outputs plus seeded Gaussian noise of `scale` times each
    output's standard deviation: an artifact that computes worse than it should."""
    from effc.runtime.session import Session

    real_run = Session.run

    def noisy(self, feeds, adapter=None):
        out = real_run(self, feeds, adapter)
        rng = np.random.default_rng(0)
        return {k: v + (rng.standard_normal(v.shape) * scale * v.std()).astype(v.dtype) for k, v in out.items()}

    monkeypatch.setattr(Session, "run", noisy)
