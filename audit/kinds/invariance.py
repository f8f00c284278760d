"""The ``invariance`` check kind (spec key ``invariance``): what the model does when the image is changed.

A heatmap is a correlation; a counterfactual is a cause. Hide the corner marker and see whether the
prediction survives; hide the object and see whether the confidence falls; mirror the image and see
whether the explanation moves with it. Each entry of the list is one transform of the decoded original
(:mod:`audit.perturb`) and what must hold afterwards:

``same_top1`` (the default), ``min_prob_drop`` / ``max_prob_drop`` (probability of the original top-1
class, before minus after, in probability points), ``min_heatmap_follows`` (geometric transforms only:
Pearson correlation of the variant's heatmap with the original's heatmap mapped the same way).

Every variant is explained in the same batched forward as the original image (``Needs.variants``), so
the number of forward passes does not grow with the number of perturbations. ``check`` is pure numpy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageOps

from audit import perturb, regions
from audit.checks import CheckResult, Metric
from audit.errors import AuditError, SpecError, closest
from audit.evidence_metrics import heatmap_follows
from audit.kinds.base import CheckKind, Needs, Picture, Variant

TRANSFORM_KEYS = ("occlude", "paste", "hflip", "jpeg", "gaussian_blur", "brightness", "corruption")
EXPECT_KEYS = ("same_top1", "min_prob_drop", "max_prob_drop", "min_heatmap_follows")

_NUMBER_01 = {"type": "number", "minimum": 0, "maximum": 1}

SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 1,
    "description": "Perturbations of the image and what must hold for each (one transform per entry).",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "properties": {
            "occlude": {
                "description": "Hide a region: 'avoid' or 'region' (the case's focus regions) or any region.",
                "anyOf": [{"enum": ["avoid", "region"]}, {"$ref": "#/$defs/region"}]},
            "fill": {"enum": list(perturb.FILLS),
                     "description": "How an occluded region is filled (inpaint: OpenCV, the honest default)."},
            "paste": {
                "type": "object", "additionalProperties": False, "required": ["image", "at"],
                "description": "Paste a foreign patch (ImageNet-W): an image file and its top-left [x, y].",
                "properties": {
                    "image": {"type": "string", "description": "Patch image, relative to the spec's folder."},
                    "at": {"type": "array", "items": {"type": "integer", "minimum": 0},
                           "minItems": 2, "maxItems": 2, "description": "[x, y] of the patch's top-left pixel."}}},
            "hflip": {"const": True, "description": "Mirror the image left-right (geometric)."},
            "jpeg": {"type": "integer", "minimum": 1, "maximum": 95, "description": "JPEG quality 1..95."},
            "gaussian_blur": {"type": "number", "exclusiveMinimum": 0, "maximum": 100,
                              "description": "Gaussian blur sigma in pixels."},
            "brightness": {"type": "number", "exclusiveMinimum": 0, "maximum": 10,
                           "description": "Brightness factor (1 unchanged, 0.7 darker)."},
            "corruption": {
                "type": "object", "additionalProperties": False, "required": ["name", "severity"],
                "description": "An ImageNet-C corruption via the imagecorruptions package.",
                "properties": {"name": {"type": "string", "description": "Corruption name (gaussian_noise, ...)."},
                               "severity": {"type": "integer", "minimum": 1, "maximum": 5,
                                            "description": "Severity 1..5 (ImageNet-C)."}}},
            "seed": {"type": "integer", "minimum": 0, "description": "Seed of random fills and corruptions."},
            "expect": {
                "description": "What must hold: 'same_top1' (default) or a mapping of expectations.",
                "anyOf": [
                    {"const": "same_top1"},
                    {"type": "object", "additionalProperties": False, "minProperties": 1,
                     "properties": {
                         "same_top1": {"type": "boolean", "description": "The top-1 class must not change."},
                         "min_prob_drop": dict(_NUMBER_01, description="The top-1 probability must fall by at least this."),
                         "max_prob_drop": dict(_NUMBER_01, description="The top-1 probability may fall by at most this."),
                         "min_heatmap_follows": {"type": "number", "minimum": -1, "maximum": 1,
                                                 "description": "Geometric transforms: correlation of the variant's "
                                                                "heatmap with the transformed original heatmap."}}}]},
        },
    },
}


@dataclass(frozen=True)
class Expectation:
    same_top1: bool = True
    min_prob_drop: float | None = None
    max_prob_drop: float | None = None
    min_heatmap_follows: float | None = None


@dataclass(frozen=True)
class Entry:
    """One perturbation as written: the transform, its value, the fill and seed, what must hold."""

    index: int
    transform: str
    value: Any
    expect: Expectation
    fill: str = perturb.DEFAULT_FILL
    seed: int = 0
    region: regions.Region | None = None      # occlude with an explicit region

    @property
    def key(self) -> str:
        return f"invariance[{self.index}]"

    def title(self) -> str:
        """Short name shown in messages and the report: "occlude avoid (inpaint)", "jpeg 40"."""
        v = self.value
        if self.transform == "occlude":
            what = v if isinstance(v, str) else self.region.describe() if self.region else "region"
            return f"occlude {what} ({self.fill})"
        if self.transform == "paste":
            return f"paste {v['image']} at {list(v['at'])}"
        if self.transform == "hflip":
            return "hflip"
        if self.transform == "corruption":
            return f"corruption {v['name']} severity {v['severity']}"
        return f"{self.transform} {v:g}" if isinstance(v, float) else f"{self.transform} {v}"


@dataclass(frozen=True, eq=False)
class PreparedEntry:
    entry: Entry
    variant: str                     # variant name in the observation
    applied: perturb.Applied = field(repr=False)


@dataclass(frozen=True, eq=False)
class PreparedInvariance:
    entries: tuple[PreparedEntry, ...]


def _parse_expect(raw: Any, transform: str, rel: str, ctx: Any) -> Expectation:
    if raw is None or raw == "same_top1":
        return Expectation()
    values = dict(raw)
    if "min_heatmap_follows" in values and not perturb.TRANSFORMS[transform].geometric:
        geometric = ", ".join(n for n, t in perturb.TRANSFORMS.items() if t.geometric)
        ctx.error(f"{rel}.expect.min_heatmap_follows",
                  f"min_heatmap_follows applies to geometric transforms ({geometric}), not {transform}")
    lo, hi = values.get("min_prob_drop"), values.get("max_prob_drop")
    if lo is not None and hi is not None and lo > hi:
        ctx.error(f"{rel}.expect", f"min_prob_drop {lo:g} is above max_prob_drop {hi:g}: nothing can pass")
    # a mapping states its expectations: same_top1 only when written (hiding the object is expected to
    # change the top-1, so it cannot be implied)
    return Expectation(same_top1=bool(values.get("same_top1", False)),
                       min_prob_drop=None if lo is None else float(lo),
                       max_prob_drop=None if hi is None else float(hi),
                       min_heatmap_follows=None if values.get("min_heatmap_follows") is None
                       else float(values["min_heatmap_follows"]))


class InvarianceKind(CheckKind):
    name = "invariance"
    key = "invariance"
    schema = SCHEMA
    merge = "replace"
    order = 40

    def parse(self, raw: Any, ctx: Any) -> tuple[Entry, ...] | None:
        if not raw:
            return None
        entries: list[Entry] = []
        for i, item in enumerate(raw):
            rel = f"invariance[{i}]"
            transforms = [k for k in TRANSFORM_KEYS if k in item]
            if len(transforms) != 1:
                found = ", ".join(transforms) if transforms else "none"
                ctx.error(rel, f"each invariance entry needs exactly one transform of {', '.join(TRANSFORM_KEYS)} "
                               f"(found: {found})")
                continue
            transform = transforms[0]
            value = item[transform]
            if "fill" in item and transform != "occlude":
                ctx.error(f"{rel}.fill", f"fill applies to occlude, not {transform}")
            region = None
            if transform == "occlude" and not isinstance(value, str):
                try:
                    region = regions.parse(value)
                except SpecError as exc:
                    ctx.error(f"{rel}.occlude", exc.message)
                    continue
            if transform == "paste":
                problem = ctx.file_problem("paste image", value["image"])
                if problem:
                    ctx.error(f"{rel}.paste.image", problem)
                    continue
            if transform == "corruption":
                try:
                    names = perturb.corruption_names()
                except AuditError as exc:
                    ctx.error(f"{rel}.corruption", str(exc))
                    continue
                if value["name"] not in names:
                    ctx.error(f"{rel}.corruption.name", f"unknown corruption {value['name']!r}; did you mean: "
                              + ", ".join(repr(n) for n in closest(value["name"], names)))
                    continue
            entries.append(Entry(i, transform, value, _parse_expect(item.get("expect"), transform, rel, ctx),
                                 fill=item.get("fill", perturb.DEFAULT_FILL), seed=int(item.get("seed", 0)),
                                 region=region))
        return tuple(entries) if entries else None

    def prepare(self, config: tuple[Entry, ...], case: Any, model: Any) -> PreparedInvariance:
        image = model.image
        prepared = []
        for entry in config:
            try:
                applied = self._apply(entry, case, model, image)
            except perturb.PerturbError as exc:
                raise model.error(entry.key, str(exc)) from None
            prepared.append(PreparedEntry(entry, f"invariance[{entry.index}]", applied))
        return PreparedInvariance(tuple(prepared))

    def _apply(self, entry: Entry, case: Any, model: Any, image: Image.Image) -> perturb.Applied:
        v = entry.value
        if entry.transform == "occlude":
            if isinstance(v, str):
                focus = case.checks.get("focus") if hasattr(case, "checks") else None
                region = getattr(focus, v, None) if focus is not None else None
                if region is None:
                    raise model.error(f"{entry.key}.occlude",
                                      f"occlude: {v} needs focus.{v} in this case (or defaults), or write the region")
                mask = model.mask(region, f"focus.{v}")
                what = f"the {v} region" if v == "avoid" else "the object region"
            else:
                mask = model.mask(entry.region, f"{entry.key}.occlude")
                what = entry.region.describe()
            return perturb.occlude(image, mask, fill=entry.fill, seed=entry.seed, what=what)
        if entry.transform == "paste":
            patch = _load_patch(Path(model.base_dir) / v["image"], model, entry)
            return perturb.paste(image, patch, tuple(v["at"]), name=v["image"])
        if entry.transform == "hflip":
            return perturb.hflip(image)
        if entry.transform == "corruption":
            return perturb.corruption(image, v["name"], v["severity"], seed=entry.seed)
        return perturb.TRANSFORMS[entry.transform].apply(image, v)

    def needs(self, prepared: PreparedInvariance) -> Needs:
        return Needs(variants=tuple(Variant(p.variant, p.applied.image, dict(p.applied.meta))
                                    for p in prepared.entries))

    # -- verdict ---------------------------------------------------------------------------------------
    def evaluate(self, prepared: PreparedInvariance, observation: Any) -> list[dict[str, Any]]:
        """Per entry: the numbers, the metrics and the one-line verdict (shared by check and record)."""
        original = observation.explanation
        label = observation.label
        c = original.top_k[0].index
        p_before = float(original.probs[c])
        rows = []
        for p in prepared.entries:
            e = p.entry
            variant = observation.variants[p.variant]
            after = variant.top_k[0]
            p_after_c = float(variant.probs[c])
            drop = p_before - p_after_c
            metrics: list[Metric] = []
            reasons: list[str] = []
            n = e.index
            name_c = label(c)
            if e.expect.same_top1:
                kept = after.index == c
                metrics.append(Metric(f"same_top1[{n}]", bool(kept), True, "==", kept))
                if not kept:
                    reasons.append("the top-1 changed")
            if e.expect.min_prob_drop is not None:
                ok = drop >= e.expect.min_prob_drop
                metrics.append(Metric(f"prob_drop[{n}]", round(drop, 6), e.expect.min_prob_drop, ">=", ok))
                if not ok:
                    reasons.append(f"{_fall(name_c, p_before, p_after_c)}, a fall of at least "
                                   f"{e.expect.min_prob_drop:.2f} required (the model does not need what was changed)")
            if e.expect.max_prob_drop is not None:
                ok = drop <= e.expect.max_prob_drop
                metrics.append(Metric(f"prob_drop[{n}]", round(drop, 6), e.expect.max_prob_drop, "<=", ok))
                if not ok:
                    reasons.append(f"{_fall(name_c, p_before, p_after_c)}, at most {e.expect.max_prob_drop:.2f} allowed")
            follows = None
            if p.applied.map_heat is not None:
                mapped = p.applied.map_heat(original.cams[c])
                heat = variant.cams.get(c)
                if heat is None:
                    heat = variant.cams[after.index]
                follows = heatmap_follows(heat, mapped)
                if e.expect.min_heatmap_follows is not None:
                    ok = follows >= e.expect.min_heatmap_follows
                    metrics.append(Metric(f"heatmap_follows[{n}]", round(follows, 6), e.expect.min_heatmap_follows,
                                          ">=", ok))
                    if not ok:
                        reasons.append(f"the heatmap does not follow the transform: correlation {follows:.2f} with "
                                       f"the transformed heatmap, at least {e.expect.min_heatmap_follows:.2f} required")
            passed = all(m.passed for m in metrics)
            change = (f"top-1 {name_c} {p_before:.2f} -> {label(after.index)} {after.prob:.2f}"
                      if after.index != c else f"top-1 {name_c} {p_before:.2f} -> {p_after_c:.2f}")
            line = f"[{n}] {change} when {p.applied.describe}"
            if follows is not None:
                line += f" (heatmap follows: {follows:.2f})"
            if not passed:
                line += ": " + "; ".join(reasons)
            rows.append({"index": n, "title": e.title(), "transform": e.transform, "describe": p.applied.describe,
                         "geometric": p.applied.geometric, "passed": passed, "line": line,
                         "top1_before": {"index": int(c), "label": label(c), "prob": p_before},
                         "top1_after": {"index": int(after.index), "label": label(after.index),
                                        "prob": float(after.prob)},
                         "prob_after_of_original_top1": p_after_c, "prob_drop": drop,
                         "heatmap_follows": follows, "metrics": metrics, "variant": p.variant})
        return rows

    def check(self, prepared: PreparedInvariance, observation: Any) -> CheckResult:
        rows = self.evaluate(prepared, observation)
        metrics = tuple(m for r in rows for m in r["metrics"])
        failed = [r for r in rows if not r["passed"]]
        if failed:
            head = f"invariance: {len(failed)} of {len(rows)} perturbations failed"
            body = [f"  {r['line']}" for r in failed] + [f"  {r['line']}: ok" for r in rows if r["passed"]]
            return CheckResult("invariance", False, "\n".join([head, *body]), metrics)
        head = f"invariance: all {len(rows)} perturbations hold"
        return CheckResult("invariance", True, "\n".join([head, *(f"  {r['line']}" for r in rows)]), metrics)

    def record(self, prepared: PreparedInvariance, observation: Any) -> Mapping[str, Any]:
        rows = self.evaluate(prepared, observation)
        return {"perturbations": [{**{k: v for k, v in r.items() if k != "metrics"},
                                   "metrics": [m.to_dict() for m in r["metrics"]]} for r in rows]}

    def pictures(self, prepared: PreparedInvariance, observation: Any) -> Mapping[str, Picture]:
        pictures: dict[str, Picture] = {}
        c = observation.explanation.top_k[0].index
        for p in prepared.entries:
            key = f"v{p.entry.index}"
            pictures[key] = Picture(image=p.applied.image)
            if p.applied.geometric:
                variant = observation.variants[p.variant]
                heat = variant.cams.get(c)
                if heat is None:
                    heat = variant.cams[variant.top_k[0].index]
                pictures[f"{key}_heat"] = Picture(image=p.applied.image, heat=np.asarray(heat))
        return pictures

    def line_key(self) -> str:
        return "invariance"


def _fall(name: str, before: float, after: float) -> str:
    drop = before - after
    if drop < 0.005:
        return f"p({name}) did not fall ({before:.2f} -> {after:.2f})"
    return f"p({name}) fell by {drop:.2f} ({before:.2f} -> {after:.2f})"


def _load_patch(path: Path, model: Any, entry: Entry) -> Image.Image:
    """The patch as drawn (alpha kept, EXIF-upright); unreadable files are the case's error."""
    try:
        with Image.open(path) as img:
            img.load()
            patch = ImageOps.exif_transpose(img)
            return patch.copy()
    except (OSError, ValueError) as exc:
        raise model.error(f"{entry.key}.paste.image", f"cannot read paste image {path.name}: {exc}") from None


KIND = InvarianceKind()
