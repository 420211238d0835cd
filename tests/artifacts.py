"""Helpers for tests that change an artifact on purpose and need its manifest to accept the change."""

from __future__ import annotations

import json
from pathlib import Path

from effc.runtime.manifest import MANIFEST, file_hashes, seal


def rewrite_manifest_hashes(artifact: Path) -> None:
    """Re-hash every file and the manifest itself, so only the numbers (not the integrity check) can tell a change."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    manifest["files"] = file_hashes(artifact)
    (artifact / MANIFEST).write_text(json.dumps(seal(manifest)))
