"""The spec's YAML: a strict, safe loader that remembers the line of every key path.

Why a loader of our own: a spec author needs "file:line key path: message", and PyYAML forgets where
values came from. ``_SpecLoader`` is PyYAML's safe loader (libyaml's ``CSafeLoader`` when PyYAML has
it) with a builder mixed in (nothing is registered on PyYAML's classes, so other suites loading YAML
are unaffected); it composes the node graph and then builds
plain dicts, lists and scalars itself, recording the lines of every key path. Building it ourselves
is also what makes the loader strict: only the standard JSON-like tags are accepted (``!!python/...``
and any other tag is refused before anything is constructed), duplicate keys are errors instead of
"last one wins", and alias expansion is bounded ("billion laughs").

``_read`` + ``_parse`` turn a file into ``(data, lines)``: plain data and a map of key paths
(``cases[0].focus.region.box``, built by ``_join``/``_key_path``) to their (first, last) lines;
``_parent`` and ``_line_of`` find the best line of any key path. ``_short`` and ``_describe`` name
values in messages (the loader's, the schema's and the builder's). Every failure is a ``SpecError``
with a line. This module knows nothing of the schema (``validation``) or the typed spec (``build``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from audit.errors import SpecError

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

_YAML = "tag:yaml.org,2002:"
_SCALAR_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null", "timestamp"))
_MAP_TAG, _SEQ_TAG, _MERGE_TAG = _YAML + "map", _YAML + "seq", _YAML + "merge"
_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


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
# Key paths


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


# --------------------------------------------------------------------------------------------------
# Values in messages


def _short(value: Any, limit: int = 60) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
