"""What a case source is: where a spec's cases come from (hand-written YAML, a COCO file, a folder ...).

A source owns one top-level key of the spec (``cases``, ``dataset``) with its JSON Schema fragment, and
yields the cases in YAML form (the mapping a spec author would have written) together with where each
came from, so every error can name a file and a line or a record. The spec layer merges ``defaults``
into each case and lets the check kinds type it, whatever the source.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from audit.errors import SpecError


@dataclass(frozen=True, slots=True)
class Location:
    """Where something was written: a spec line (``path:12``) or a record of an annotation file."""

    path: Path
    line: int | None
    key_path: str
    record: str | None = None

    def __str__(self) -> str:
        if self.record is not None:
            return f"{self.path}: {self.record}"
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class SourceCase:
    """One case as a source found it.

    ``raw`` is the case in YAML form (``id``, ``image`` relative to ``base_dir`` or absolute, the kinds'
    keys, and optionally ``label``: the dataset's class, and ``annotations``: ``{name: region}``);
    ``lines`` maps key paths relative to the case to the line they were written on (YAML sources only).
    ``error`` is set when the source's own record of the case is bad (a dataset's bad box): the case
    then errors with it while the other cases run.
    """

    raw: Mapping[str, Any]
    location: Location
    lines: Mapping[str, int] = field(default_factory=dict)
    error: SpecError | None = None


class CaseSource:
    """Base class of case sources: subclasses set ``key`` and ``schema`` and implement ``cases``."""

    key: str = ""
    schema: Mapping[str, Any] = {}

    def cases(self, raw: Any, ctx: "SourceContext") -> Iterator[SourceCase]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<case source {self.key}>"


class SourceContext:
    """What a source may use: the spec's path and folder, its line map, and error reporting."""

    path: Path
    base_dir: Path
    lines: Mapping[str, tuple[int, int]]

    def line_of(self, key_path: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def error(self, key_path: str, message: str, record: str | None = None) -> Exception:  # pragma: no cover
        raise NotImplementedError
