"""The registry: every way model-audit grows, in one place — check kinds, CAM methods, case sources, models.

Each built-in part is one module plus one line in the tuples below; a user's part is registered from
their ``conftest.py`` through the ``pytest_audit_register(registry)`` hook (:mod:`audit.hookspecs`).
A registry belongs to one session (``config.stash``), never to the process, so what a user's conftest
registers is gone when the session ends; ``Registry.default()`` gives a fresh one with the built-ins
for the Python API and the command line.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable, Mapping

from audit.errors import AuditError, UnknownNameError, closest

#: built-in check kinds, in item order (each module has ``KIND``)
BUILTIN_CHECK_KINDS = ("audit.kinds.prediction", "audit.kinds.focus", "audit.kinds.baseline",
                       "audit.kinds.invariance", "audit.kinds.sanity", "audit.kinds.gates")
#: built-in case sources (each module has ``SOURCE``)
BUILTIN_CASE_SOURCES = ("audit.sources.yaml_cases", "audit.sources.dataset")
#: the module holding the built-in CAM methods (its ``METHODS``: name -> method)
BUILTIN_CAM_METHODS = "audit.cams"


class Registry:
    """Check kinds, CAM methods, case sources and user models known to one session."""

    def __init__(self) -> None:
        self.check_kinds: dict[str, Any] = {}
        self.cam_methods: dict[str, Any] = {}
        self.case_sources: dict[str, Any] = {}
        self.models: dict[str, Callable[..., Any]] = {}

    @classmethod
    def default(cls) -> "Registry":
        """A registry holding the built-in parts only."""
        registry = cls()
        for name in BUILTIN_CHECK_KINDS:
            registry.add_check_kind(importlib.import_module(name).KIND)
        for name in BUILTIN_CASE_SOURCES:
            registry.add_case_source(importlib.import_module(name).SOURCE)
        try:
            methods = importlib.import_module(BUILTIN_CAM_METHODS).METHODS
        except (ModuleNotFoundError, AttributeError):
            methods = {}
        for method in methods.values():
            registry.add_cam_method(method)
        return registry

    def with_check_kinds(self, *names: str) -> "Registry":
        """A copy holding only the named check kinds (and every CAM method, case source and model): a
        session of it observes the cases without the other kinds' variants or follow-up images."""
        unknown = [n for n in names if n not in self.check_kinds]
        if unknown:
            raise UnknownNameError("check kind", unknown[0], closest(unknown[0], self.check_kinds))
        copy = Registry()
        copy.check_kinds = {n: k for n, k in self.check_kinds.items() if n in names}
        copy.cam_methods = dict(self.cam_methods)
        copy.case_sources = dict(self.case_sources)
        copy.models = dict(self.models)
        return copy

    # -- adding ----------------------------------------------------------------------------------------
    def add_check_kind(self, kind: Any) -> None:
        """Add a check kind (an ``audit.kinds.CheckKind``); its ``name`` becomes the item name."""
        name = getattr(kind, "name", "")
        if not name or not str(name).isidentifier():
            raise AuditError(f"check kind {kind!r} needs a name that is an identifier (it ends the node id)")
        if name in self.check_kinds:
            raise AuditError(f"check kind {name!r} is registered twice ({self.check_kinds[name]!r}, {kind!r})")
        key = getattr(kind, "key", None)
        clash = [k for k in self.check_kinds.values() if key is not None and k.key == key]
        if clash:
            raise AuditError(f"check kinds {clash[0].name!r} and {name!r} both read the spec key {key!r}")
        self.check_kinds[name] = kind

    def add_cam_method(self, method: Any) -> None:
        """Add a CAM method (``name``, ``needs_gradient``, ``compute``: see :mod:`audit.cams`)."""
        name = getattr(method, "name", "")
        if not name:
            raise AuditError(f"CAM method {method!r} needs a name")
        self.cam_methods[name] = method

    def add_case_source(self, source: Any) -> None:
        """Add a case source (an ``audit.sources.base.CaseSource``) owning one top-level spec key."""
        key = getattr(source, "key", "")
        if not key:
            raise AuditError(f"case source {source!r} needs the spec key it reads")
        if key in self.case_sources:
            raise AuditError(f"two case sources read the spec key {key!r}")
        self.case_sources[key] = source

    def add_model(self, name: str, factory: Callable[..., Any]) -> None:
        """Add a model a spec can name as ``arch: <name>``: ``factory(model_spec, device)`` returns an
        ``nn.Module`` or an ``audit.models.ProvidedModel``."""
        self.models[str(name)] = factory

    # -- lookups ---------------------------------------------------------------------------------------
    def kinds(self, scope: str | None = None) -> list[Any]:
        """The check kinds in item order (of one scope when given)."""
        found = [k for k in self.check_kinds.values() if scope is None or k.scope == scope]
        return sorted(found, key=lambda k: getattr(k, "order", 50))

    def cam_method(self, name: str) -> Any:
        try:
            return self.cam_methods[name]
        except KeyError:
            raise UnknownNameError("CAM method", name, closest(str(name), self.cam_methods)) from None

    def spec_keys(self) -> Mapping[str, Any]:
        """Schema fragments of the case keys the kinds read: ``{key: schema}``."""
        return {k.key: k.schema for k in self.kinds() if k.key}

    def top_level_keys(self) -> Iterable[str]:
        """Top-level spec keys owned by sources and by kinds that allow a spec-level value."""
        return [*self.case_sources, *(k.key for k in self.kinds() if k.key and k.spec_level)]
