"""The typed spec: frozen dataclasses built from a validated document, every value traceable to its file:line.

``load_spec`` reads and parses the file (``yaml_positions``), validates it against the schema
(``validation``), then builds ``Spec``, ``ModelSpec`` and one ``CaseSpec`` per case from the registered
case sources and check kinds, with the semantic checks a schema cannot say (exclusive keys, files that
must exist, unique ids; each check kind types and checks its own key). Problems of the file or of the
model block raise ``SpecError``; problems of one case are kept on that ``CaseSpec.error`` so that one
bad case does not hide the good ones.
"""
from __future__ import annotations

import functools
import gc
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

from audit import defaults
from audit.errors import SpecError
from audit.sources.base import Location, SourceCase
from audit.spec.validation import (_case_index, _combine, _dedupe, _error_at, _number_problems, _registry,
                                   _schema_problems)
from audit.spec.yaml_positions import MAX_BYTES, _describe, _line_of, _parent, _parse, _read, _short


# --------------------------------------------------------------------------------------------------
# Public dataclasses


@dataclass(frozen=True)
class ModelSpec:
    """The ``model`` block. Paths are absolute (resolved against the spec's folder)."""

    arch: str
    weights: str | None
    checkpoint: Path | None
    preprocess: str
    cam_layer: str | None
    labels: Path | None
    seed: int | None
    location: Location = field(compare=False)
    cam_method: str | None = None  # a registered CAM method (audit.cams); None: the default (gradcam)

    def key(self) -> tuple:
        """Identity of the loaded model, so a session loads it once however many specs name it.

        Preprocessing and CAM layer are per-call choices of the engine, so they are not part of it; the
        seed only matters for a random initialisation.
        """
        seed = self.seed if self.weights is None and self.checkpoint is None else None
        return (self.arch, self.weights, str(self.checkpoint) if self.checkpoint else None,
                str(self.labels) if self.labels else None, seed)


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """A layer to draw as a feature-map grid; ``max_channels`` None means all channels."""

    layer: str
    max_channels: int | None = None


@dataclass(frozen=True, slots=True)   # 10,000 cases of a golden set: no __dict__ each
class CaseSpec:
    """One case with the spec's defaults merged in.

    ``checks`` maps each check kind's name to its typed configuration (``checks["prediction"]`` is an
    ``Expect``, ``None`` when the case has nothing for that kind); ``label`` and ``annotations`` are set by
    dataset sources (the case's class, and named regions such as ``annotation``); ``labels`` are the model
    labels the dataset class stands for (its ``labels_map`` entry, any of them; else ``(label,)``).
    When ``error`` is set the case cannot run (its other fields are best effort: ``id`` is the written
    id when usable, else ``cases[i]``); the plugin reports it as errored while the other cases run.
    ``lines`` maps key paths relative to the case (``"expect.top1"``, ``"focus.region[1].box"``) to the
    line they were written on; keys inherited from ``defaults`` point at the defaults block.
    """

    id: str
    image: Path
    top_k: int
    checks: Mapping[str, Any]
    features: tuple[FeatureRequest, ...]
    marks: tuple[str, ...]
    location: Location = field(compare=False)
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    error: SpecError | None = field(default=None, compare=False)
    spec_path: Path = field(default=Path("."), compare=False, repr=False)
    label: str | int | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    mark_args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False, repr=False)
    labels: tuple[str | int, ...] = ()

    def line_of(self, rel_key_path: str) -> int | None:
        """The best line for a key path relative to the case: the key's, else its nearest parent's,
        else the case's own line (None for a case from an annotation file)."""
        key = rel_key_path
        while key:
            if key in self.lines:
                return self.lines[key]
            key = _parent(key)
        return self.location.line


@dataclass(frozen=True)
class Spec:
    """A loaded spec file. ``path`` is as given to ``load_spec``; other paths are absolute.

    ``checks`` holds the configurations of spec-scope check kinds (gates, sanity), by kind name.
    """

    path: Path
    model: ModelSpec
    cases: tuple[CaseSpec, ...]
    marks: tuple[str, ...]
    checks: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def case_errors(self) -> tuple[SpecError, ...]:
        """The errors of the cases that cannot run (empty when every case is valid)."""
        return tuple(c.error for c in self.cases if c.error is not None)


# --------------------------------------------------------------------------------------------------
# Public functions


@lru_cache(maxsize=16)
def _top_level_pattern(keys: tuple[str, ...]) -> re.Pattern:
    names = "|".join(re.escape(k) for k in keys)
    return re.compile(rf"^(?:{names}|'(?:{names})'|\"(?:{names})\")[ \t]*:", re.MULTILINE)


def is_spec_file(path: str | Path, registry: Any = None) -> bool:
    """Whether pytest should collect this file as a spec: ``*.yaml``/``*.yml`` with a top-level line
    naming a case source (``cases:``, ``dataset:``).

    A text check, not a parse: it is cheap, never raises, never collects unrelated YAML (CI workflows,
    docker-compose files), and still claims a broken spec so that its syntax error gets reported.
    """
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(MAX_BYTES)
    except (OSError, ValueError):
        return False
    pattern = _top_level_pattern(tuple(_registry(registry).case_sources))
    return pattern.search(head.decode("utf-8", errors="replace")) is not None


def _gc_paused(load: Callable[..., Spec]) -> Callable[..., Spec]:
    """Run ``load`` with the cyclic garbage collector paused (and restored after, as it was).

    Loading builds hundreds of thousands of small, acyclic objects (YAML nodes, dicts, lines); each
    allocation burst triggers full collections that find nothing, a third of a 50,000-case load.
    """
    @functools.wraps(load)
    def paused(*args: Any, **kwargs: Any) -> Spec:
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return load(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()
    return paused


@_gc_paused
def load_spec(path: str | Path, registry: Any = None) -> Spec:
    """Load, validate and type a spec file with the check kinds and case sources of ``registry``
    (default: the built-in ones).

    Raises ``SpecError`` for problems of the file (syntax, tags, duplicate keys, top-level keys,
    ``model``, ``defaults``); per-case problems are returned on ``CaseSpec.error``.
    """
    path = Path(path)
    registry = _registry(registry)
    data, lines = _parse(_read(path), path)
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping with the keys 'model' and 'cases'; found {_describe(data)}",
                        path, lines.get("", (1, 1))[0])
    problems = _dedupe(list(_number_problems(data, ())) + list(_schema_problems(data, registry)))
    spec_level = [p for p in problems if _case_index(p[0]) is None]
    if spec_level:
        raise _combine([_error_at(path, lines, parts, message) for parts, message in spec_level])
    by_case: dict[int, list[tuple[tuple, str]]] = {}
    for parts, message in problems:
        by_case.setdefault(_case_index(parts), []).append((parts, message))
    sources = [s for key, s in registry.case_sources.items() if key in data]
    if not sources:
        keys = ", ".join(repr(k) for k in registry.case_sources)
        raise SpecError(f"a spec needs its cases: give one of {keys}", path, lines.get("", (1, 1))[0])
    model = _model_spec(data["model"], path, lines)
    builder = _CaseBuilder(data, path, lines, registry)
    context = _SourceContext(path, lines)
    cases = []
    for source in sources:
        found = source.cases(data[source.key], context)
        cases += [builder.build(len(cases) + i, found_case, by_case.get(len(cases) + i, []))
                  for i, found_case in enumerate(found)]
    return Spec(path=path, model=model, cases=tuple(cases),
                marks=tuple(dict.fromkeys(n for n in (_mark(m)[0] for m in data.get("marks", ())) if n)),
                checks=builder.spec_checks())


# --------------------------------------------------------------------------------------------------
# Model


def _resolve(base_dir: Path, value: str) -> Path:
    """Absolute, normalised, relative to the spec's folder; no file system access (never raises)."""
    return Path(os.path.abspath(os.path.join(base_dir, os.path.expanduser(value))))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


def _file_problem(what: str, path: Path) -> str | None:
    if _is_file(path):
        return None
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    return f"{what} {path} is not a file" if exists else f"{what} not found: {path}"


def _model_spec(raw: dict, path: Path, lines: Mapping[str, tuple[int, int]]) -> ModelSpec:
    base_dir = path.parent
    errors = []
    if "weights" in raw and "checkpoint" in raw:
        errors.append(_error_at(path, lines, ("model", "checkpoint"),
                                "give either 'weights' or 'checkpoint', not both "
                                f"(weights at line {_line_of(lines, 'model.weights')})"))
    checkpoint = _resolve(base_dir, raw["checkpoint"]) if "checkpoint" in raw else None
    labels = _resolve(base_dir, raw["labels"]) if "labels" in raw else None
    for key, file in (("checkpoint", checkpoint), ("labels", labels)):
        problem = file is not None and _file_problem(f"{key} file", file)
        if problem:
            errors.append(_error_at(path, lines, ("model", key), problem))
    if errors:
        raise _combine(errors)
    return ModelSpec(arch=raw["arch"], weights=raw.get("weights"), checkpoint=checkpoint,
                     preprocess=raw.get("preprocess", defaults.PREPROCESS), cam_layer=raw.get("cam_layer"),
                     labels=labels, seed=raw.get("seed"),
                     location=Location(path, _line_of(lines, "model"), "model"), cam_method=raw.get("cam_method"))


# --------------------------------------------------------------------------------------------------
# Cases

_ID_FORBIDDEN = re.compile(r"\s|/|::")


class _SourceContext:
    """What a case source sees of the spec: its path, folder and lines."""

    def __init__(self, path: Path, lines: Mapping[str, tuple[int, int]]):
        self.path, self.base_dir, self.lines = path, path.parent, lines

    def line_of(self, key_path: str) -> int:
        return _line_of(self.lines, key_path)

    def error(self, key_path: str, message: str, record: str | None = None) -> SpecError:
        return SpecError(message, self.path, None if record else self.line_of(key_path), key_path or None)


_SHARED_MAX = 64


class _CaseBuilder:
    """Builds one ``CaseSpec`` per source case: merges defaults, lets each check kind type its key,
    checks what is common to every case (id, image), keeps lines."""

    def __init__(self, data: dict, path: Path, lines: Mapping[str, tuple[int, int]], registry: Any):
        self.path = path
        self.base_dir = path.parent
        self.data = data
        self.registry = registry
        self.kinds = registry.kinds("case")
        self.defaults = data.get("defaults", {})
        self.spec_values = {k.key: data[k.key] for k in self.kinds if k.key and k.spec_level and k.key in data}
        self.deep = {k.key for k in self.kinds if k.key and k.merge == "deep"}
        self.spec_marks = tuple(data.get("marks", ()))
        self.lines = lines
        self.buckets: dict[str, dict[str, tuple[int, int]]] = {}
        for key_path, span in lines.items():
            self.buckets.setdefault(_top_segment(key_path), {})[key_path] = span
        self.first_id_line: dict[str, int] = {}
        self._shared: dict[tuple, MappingProxyType] = {}

    def shared(self, mapping: Mapping) -> MappingProxyType:
        """One read-only mapping for equal small mappings (a dataset's cases all have the same key lines
        and no mark arguments): 10,000 cases need not hold 10,000 equal copies. Keyed by the items, so
        only for mappings of hashable values; past ``_SHARED_MAX`` different ones, each gets its own."""
        key = tuple(mapping.items())
        found = self._shared.get(key)
        if found is None:
            found = MappingProxyType(dict(mapping))
            if len(self._shared) < _SHARED_MAX:
                self._shared[key] = found
        return found

    # -- one case

    def build(self, index: int, found: SourceCase, schema_problems: list[tuple[tuple, str]]) -> CaseSpec:
        location = found.location
        case_kp = location.key_path
        errors = [_error_at(self.path, self.lines, parts, message) for parts, message in schema_problems]
        if found.error is not None:   # the source's record of this case is bad (a dataset's bad box)
            errors.append(found.error)
        raw = found.raw if isinstance(found.raw, dict) else {}
        case_id = self._claim_id(raw, case_kp, errors, location)
        merged, origin = self._merge(raw, case_kp)
        lines_rel = {**self._relative_lines(origin, location.line), **found.lines}
        ctx = _Context(self.path, case_kp, origin, lines_rel, errors, location)
        image = merged.get("image")
        if isinstance(image, str) and image and not any(e.key_path == f"{case_kp}.image" for e in errors):
            problem = _file_problem("image", _resolve(self.base_dir, image))
            if problem:  # checked even when other keys are wrong: one round trip fixes both
                ctx.error("image", problem)
        if not errors:
            case = self._typed(merged, raw, ctx, case_id, location, lines_rel)
            if not errors:
                return case
        return self._errored(case_id or case_kp, merged, location, lines_rel, errors, raw)

    def _claim_id(self, raw: dict, case_kp: str, errors: list[SpecError], location: Location) -> str | None:
        """The case id when usable; a repeated id is an error on the second case."""
        value = raw.get("id")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        case_id = str(value)
        line = _line_of(self.lines, f"{case_kp}.id") if location.record is None else None
        if not case_id or _ID_FORBIDDEN.search(case_id) or not case_id.isprintable():
            if not any(e.key_path == f"{case_kp}.id" for e in errors):  # the schema's pattern caught it
                errors.append(SpecError(f"{_short(case_id)} is not a valid case id: it becomes part of the "
                                        "pytest node id, so only printable characters and no whitespace, "
                                        "'/' or '::'", self.path, line, f"{case_kp}.id"))
            return None
        if case_id in self.first_id_line:
            errors.append(SpecError(f"duplicate case id {case_id!r} (first used at line "
                                    f"{self.first_id_line[case_id]}); ids must be unique in a file",
                                    self.path, line, f"{case_kp}.id"))
            return None
        self.first_id_line[case_id] = line or 0
        return case_id

    def _merge(self, raw: dict, case_kp: str) -> tuple[dict, dict[str, str]]:
        """The case over the defaults over the spec-level values, and for each (relative) key the
        absolute key path it was written at."""
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key, value in self.spec_values.items():
            merged[key] = value
            origin[key] = key
            if isinstance(value, dict):
                for sub in value:
                    origin[f"{key}.{sub}"] = f"{key}.{sub}"
        for key, value in self.defaults.items():
            base = merged.get(key)
            if key in self.deep and isinstance(base, dict) and isinstance(value, dict):
                value = {**base, **value}
            merged[key] = value
            origin[key] = f"defaults.{key}"
            if key in self.deep and isinstance(self.defaults[key], dict):
                for sub in self.defaults[key]:
                    origin[f"{key}.{sub}"] = f"defaults.{key}.{sub}"
        for key, value in raw.items():
            base = merged.get(key)
            if key in self.deep and isinstance(base, dict) and isinstance(value, dict):
                value = {**base, **value}
            merged[key] = value
            origin[key] = f"{case_kp}.{key}"
            if isinstance(raw[key], dict) and key in self.deep:
                for sub in raw[key]:
                    origin[f"{key}.{sub}"] = f"{case_kp}.{key}.{sub}"
        return merged, origin

    def _relative_lines(self, origin: Mapping[str, str], case_line: int | None) -> dict[str, int]:
        rel_lines = {"": case_line} if case_line is not None else {}
        for rel in sorted(origin, key=lambda k: k.count(".")):  # parents first, then their overrides
            source = origin[rel]
            bucket = self.buckets.get(_top_segment(source), {})
            for key_path, (start, _end) in bucket.items():
                if key_path == source:
                    rel_lines[rel] = start
                elif key_path.startswith(source) and key_path[len(source)] in ".[":
                    rel_lines[rel + key_path[len(source):]] = start
        return rel_lines

    # -- typed values

    def _typed(self, merged: dict, raw: dict, ctx: "_Context", case_id: str | None, location: Location,
               lines_rel: dict[str, int]) -> CaseSpec | None:
        image = _resolve(self.base_dir, merged["image"])
        top_k = int(merged.get("top_k", defaults.TOP_K))
        ctx.top_k, ctx.base_dir = top_k, self.base_dir
        ctx.label = merged.get("label")
        ctx.annotations = merged.get("annotations") or {}
        ctx.labels = tuple(merged.get("labels") or ((ctx.label,) if ctx.label is not None else ()))
        configs: dict[str, Any] = {}
        for kind in self.kinds:
            if not kind.key:
                configs[kind.name] = None
                continue
            ctx.own = raw.get(kind.key)
            configs[kind.name] = kind.parse(merged.get(kind.key), ctx)
        if ctx.errors:
            return None
        marks, mark_args = self._marks(merged)
        from_record = location.record is not None   # a dataset's cases: the same lines, case after case
        return CaseSpec(id=case_id or location.key_path, image=image, top_k=top_k,
                        checks=MappingProxyType(configs), features=_features(merged.get("features", ())),
                        marks=marks, mark_args=self.shared(mark_args) if not mark_args else MappingProxyType(mark_args),
                        location=location, lines=self.shared(lines_rel) if from_record else MappingProxyType(lines_rel),
                        spec_path=self.path, label=ctx.label, annotations=MappingProxyType(dict(ctx.annotations)),
                        labels=ctx.labels)

    def spec_checks(self) -> Mapping[str, Any]:
        """Configurations of the spec-scope kinds (their keys stand at the top of the spec)."""
        configs: dict[str, Any] = {}
        errors: list[SpecError] = []
        for kind in self.registry.kinds("spec"):
            if kind.key and kind.key in self.data:
                ctx = _Context(self.path, "", {kind.key: kind.key}, {kind.key: _line_of(self.lines, kind.key)},
                               errors, None)
                ctx.own, ctx.base_dir, ctx.top_k = self.data[kind.key], self.base_dir, defaults.TOP_K
                configs[kind.name] = kind.parse(self.data[kind.key], ctx)
        if errors:
            raise _combine(errors)
        return MappingProxyType(configs)

    def _marks(self, merged: dict) -> tuple[tuple[str, ...], dict[str, dict]]:
        """The mark names (spec-level first, then the case's) and the arguments of those that have any."""
        names: dict[str, None] = {}
        args: dict[str, dict] = {}
        for mark in (*self.spec_marks, *merged.get("marks", ())):
            name, kwargs = _mark(mark)
            if name is None:
                continue
            names[name] = None
            if kwargs:
                args[name] = kwargs
        return tuple(names), args

    def _errored(self, case_id: str, merged: dict, location: Location, lines_rel: dict[str, int],
                 errors: list[SpecError], raw: Mapping[str, Any] | None = None) -> CaseSpec:
        """A case that cannot run, with what is known so the plugin can name and mark it."""
        image = merged.get("image")
        marks = merged.get("marks")
        valid_marks = isinstance(marks, list) and all(_mark(m)[0] is not None for m in marks)
        names, args = self._marks({"marks": marks if valid_marks else []})
        return CaseSpec(id=case_id,
                        image=_resolve(self.base_dir, image) if isinstance(image, str) and image else self.base_dir,
                        top_k=defaults.TOP_K, checks=MappingProxyType({k.name: None for k in self.kinds}),
                        features=(),
                        marks=names, mark_args=MappingProxyType(args),
                        location=location, lines=MappingProxyType(lines_rel), error=_combine(errors),
                        spec_path=self.path, label=raw.get("label") if isinstance(raw, dict) else None)


class _Context:
    """Collects the errors of one case at the lines (and key paths) their keys were written at; it is
    the ``ParseContext`` the check kinds see (``own``, ``top_k``, ``base_dir``, ``error``)."""

    def __init__(self, path: Path, case_kp: str, origin: Mapping[str, str], lines_rel: Mapping[str, int],
                 errors: list[SpecError], location: Location | None):
        self.path, self.case_kp, self.origin, self.lines_rel, self.errors = path, case_kp, origin, lines_rel, errors
        self.location = location
        self.own: Any = None
        self.top_k = defaults.TOP_K
        self.base_dir = path.parent
        self.label: Any = None
        self.annotations: Mapping[str, Any] = {}
        self.labels: tuple = ()

    def error_count(self) -> int:
        return len(self.errors)

    def file_problem(self, what: str, value: str) -> str | None:
        return _file_problem(what, _resolve(self.base_dir, value))

    def error(self, rel: str, message: str) -> None:
        key, suffix = rel, ""
        while key and key not in self.origin:  # where was this (or its parent) written?
            cut = _parent(key)
            suffix = key[len(cut):] + suffix
            key = cut
        prefix = f"{self.case_kp}." if self.case_kp else ""
        key_path = (self.origin[key] + suffix) if key else f"{prefix}{rel}"
        line = self.lines_rel.get(rel)
        probe = rel
        while line is None and probe:
            probe = _parent(probe)
            line = self.lines_rel.get(probe)
        if line is None and self.location is not None and self.location.record is None:
            line = self.location.line
        self.errors.append(SpecError(message, self.path, line, key_path))


def _top_segment(key_path: str) -> str:
    match = re.match(r"cases\[\d+\]|[^.\[]*", key_path)
    return match.group(0) if match else ""


def _mark(mark: Any) -> tuple[str | None, dict]:
    """``slow`` -> ("slow", {}); ``{xfail: {reason: r}}`` / ``{skip: r}`` -> (name, {"reason": r, ...})."""
    if isinstance(mark, str):
        return (mark, {}) if mark.isidentifier() else (None, {})
    if isinstance(mark, dict) and len(mark) == 1:
        (name, value), = mark.items()
        if not isinstance(name, str) or not name.isidentifier():
            return None, {}
        if isinstance(value, str):
            return name, {"reason": value}
        return (name, dict(value)) if isinstance(value, dict) else (None, {})
    return None, {}


def _features(raw: Sequence) -> tuple[FeatureRequest, ...]:
    return tuple(FeatureRequest(item) if isinstance(item, str)
                 else FeatureRequest(item["layer"], item.get("max_channels")) for item in raw)
