"""The errors a user can cause, each with a message written for the person who wrote the spec.

One base class, a few meaningful subclasses: the plugin turns any ``AuditError`` into a one-line
failure without a traceback; any other exception is our bug and keeps its full traceback.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable, Sequence


class AuditError(Exception):
    """A problem in the user's input (spec, image, model, checkpoint); ``str()`` is the whole message."""


class SpecError(AuditError):
    """A spec that cannot be used as written; knows the file, line and key path when they are known."""

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None,
                 key_path: str | None = None):
        self.message = message
        self.path = Path(path) if path is not None else None
        self.line = line
        self.key_path = key_path
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:{self.line}: " if self.line else f"{self.path}: "
        key = f"{self.key_path}: " if self.key_path else ""
        return f"{where}{key}{self.message}"

    def located(self, path: str | Path, line: int | None, key_path: str | None = None) -> "SpecError":
        """The same error placed at a spec location (used when the check that failed knew none)."""
        return SpecError(self.message, path, line if line else self.line, key_path or self.key_path)


class ImageError(AuditError):
    """An image file that cannot be used: missing, empty, truncated, not an image, too large."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class ModelError(AuditError):
    """A model, checkpoint, layer or labels file that cannot be used."""


class WeightsUnavailable(ModelError):
    """Named weights are neither cached nor downloadable; the message says which file and how to provide it."""


class UnknownNameError(AuditError):
    """An unknown label or layer name; the message lists the closest valid names."""

    def __init__(self, kind: str, name: object, suggestions: Sequence[str], hint: str = ""):
        self.kind = kind
        self.name = name
        self.suggestions = list(suggestions)
        msg = f"unknown {kind} {name!r}"
        if self.suggestions:
            msg += "; did you mean: " + ", ".join(repr(s) for s in self.suggestions)
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)


def closest(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The ``n`` candidates closest to ``name`` (case-insensitive), best first, always ``n`` when possible."""
    candidates = list(dict.fromkeys(candidates))
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.0)
    return [lowered[h] for h in hits]
