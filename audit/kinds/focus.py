"""The ``focus`` check kind (spec key ``focus``): where the model's heat must (and must not) lie.

The metrics are pure functions in :mod:`audit.checks` (definitions in docs/ARCHITECTURE.md); this module
turns the spec's ``focus`` mapping into masks of the case's image and the heatmap of the explained class
into a ``CheckResult``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit import checks, defaults, regions
from audit.errors import SpecError
from audit.kinds.base import CheckKind, Needs, ShownRegion

#: the metrics that measure against ``region`` (one of them is required; MIN_ENERGY when none is named)
REGION_METRICS = ("min_energy", "pointing_game", "min_iou", "min_rank_accuracy", "min_auc")


@dataclass(frozen=True)
class Focus:
    """Focus expectations with their defaults applied; ``region``/``avoid`` are typed regions."""

    target: str | int | None = None
    region: regions.Region | None = None
    min_energy: float | None = None
    pointing_game: bool = False
    tolerance_px: float = 0.0
    min_iou: float | None = None
    iou_threshold: float = defaults.IOU_THRESHOLD
    min_rank_accuracy: float | None = None
    min_auc: float | None = None
    avoid: regions.Region | None = None
    max_energy_in_avoid: float | None = None


@dataclass(frozen=True, eq=False)
class PreparedFocus:
    """A focus configuration resolved against one image: class index, masks and outlines."""

    focus: Focus
    target: int | None
    region_mask: Any
    avoid_mask: Any
    region_outlines: tuple
    avoid_outlines: tuple


class FocusKind(CheckKind):
    name = "focus"
    key = "focus"
    schema = {"$ref": "#/$defs/focus"}
    order = 20

    def parse(self, raw: Any, ctx: Any) -> Focus | None:
        """Focus with its defaults; metrics inherited from ``defaults`` apply only to cases with a region,
        metrics written in the case itself without a region are errors."""
        if not raw:
            return None
        own = ctx.own if isinstance(ctx.own, dict) else {}
        values = dict(raw)
        before = ctx.error_count()
        region = _parse_region(values.get("region"), "focus.region", ctx)
        avoid = _parse_region(values.get("avoid"), "focus.avoid", ctx)
        if region is None:
            for metric in REGION_METRICS:
                if metric in own and own[metric] is not False:
                    ctx.error(f"focus.{metric}", f"{metric} needs a region to measure against (focus.region)")
                values.pop(metric, None)
        if avoid is None and "max_energy_in_avoid" in values:
            if "max_energy_in_avoid" in own:
                ctx.error("focus.max_energy_in_avoid", "max_energy_in_avoid needs an avoid region (focus.avoid)")
            values.pop("max_energy_in_avoid")
        if region is None and avoid is None:
            if own and ctx.error_count() == before:
                ctx.error("focus", "focus has nothing to check: give a region and/or an avoid region")
            return None
        if region is not None and not any(values.get(m) not in (None, False) for m in REGION_METRICS):
            values["min_energy"] = defaults.MIN_ENERGY
        if avoid is not None and values.get("max_energy_in_avoid") is None:
            values["max_energy_in_avoid"] = defaults.MAX_ENERGY_IN_AVOID
        floats = ("min_energy", "min_iou", "min_rank_accuracy", "min_auc", "max_energy_in_avoid")
        return Focus(target=values.get("target"), region=region, avoid=avoid,
                     pointing_game=bool(values.get("pointing_game", False)),
                     tolerance_px=float(values.get("tolerance_px", 0.0)),
                     iou_threshold=float(values.get("iou_threshold", defaults.IOU_THRESHOLD)),
                     **{k: float(values[k]) if values.get(k) is not None else None for k in floats})

    def prepare(self, config: Focus, case: Any, model: Any) -> PreparedFocus:
        target = model.resolve_class(config.target, "focus.target") if config.target is not None else None
        masks, outlines = {}, {}
        for attr in ("region", "avoid"):
            region = getattr(config, attr)
            if region is not None:
                masks[attr] = model.mask(region, f"focus.{attr}")
                outlines[attr] = tuple(model.outline(region, f"focus.{attr}"))
        return PreparedFocus(config, target, masks.get("region"), masks.get("avoid"),
                             outlines.get("region", ()), outlines.get("avoid", ()))

    def needs(self, prepared: PreparedFocus) -> Needs:
        if prepared.target is None:
            return Needs()
        return Needs(targets=(prepared.target,), subject=prepared.target)

    def check(self, prepared: PreparedFocus, observation: Any) -> checks.CheckResult:
        focus = prepared.focus
        target = prepared.target if prepared.target is not None else observation.explanation.top_k[0].index
        expectation = checks.FocusExpectation(
            region=prepared.region_mask, region_desc=focus.region.describe() if focus.region else "",
            min_energy=focus.min_energy, pointing_game=focus.pointing_game, tolerance_px=focus.tolerance_px,
            min_iou=focus.min_iou, iou_threshold=focus.iou_threshold, min_rank_accuracy=focus.min_rank_accuracy,
            min_auc=focus.min_auc,
            avoid=prepared.avoid_mask, avoid_desc=focus.avoid.describe() if focus.avoid else "",
            max_energy_in_avoid=focus.max_energy_in_avoid,
            target_desc=f"{observation.label(target)!r} (#{target})")
        return checks.check_focus(observation.explanation.cams[target], expectation)

    def regions(self, prepared: PreparedFocus) -> tuple[ShownRegion, ...]:
        shown = []
        if prepared.focus.region is not None:
            shown.append(ShownRegion("expected", prepared.focus.region.describe(), prepared.region_outlines))
        if prepared.focus.avoid is not None:
            shown.append(ShownRegion("avoid", prepared.focus.avoid.describe(), prepared.avoid_outlines))
        return tuple(shown)


def _parse_region(raw: Any, rel: str, ctx: Any) -> regions.Region | None:
    """The typed region of ``raw``; each bad part is reported at its own key (``focus.region[1].box``)."""
    if raw is None:
        return None
    items = [(rel, raw)] if isinstance(raw, dict) else [(f"{rel}[{i}]", r) for i, r in enumerate(raw)]
    parts = []
    for item_rel, item in items:
        kind = next(iter(item), "") if isinstance(item, dict) else ""
        where = f"{item_rel}.{kind}" if kind else item_rel
        value = item.get(kind) if kind else None
        if kind in ("box", "box_rel") and isinstance(value, (list, tuple)) and len(value) == 4:
            x0, y0, x1, y1 = value
            if not (x0 < x1 and y0 < y1):
                ctx.error(where, f"{kind} {list(value)} is empty: it needs x0 < x1 and y0 < y1 "
                                 "([x0, y0, x1, y1], not [x, y, width, height])")
                continue
        if kind == "polygon" and isinstance(value, (list, tuple)) and len({tuple(p) for p in value}) < 3:
            ctx.error(where, "a polygon needs at least 3 distinct points")
            continue
        if kind == "mask" and isinstance(value, str):
            problem = ctx.file_problem("mask", value)
            if problem:
                ctx.error(where, problem)
                continue
        try:
            parts.append(regions.parse(item))
        except SpecError as exc:
            ctx.error(where, exc.message)
    if len(parts) != len(items):
        return None
    return parts[0] if isinstance(raw, dict) else regions.Union(tuple(parts))


KIND = FocusKind()
