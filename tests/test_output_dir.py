"""-o of `effc compile`: refused up front when it must not be written, locked while a compile runs,
replaced atomically with --force and only when it is an effc artifact, debris of killed runs removed."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from effc import outdir, sources
from effc.errors import EffcError
from effc.runtime.manifest import MANIFEST
from tests.test_cli import one_line_error, run

TINY = "examples.models:tiny_gpt2"  # the cheapest real compile (~10 s)
UMASK = 0o027


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under root (hidden ones too) with a file's content, to show nothing was touched."""
    return {p.relative_to(root).as_posix(): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [root, *root.rglob("*")]}


@pytest.fixture
def no_load(monkeypatch):
    """A refusal that must come before the model is loaded fails the test if the model is loaded."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was refused")

    monkeypatch.setattr(sources, "load", load)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real artifact (onnx target), compiled under umask 027."""
    out = tmp_path_factory.mktemp("outdir") / "art"
    old = os.umask(UMASK)
    try:
        result = run("compile", TINY, "--target", "onnx", "-o", out)
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    return out


def test_artifact_mode_follows_umask(artifact):
    # tempfile.mkdtemp alone would leave the artifact directory 0700
    assert modes(artifact) == {("dir", 0o777 & ~UMASK), ("file", 0o666 & ~UMASK)}


def test_force_keeps_a_user_directory(tmp_path, no_load):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes\n")
    before = snapshot(tmp_path)
    one_line_error(run("compile", TINY, "-o", out, "--force"), "not one", "no manifest.json", "choose another -o")
    assert snapshot(tmp_path) == before
    for foreign in ('{"name": "my config"}', "not json {"):  # a manifest.json effc did not write
        (out / MANIFEST).write_text(foreign)
        before = snapshot(tmp_path)
        one_line_error(run("compile", TINY, "-o", out, "--force"), "--force replaces only an effc artifact")
        assert snapshot(tmp_path) == before
    assert (out / "notes.txt").read_text() == "my notes\n"


def test_force_keeps_files_added_to_an_artifact(artifact, tmp_path, no_load):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    (out / "notes.txt").write_text("measurements\n")
    before = snapshot(tmp_path)
    one_line_error(run("compile", TINY, "-o", out, "--force"), "not part of the artifact", "notes.txt")
    assert snapshot(tmp_path) == before


def test_output_refused_up_front(default_model, tmp_path, monkeypatch, no_load):
    model, adapter = default_model
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "a.txt").write_text("a file\n")
    (work / "link").symlink_to(work / "sub")
    monkeypatch.chdir(work / "sub")
    cases = [
        (("-o", "."), ["current directory", "-o out/model"]),
        (("-o", ".", "--force"), ["current directory"]),
        (("-o", "..", "--force"), ["current directory or one above it"]),
        (("-o", work / "a.txt"), ["existing file"]),
        (("-o", work / "a.txt", "--force"), ["existing file"]),
        (("-o", work / "link", "--force"), ["symbolic link"]),
        (("-o", model / "out"), ["inside the model directory", "outside it"]),
        (("-o", model, "--force"), ["inside the model directory"]),
        (("-o", model.parent, "--force"), ["holds the model directory"]),
        (("--adapter", adapter, "-o", adapter / "out"), ["inside the adapter directory"]),
    ]
    before, model_before = snapshot(tmp_path), snapshot(model.parent)
    for args, needles in cases:
        one_line_error(run("compile", model, *args), *needles)
        assert snapshot(tmp_path) == before, args
        assert snapshot(model.parent) == model_before, args


def test_output_under_a_file_refused(tmp_path, no_load):
    (tmp_path / "f").write_text("x")
    one_line_error(run("compile", TINY, "-o", tmp_path / "f" / "out"), "is a file")
    one_line_error(run("compile", TINY, "-o", tmp_path / "f" / "deeper" / "out"), "is a file")
    assert [p.name for p in tmp_path.iterdir()] == ["f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories, so nothing to refuse")
def test_read_only_parent_refused(tmp_path, no_load):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        one_line_error(run("compile", TINY, "-o", parent / "out"), "cannot", "directory you can write to")
        one_line_error(run("compile", TINY, "-o", parent / "new" / "out"), "cannot", "directory you can write to")
        assert list(parent.iterdir()) == []
    finally:
        parent.chmod(0o755)


def test_unwritable_parent_refused(tmp_path, monkeypatch, no_load):
    """The same refusal without depending on who runs the tests: the parent reads as unwritable."""
    parent = tmp_path / "ro"
    parent.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: Path(p) != parent and access(p, mode, **kw))
    one_line_error(run("compile", TINY, "-o", parent / "out"), f"cannot write in {parent}", "directory you can write to")
    assert list(parent.iterdir()) == []


def test_created_parents_removed_when_refused(tmp_path):
    one_line_error(run("compile", TINY, "--passes", "nosuchpass", "-o", tmp_path / "a" / "b" / "out"), "unknown pass")
    assert list(tmp_path.iterdir()) == []


def test_held_lock_refuses_a_second_compile(tmp_path, no_load):
    out = tmp_path / "out"
    with outdir.Lock(out).acquire() as first:  # what a running compile holds
        one_line_error(run("compile", TINY, "-o", out), "another effc compile", f"pid {os.getpid()}", "wait for it")
        one_line_error(run("compile", TINY, "-o", out, "--force"), "another effc compile")
        assert [p.name for p in tmp_path.iterdir()] == [first.path.name]
    assert list(tmp_path.iterdir()) == [], "the lock file outlived the compile that held it"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    if outdir._alive(proc.pid):
        pytest.skip("the exited process's pid was taken again")
    return proc.pid


def test_force_replaces_an_artifact_and_cleans_debris(artifact, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    dead = dead_pid()
    debris = [".art.tmp-k1ll3d", f".art.old-{dead}"]  # a compile killed while building / while publishing
    kept = [".art.old-1", ".other.tmp-abc", ".art.tmp-x.tmp-abc"]  # a live pid's; another -o's
    for name in debris + kept:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.onnx").write_text("partial")
    (tmp_path / ".art.lock").write_text(f"pid {dead} on a killed compile\n")  # its flock went with it

    missing, stop = [], threading.Event()

    def watch():  # -o must exist at every moment, also while the new artifact is swapped in
        while not stop.is_set():
            if not (out / MANIFEST).is_file():
                missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = run("compile", TINY, "--target", "ort", "-o", out, "--force")
    finally:
        stop.set()
        watcher.join()
    assert result.exit_code == 0, result.output
    assert not missing, f"-o was missing {len(missing)} times during the compile"
    assert json.loads((out / MANIFEST).read_text())["target"]["name"] == "ort"  # the old (onnx) one is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", *kept])


def test_publish_refuses_what_appeared_during_the_compile(tmp_path):
    out = tmp_path / "out"
    tmp = outdir.make_tmp(out)
    (tmp / "model.onnx").write_text("new")
    out.mkdir()  # someone else's directory, made while effc compiled
    (out / "notes.txt").write_text("mine")
    with pytest.raises(EffcError, match="appeared while compiling"):
        outdir.publish(tmp, out, force=False)
    with pytest.raises(EffcError, match="changed while compiling"):
        outdir.publish(tmp, out, force=True)
    assert snapshot(out) == {"notes.txt": b"mine"}
    assert (tmp / "model.onnx").read_text() == "new"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_publish_replaces_an_artifact(tmp_path, monkeypatch, exchange):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    (out / MANIFEST).write_text(json.dumps({"format_version": 1, "effc_version": "0", "files": {"model.onnx": ""}}))
    tmp = outdir.make_tmp(out)
    (tmp / "model.onnx").write_text("new")
    if exchange:
        if not sys.platform.startswith("linux"):
            pytest.skip("renameat2 is Linux only")
    else:
        monkeypatch.setattr(outdir, "_renameat2", lambda src, dst, flags: False)
    outdir.publish(tmp, out, force=True)
    assert (out / "model.onnx").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
