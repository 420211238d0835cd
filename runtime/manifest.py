"""The artifact's manifest.json: what was built, from what, and the hash of every file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from effc.errors import EffcError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """One hash for a directory: relative paths and contents of every file, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root except the manifest itself."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(root: Path, manifest: dict) -> None:
    manifest = dict(manifest, format_version=FORMAT_VERSION, files=file_hashes(root))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def read_manifest(root: Path, verify: bool = True) -> dict:
    """Load manifest.json; with verify, refuse an artifact whose files were changed, added or removed."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise EffcError(f"{root} is not an effc artifact directory (not a directory); pass the -o folder of `effc compile`")
    if not path.is_file():
        raise EffcError(f"{root} is not an effc artifact: no {MANIFEST}; pass the -o folder of `effc compile`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EffcError(f"{path} is not valid JSON ({e}); the artifact is damaged, compile it again") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EffcError(f"{root} has artifact format {version}, this effc reads {FORMAT_VERSION}; recompile it with this effc")
    if verify:
        expected = manifest.get("files", {})
        actual = file_hashes(root)
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                raise EffcError(f"artifact {root} is incomplete: {name} is missing; recompile it")
            if name not in expected:
                raise EffcError(f"artifact {root} was tampered with: unexpected file {name}; remove it or recompile")
            if expected[name] != actual[name]:
                raise EffcError(f"artifact {root} was tampered with: sha256 of {name} does not match manifest.json; recompile it")
    return manifest
