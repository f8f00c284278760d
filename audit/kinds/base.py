"""What a check kind is: the one protocol every kind of check implements, built in or a user's.

A kind owns everything about itself: the spec key it reads (with its JSON Schema fragment and its
parser), whether a case gets an item of it, what it needs from the engine (classes to explain,
perturbed variants of the image to put in the same batched forward, layers), how it turns the
observation into a ``CheckResult``, and what the report shows for it. Collection, the session, the
results and the report iterate the registry (:mod:`audit.registry`); no kind name is spelled outside its
own module. Adding a kind is one module (a subclass of :class:`CheckKind`) plus one registration.

Kinds never touch torch: ``prepare`` resolves labels, layers and regions through the
:class:`ModelContext` the session hands it, and ``check`` is a pure function of numpy data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:  # only for type hints: kinds sit before the session in the data flow
    import numpy as np
    from PIL import Image

    from audit.checks import CheckResult


@dataclass(frozen=True, eq=False)
class Variant:
    """A perturbed copy of a case's decoded original image, explained in the same forward as the original.

    ``name`` is unique within the case; ``meta`` is free-form data the kind wants back (what was done).
    """

    name: str
    image: "Image.Image"
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Needs:
    """What a kind asks of the engine for one case.

    ``targets``: classes whose CAM must be computed besides the top-1; ``variants``: perturbed images to
    explain in the same batch; ``layers``: feature maps to capture; ``subject``: the class this kind is
    about (the report shows its heatmap; the first kind with a subject wins, else the top-1).
    """

    targets: tuple[int, ...] = ()
    variants: tuple[Variant, ...] = ()
    layers: tuple[str, ...] = ()
    subject: int | None = None


@dataclass(frozen=True)
class ShownRegion:
    """A region the report draws on the image: ``role`` is "expected" (solid green) or "avoid" (dashed red)."""

    role: str
    description: str
    outlines: tuple = ()


@dataclass(frozen=True, eq=False)
class Picture:
    """An extra picture a kind wants in the report: an image, a heatmap, or a heatmap over an image."""

    image: "Image.Image | None" = None
    heat: "np.ndarray | None" = None


class CheckKind:
    """Base class of check kinds; subclasses set the class attributes and override what they need.

    Class attributes:

    * ``name``: the item name (``spec.yaml::<case>::<name>``) and the key of its results;
    * ``key``: the key it reads in a case and in ``defaults`` (None: the kind reads no key);
    * ``schema``: the JSON Schema (2020-12) of that key's value, merged into the spec schema; it may
      refer to the spec schema's shared definitions (``#/$defs/label``, ``#/$defs/region``);
    * ``spec_level``: the key may also stand at the top of the spec (the lowest layer of the merge);
    * ``merge``: ``"deep"`` merges a mapping one level deep with ``defaults`` (a case's key replaces the
      default key by key), ``"replace"`` replaces it whole;
    * ``scope``: ``"case"`` (one item per case) or ``"spec"`` (one item per spec file, run after its cases);
    * ``order``: where its items come among a case's items (lower first).
    """

    name: str = ""
    key: str | None = None
    schema: Mapping[str, Any] = {}
    spec_level: bool = False
    merge: str = "deep"
    scope: str = "case"
    order: int = 50

    # -- spec ------------------------------------------------------------------------------------------
    def parse(self, raw: Any, ctx: "ParseContext") -> Any:
        """The typed, validated configuration of the kind's key (``raw`` already passed the schema).

        Report a semantic problem with ``ctx.error(rel_key, message)`` (``rel_key`` relative to the case,
        e.g. ``"focus.region"``); return None when the case has nothing for this kind to check.
        """
        return raw

    # -- collection ------------------------------------------------------------------------------------
    def applies(self, case: Any, run: "RunContext") -> bool:
        """Whether ``case`` gets an item of this kind (default: it has a configuration for it)."""
        return case.checks.get(self.name) is not None

    def applies_to_spec(self, spec: Any, run: "RunContext") -> bool:
        """For spec-scope kinds: whether ``spec`` gets one item of this kind."""
        return False

    # -- observation -----------------------------------------------------------------------------------
    def prepare(self, config: Any, case: Any, model: "ModelContext") -> Any:
        """Resolve the configuration against the model and the image; raise ``AuditError`` on bad input."""
        return config

    def needs(self, prepared: Any) -> Needs:
        return Needs()

    def ready(self, prepared: Any, observation: Any) -> None:
        """Raise :class:`NotRecorded` when the check has nothing to compare with yet (the item is then
        skipped, an error under ``--audit-strict``); called at the item's setup, after the observation."""

    def check(self, prepared: Any, observation: Any) -> "CheckResult":
        raise NotImplementedError(f"check kind {self.name!r} does not implement check()")

    def check_spec(self, spec: Any, session: Any) -> "CheckResult":
        """For spec-scope kinds: the verdict over a whole spec (its case records via ``session``)."""
        raise NotImplementedError(f"check kind {self.name!r} does not implement check_spec()")

    # -- report ----------------------------------------------------------------------------------------
    def expected_labels(self, prepared: Any) -> Iterable[int]:
        """Classes the report marks as expected in the top-k table."""
        return ()

    def regions(self, prepared: Any) -> Iterable[ShownRegion]:
        """Regions the report draws on the image."""
        return ()

    def record(self, prepared: Any, observation: Any) -> Mapping[str, Any] | None:
        """JSON-ready data for results.json and the report (``case["kinds"][name]``)."""
        return None

    def pictures(self, prepared: Any, observation: Any) -> Mapping[str, Picture]:
        """Extra pictures for the report (``case["assets"]["kinds"][name][key]``)."""
        return {}

    def summary(self, checks: list[Mapping[str, Any]], specs: list[Any], run: "RunContext") -> list[str]:
        """Lines for the end of the terminal output, on the controller: ``checks`` are this kind's check
        results of the run (``CheckResult.to_dict()`` plus ``outcome``), ``specs`` the spec files seen."""
        return []

    def line_key(self) -> str:
        """The case key whose line a failure message points at."""
        return self.key or ""

    def __repr__(self) -> str:
        return f"<check kind {self.name}>"


class NotRecorded(Exception):
    """A check with nothing recorded to compare with (a baseline): skipped, an error under --audit-strict.

    Not an ``AuditError``: the input is fine, the recording is missing.
    """


class ParseContext:
    """What ``CheckKind.parse`` may use: the case's own raw value (without defaults) and error reporting."""

    own: Any = None
    base_dir: Any = None

    def error(self, rel_key: str, message: str) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class ModelContext:
    """What ``CheckKind.prepare`` may use: label and layer lookup, the decoded image, region masks.

    Every method raises a ``SpecError`` located at the given case key (``"expect.top1"``).
    """

    image: "Image.Image"
    base_dir: Any

    def resolve_class(self, label: Any, key: str) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def label(self, index: int) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def mask(self, region: Any, key: str) -> "np.ndarray":  # pragma: no cover - interface
        raise NotImplementedError

    def outline(self, region: Any, key: str) -> list:  # pragma: no cover - interface
        raise NotImplementedError

    def error(self, key: str, message: str) -> Exception:  # pragma: no cover - interface
        raise NotImplementedError


class RunContext:
    """What ``CheckKind.applies`` may use about the run: options and per-spec facts."""

    update_baselines: bool = False
    strict: bool = False
    remove_unused_baselines: bool = False
