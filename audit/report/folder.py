"""The report folder's lifecycle: checked at the start, one asset folder per run, an atomic commit at the end.

``check_writable`` fails before any model runs if the report could not be written. Each run draws
into its own ``assets/<run_id>/`` (``new_run_dir``), locked while the run lives so that other runs
into the same folder never prune it (``_folder_lock``, ``_hold_run``, ``_in_use``). ``committing``
stages a page's files as temp files next to their targets and moves them in with ``os.replace``
under the folder's lock; only then are older runs' asset folders removed (``_prune_assets``) and
killed runs' temp files (``STALE_TEMPS``). A run that never commits leaves the folder as it found it
(``discard_run``, ``discard_run_dir``). Nothing here draws or renders.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from audit.errors import AuditError
from audit.files import create_temp, remove_stale_temps

#: run ids look like ``20240131-235959-1a2b3c``; only folders matching this are ever deleted by us.
RUN_ID_PATTERN = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


def check_writable(out_dir: Path) -> None:
    """Fail at session start, before any model runs, if the report could not be written at the end."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except FileExistsError:
        raise AuditError(f"report folder {out_dir} is not writable: it exists and is not a folder") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename and str(exc.filename) != str(out_dir):
            reason = f"{reason} ({exc.filename})"
        raise AuditError(f"report folder {out_dir} is not writable: {reason}") from None


STALE_TEMPS = (".index-*.tmp", ".results-*.tmp", ".compare-*.tmp", ".write-test-*", ".tmp-*")
_RUN_LOCKS: dict[str, int] = {}   # run id -> open fd holding that run's asset-folder lock


# --------------------------------------------------------------------------------------------------
# one asset folder per run


@contextlib.contextmanager
def _folder_lock(out_dir: Path) -> Iterator[None]:
    """Exclusive lock of a report folder: one run at a time creates a run folder or commits a page.

    The kernel drops the lock when its holder dies, so a killed run never blocks the next one. Where
    ``fcntl`` is missing (Windows) runs are not serialised: two runs into one folder there may lose
    pictures, as before this lock existed.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)   # on the folder itself: the report folder holds no lock file
        yield
    finally:
        os.close(fd)   # closing releases the lock


def _hold_run(run_dir: Path) -> int | None:
    """Lock this run's asset folder (flock on the folder's own descriptor) until the run commits or
    its process ends, so other runs' pruning skips it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # the folder itself: no lock file among the pictures
    return fd


def _in_use(run_dir: Path) -> bool:
    """Whether a live run holds this asset folder (a killed run's folder is free: the kernel unlocked it)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return False
    try:
        fd = os.open(run_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def new_run_dir(out_dir: Path) -> tuple[str, Path]:
    """A fresh ``out_dir/assets/<run_id>/`` for this run's pictures (timestamp + random, never reused).

    The folder is locked for the life of this process: another run writing the same report folder
    at the same time prunes only folders no live run holds, so it never deletes these pictures.
    """
    assets = Path(out_dir) / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    with _folder_lock(Path(out_dir)):
        while True:
            run_id = f"{_dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            try:
                (assets / run_id).mkdir()
            except FileExistsError:
                continue
            fd = _hold_run(assets / run_id)
            if fd is not None:
                _RUN_LOCKS[run_id] = fd
            return run_id, assets / run_id


def release_run_dir(run_id: str | None) -> None:
    """Give up this process's hold on a run's asset folder (after its page is committed or given up)."""
    fd = _RUN_LOCKS.pop(run_id, None) if run_id else None
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def discard_run_dir(out_dir: Path, run_id: str | None) -> None:
    """Remove this run's (unused) asset folder: a run that wrote no page leaves the folder as it found it."""
    if run_id is None or not RUN_ID_PATTERN.match(run_id):
        return
    folder = Path(out_dir) / "assets" / run_id
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        (Path(out_dir) / "assets").rmdir()   # only when empty


def discard_run(out_dir: Path, run_id: str | None) -> None:
    """Give up a run whose page will not be written: its pictures go, the previous report stays."""
    release_run_dir(run_id)
    _remove_run(out_dir, run_id)


def _remove_run(out_dir: Path, run_id: str | None) -> None:
    if run_id and RUN_ID_PATTERN.match(run_id):
        shutil.rmtree(Path(out_dir) / "assets" / run_id, ignore_errors=True)
        with contextlib.suppress(OSError):
            (Path(out_dir) / "assets").rmdir()   # only succeeds when empty


def _prune_assets(out_dir: Path, keep: str | None) -> None:
    """Remove asset folders of other runs (only names we create); everything else is the user's."""
    assets = out_dir / "assets"
    if not assets.is_dir():
        return
    for child in assets.iterdir():
        if (child.is_dir() and not child.is_symlink() and RUN_ID_PATTERN.match(child.name) and child.name != keep
                and not _in_use(child)):   # another run, still writing into this folder, keeps its pictures
            shutil.rmtree(child, ignore_errors=True)
    with contextlib.suppress(OSError):
        assets.rmdir()   # only succeeds when empty


# --------------------------------------------------------------------------------------------------
# the commit


def _write_temp(out_dir: Path, prefix: str, chunks: Iterable[str], temps: list[str]) -> str:
    fd, tmp = create_temp(out_dir, prefix=prefix, suffix=".tmp")
    temps.append(tmp)
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(chunks)   # the text layer buffers: batching the page's chunks measured no gain
        fh.flush()
        os.fsync(fh.fileno())
    return tmp


class _Commit:
    """The files of one page being written: staged as temp files in the report folder, then moved in."""

    def __init__(self, out_dir: Path, run_id: str | None) -> None:
        self.out_dir = out_dir
        self.run_id = run_id
        self.temps: list[str] = []   # staged files not moved in yet: removed when the commit ends
        self.committed = False

    def stage(self, prefix: str, chunks: Iterable[str]) -> str:
        """Write ``chunks`` into a new temp file ``<prefix>*.tmp`` of the report folder (flushed and synced)."""
        return _write_temp(self.out_dir, prefix, chunks, self.temps)

    def publish(self, files: Sequence[tuple[str, str]], keep: str | None) -> None:
        """Move the staged files onto their names, in order (the last is the commit point), holding the
        folder's lock; then give up this run's hold on its asset folder, remove the other runs' asset
        folders (all but ``keep``) and the temp files of killed runs."""
        with _folder_lock(self.out_dir):   # one run at a time: results.json and index.html stay a pair
            for tmp, name in files:
                os.replace(tmp, self.out_dir / name)
                self.temps.remove(tmp)
            self.committed = True
            release_run_dir(self.run_id)
            _prune_assets(self.out_dir, keep)
            remove_stale_temps(self.out_dir, STALE_TEMPS)


@contextlib.contextmanager
def committing(out_dir: Path, run_id: str | None) -> Iterator[_Commit]:
    """A commit of the report folder ``out_dir`` by run ``run_id``: stage files, then ``publish`` them.

    Whatever happens in the block (KeyboardInterrupt included), staged files left over are removed;
    if nothing was published, the previous report stays untouched and this run's pictures go
    (nothing will ever show them; on a full disk they would keep it full).
    """
    commit = _Commit(Path(out_dir), run_id)
    try:
        yield commit
    finally:
        for tmp in commit.temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if not commit.committed:   # nothing will ever show this run's pictures: free the space they hold
            release_run_dir(run_id)
            _remove_run(out_dir, run_id)
