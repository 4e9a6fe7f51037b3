"""Output files: atomic writes, an asset's files committed together, safe temp clean-up.

Every output goes to a hidden temp file in the destination folder and is `os.replace`d into place;
the rename is atomic on POSIX and Windows when both paths are on one file system. Inside
:func:`staged_outputs` the renames wait until the whole run has succeeded, so a failed run leaves
the previous asset's files (glb, splat, preview, config, LODs, sidecar) as they were.

Temp names carry the writer's host and pid (``.tdgen-tmp-HOST-PID-RANDOM.ext``), so a clean-up
removes only what this process or a dead one left, never a concurrent run's files in flight.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import os
import re
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

from tdgen.errors import InputError, WriteError

TEMP_PREFIX = ".tdgen-tmp-"
TEMP_GRACE_S = 3600.0
"""A temp file whose owner cannot be told (another host, an older naming) is stale only when it is
this much older than this process: longer than any stage holds a staged file."""

_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]
_TEMP_NAME = re.compile(r"^\.tdgen-tmp-([0-9a-f]{8})-(\d+)-")
_STARTED = time.time()
_LIVE: set[Path] = set()  # temps this process created and has not yet renamed or removed
_LIVE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Errors


def _why_and_fix(e: OSError) -> tuple[str, str]:
    why = e.strerror or str(e) or type(e).__name__
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return why, "free some disk space (or pick a folder on another disk with -o) and rerun"
    if e.errno == errno.EROFS:
        return why, "the file system is read-only: choose a writable folder with -o"
    if e.errno in (errno.EACCES, errno.EPERM):
        return why, "fix the folder's permissions or choose another folder with -o"
    return why, "check the folder, or choose another one with -o"


def write_error(path: str | os.PathLike, e: OSError) -> WriteError:
    """A one-line WriteError for an OSError raised while writing `path`, with the fix."""
    why, fix = _why_and_fix(e)
    return WriteError(f"cannot write {path} ({why}); {fix}")


# ---------------------------------------------------------------------------------------------
# Temp files


def _new_temp(folder: Path, suffix: str) -> Path:
    """Create an empty temp file in `folder`, mode 0666 less the umask (mkstemp's 0600 would
    survive the rename and hide outputs from other users, web servers and CI artefact steps)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        p = folder / f"{TEMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
        try:
            fd = os.open(p, flags, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        with _LIVE_LOCK:
            _LIVE.add(p)
        return p


def _drop_temp(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
    with _LIVE_LOCK:
        _LIVE.discard(p)


def _rename(tmp: Path, path: Path) -> None:
    try:
        os.replace(tmp, path)
    except OSError as e:
        _drop_temp(tmp)
        raise write_error(path, e) from None
    with _LIVE_LOCK:
        _LIVE.discard(tmp)


def _is_stale(p: Path) -> bool:
    with _LIVE_LOCK:
        if p in _LIVE:
            return False
    m = _TEMP_NAME.match(p.name)
    if m and m.group(1) == _HOST:
        pid = int(m.group(2))
        if pid == os.getpid():
            return True  # ours and not in flight: left by an aborted write
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True  # its writer is gone (killed, crashed)
        except OSError:
            return False  # alive, under another user
        return False  # a concurrent run on this machine is still writing it
    try:
        return p.stat().st_mtime < _STARTED - TEMP_GRACE_S
    except OSError:
        return False


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files that killed or failed runs left in `folder`; returns how many.

    Removes this process's own leftovers and those of dead processes on this machine; a file of a
    live run (here or, by its age, on another host sharing the folder) is left alone.
    """
    n = 0
    for p in Path(folder).glob(TEMP_PREFIX + "*"):
        if _is_stale(p):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


def check_writable(folder: str | os.PathLike) -> Path:
    """Create `folder` if needed and prove a file can be created in it (then remove the probe).

    An actual create, not `os.access`: root passes every permission check but still cannot
    write to a read-only mount. InputError (exit 2), before any work, naming the fix.
    """
    folder = Path(folder) if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = _new_temp(folder, ".probe")
    except FileExistsError:
        raise InputError(f"cannot create the output folder {folder}: a file is in the way; "
                         "choose another folder with -o") from None
    except OSError as e:
        why, fix = _why_and_fix(e)
        raise InputError(f"cannot write to the output folder {folder} ({why}); {fix}") from None
    _drop_temp(probe)
    return folder


# ---------------------------------------------------------------------------------------------
# Staged outputs: written now, renamed together at the end


class StagedOutputs:
    """Files written under temp names and renamed into place together by :meth:`commit`."""

    def __init__(self) -> None:
        self._files: dict[Path, Path] = {}  # final path → its temp, in write order
        self._remove: list[Path] = []

    def stage(self, path: Path, tmp: Path) -> None:
        old = self._files.pop(path, None)
        if old is not None and old != tmp:
            _drop_temp(old)
        self._files[path] = tmp

    def pending(self, path: str | os.PathLike) -> Path:
        """Where `path`'s new content is until commit (the path itself when not staged)."""
        return self._files.get(Path(path), Path(path))

    def remove_on_commit(self, path: str | os.PathLike) -> None:
        """Delete `path` at commit (an old output this run does not replace, e.g. a stale LOD)."""
        self._remove.append(Path(path))

    @property
    def paths(self) -> list[Path]:
        return list(self._files)

    def commit(self) -> None:
        # Write order is rename order: callers stage the file that vouches for the others (the
        # config, a batch sidecar) last, so a crash mid-commit leaves it old and the set detectable.
        items = list(self._files.items())
        self._files.clear()
        for i, (path, tmp) in enumerate(items):
            try:
                _rename(tmp, path)
            except WriteError:
                for _, rest in items[i + 1 :]:
                    _drop_temp(rest)
                raise
        for p in self._remove:
            if p not in dict(items):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def discard(self) -> None:
        for tmp in self._files.values():
            _drop_temp(tmp)
        self._files.clear()


_STAGED: contextvars.ContextVar[StagedOutputs | None] = contextvars.ContextVar("tdgen_staged", default=None)


@contextlib.contextmanager
def staged_outputs() -> Iterator[StagedOutputs]:
    """Every atomic write inside is held back and committed when the block ends without error;
    on any exception (Ctrl-C included) the temps are removed and existing files stay untouched.
    Nested blocks join the outermost one, so a batch can add its sidecar to `generate`'s set."""
    outer = _STAGED.get()
    if outer is not None:
        yield outer
        return
    staged = StagedOutputs()
    token = _STAGED.set(staged)
    try:
        yield staged
        _STAGED.reset(token)
        token = None
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    finally:
        if token is not None:
            _STAGED.reset(token)


def pending_path(path: str | os.PathLike) -> Path:
    """Where the content that will be at `path` is now: its staged temp inside
    :func:`staged_outputs`, else `path` itself. For reading (hashing) an output before commit."""
    staged = _STAGED.get()
    return staged.pending(path) if staged is not None else Path(path)


# ---------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` (at the end of the enclosing
    :func:`staged_outputs`, if any), on error it is removed.

    The temp name keeps the final suffix, so writers that pick a format by extension still work.
    OSErrors (disk full, read-only, no permission) become a one-line WriteError naming `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path.parent, path.suffix)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
    except OSError as e:
        _drop_temp(tmp)
        raise write_error(path, e) from None
    except BaseException:
        _drop_temp(tmp)
        raise
    staged = _STAGED.get()
    if staged is not None:
        staged.stage(path, tmp)
    else:
        _rename(tmp, path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
