"""Spec files: YAML in, typed and validated dataclasses out, every value traceable to its file:line.

The data flows one way through three modules (each imports only those before it):

1. ``yaml_positions``: the file's text -> plain data (dicts, lists, scalars) plus the line of every
   key path, with a strict safe YAML loader (standard tags only, no duplicate keys, bounded aliases).
2. ``validation``: the data -> (key path, message) problems against the JSON Schema
   (``spec.schema.json`` composed with the registered check kinds and case sources), placed at lines.
3. ``build``: the valid data -> ``Spec``, ``ModelSpec``, ``CaseSpec``, with the semantic checks a schema
   cannot say; ``load_spec`` runs all three, ``is_spec_file`` tells pytest what to collect.

The names below are the public API (``from audit.spec import load_spec``). The limits (``MAX_BYTES``,
``MAX_NODES``, ...) are read here too, but live in (and are changed on) ``audit.spec.yaml_positions``
and ``audit.spec.validation`` (``MAX_INT``).
"""
from __future__ import annotations

from audit.sources.base import Location
from audit.spec.build import CaseSpec, FeatureRequest, ModelSpec, Spec, is_spec_file, load_spec
from audit.spec.validation import MAX_INT, SCHEMA_PATH, schema
from audit.spec.yaml_positions import ALIAS_RATIO, MAX_BYTES, MAX_DEPTH, MAX_NODES

__all__ = ["SCHEMA_PATH", "Location", "ModelSpec", "FeatureRequest", "CaseSpec", "Spec", "load_spec", "is_spec_file",
           "schema", "MAX_BYTES", "MAX_NODES", "ALIAS_RATIO", "MAX_DEPTH", "MAX_INT"]
