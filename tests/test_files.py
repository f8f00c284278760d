"""Atomic writes: the whole new file or the old one, never half of either, and the user's umask."""
from __future__ import annotations

import os
import stat

import pytest

from audit.files import atomic_write, atomic_write_bytes, create_temp


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


@pytest.mark.parametrize("write", [
    lambda path, data: atomic_write(path, lambda fh: fh.write(data)),
    lambda path, data: atomic_write_bytes(path, data),
], ids=["atomic_write", "atomic_write_bytes"])
def test_atomic_writes_replace_the_file_and_leave_no_temp(tmp_path, umask_027, write):
    target = tmp_path / "picture.png"
    target.write_bytes(b"old")
    write(target, b"new" * 100_000)
    assert target.read_bytes() == b"new" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_atomic_write_bytes_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "picture.png"
    target.write_bytes(b"old")

    def broken_write(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", broken_write)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["picture.png"]


def test_atomic_write_bytes_into_a_missing_folder_says_which(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "missing" / "x.png", b"x")
    assert list(tmp_path.iterdir()) == []


def test_create_temp_lets_the_umask_decide_the_mode_and_never_reuses_a_name(tmp_path, umask_027):
    made = [create_temp(tmp_path, prefix=".t-", suffix=".png") for _ in range(50)]
    for fd, _ in made:
        os.close(fd)
    paths = {path for _, path in made}
    assert len(paths) == 50
    assert all(os.path.basename(p).startswith(".t-") and p.endswith(".png") for p in paths)
    assert {stat.S_IMODE(os.stat(p).st_mode) for p in paths} == {0o640}
