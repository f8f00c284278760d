"""Atomic file writes: a reader (a browser, a second xdist worker, the next run) never sees half a file.

Every file model-audit writes for later reading (baselines, report pictures, compare pages) goes through
``atomic_write``: a temp file in the same folder, then ``os.replace``.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO, Callable


def file_mode() -> int:
    """The mode an ordinary ``open()`` would give (mkstemp's 0600 would hide files from a web server)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write: Callable[[BinaryIO], object], durable: bool = False) -> None:
    """Write ``path`` through ``write(fh)`` on a temp file, then move it in place; nothing is left on failure.

    ``durable`` also fsyncs before the move (baselines, which are committed to git), at a cost per file
    that pictures do not need.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        os.chmod(tmp, file_mode())
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
    """``atomic_write`` for bytes already in memory, in a handful of system calls.

    The report's picture thread calls this for every picture while the tests run: each call holds the
    interpreter lock only between the calls below. The temp name is unique per process and thread;
    ``os.open`` applies the umask like ``open()`` does.
    """
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".tmp-{os.getpid()}-{threading.get_ident()}-{name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
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
