"""Deterministic shards of a run for CI matrices: ``--audit-shard K/N`` (no torch, no pytest).

A 10,000-image golden set is split over N CI jobs; each job must pick its cases without talking to
the others, the same way on every machine, and the union of the N shards must be every case once.
A case's shard is the hash of its spec path and case id (sha1, not Python's salted ``hash``), so a
case stays in its shard when other cases are added or removed: a shard's baseline stays warm, and
re-running shard 2 after a fix re-runs the same cases. All checks of a case land in one shard (one
forward per case). Spec-scope items (the set-level gates) are decided over every shard by
``model-audit merge``, so inside a shard they report that instead of gating a third of the set.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import PurePath


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based, as written on the command line) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def holds(self, spec_path: str | PurePath, case_id: str) -> bool:
        return shard_of(spec_path, case_id, self.count) == self.index


_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> Shard:
    """``"2/3"`` -> Shard(2, 3); ``ValueError`` with a one-line message otherwise."""
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"--audit-shard must be K/N, such as 2/3 (shard 2 of 3), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise ValueError(f"--audit-shard {text}: K must be in 1..N and N at least 1")
    return Shard(index, count)


def shard_of(spec_path: str | PurePath, case_id: str, count: int) -> int:
    """The 1-based shard of a case: sha1 of ``<spec path, posix>::<case id>`` modulo ``count``.

    The spec path is taken as given on the command line (posix separators), so shard jobs must be
    started from the same folder with the same spec arguments, as a CI matrix is.
    """
    key = f"{PurePath(spec_path).as_posix()}::{case_id}".encode("utf-8")
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % count + 1
