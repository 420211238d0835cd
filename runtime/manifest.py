"""The artifact's manifest.json: what was built, from what, the hash of every file, the hash of the
manifest's own content, and optionally an HMAC of that hash (README, "Trust")."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path, PurePosixPath, PureWindowsPath

from effc.errors import EffcError

FORMAT_VERSION = 2  # 2: manifest_sha256 (the manifest covers itself), optional signature
MANIFEST = "manifest.json"
REPORT = "report.json"
MANIFEST_SHA256 = "manifest_sha256"  # sha256 of the canonical JSON of every other field except SIGNATURE
SIGNATURE = "signature"  # {"hmac_sha256": hex} of MANIFEST_SHA256's value, keyed with the --sign-key file


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


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's content: canonical JSON (sorted keys, no spaces) of every field but the
    hash and the signature. Computed on the JSON round trip, so it is the same before and after writing."""
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k not in (MANIFEST_SHA256, SIGNATURE)}))
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_key(sign_key: str | Path | bytes) -> bytes:
    """The HMAC key: bytes as given, or the bytes of the file a path names."""
    if isinstance(sign_key, bytes):
        key = sign_key
    else:
        path = Path(sign_key)
        try:
            key = path.read_bytes()
        except OSError as e:
            raise EffcError(f"cannot read the signing key {path}: {e.strerror or e}; give a file holding the key") from None
    if not key:
        raise EffcError(f"the signing key {'given' if isinstance(sign_key, bytes) else sign_key} is empty; "
                        "use a file of random bytes (e.g. `head -c 32 /dev/urandom > key`)")
    return key


def signature(digest: str, key: bytes) -> str:
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def seal(manifest: dict, sign_key: str | Path | bytes | None = None) -> dict:
    """The manifest with its own hash, and with a key its HMAC; any previous seal is replaced."""
    manifest = {k: v for k, v in manifest.items() if k not in (MANIFEST_SHA256, SIGNATURE)}
    manifest[MANIFEST_SHA256] = manifest_digest(manifest)
    if sign_key is not None:
        manifest[SIGNATURE] = {"hmac_sha256": signature(manifest[MANIFEST_SHA256], load_key(sign_key))}
    return manifest


def write_manifest(root: Path, manifest: dict, sign_key: str | Path | bytes | None = None) -> None:
    manifest = seal(dict(manifest, format_version=FORMAT_VERSION, files=file_hashes(root)), sign_key)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def artifact_file(root: Path, manifest: dict, rel, what: str) -> Path:
    """root/rel for a file the manifest names (`what`: "model_file", ...), refused unless rel is a relative
    path inside the artifact, without "..", that the manifest hashes, and not a link to elsewhere."""
    root = Path(root)
    if not isinstance(rel, str) or not rel:
        raise EffcError(f"artifact {root} was tampered with: {what} is {rel!r}, not a file name; recompile it")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).drive or "\\" in rel or ".." in parts:
        raise EffcError(f"artifact {root} points outside itself: {what} {rel!r} must be a relative path inside "
                        "the artifact; recompile it")
    if rel not in manifest.get("files", {}):
        raise EffcError(f"artifact {root} was tampered with: {what} {rel!r} is not a file manifest.json hashes; "
                        "recompile it")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise EffcError(f"artifact {root} points outside itself: {what} {rel!r} is a link to {path.resolve()}; "
                        "recompile it")
    return path


def referenced_files(manifest: dict) -> dict[str, object]:
    """What the runtime opens, by the manifest field that names it."""
    refs: dict[str, object] = {"model_file": manifest.get("model_file")}
    target = manifest.get("target") if isinstance(manifest.get("target"), dict) else {}
    if "native_library" in target:
        refs["target.native_library"] = target["native_library"]
    if isinstance(manifest.get("engine"), dict):  # a TensorRT engine from effc build-engine
        refs["engine.file"] = manifest["engine"].get("file")
    decoder = manifest.get("decoder") if isinstance(manifest.get("decoder"), dict) else {}
    if decoder.get("tokenizer"):
        refs["decoder.tokenizer"] = decoder["tokenizer"]
    adapters = manifest.get("adapters") or {}
    for name, rel in (adapters.get("files") or {}).items() if isinstance(adapters, dict) else ():
        refs[f"adapter {name}"] = rel
    return refs


def read_manifest(root: Path, verify: bool = True, sign_key: str | Path | bytes | None = None) -> dict:
    """Load manifest.json and refuse one whose content does not match its own hash, or that names a file
    outside the artifact; with sign_key, one that is unsigned or signed with another key. With verify, also
    refuse an artifact whose files were changed, added or removed (verify=False is for the compiler's own
    provisional artifact; torch_program.py hashes what it loads regardless)."""
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
    if not isinstance(manifest, dict):
        raise EffcError(f"{path} is not an effc manifest (not a JSON object); the artifact is damaged, compile it again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise EffcError(f"{root} has artifact format {version}, this effc reads {FORMAT_VERSION}; recompile it with this effc")
    if not isinstance(manifest.get("files"), dict):
        raise EffcError(f"artifact {root} was tampered with: manifest.json has no file list; recompile it")
    if manifest.get(MANIFEST_SHA256) != manifest_digest(manifest):
        raise EffcError(f"artifact {root} was tampered with: manifest.json does not match its {MANIFEST_SHA256} "
                        "(a field was edited); recompile it")
    for what, rel in referenced_files(manifest).items():
        artifact_file(root, manifest, rel, what)
    if sign_key is not None:
        key = load_key(sign_key)
        signed = manifest.get(SIGNATURE)
        signed = signed.get("hmac_sha256") if isinstance(signed, dict) else None
        if not signed:
            raise EffcError(f"artifact {root} is not signed, and a signing key was given; compile it with "
                            "`effc compile --sign-key KEY`, or open it without a key")
        if not hmac.compare_digest(str(signed), signature(manifest[MANIFEST_SHA256], key)):
            raise EffcError(f"artifact {root} is not signed with this key: it was signed with another key, "
                            "or its manifest was rewritten; refusing it")
    if verify:
        expected = manifest["files"]
        actual = file_hashes(root)
        inside = root.resolve()
        for name in sorted(actual):
            if not (root / name).resolve().is_relative_to(inside):
                raise EffcError(f"artifact {root} points outside itself: {name} is a link to {(root / name).resolve()}; "
                                "recompile it")
        for name in sorted(set(expected) | set(actual)):
            if name not in actual:
                raise EffcError(f"artifact {root} is incomplete: {name} is missing; recompile it")
            if name not in expected:
                raise EffcError(f"artifact {root} was tampered with: unexpected file {name}; remove it or recompile")
            if expected[name] != actual[name]:
                raise EffcError(f"artifact {root} was tampered with: sha256 of {name} does not match manifest.json; recompile it")
    return manifest
