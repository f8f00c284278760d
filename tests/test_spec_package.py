"""The spec package's layout: one-way imports (positions <- validation <- build) and the public names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import audit.spec

PACKAGE = Path(audit.spec.__file__).parent
# what each module may import from its siblings
ALLOWED = {"yaml_positions": set(), "validation": {"yaml_positions"}, "build": {"yaml_positions", "validation"}}


def sibling_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("audit.spec."):
                found.add(name.split(".")[2])
            elif name == "audit.spec" or (isinstance(node, ast.ImportFrom) and node.level):
                found.add("<package>")
    return found


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_imports_inside_the_package_go_one_way(module):
    assert sibling_imports(module) <= ALLOWED[module]


def test_the_public_names_are_importable_from_the_package():
    for name in audit.spec.__all__:
        assert getattr(audit.spec, name) is not None
    assert audit.spec.SCHEMA_PATH.is_file() and audit.spec.SCHEMA_PATH.name == "spec.schema.json"
    assert audit.spec.SCHEMA_PATH.parent == PACKAGE.parent   # audit/spec.schema.json, shipped as package data
