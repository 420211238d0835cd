"""Where `effc compile` writes: the up-front checks of -o, the lock beside it, and the atomic publish.

-o is refused before any model is loaded when it is the working directory (or above it), a file, a
symbolic link, inside the source model (or holds it), or in a directory that cannot be written.
`--force` replaces only an effc artifact. Beside -o (same directory, hidden names):

    .NAME.lock        held (flock) for the whole compile; a second compile to -o refuses at once
    .NAME.tmp-XXXX    the artifact being built; renamed onto -o once complete and verified
    .NAME.old-PID     only where the atomic exchange is unavailable (see publish)

A compile that was killed leaves the last two behind; the next compile to the same -o removes them.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from effc.errors import EffcError
from effc.runtime.manifest import MANIFEST

try:
    import fcntl
except ImportError:  # Windows: no lock; publish still refuses an -o that appeared during the compile
    fcntl = None


def check(output: str | Path, force: bool, source: str, adapters) -> Path:
    """Refuse an -o that compile must never write (nothing is written here); the normalized -o path.

    The model directory is `source` when it is a directory that holds config.json: any other directory
    is refused by sources.load at once, with a better message than this one."""
    given = output
    output = Path(os.path.abspath(output))
    output = output.parent.resolve() / output.name
    if output.is_symlink():
        raise EffcError(f"-o {given} is a symbolic link; give the directory it points to, or another -o")
    real = output.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise EffcError(f"-o {given} is the current directory or one above it; give a new directory, e.g. -o out/model")
    if output.exists() and not output.is_dir():
        raise EffcError(f"-o {given} is an existing file, not a directory; choose another -o")
    sources = [("model", Path(source))] if (Path(source) / "config.json").is_file() else []
    sources += [("adapter", Path(a)) for a in adapters if Path(a).is_dir()]
    for kind, path in sources:
        src = path.resolve()
        if real == src or src in real.parents:
            raise EffcError(f"-o {given} is inside the {kind} directory {path}; write the artifact outside it")
        if real in src.parents:
            raise EffcError(f"-o {given} holds the {kind} directory {path}; write the artifact somewhere else")
    if output.exists() and not force:
        raise EffcError(f"{given} already exists; choose another -o or pass --force to replace it")
    return output


def not_replaceable(path: Path) -> str | None:
    """Why --force must not replace the directory `path`, or None: it may replace an effc artifact holding
    only its own files, or an empty directory (nothing to lose; e.g. made by `mkdir out` beforehand)."""
    if not any(path.iterdir()):
        return None
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return f"it has no {MANIFEST} that effc wrote"
    if not isinstance(manifest, dict) or not {"format_version", "effc_version"} <= manifest.keys():
        return f"its {MANIFEST} was not written by effc"
    listed = set(manifest.get("files") or ()) | {MANIFEST}
    extra = []
    for root, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            rel = Path(root, name).relative_to(path).as_posix()
            if rel not in listed:
                extra.append(rel)
    if extra:
        return f"it holds files that are not part of the artifact ({', '.join(sorted(extra)[:3])})"
    return None


class Lock:
    """flock on .NAME.lock beside -o, held for the whole compile; the file says who holds it.

    The holder removes the file when it is done. A compile that finds the lock taken refuses at once and
    names the holder; one that locked a file that its previous holder had just removed tries again."""

    def __init__(self, output: Path):
        self.output = output
        self.path = output.with_name(f".{output.name}.lock")
        self.fd: int | None = None
        self.made: list[Path] = []  # parent directories this compile created, removed again if it fails

    def acquire(self) -> Lock:
        parent = self.output.parent
        chain = [parent, *parent.parents]
        first = next(i for i, p in enumerate(chain) if p.exists())  # the root exists
        if not chain[first].is_dir():
            raise EffcError(f"cannot create -o {self.output}: {chain[first]} is a file; choose another -o")
        self.made = chain[:first]  # deepest first
        try:
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise EffcError(f"cannot create {parent} ({e.strerror}); "
                                "choose an -o in a directory you can write to") from None
            if not os.access(parent, os.W_OK | os.X_OK):
                raise EffcError(f"cannot write in {parent} (permission denied); "
                                "choose an -o in a directory you can write to")
            self._lock()
        except BaseException:
            self._remove_made()
            raise
        return self

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            except OSError as e:
                raise EffcError(f"cannot create files in {self.output.parent} ({e.strerror}); "
                                "choose an -o in a directory you can write to") from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "holder unknown"
                os.close(fd)
                raise EffcError(f"another effc compile ({holder}) is writing {self.output}; "
                                "wait for it to finish or choose another -o") from None
            try:
                locked = os.stat(self.path)
            except FileNotFoundError:
                locked = None
            if locked is not None and os.path.samestat(locked, os.fstat(fd)):
                break
            os.close(fd)  # the previous holder removed the file we locked: lock the one there now
        started = datetime.datetime.now().isoformat(sep=" ", timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {started}\n".encode(), 0)
        self.fd = fd

    def release(self, failed: bool = False) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while locked: a compile that opened it meanwhile sees it gone (_lock)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        if failed:
            self._remove_made()

    def _remove_made(self) -> None:
        for p in self.made:  # deepest first; only empty ones go (another compile may be using one)
            try:
                p.rmdir()
            except OSError:
                break

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.release(failed=kind is not None)


def claim(output: Path, force: bool) -> Lock:
    """Create -o's parent, take the lock, check again under it what --force would replace, and remove
    what killed compiles to -o left behind. The caller holds the returned lock until it has published."""
    lock = Lock(output).acquire()
    try:
        if output.exists() and not force:
            raise EffcError(f"{output} already exists; choose another -o or pass --force to replace it")
        if output.is_dir():
            why = not_replaceable(output)
            if why:
                raise EffcError(f"--force replaces only an effc artifact, and {output} is not one: {why}; "
                                "move it away yourself or choose another -o")
        clean_debris(output)
    except BaseException:
        lock.release(failed=True)
        raise
    return lock


_DEBRIS = re.compile(r"(tmp)-[A-Za-z0-9_]+|(old)-([0-9]+)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def clean_debris(output: Path) -> list[str]:
    """Remove .NAME.tmp-* (no live compile owns one: we hold the lock) and .NAME.old-PID whose process is
    gone (or is this one: a dead compile's PID reused) beside `output`; the names removed."""
    prefix = f".{output.name}."
    removed = []
    for entry in os.scandir(output.parent):
        m = _DEBRIS.fullmatch(entry.name[len(prefix):]) if entry.name.startswith(prefix) else None
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        if m[1] or int(m[3]) == os.getpid() or not _alive(int(m[3])):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.name)
    return removed


def make_tmp(output: Path) -> Path:
    """The directory the artifact is built in, beside -o, with the mode the user's umask gives
    (tempfile.mkdtemp makes it 0700; the files inside follow the umask already)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2(2); False where this system has none or the filesystem does not take `flags`."""
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is None:
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def publish(tmp: Path, output: Path, force: bool) -> None:
    """Move the finished artifact in `tmp` to `output` so that -o is never missing.

    Replacing: renameat2(RENAME_EXCHANGE) swaps the two directories in one step (a directory cannot be
    renamed over a non-empty one), then the old artifact, now at `tmp`'s name, is removed; a kill in
    between leaves it as .NAME.tmp-* debris. Where the kernel or filesystem has no exchange, the old one
    is renamed to .NAME.old-PID first and -o is missing between two renames. A new -o is created with
    RENAME_NOREPLACE. What appeared at -o during the compile (we hold the lock, so not from effc) is
    refused unless --force may replace it."""
    if os.path.lexists(output):
        if not force:
            raise EffcError(f"{output} appeared while compiling; nothing was replaced; "
                            "choose another -o or pass --force to replace it")
        if output.is_symlink():
            why = "it is a symbolic link"
        elif not output.is_dir():
            why = "it is a file"
        else:
            why = not_replaceable(output)
        if why:
            raise EffcError(f"{output} changed while compiling and --force will not replace it: {why}; "
                            "nothing was written; move it away yourself or choose another -o")
        if _renameat2(tmp, output, _RENAME_EXCHANGE):
            shutil.rmtree(tmp)
            return
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
        try:
            tmp.rename(output)
        except BaseException:
            old.rename(output)
            raise
        shutil.rmtree(old)
        return
    try:
        if _renameat2(tmp, output, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise EffcError(f"{output} appeared while compiling; nothing was replaced; choose another -o") from None
    tmp.rename(output)
