"""Spec files: YAML in, typed and validated dataclasses out, every value traceable to its file:line.

Why a loader of our own: a spec author needs "file:line key path: message", and PyYAML forgets where
values came from. ``_SpecLoader`` is PyYAML's safe loader (libyaml's ``CSafeLoader`` when PyYAML has
it) with a builder mixed in (nothing is registered on PyYAML's classes, so other suites loading YAML
are unaffected); it composes the node graph and then builds
plain dicts, lists and scalars itself, recording the lines of every key path. Building it ourselves
is also what makes the loader strict: only the standard JSON-like tags are accepted (``!!python/...``
and any other tag is refused before anything is constructed), duplicate keys are errors instead of
"last one wins", and alias expansion is bounded ("billion laughs").

Validation has two layers: ``spec.schema.json`` (JSON Schema 2020-12, also usable for editor
completion) for shapes, types and ranges, and the semantic checks below for what a schema cannot say
(exclusive keys, box corners, files that must exist, unique ids). Problems of the file or of the model
block raise ``SpecError``; problems of one case are kept on that ``CaseSpec.error`` so that one bad case
does not hide the good ones.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Mapping, Sequence

import yaml
from jsonschema import Draft202012Validator
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from audit import defaults
from audit.errors import SpecError, closest
from audit.sources.base import Location, SourceCase

__all__ = ["SCHEMA_PATH", "Location", "ModelSpec", "FeatureRequest", "CaseSpec", "Spec", "load_spec", "is_spec_file",
           "schema"]

SCHEMA_PATH: Path = Path(__file__).with_name("spec.schema.json")

#: Largest spec file read; a spec is a few kilobytes, anything near this is a mistake.
MAX_BYTES = 8 * 2**20
#: Values a document may expand to (aliases included): bounds the cost of "billion laughs" documents.
MAX_NODES = 100_000
#: Nesting depth of mappings and lists; specs need about 8.
MAX_DEPTH = 64
#: Integers beyond 64 bits are refused: no spec field needs them, and they upset numpy and torch.
MAX_INT = 2**63 - 1

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = _YAML + "map", _YAML + "seq", _YAML + "merge"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

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


@dataclass(frozen=True)
class FeatureRequest:
    """A layer to draw as a feature-map grid; ``max_channels`` None means all channels."""

    layer: str
    max_channels: int | None = None


@dataclass(frozen=True)
class CaseSpec:
    """One case with the spec's defaults merged in.

    ``checks`` maps each check kind's name to its typed configuration (``checks["prediction"]`` is an
    ``Expect``, ``None`` when the case has nothing for that kind); ``label`` and ``annotations`` are set by
    dataset sources (the case's class, and named regions such as ``annotation``).
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


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    from audit.registry import Registry

    return _default_registry(Registry)


@lru_cache(maxsize=1)
def _default_registry(cls: Any) -> Any:
    return cls.default()


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
# Reading and YAML


def _read(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SpecError(f"the spec is {size} bytes; specs are limited to {MAX_BYTES} bytes", path)
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read the spec: {exc.strerror or exc}", path) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise SpecError(f"the spec is not UTF-8 text (byte {exc.start})", path, line) from None


class _SpecBuilder:
    """Builds plain data from a safe loader's node graph and records the lines of every key path.

    Only the standard scalar tags reach PyYAML's (safe) constructors; collections are built here, which
    is where duplicate keys, foreign tags and alias expansion are caught. Mixed into a safe loader below.
    """

    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.spec_path = path
        self.lines: dict[str, tuple[int, int]] = {}
        self.budget = MAX_NODES

    def fail(self, message: str, node: Node, key_path: str) -> SpecError:
        return SpecError(message, self.spec_path, node.start_mark.line + 1, key_path or None)

    def build(self, node: Node, key_path: str, depth: int) -> Any:
        self.budget -= 1
        if self.budget < 0:
            raise self.fail(f"the document expands to more than {MAX_NODES} values; "
                            "is an alias ('*name') repeating a large anchor?", node, key_path)
        self.check_depth(node, key_path, depth)
        if isinstance(node, MappingNode) and node.tag == _MAP_TAG:
            return self.build_mapping(node, key_path, depth, frozenset())
        if isinstance(node, SequenceNode) and node.tag == _SEQ_TAG:
            result = []
            for index, item in enumerate(node.value):
                child = f"{key_path}[{index}]"
                self.lines[child] = _span(item, item)
                result.append(self.build(item, child, depth + 1))
            return result
        if isinstance(node, ScalarNode) and node.tag in _SCALAR_TAGS:
            return self.build_scalar(node, key_path)
        raise self.fail(f"tag {_short_tag(node.tag)} is not allowed: specs are loaded safely", node, key_path)

    def check_depth(self, node: Node, key_path: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            shown = key_path if len(key_path) <= 80 else key_path[:77] + "..."
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep (is an anchor used inside itself?)",
                            node, shown)

    def build_scalar(self, node: ScalarNode, key_path: str) -> Any:
        if node.tag == _YAML + "timestamp":
            return node.value  # a date-like id or label stays the text the author wrote
        try:
            return self.yaml_constructors[node.tag](self, node)
        except (ValueError, OverflowError, yaml.YAMLError):
            raise self.fail(f"cannot read {_short(node.value)} as {_short_tag(node.tag)}", node, key_path) from None

    def build_mapping(self, node: MappingNode, key_path: str, depth: int, skip: frozenset) -> dict:
        """Explicit keys first (duplicates refused), then YAML merge keys ('<<') for the keys not set;
        ``skip`` holds keys already set by the mapping that merges this one."""
        self.check_depth(node, key_path, depth)
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                merges.append(value_node)
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _SCALAR_TAGS:
                raise self.fail("a key must be plain text", key_node, key_path)
            key = self.build_scalar(key_node, key_path)
            if not isinstance(key, str):
                raise self.fail(f"key {key_node.value!r} must be text, not {_describe(key)} (quote it)",
                                key_node, key_path)
            child = _join(key_path, key)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise SpecError(f"duplicate key {key!r} (first at line {first_line[key]}); "
                                "YAML would silently keep only the last one", self.spec_path, line, child)
            first_line[key] = line
            if key in skip:
                continue
            self.lines[child] = _span(key_node, value_node)
            result[key] = self.build(value_node, child, depth + 1)
        for merge_node in merges:
            sources = merge_node.value if isinstance(merge_node, SequenceNode) else [merge_node]
            for source in sources:
                if not isinstance(source, MappingNode) or source.tag != _MAP_TAG:
                    raise self.fail("'<<' (merge key) takes a mapping or a list of mappings", source, key_path)
                merged = self.build_mapping(source, key_path, depth + 1, skip | result.keys())
                for key, value in merged.items():
                    result.setdefault(key, value)
        return result


class _PySpecLoader(_SpecBuilder, yaml.SafeLoader):
    """Pure-Python parsing: used where PyYAML was built without libyaml."""


class _CSpecLoader(_SpecBuilder, getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """libyaml parsing: the same nodes and marks, about ten times faster on a 200-case spec."""


_SpecLoader = _CSpecLoader if getattr(yaml, "__with_libyaml__", False) else _PySpecLoader


def _parse(text: str, path: Path) -> tuple[Any, dict[str, tuple[int, int]]]:
    """The document's data and its line map; every failure is a ``SpecError`` with a line."""
    loader = None
    try:
        loader = _SpecLoader(text, path)  # the reader refuses control characters right here
        if not loader.check_node():
            raise SpecError("empty spec: expected a mapping with 'model' and 'cases'", path, 1)
        node = loader.get_node()
        if loader.check_node():
            line = _document_start_line(text, node.end_mark.line, loader.peek_event().start_mark.line)
            raise SpecError("a spec holds one YAML document; found a second one ('---')", path, line)
        if isinstance(node, ScalarNode) and node.tag == _YAML + "null":
            raise SpecError("empty spec: expected a mapping with 'model' and 'cases'", path,
                            node.start_mark.line + 1)
        loader.lines[""] = _span(node, node)
        data = loader.build(node, "", 0)
        return data, loader.lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        detail = "; ".join(p for p in (exc.context, exc.problem) if p)
        if exc.context_mark is not None and mark is not None and mark.index >= len(text.rstrip()):
            # the file ended inside a bracket or quote: the line that opened it is the one to fix
            mark = exc.context_mark
            detail += f" (the file ends before it is closed; opened on line {mark.line + 1})"
        raise SpecError(f"YAML syntax error: {detail}", path, mark.line + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        raise SpecError(f"YAML syntax error: character {exc.character!r} is not allowed "
                        "(control characters must be escaped in double quotes)", path, line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML syntax error: {exc}", path) from None
    except RecursionError:
        raise SpecError(f"nested too deeply (more than {MAX_DEPTH} levels)", path) from None
    finally:
        if loader is not None:
            loader.dispose()


def _document_start_line(text: str, after: int, fallback: int) -> int:
    """1-based line of the '---' that opens the next document (libyaml marks its first content instead)."""
    for number, line in enumerate(text.splitlines()[after:fallback + 1], start=after + 1):
        if line.startswith("---"):
            return number
    return fallback + 1


def _span(first: Node, last: Node) -> tuple[int, int]:
    """1-based (start, end) lines; an end mark at column 0 belongs to the line before."""
    start = first.start_mark.line + 1
    end_mark = last.end_mark
    end = end_mark.line + (1 if end_mark.column > 0 else 0)
    return start, max(start, end)


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML):] if tag.startswith(_YAML) else tag


# --------------------------------------------------------------------------------------------------
# Key paths, messages, errors


def _join(key_path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{key_path}[{key}]"
    if _PLAIN_KEY.fullmatch(key):
        return f"{key_path}.{key}" if key_path else key
    return f"{key_path}[{key!r}]"


def _key_path(parts: Sequence[str | int]) -> str:
    key_path = ""
    for part in parts:
        key_path = _join(key_path, part)
    return key_path


def _parent(key_path: str) -> str:
    """``a.b[2].c`` → ``a.b[2]`` → ``a.b`` → ``a`` → ``""``."""
    if key_path.endswith("]"):
        depth, i = 0, len(key_path) - 1
        while i >= 0:  # find the matching '[' (a quoted key may hold brackets)
            if key_path[i] == "]":
                depth += 1
            elif key_path[i] == "[":
                depth -= 1
                if depth == 0:
                    return key_path[:i]
            i -= 1
        return ""
    cut = max(key_path.rfind("."), key_path.rfind("]") + 1 if "]" in key_path else -1)
    return key_path[:cut] if cut > 0 else ""


def _line_of(lines: Mapping[str, tuple[int, int]], key_path: str) -> int:
    key = key_path
    while key not in lines and key:
        key = _parent(key)
    return lines.get(key, (1, 1))[0]


def _error_at(path: Path, lines: Mapping[str, tuple[int, int]], parts: Sequence, message: str) -> SpecError:
    key_path = _key_path(parts)
    return SpecError(message, path, _line_of(lines, key_path), key_path or None)


def _combine(errors: list[SpecError]) -> SpecError:
    """One error for several problems: the first (by line) carries the location, the others follow."""
    errors = sorted(errors, key=lambda e: (e.line or 0))
    first = errors[0]
    if len(errors) == 1:
        return first
    rest = "\n".join(f"  {e}" for e in errors[1:])
    return SpecError(f"{first.message}\n  (and {len(errors) - 1} more problem(s))\n{rest}",
                     first.path, first.line, first.key_path)


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_KIND = {"string": "text", "integer": "an integer", "number": "a number", "boolean": "true or false",
         "object": "a mapping", "array": "a list", "null": "null"}


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, str):
        return f"text ({_short(value)})"
    if isinstance(value, int):
        return f"an integer ({_short(value)})"
    if isinstance(value, float):
        return f"a number ({_short(value)})"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _suggestion(key: str, allowed: Sequence[str]) -> str | None:
    """The allowed key the author probably meant, or None when nothing is close enough to be a typo."""
    best = closest(str(key), allowed, n=1)
    if best and difflib.SequenceMatcher(None, str(key).lower(), best[0].lower()).ratio() >= 0.6:
        return best[0]
    return None


def _unknown_key_message(key: str, allowed: Sequence[str]) -> str:
    best = _suggestion(key, allowed)
    if best:
        return f"unknown key; did you mean {best!r}?"
    return "unknown key; allowed here: " + ", ".join(allowed)


# --------------------------------------------------------------------------------------------------
# Schema validation


@lru_cache(maxsize=1)
def _base_schema() -> str:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return fh.read()


def schema(registry: Any = None) -> dict:
    """The spec's JSON Schema: the shipped file's shared definitions plus the key of every registered
    check kind (in cases, ``defaults`` and, for spec-level kinds, at the top) and case source.

    The shipped ``spec.schema.json`` is this composition for the built-in parts (a test keeps them equal),
    so editors complete the built-in keys; a user's kind adds its own fragment at load time.
    """
    registry = _registry(registry)
    doc = json.loads(_base_schema())
    case_props = doc["$defs"]["case"]["properties"]
    default_props = doc["properties"]["defaults"]["properties"]
    for kind in registry.kinds():
        if not kind.key:
            continue
        if kind.scope == "case":
            case_props[kind.key] = kind.schema
            default_props[kind.key] = kind.schema
            if kind.spec_level:
                doc["properties"][kind.key] = kind.schema
        else:
            doc["properties"][kind.key] = kind.schema
    for key, source in registry.case_sources.items():
        doc["properties"][key] = source.schema
    return doc


def _validator(registry: Any) -> Draft202012Validator:
    cached = getattr(registry, "_spec_validator", None)
    if cached is None:
        cached = Draft202012Validator(schema(registry))
        registry._spec_validator = cached
    return cached


def _schema_problems(data: dict, registry: Any) -> Iterator[tuple[tuple, str]]:
    """(path parts, message) for every schema violation, one per unknown key or missing key."""
    for err in _validator(registry).iter_errors(data):
        parts = tuple(err.absolute_path)
        kind = err.validator
        schema = err.schema if isinstance(err.schema, dict) else {}
        if kind == "additionalProperties":
            allowed = list(schema.get("properties", {}))
            for key in err.instance:
                if key not in allowed:
                    yield parts + (key,), _unknown_key_message(key, allowed)
        elif kind == "required":
            allowed = list(schema.get("properties", {}))
            typos = {_suggestion(k, allowed) for k in err.instance if k not in allowed}
            missing = [k for k in err.validator_value if k not in err.instance and k not in typos]
            if missing:  # a misspelt required key is reported once, as the unknown key it is
                yield parts, "missing required key " + ", ".join(repr(k) for k in missing)
        else:
            yield parts, _schema_message(err, schema)


def _schema_message(err, schema: dict) -> str:
    kind, value, instance = err.validator, err.validator_value, err.instance
    custom = schema.get("x-messages", {}).get(kind)
    if custom:
        return custom
    if kind == "type":
        kinds = [value] if isinstance(value, str) else list(value)
        return f"expected {' or '.join(_KIND.get(k, k) for k in kinds)}, got {_describe(instance)}"
    if kind == "enum":
        return f"{_short(instance)} is not one of " + ", ".join(repr(v) for v in value)
    if kind == "minimum":
        return f"{_short(instance)} is less than the minimum of {value}"
    if kind == "maximum":
        return f"{_short(instance)} is greater than the maximum of {value}"
    if kind in ("minItems", "maxItems"):
        exact = schema.get("minItems") == schema.get("maxItems")
        need = f"exactly {value}" if exact else (f"at least {value}" if kind == "minItems" else f"at most {value}")
        return f"needs {need} item(s), got {len(instance)}"
    if kind == "minLength":
        return "must not be empty"
    if kind == "maxLength":
        return f"is longer than {value} characters"
    if kind == "pattern":
        return f"{_short(instance)} {schema.get('x-pattern-message') or f'does not match {value!r}'}"
    if kind == "minProperties":
        return f"needs at least {value} key(s)"
    if kind == "maxProperties":
        return f"takes at most {value} key(s)"
    return err.message


def _number_problems(value: Any, parts: tuple) -> Iterator[tuple[tuple, str]]:
    """Non-finite floats and integers beyond 64 bits anywhere: the schema's ranges cannot catch NaN
    (every comparison with it is false), and huge integers would crash numpy later."""
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        yield parts, f"{value} is not a finite number"
    elif isinstance(value, int) and abs(value) > MAX_INT:
        yield parts, f"{_short(value)} is too large (the limit is 64 bits)"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _number_problems(item, parts + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _number_problems(item, parts + (index,))


def _dedupe(problems: list[tuple[tuple, str]]) -> list[tuple[tuple, str]]:
    """One problem per key path (the first: number problems come before the schema's view of them)."""
    seen: set[tuple] = set()
    out = []
    for parts, message in problems:
        if parts not in seen:
            seen.add(parts)
            out.append((parts, message))
    return out


def _case_index(parts: Sequence) -> int | None:
    if len(parts) >= 2 and parts[0] == "cases" and isinstance(parts[1], int):
        return parts[1]
    return None


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

    # -- one case

    def build(self, index: int, found: SourceCase, schema_problems: list[tuple[tuple, str]]) -> CaseSpec:
        location = found.location
        case_kp = location.key_path
        errors = [_error_at(self.path, self.lines, parts, message) for parts, message in schema_problems]
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
        return self._errored(case_id or case_kp, merged, location, lines_rel, errors)

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
        configs: dict[str, Any] = {}
        for kind in self.kinds:
            if not kind.key:
                configs[kind.name] = None
                continue
            ctx.own = raw.get(kind.key)
            configs[kind.name] = kind.parse(merged.get(kind.key), ctx)
        if ctx.errors:
            return None
        return CaseSpec(id=case_id or location.key_path, image=image, top_k=top_k,
                        checks=MappingProxyType(configs), features=_features(merged.get("features", ())),
                        marks=self._marks(merged)[0], mark_args=MappingProxyType(self._marks(merged)[1]),
                        location=location, lines=MappingProxyType(lines_rel),
                        spec_path=self.path, label=ctx.label, annotations=MappingProxyType(dict(ctx.annotations)))

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
                 errors: list[SpecError]) -> CaseSpec:
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
                        spec_path=self.path)


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
