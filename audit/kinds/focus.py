"""The ``focus`` check kind (spec key ``focus``): where the model's heat must (and must not) lie.

The metrics are pure functions in :mod:`audit.checks` (definitions in docs/ARCHITECTURE.md); this module
turns the spec's ``focus`` mapping into masks of the case's image and the heatmap of the explained class
into a ``CheckResult``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit import checks, defaults, evidence_metrics, faithfulness, regions
from audit.errors import SpecError
from audit.kinds.base import CheckKind, Needs, ShownRegion

#: the metrics that measure against ``region`` (one of them is required; MIN_ENERGY when none is named)
REGION_METRICS = ("min_energy", "pointing_game", "min_iou", "min_rank_accuracy", "min_auc")
#: the faithfulness metrics (RISE deletion / insertion): they need no region, they need the model
CURVE_METRICS = ("max_deletion_auc", "min_insertion_auc")


@dataclass(frozen=True, slots=True)
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
    max_density_in_avoid: float | None = None
    max_deletion_auc: float | None = None
    min_insertion_auc: float | None = None
    curve_steps: int = faithfulness.DEFAULT_STEPS

    @property
    def curves(self) -> tuple[str, ...]:
        """The curve modes the metrics need ("deletion", "insertion")."""
        return tuple(mode for mode, v in (("deletion", self.max_deletion_auc), ("insertion", self.min_insertion_auc))
                     if v is not None)


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
        curve_values = {k: float(values[k]) for k in CURVE_METRICS if values.get(k) is not None}
        if region is None and avoid is None and not curve_values:
            if own and ctx.error_count() == before:
                ctx.error("focus", "focus has nothing to check: give a region and/or an avoid region")
            return None
        if region is not None and not any(values.get(m) not in (None, False) for m in REGION_METRICS):
            values["min_energy"] = defaults.MIN_ENERGY
        if avoid is not None and values.get("max_energy_in_avoid") is None:
            values["max_energy_in_avoid"] = defaults.MAX_ENERGY_IN_AVOID
        if avoid is None and values.get("max_density_in_avoid") is not None:
            if "max_density_in_avoid" in own:
                ctx.error("focus.max_density_in_avoid", "max_density_in_avoid needs an avoid region (focus.avoid)")
            values.pop("max_density_in_avoid")
        floats = ("min_energy", "min_iou", "min_rank_accuracy", "min_auc", "max_energy_in_avoid",
                  "max_density_in_avoid")
        return Focus(target=values.get("target"), region=region, avoid=avoid, **curve_values,
                     curve_steps=int(values.get("curve_steps", faithfulness.DEFAULT_STEPS)),
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
        extra = [(metric, why) for metric, why, _ in self._curve_rows(prepared, observation, target)]
        heat = observation.explanation.cams[target]
        if focus.max_density_in_avoid is not None and not checks.heat_is_empty(heat):
            density = evidence_metrics.density_ratio(heat, prepared.avoid_mask)
            ok = density <= focus.max_density_in_avoid
            extra.append((checks.Metric("density_in_avoid", density, focus.max_density_in_avoid, "<=", ok),
                          f"the heat in {focus.avoid.describe()} is {density:.2f}x the image's mean density; "
                          f"at most {focus.max_density_in_avoid:g}x allowed (1.0: no hotter than average)"))
        return checks.check_focus(heat, expectation, extra)

    # -- faithfulness: deletion / insertion curves (RISE) ----------------------------------------------
    def _curve_requests(self, prepared: PreparedFocus, image: Any, explanation: Any) -> list:
        focus = prepared.focus
        target = prepared.target if prepared.target is not None else explanation.top_k[0].index
        heat = explanation.cams[target]
        return [faithfulness.CurveRequest(image, heat, int(target), mode) for mode in focus.curves]

    def followups(self, prepared: PreparedFocus | None, image: Any, explanation: Any) -> list:
        """The step images of the requested curves: ordered by this heatmap, so they come after the forward."""
        if prepared is None or not prepared.focus.curves:
            return []
        return faithfulness.step_batch(self._curve_requests(prepared, image, explanation), prepared.focus.curve_steps)

    def _curve_rows(self, prepared: PreparedFocus, observation: Any, target: int) -> list:
        focus = prepared.focus
        if not focus.curves:
            return []
        probs = observation.followups.get(self.name)
        if probs is None:
            raise AssertionError("the session did not predict the focus kind's curve steps")
        requests = self._curve_requests(prepared, observation.image, observation.explanation)
        found = faithfulness.curves_from_probs(requests, probs, focus.curve_steps)
        name = observation.label(target)
        rows = []
        for curve in found:
            if curve.mode == "deletion":
                ok = curve.auc <= focus.max_deletion_auc
                metric = checks.Metric("deletion_auc", curve.auc, focus.max_deletion_auc, "<=", ok)
                why = (f"p({name}) as the hottest pixels are inpainted away in {focus.curve_steps} steps: "
                       f"{curve.probs[0]:.2f} -> {curve.probs[len(curve.probs) // 4]:.2f} at 25% deleted; "
                       f"area at most {focus.max_deletion_auc:.2f} allowed (lower: the map shows what the model uses)")
            else:
                ok = curve.auc >= focus.min_insertion_auc
                metric = checks.Metric("insertion_auc", curve.auc, focus.min_insertion_auc, ">=", ok)
                why = (f"p({name}) as the hottest pixels are revealed on a blurred copy in {focus.curve_steps} steps: "
                       f"{curve.probs[0]:.2f} -> {curve.probs[len(curve.probs) // 4]:.2f} at 25% revealed; "
                       f"area at least {focus.min_insertion_auc:.2f} required")
            rows.append((metric, why, curve))
        return rows

    def record(self, prepared: PreparedFocus | None, observation: Any) -> dict | None:
        """The curves (for the report's plot) and the avoid region's heat density, for results.json."""
        if prepared is None:
            return None
        target = prepared.target if prepared.target is not None else observation.explanation.top_k[0].index
        out: dict[str, Any] = {}
        if prepared.avoid_mask is not None:
            # reported beside energy_in_avoid: a small avoid box can hold little energy and still be
            # several times hotter than the image on average (the shortcut example)
            out["density_in_avoid"] = evidence_metrics.density_ratio(observation.explanation.cams[target],
                                                                     prepared.avoid_mask)
        if prepared.focus.curves:
            out["curves"] = [curve.to_dict() for _, _, curve in self._curve_rows(prepared, observation, target)]
        return out or None

    def marks_peak(self, prepared: PreparedFocus) -> bool:
        return bool(prepared.focus.pointing_game)

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
    if isinstance(raw, str):
        return _annotation(raw, rel, ctx)
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


def _annotation(raw: str, rel: str, ctx: Any) -> regions.Region | None:
    """``region: annotation``: the dataset's region of the case's own label (every instance of it)."""
    annotations = getattr(ctx, "annotations", None) or {}
    label = getattr(ctx, "label", None)
    if rel.endswith("avoid"):
        ctx.error(rel, "avoid: annotation would avoid the object itself; 'annotation' is for focus.region")
        return None
    if label is None:
        ctx.error(rel, "region: annotation needs a case read from a dataset (dataset:); a hand-written case "
                       "gives its region as {box: [x0, y0, x1, y1]}, a polygon or a mask")
        return None
    region = annotations.get(label)
    if region is None:
        ctx.error(rel, f"region: annotation: this image has no annotated region of its label {label!r}"
                       + (" (a folder set has labels only: drop region: annotation)" if not annotations else
                          f" (annotated: {', '.join(map(repr, annotations))})"))
        return None
    return regions.parse(region)


KIND = FocusKind()
