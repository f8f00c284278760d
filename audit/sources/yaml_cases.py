"""The built-in case source: the ``cases:`` list a spec author writes by hand, with its lines."""
from __future__ import annotations

from typing import Any, Iterator

from audit.sources.base import CaseSource, Location, SourceCase


class YamlCases(CaseSource):
    key = "cases"
    schema = {"description": "The audited images.", "type": "array", "minItems": 1,
              "items": {"$ref": "#/$defs/case"}}

    def cases(self, raw: Any, ctx: Any) -> Iterator[SourceCase]:
        for index, case in enumerate(raw or ()):
            key_path = f"cases[{index}]"
            yield SourceCase(case if isinstance(case, dict) else {}, Location(ctx.path, ctx.line_of(key_path),
                                                                           key_path))


SOURCE = YamlCases()
