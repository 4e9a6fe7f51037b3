"""tdgen.io: staged commits, file modes, write errors, writability probes, temp ownership."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tdgen.io as tio
from tdgen.errors import InputError, WriteError


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(tio.TEMP_PREFIX + "*"))


def test_outputs_follow_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o027)
    try:
        tio.atomic_write_bytes(tmp_path / "a.glb", b"x")
        with tio.staged_outputs():
            tio.atomic_write_text(tmp_path / "b.toml", "y")
    finally:
        os.umask(old)
    assert (tmp_path / "a.glb").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "b.toml").stat().st_mode & 0o777 == 0o640


def test_staged_files_appear_together_and_only_on_success(tmp_path):
    (tmp_path / "a.glb").write_bytes(b"old glb")
    (tmp_path / "a.ply").write_bytes(b"old ply")
    with pytest.raises(RuntimeError):
        with tio.staged_outputs():
            tio.atomic_write_bytes(tmp_path / "a.ply", b"new ply")
            assert (tmp_path / "a.ply").read_bytes() == b"old ply"  # not yet
            assert tio.pending_path(tmp_path / "a.ply").read_bytes() == b"new ply"
            raise RuntimeError("stage 2 failed")
    assert (tmp_path / "a.ply").read_bytes() == b"old ply" and (tmp_path / "a.glb").read_bytes() == b"old glb"
    assert temps(tmp_path) == []

    (tmp_path / "a_lod3.glb").write_bytes(b"stale lod")
    with tio.staged_outputs() as outer:
        tio.atomic_write_bytes(tmp_path / "a.ply", b"new ply")
        with tio.staged_outputs() as inner:  # joins the outer set: nothing lands at its end
            assert inner is outer
            tio.atomic_write_bytes(tmp_path / "a.glb", b"new glb")
        assert (tmp_path / "a.glb").read_bytes() == b"old glb"
        outer.remove_on_commit(tmp_path / "a_lod3.glb")
    assert (tmp_path / "a.ply").read_bytes() == b"new ply" and (tmp_path / "a.glb").read_bytes() == b"new glb"
    assert not (tmp_path / "a_lod3.glb").exists() and temps(tmp_path) == []
    assert tio.pending_path(tmp_path / "a.glb") == tmp_path / "a.glb"  # outside a set: the path itself


def test_ctrl_c_inside_a_staged_set_removes_its_temps(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with tio.staged_outputs():
            tio.atomic_write_bytes(tmp_path / "a.glb", b"x")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code, fix",
    [(errno.ENOSPC, "free some disk space"), (errno.EROFS, "read-only"), (errno.EACCES, "permissions"), (errno.EIO, "check the folder")],
)
def test_write_errors_are_one_line_and_leave_no_temp(tmp_path, monkeypatch, code, fix):
    (tmp_path / "a.glb").write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(WriteError) as e:
        tio.atomic_write_bytes(tmp_path / "a.glb", b"new")
    msg = str(e.value)
    assert str(tmp_path / "a.glb") in msg and os.strerror(code) in msg and fix in msg and "\n" not in msg
    assert e.value.exit_code == 1
    assert (tmp_path / "a.glb").read_bytes() == b"old" and temps(tmp_path) == []


def test_check_writable_really_creates_a_file(tmp_path, monkeypatch):
    # os.access would say yes to root on a read-only mount; the probe is an actual create.
    assert tio.check_writable(tmp_path / "new" / "sub") == tmp_path / "new" / "sub"
    assert (tmp_path / "new" / "sub").is_dir() and temps(tmp_path / "new" / "sub") == []
    real_open = os.open

    def read_only(path, flags, *a, **k):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(InputError, match="cannot write to the output folder .*Read-only file system.*choose a writable folder"):
        tio.check_writable(tmp_path)
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="a file is in the way"):
        tio.check_writable(tmp_path / "file")
    with pytest.raises(InputError, match="Not a directory"):
        tio.check_writable(tmp_path / "file" / "sub")


def _temp_named(folder: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    p = folder / f"{tio.TEMP_PREFIX}{host}-{pid}-abc123.glb"
    p.write_bytes(b"half")
    if age_s:
        os.utime(p, (time.time() - age_s,) * 2)
    return p


def test_stale_temp_clean_up_spares_live_writers(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        other_live = _temp_named(tmp_path, tio._HOST, live.pid)
        other_dead = _temp_named(tmp_path, tio._HOST, dead.pid)
        mine_left = _temp_named(tmp_path, tio._HOST, os.getpid())
        with tio.atomic_path(tmp_path / "inflight.glb") as mine_inflight:
            far_fresh = _temp_named(tmp_path, "0123abcd" if tio._HOST != "0123abcd" else "fedc4321", 1)
            far_old = _temp_named(tmp_path, "0123abcd" if tio._HOST != "0123abcd" else "fedc4321", 2, age_s=3 * 3600)
            legacy_fresh = tmp_path / f"{tio.TEMP_PREFIX}k3j4h5.glb"
            legacy_fresh.write_bytes(b"")
            assert tio.remove_stale_temps(tmp_path) == 3
            left = set(temps(tmp_path))
            assert left == {other_live, mine_inflight, far_fresh, legacy_fresh}
            assert not {other_dead, mine_left, far_old} & left
    finally:
        live.kill()
        live.wait()
