"""Atomic file writes: a reader (a browser, a second xdist worker, the next run) never sees half a file.

Every file model-audit writes for later reading (baselines, weights, the shared colour bar, compare pages)
goes through ``atomic_write``: a temp file in the same folder, then ``os.replace``. The report's own
pictures are the exception: they go into a new run folder that nothing points at until ``index.html``,
itself written this way, is replaced.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
import time
from pathlib import Path
from typing import BinaryIO, Callable


def create_temp(folder: Path | str, prefix: str = ".tmp-", suffix: str = "") -> tuple[int, str]:
    """A new file in ``folder`` for writing, with the mode ``open()`` would give it: ``(fd, path)``.

    ``tempfile.mkstemp`` makes files 0600, and finding the umask to chmod them means setting it for a
    moment, which races with any thread that creates a file meanwhile (the report's picture thread).
    ``O_CREAT | O_EXCL`` with mode 0666 lets the kernel apply the umask; the name is random.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOINHERIT", 0)
    for _ in range(100):
        path = os.path.join(folder, f"{prefix}{secrets.token_hex(6)}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Write ``path`` through ``write(fh)`` on a temp file, then move it in place; nothing is left on failure.

    ``durable`` also fsyncs before the move (baselines, which are committed to git), at a cost per file
    that pictures do not need.
    """
    path = Path(path)
    fd, tmp = create_temp(path.parent, suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """``atomic_write`` for bytes already in memory, in a handful of system calls and no file object.

    For small files written often: the shared colour bar, the command line's pictures, and a report
    picture that OpenCV could not write itself.
    """
    path = os.fspath(path)
    fd, tmp = create_temp(os.path.dirname(path) or ".", suffix=os.path.splitext(path)[1])
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


STALE_TEMP_S = 600.0
"""A temp file untouched for this long belongs to a writer that was killed: writes take milliseconds,
and a live writer's file changes as it writes. Younger temps may be another process's, mid-write."""


def remove_stale_temps(folder: Path | str, patterns: tuple[str, ...] = (".tmp-*",),
                       older_than_s: float = STALE_TEMP_S) -> int:
    """Delete temp files a killed writer left in ``folder`` (only names matching ``patterns``, only plain
    files, only when older than ``older_than_s``); returns how many. Never raises: it is housekeeping."""
    removed = 0
    cutoff = time.time() - older_than_s
    folder = Path(folder)
    for pattern in patterns:
        try:
            found = list(folder.glob(pattern))
        except OSError:
            continue
        for path in found:
            with contextlib.suppress(OSError):
                info = path.lstat()
                if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                    path.unlink()
                    removed += 1
    return removed


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes: a changed image makes its baseline stale; an installed weights file is
    checked against the hash prefix in its torchvision file name."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
