"""The case record: what a worker tells the controller about one case, typed and versioned.

A record travels as JSON on pytest's own reports (``item.user_properties``), so it crosses pytest-xdist
without a side channel; the controller rebuilds every case from the records alone and never needs the
model, the images or torch. ``RECORD_SCHEMA`` is bumped on any incompatible change; a record of another
schema is refused with a message, never misread.

The record knows no check kind by name: each kind contributes its expected labels, its regions and its
own section (``kinds[name]``); the pictures are drawn by the report (:mod:`audit.report`) from the
observation and the record.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

#: version of the record format; results.json carries it per case
RECORD_SCHEMA = 2


@dataclass
class CaseRecord:
    """One case as the report and results.json show it. ``checks`` is filled by the controller."""

    nodeid: str
    spec: str
    line: int | None
    case_id: str
    model: str | None
    image: str | None
    image_size: list[int] | None = None
    top_k: list[dict[str, Any]] = field(default_factory=list)
    k: int | None = None            # the case's top_k (the report's table says top-k; more rows for context)
    target: dict[str, Any] | None = None
    regions: dict[str, str | None] = field(default_factory=lambda: {"region": None, "avoid": None})
    seen_box: list[float] | None = None
    crops: bool = False
    assets: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    features: list[dict[str, Any]] = field(default_factory=list)
    kinds: dict[str, Any] = field(default_factory=dict)
    cam_layer: str | None = None
    cam_method: str | None = None
    observe_s: float | None = None
    record: str | None = None
    label: str | None = None        # the class a dataset source gave the case (the report's per-class views)
    checks: list[dict[str, Any]] = field(default_factory=list)
    schema_version: int = RECORD_SCHEMA

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), allow_nan=True)

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict sharing their (plain JSON) values: ``dataclasses.asdict`` deep-copies
        every nested list and dict, which cost ~0.3 ms of a golden-set case's ~1.5 ms."""
        return {name: getattr(self, name) for name in _FIELD_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaseRecord":
        version = data.get("schema_version", RECORD_SCHEMA)
        if version != RECORD_SCHEMA:
            raise ValueError(f"case record of schema {version}; this model-audit reads schema {RECORD_SCHEMA} "
                             "(were the workers started from another version?)")
        return cls(**{k: v for k, v in data.items() if k in _FIELD_NAMES})


_FIELD_NAMES = tuple(f.name for f in fields(CaseRecord))


def shared_text(value: Any) -> Any:
    """One string object for each distinct kind name, outcome, spec path or label read from records:
    a 10,000-case run holds a few distinct values, not one copy per case (parsed from each record)."""
    return sys.intern(value) if isinstance(value, str) else value


def default_channels(channels: int) -> int:
    """The classic notebook's grids: all 64 maps of an early layer, the first 72 of a deep one."""
    return channels if channels <= 64 else 72


def error_record(nodeid: str, spec: str, line: int | None, case_id: str, model: str | None, image: str | None,
                 error: str | None, record: str | None = None, label: Any = None) -> CaseRecord:
    """The record of a case that could not be observed (bad input, model unavailable, broken spec)."""
    return CaseRecord(nodeid=nodeid, spec=spec, line=line, case_id=case_id, model=model, image=image,
                      error=error, record=record, label=None if label is None else str(label))


def build(observation: Any, kinds: list[Any], model: str) -> CaseRecord:
    """The record of an observed case: top-k (expected labels marked), explained class, regions, each
    kind's own data, feature-map shapes."""
    ref, e = observation.ref, observation.explanation
    case = ref.case
    expected: set[int] = set()
    shown: dict[str, list[str]] = {"expected": [], "avoid": []}
    sections: dict[str, Any] = {}
    for kind in kinds:
        prepared = observation.prepared.get(kind.name)
        expected.update(int(i) for i in kind.expected_labels(prepared))
        for region in kind.regions(prepared):
            shown.setdefault(region.role, []).append(region.description)
        data = kind.record(prepared, observation)
        if data is not None:
            sections[kind.name] = data
    subject = observation.subject
    return CaseRecord(
        nodeid=ref.nodeid, spec=str(ref.spec.path), line=case.location.line, case_id=case.id, model=model,
        image=str(case.image), image_size=list(e.image_size), k=case.top_k,
        top_k=[{"index": r.index, "label": r.label, "prob": r.prob, "expected": r.index in expected}
               for r in e.top_k[:max(case.top_k, 5)]],
        target={"index": subject, "label": observation.label(subject)},
        regions={"region": " ∪ ".join(shown["expected"]) or None, "avoid": " ∪ ".join(shown["avoid"]) or None},
        seen_box=list(e.geometry.seen_box), crops=bool(e.geometry.crops),
        features=[{"layer": f.layer, "shape": list(e.features[f.layer].shape),
                   "shown": min(f.max_channels or default_channels(e.features[f.layer].shape[0]),
                                e.features[f.layer].shape[0])}
                  for f in case.features],
        kinds=sections, cam_layer=e.cam_layer, cam_method=getattr(e, "cam_method", None),
        observe_s=observation.seconds, record=case.location.record,
        label=None if case.label is None else str(case.label))
