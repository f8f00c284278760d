"""The spec's JSON Schema, and its violations translated into messages at file:line key paths.

Validation has two layers: ``spec.schema.json`` (JSON Schema 2020-12, also usable for editor
completion) for shapes, types and ranges, checked here on the plain data ``yaml_positions`` built,
and the semantic checks of ``build`` for what a schema cannot say (exclusive keys, box corners, files
that must exist, unique ids). ``schema(registry)`` composes the shipped file with the keys of the
registered check kinds and case sources; ``_schema_problems`` and ``_number_problems`` yield
(path parts, message) pairs, worded for spec authors ("did you mean 'x'?"); ``_error_at`` places one
at its line and ``_combine`` joins several into one ``SpecError``.
"""
from __future__ import annotations

import difflib
import json
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from jsonschema import Draft202012Validator

from audit.errors import SpecError, closest
from audit.spec.yaml_positions import _describe, _key_path, _line_of, _short

#: ``audit/spec.schema.json``, next to this package's folder.
SCHEMA_PATH: Path = Path(__file__).parent.with_name("spec.schema.json")

#: Integers beyond 64 bits are refused: no spec field needs them, and they upset numpy and torch.
MAX_INT = 2**63 - 1


# --------------------------------------------------------------------------------------------------
# Registry


def _registry(registry: Any) -> Any:
    if registry is not None:
        return registry
    from audit.registry import Registry

    return _default_registry(Registry)


@lru_cache(maxsize=1)
def _default_registry(cls: Any) -> Any:
    return cls.default()


# --------------------------------------------------------------------------------------------------
# Errors and messages


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


_KIND = {"string": "text", "integer": "an integer", "number": "a number", "boolean": "true or false",
         "object": "a mapping", "array": "a list", "null": "null"}


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
        cached = Draft202012Validator(_inline_refs(schema(registry)))
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
