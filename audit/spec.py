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
import functools
import gc
import json
import math
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml
from jsonschema import Draft202012Validator
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from audit.errors import SpecError, closest

__all__ = ["SCHEMA_PATH", "Location", "ModelSpec", "Expect", "Focus", "FeatureRequest", "BaselineTolerance",
           "CaseSpec", "Spec", "load_spec", "is_spec_file"]

SCHEMA_PATH: Path = Path(__file__).with_name("spec.schema.json")

#: Largest spec file read: room for a generated 50,000-case spec (~170 bytes a case in block style);
#: anything beyond is a mistake (a binary file, a log), refused before it is read.
MAX_BYTES = 32 * 2**20
#: Values aliases may add to a document: bounds the cost of "billion laughs" documents. What the author
#: wrote is never counted (a 50,000-case spec is long, not a bomb); aliases may always add this many,
#: and up to ``ALIAS_RATIO`` times what the document itself holds (a ``<<: *defaults`` in every case).
MAX_NODES = 100_000
ALIAS_RATIO = 10
#: Nesting depth of mappings and lists; specs need about 8.
MAX_DEPTH = 64
#: Integers beyond 64 bits are refused: no spec field needs them, and they upset numpy and torch.
MAX_INT = 2**63 - 1

DEFAULT_TOP_K = 5
DEFAULT_PREPROCESS = "squash"
DEFAULT_MIN_ENERGY = 0.5
DEFAULT_MAX_ENERGY_IN_AVOID = 0.2
DEFAULT_IOU_THRESHOLD = 0.5
FOCUS_METRICS = ("min_energy", "pointing_game", "min_iou", "min_rank_accuracy")

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = _YAML + "map", _YAML + "seq", _YAML + "merge"
_CASES_LINE = re.compile(r"^(?:cases|'cases'|\"cases\")[ \t]*:", re.MULTILINE)
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")

# --------------------------------------------------------------------------------------------------
# Public dataclasses


@dataclass(frozen=True)
class Location:
    """Where something was written: the spec file, the 1-based line and the key path."""

    path: Path
    line: int
    key_path: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


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

    def key(self) -> tuple:
        """Identity of the loaded model, so a session loads it once however many specs name it.

        Preprocessing and CAM layer are per-call choices of the engine, so they are not part of it; the
        seed only matters for a random initialisation.
        """
        seed = self.seed if self.weights is None and self.checkpoint is None else None
        return (self.arch, self.weights, str(self.checkpoint) if self.checkpoint else None,
                str(self.labels) if self.labels else None, seed)


@dataclass(frozen=True)
class Expect:
    """Prediction expectations; labels stay raw (a name or an index): the model resolves them."""

    top1: str | int | None = None
    in_top_k: tuple[str | int, ...] = ()
    any_in_top_k: tuple[str | int, ...] = ()
    not_in_top_k: tuple[str | int, ...] = ()
    min_prob: float | None = None


@dataclass(frozen=True)
class Focus:
    """Focus expectations with defaults applied. ``region``/``avoid`` are tuples of one-key dicts
    (``box``, ``box_rel``, ``polygon``, ``mask``) whose union is the region; mask paths stay as written
    (relative to the spec's folder). Not hashable (it holds dicts)."""

    target: str | int | None = None
    region: tuple[dict, ...] | None = None
    min_energy: float | None = None
    pointing_game: bool = False
    tolerance_px: float = 0.0
    min_iou: float | None = None
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    min_rank_accuracy: float | None = None
    avoid: tuple[dict, ...] | None = None
    max_energy_in_avoid: float | None = None


@dataclass(frozen=True)
class FeatureRequest:
    """A layer to draw as a feature-map grid; ``max_channels`` None means all channels."""

    layer: str
    max_channels: int | None = None


@dataclass(frozen=True)
class BaselineTolerance:
    """How far a run may drift from the recorded baseline. These defaults are the documented ones."""

    top1_must_match: bool = True
    min_topk_overlap: float = 0.6
    max_prob_drift: float = 0.15
    min_heatmap_correlation: float = 0.7
    min_hot_iou: float = 0.4


@dataclass(frozen=True)
class CaseSpec:
    """One case with the spec's defaults merged in.

    When ``error`` is set the case cannot run (its other fields are best effort: ``id`` is the written
    id when usable, else ``cases[i]``); the plugin reports it as errored while the other cases run.
    ``lines`` maps key paths relative to the case (``"expect.top1"``, ``"focus.region[1].box"``) to the
    line they were written on; keys inherited from ``defaults`` point at the defaults block.
    """

    id: str
    image: Path
    top_k: int
    expect: Expect | None
    focus: Focus | None
    features: tuple[FeatureRequest, ...]
    marks: tuple[str, ...]
    baseline: BaselineTolerance
    location: Location = field(compare=False)
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    error: SpecError | None = field(default=None, compare=False)

    def line_of(self, rel_key_path: str) -> int:
        """The best line for a key path relative to the case: the key's, else its nearest parent's,
        else the case's own line."""
        key = rel_key_path
        while key:
            if key in self.lines:
                return self.lines[key]
            key = _parent(key)
        return self.location.line


@dataclass(frozen=True)
class Spec:
    """A loaded spec file. ``path`` is as given to ``load_spec``; other paths are absolute."""

    path: Path
    model: ModelSpec
    cases: tuple[CaseSpec, ...]
    marks: tuple[str, ...]

    @property
    def case_errors(self) -> tuple[SpecError, ...]:
        """The errors of the cases that cannot run (empty when every case is valid)."""
        return tuple(c.error for c in self.cases if c.error is not None)


# --------------------------------------------------------------------------------------------------
# Public functions


def is_spec_file(path: str | Path) -> bool:
    """Whether pytest should collect this file as a spec: ``*.yaml``/``*.yml`` with a top-level
    ``cases:`` line.

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
    return _CASES_LINE.search(head.decode("utf-8", errors="replace")) is not None


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
def load_spec(path: str | Path) -> Spec:
    """Load, validate and type a spec file.

    Raises ``SpecError`` for problems of the file (syntax, tags, duplicate keys, top-level keys,
    ``model``, ``defaults``); per-case problems are returned on ``CaseSpec.error``.
    """
    path = Path(path)
    data, lines = _parse(_read(path), path)
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping with the keys 'model' and 'cases'; found {_describe(data)}",
                        path, lines.get("", (1, 1))[0])
    problems = _dedupe(list(_number_problems(data, ())) + list(_schema_problems(data)))
    spec_level = [p for p in problems if _case_index(p[0]) is None]
    if spec_level:
        raise _combine([_error_at(path, lines, parts, message) for parts, message in spec_level])
    by_case: dict[int, list[tuple[tuple, str]]] = {}
    for parts, message in problems:
        by_case.setdefault(_case_index(parts), []).append((parts, message))
    model = _model_spec(data["model"], path, lines)
    builder = _CaseBuilder(data, path, lines)
    cases = tuple(builder.build(i, raw, by_case.get(i, [])) for i, raw in enumerate(data["cases"]))
    return Spec(path=path, model=model, cases=cases, marks=tuple(dict.fromkeys(data.get("marks", ()))))


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
        self.seen: set[int] = set()   # ids of the nodes built once: a second visit is an alias
        self.written = 0              # values the document holds
        self.expanded = 0             # values aliases added
        self.in_alias = 0             # > 0 while building a node reached through an alias

    def fail(self, message: str, node: Node, key_path: str) -> SpecError:
        return SpecError(message, self.spec_path, node.start_mark.line + 1, key_path or None)

    def build(self, node: Node, key_path: str, depth: int) -> Any:
        # PyYAML hands an alias as the anchor's own node object: a node seen before is an expansion
        if self.in_alias or id(node) in self.seen:
            self.expanded += 1
            limit = max(MAX_NODES, ALIAS_RATIO * self.written)
            if self.expanded > limit:
                raise self.fail(f"the document expands to more than {limit} values through aliases (it holds "
                                f"{self.written} itself); is an alias ('*name') repeating a large anchor?",
                                node, key_path)
            self.in_alias += 1
            try:
                return self._build(node, key_path, depth)
            finally:
                self.in_alias -= 1
        self.seen.add(id(node))
        self.written += 1
        return self._build(node, key_path, depth)

    def _build(self, node: Node, key_path: str, depth: int) -> Any:
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
def _validator() -> Draft202012Validator:
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        return Draft202012Validator(_inline_refs(json.load(fh)))


_ANNOTATIONS = frozenset({"description", "title", "$comment", "examples", "default", "markdownDescription"})


def _inline_refs(schema: dict) -> dict:
    """The schema with each local ``{"$ref": "#/..."}`` replaced by a copy of what it points at.

    Same validation, same error schemas (the copies are the targets' own keywords): only faster, as
    jsonschema resolves a ``$ref`` on every visit, five per case, a third of a large spec's load time.
    A ``$ref`` with siblings other than annotations, or one inside its own target (recursion), stays.
    """
    def target(ref: str) -> Any:
        node: Any = schema
        for part in ref[2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def walk(node: Any, active: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [walk(v, active) for v in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if (isinstance(ref, str) and ref.startswith("#/") and ref not in active
                and set(node) - {"$ref"} <= _ANNOTATIONS):
            try:
                found = target(ref)
            except (KeyError, TypeError, IndexError):
                found = None
            if isinstance(found, dict):
                inlined = walk(found, active + (ref,))
                return {**inlined, **{k: v for k, v in node.items() if k != "$ref" and k not in inlined}}
        return {k: walk(v, active) for k, v in node.items()}

    return walk(schema, ())


def _schema_problems(data: dict) -> Iterator[tuple[tuple, str]]:
    """(path parts, message) for every schema violation, one per unknown key or missing key."""
    for err in _validator().iter_errors(data):
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
                     preprocess=raw.get("preprocess", DEFAULT_PREPROCESS), cam_layer=raw.get("cam_layer"),
                     labels=labels, seed=raw.get("seed"),
                     location=Location(path, _line_of(lines, "model"), "model"))


# --------------------------------------------------------------------------------------------------
# Cases

_DEEP_MERGED = ("expect", "focus", "baseline")
_ID_FORBIDDEN = re.compile(r"\s|/|::")


class _CaseBuilder:
    """Builds one ``CaseSpec`` per raw case: merges defaults, checks semantics, keeps lines."""

    def __init__(self, data: dict, path: Path, lines: Mapping[str, tuple[int, int]]):
        self.path = path
        self.base_dir = path.parent
        self.defaults = data.get("defaults", {})
        self.spec_baseline = data.get("baseline", {})
        self.spec_marks = tuple(data.get("marks", ()))
        self.lines = lines
        self.buckets: dict[str, dict[str, tuple[int, int]]] = {}
        for key_path, span in lines.items():
            self.buckets.setdefault(_top_segment(key_path), {})[key_path] = span
        self.first_id_line: dict[str, int] = {}

    # -- one case

    def build(self, index: int, raw: Any, schema_problems: list[tuple[tuple, str]]) -> CaseSpec:
        case_kp = f"cases[{index}]"
        location = Location(self.path, _line_of(self.lines, case_kp), case_kp)
        errors = [_error_at(self.path, self.lines, parts, message) for parts, message in schema_problems]
        raw = raw if isinstance(raw, dict) else {}
        case_id = self._claim_id(raw, case_kp, errors)
        merged, origin = self._merge(raw, case_kp)
        lines_rel = self._relative_lines(origin, location.line)
        ctx = _Context(self.path, case_kp, origin, lines_rel, errors)
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

    def _claim_id(self, raw: dict, case_kp: str, errors: list[SpecError]) -> str | None:
        """The case id when usable; a repeated id is an error on the second case."""
        value = raw.get("id")
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            return None
        case_id = str(value)
        line = _line_of(self.lines, f"{case_kp}.id")
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
        self.first_id_line[case_id] = line
        return case_id

    def _merge(self, raw: dict, case_kp: str) -> tuple[dict, dict[str, str]]:
        """The case over the defaults over the spec-level baseline, and for each (relative) key the
        absolute key path it was written at."""
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key, value in self.defaults.items():
            merged[key] = value
            origin[key] = f"defaults.{key}"
        for key, value in raw.items():
            base = merged.get(key)
            if key in _DEEP_MERGED and isinstance(base, dict) and isinstance(value, dict):
                for sub in base:
                    origin[f"{key}.{sub}"] = f"defaults.{key}.{sub}"
                value = {**base, **value}
            merged[key] = value
            origin[key] = f"{case_kp}.{key}"
            if isinstance(raw[key], dict) and key in _DEEP_MERGED:
                for sub in raw[key]:
                    origin[f"{key}.{sub}"] = f"{case_kp}.{key}.{sub}"
        if self.spec_baseline:
            own = merged.get("baseline") if isinstance(merged.get("baseline"), dict) else {}
            for sub in self.spec_baseline:
                if sub not in own:
                    origin[f"baseline.{sub}"] = f"baseline.{sub}"
            merged["baseline"] = {**self.spec_baseline, **own}
            origin.setdefault("baseline", "baseline")
        return merged, origin

    def _relative_lines(self, origin: Mapping[str, str], case_line: int) -> dict[str, int]:
        rel_lines = {"": case_line}
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
        top_k = int(merged.get("top_k", DEFAULT_TOP_K))
        expect = _expect(merged.get("expect"), top_k, ctx)
        own_focus = raw.get("focus") if isinstance(raw.get("focus"), dict) else {}
        focus = self._focus(merged.get("focus"), own_focus, ctx)
        if ctx.errors:
            return None
        return CaseSpec(id=case_id or location.key_path, image=image, top_k=top_k, expect=expect, focus=focus,
                        features=_features(merged.get("features", ())), marks=self._marks(merged),
                        baseline=BaselineTolerance(**merged.get("baseline", {})), location=location,
                        lines=MappingProxyType(lines_rel))

    def _focus(self, raw: dict | None, own: dict, ctx: "_Context") -> Focus | None:
        """Focus with its defaults; metrics inherited from ``defaults`` apply only to cases with a
        region, metrics written in the case without a region are errors."""
        if not raw:
            return None
        values = dict(raw)
        region = self._regions(values.get("region"), "focus.region", ctx)
        avoid = self._regions(values.get("avoid"), "focus.avoid", ctx)
        reported = len(ctx.errors)
        if region is None:
            for metric in FOCUS_METRICS:
                if metric in own and own[metric] is not False:
                    ctx.error(f"focus.{metric}", f"{metric} needs a region to measure against (focus.region)")
                values.pop(metric, None)
        if avoid is None and "max_energy_in_avoid" in values:
            if "max_energy_in_avoid" in own:
                ctx.error("focus.max_energy_in_avoid", "max_energy_in_avoid needs an avoid region (focus.avoid)")
            values.pop("max_energy_in_avoid")
        if region is None and avoid is None:
            if own and len(ctx.errors) == reported:
                ctx.error("focus", "focus has nothing to check: give a region and/or an avoid region")
            return None
        if region is not None and not any(values.get(m) not in (None, False) for m in FOCUS_METRICS):
            values["min_energy"] = DEFAULT_MIN_ENERGY
        if avoid is not None and values.get("max_energy_in_avoid") is None:
            values["max_energy_in_avoid"] = DEFAULT_MAX_ENERGY_IN_AVOID
        floats = ("min_energy", "min_iou", "min_rank_accuracy", "max_energy_in_avoid")
        return Focus(target=values.get("target"), region=region, avoid=avoid,
                     pointing_game=bool(values.get("pointing_game", False)),
                     tolerance_px=float(values.get("tolerance_px", 0.0)),
                     iou_threshold=float(values.get("iou_threshold", DEFAULT_IOU_THRESHOLD)),
                     **{k: float(values[k]) if values.get(k) is not None else None for k in floats})

    def _regions(self, raw: Any, rel: str, ctx: "_Context") -> tuple[dict, ...] | None:
        if raw is None:
            return None
        items = [(rel, raw)] if isinstance(raw, dict) else [(f"{rel}[{i}]", r) for i, r in enumerate(raw)]
        out = []
        for item_rel, item in items:
            (kind, value), = item.items()
            where = f"{item_rel}.{kind}"
            if kind in ("box", "box_rel"):
                x0, y0, x1, y1 = value
                if not (x0 < x1 and y0 < y1):
                    ctx.error(where, f"{kind} {list(value)} is empty: it needs x0 < x1 and y0 < y1 "
                                     "([x0, y0, x1, y1], not [x, y, width, height])")
                out.append({kind: tuple(value)})
            elif kind == "polygon":
                if len({tuple(p) for p in value}) < 3:
                    ctx.error(where, "a polygon needs at least 3 distinct points")
                out.append({kind: tuple(tuple(p) for p in value)})
            else:
                problem = _file_problem("mask", _resolve(self.base_dir, value))
                if problem:
                    ctx.error(where, problem)
                out.append({kind: value})
        return tuple(out)

    def _marks(self, merged: dict) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.spec_marks + tuple(merged.get("marks", ()))))

    def _errored(self, case_id: str, merged: dict, location: Location, lines_rel: dict[str, int],
                 errors: list[SpecError]) -> CaseSpec:
        """A case that cannot run, with what is known so the plugin can name and mark it."""
        image = merged.get("image")
        marks = merged.get("marks")
        valid_marks = isinstance(marks, list) and all(isinstance(m, str) and m.isidentifier() for m in marks)
        return CaseSpec(id=case_id,
                        image=_resolve(self.base_dir, image) if isinstance(image, str) and image else self.base_dir,
                        top_k=DEFAULT_TOP_K, expect=None, focus=None, features=(),
                        marks=tuple(dict.fromkeys(self.spec_marks + (tuple(marks) if valid_marks else ()))),
                        baseline=BaselineTolerance(), location=location, lines=MappingProxyType(lines_rel),
                        error=_combine(errors))


class _Context:
    """Collects the errors of one case at the lines (and key paths) their keys were written at."""

    def __init__(self, path: Path, case_kp: str, origin: Mapping[str, str], lines_rel: Mapping[str, int],
                 errors: list[SpecError]):
        self.path, self.case_kp, self.origin, self.lines_rel, self.errors = path, case_kp, origin, lines_rel, errors

    def error(self, rel: str, message: str) -> None:
        key, suffix = rel, ""
        while key and key not in self.origin:  # where was this (or its parent) written?
            cut = _parent(key)
            suffix = key[len(cut):] + suffix
            key = cut
        key_path = (self.origin[key] + suffix) if key else f"{self.case_kp}.{rel}"
        line = self.lines_rel.get(rel)
        probe = rel
        while line is None:
            probe = _parent(probe)
            line = self.lines_rel.get(probe)
        self.errors.append(SpecError(message, self.path, line, key_path))


def _top_segment(key_path: str) -> str:
    match = re.match(r"cases\[\d+\]|[^.\[]*", key_path)
    return match.group(0) if match else ""


def _label_key(label: str | int) -> str | int:
    return label.strip().lower() if isinstance(label, str) else label


def _expect(raw: dict | None, top_k: int, ctx: _Context) -> Expect | None:
    if not raw:
        return None
    expect = Expect(top1=raw.get("top1"), in_top_k=tuple(raw.get("in_top_k", ())),
                    any_in_top_k=tuple(raw.get("any_in_top_k", ())), not_in_top_k=tuple(raw.get("not_in_top_k", ())),
                    min_prob=float(raw["min_prob"]) if raw.get("min_prob") is not None else None)
    required = set(map(_label_key, expect.in_top_k))
    if expect.top1 is not None:
        required.add(_label_key(expect.top1))
    if len(required) > top_k:
        ctx.error("expect.in_top_k", f"{len(required)} different labels must be in the top-k but top_k is {top_k}")
    clash = [label for label in expect.not_in_top_k if _label_key(label) in required]
    if clash:
        ctx.error("expect.not_in_top_k", f"{_short(clash[0])} is both required and forbidden in the top-k")
    return expect


def _features(raw: Sequence) -> tuple[FeatureRequest, ...]:
    return tuple(FeatureRequest(item) if isinstance(item, str)
                 else FeatureRequest(item["layer"], item.get("max_channels")) for item in raw)
