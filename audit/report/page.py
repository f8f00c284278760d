"""The page: ``results.json`` and ``index.html`` of a run, written once, on the controller, from the case records.

View models (``_page_record``, ``_case_view``, ``_views``, ``_run_view``, ``_class_summary``) turn the
records into what the page shows, numbers as the spec wrote them (``fmt_threshold``, ``fmt_value``,
``fmt_prob``); ``_Assets`` gives each picture the workers wrote its URL (or data URI) and size, and
reads no pixels. The page is rendered by jinja2 (``_env``: ``templates/`` of the ``audit`` package)
with autoescape on: case ids, labels, file names and messages come from specs and models and are
never trusted. ``write_report`` commits both files through :mod:`audit.report.folder`.
"""
from __future__ import annotations

import base64
import contextlib
import functools
import json
import math
import os
import re
import secrets
import statistics
from pathlib import Path
from urllib.parse import quote
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from audit.records import shared_text
from audit.report.assets import flush_assets, safe_stem
from audit.report.drawing import DISPLAY_MIN, _shown_size
from audit.report.folder import committing

if TYPE_CHECKING:
    import jinja2


SCHEMA_VERSION = 1


# --------------------------------------------------------------------------------------------------
# the template environment


_ENV: "jinja2.Environment | None" = None


def _env() -> "jinja2.Environment":
    """The template environment (jinja2 is imported on first use: a run without a report never pays for it)."""
    global _ENV
    if _ENV is None:
        import jinja2

        env = jinja2.Environment(loader=jinja2.PackageLoader("audit", "templates"),
                                 autoescape=jinja2.select_autoescape(["html", "xml"]),
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                 bytecode_cache=_template_cache())
        env.filters["num"] = _fmt_num
        env.filters["pct"] = fmt_prob
        _ENV = env
    return _ENV


def _template_cache() -> "jinja2.BytecodeCache | None":
    """jinja2's cache of compiled templates, so the page is compiled once per machine (~25 ms), not per run.

    It is jinja2's ``FileSystemBytecodeCache`` in its default folder: private to the user (0700; jinja2
    refuses a folder that someone else owns or that is a link) and keyed by a hash of the template's
    source, so an edited or upgraded template is compiled afresh. A cache that cannot be read or
    written is skipped: the page is then compiled as if there were none.
    """
    import jinja2

    class TemplateCache(jinja2.FileSystemBytecodeCache):
        def load_bytecode(self, bucket: "jinja2.bccache.Bucket") -> None:
            with contextlib.suppress(OSError):
                super().load_bytecode(bucket)

        def dump_bytecode(self, bucket: "jinja2.bccache.Bucket") -> None:
            with contextlib.suppress(OSError):
                super().dump_bytecode(bucket)

    try:
        return TemplateCache()
    except (OSError, RuntimeError):   # no usable temp folder, or one that is not ours
        return None


# --------------------------------------------------------------------------------------------------
# numbers as the page writes them


def fmt_prob(value: Any) -> str:
    """A probability in percent, one decimal, with more where one decimal would round a value that is
    not 1 up to "100.0%" (0.9996 is 99.96%, not a certainty)."""
    if value is None:
        return ""
    p = 100.0 * float(value)
    for d in range(1, 6):
        text = f"{p:.{d}f}"
        if p >= 100.0 or float(text) < 100.0:
            return text + "%"
    return f"{p:.5f}%"


def _fmt_num(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _plain_number(value: Any) -> float | str:
    """A finite float to format, or the finished text of what is not one (None, booleans, integers, text)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    return v if math.isfinite(v) else str(v)


def fmt_threshold(value: Any) -> str:
    """A threshold as the spec wrote it: the shortest decimal that reads back as the same float
    (0.999 stays 0.999, never "1.00" nor "100%")."""
    plain = _plain_number(value)
    if isinstance(plain, str):
        return plain
    text = repr(plain)
    return text[:-2] if text.endswith(".0") else text


def fmt_value(value: Any, threshold: Any = None) -> str:
    """A measured value with as many decimals as it takes to keep its relation to the threshold: 0.4996
    against 0.5 prints 0.4996, not 0.50; at least two decimals, or the threshold's own."""
    plain = _plain_number(value)
    if isinstance(plain, str):
        return plain
    v = plain
    try:
        t = None if threshold is None or isinstance(threshold, bool) else float(threshold)
    except (TypeError, ValueError):
        t = None
    written = fmt_threshold(t) if t is not None and math.isfinite(t) else ""
    decimals = max(2, len(written.partition(".")[2]) if "e" not in written else 2)
    if abs(v) < 0.01 and v != 0 and t is None:
        return f"{v:.2e}"
    for d in range(decimals, 9):
        text = f"{v:.{d}f}"
        if t is None or (float(text) > t) == (v > t) and (float(text) < t) == (v < t):
            return text
    return repr(v)


def _fmt_margin(margin: float) -> str:
    return f"{margin:+.3f}".replace("-", "\u2212")


def _ms(seconds: Any) -> str:
    ms = 1000.0 * float(seconds or 0.0)
    return f"{ms:.1f} ms" if ms < 10 else f"{ms:,.0f} ms"


def _run_seconds(seconds: Any) -> str:
    s = float(seconds or 0.0)
    return f"{s:.2f} s" if s < 10 else f"{s:,.1f} s"


# --------------------------------------------------------------------------------------------------
# pictures: URL (or data URI) and size


class _Assets:
    """Turns asset paths from the cases into what the page needs: URL (or data URI) and pixel size."""

    MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

    def __init__(self, out_dir: Path, self_contained: bool, sizes: Mapping[str, Sequence[int]] | None = None):
        self.out_dir = out_dir
        self.self_contained = self_contained
        self.sizes = dict(sizes or {})  # asset path → [width, height], recorded when it was drawn

    def exists(self, rel: str | None) -> bool:
        """Whether the report folder holds this file."""
        return bool(rel) and os.path.isfile(os.path.join(self.out_dir, rel))

    def picture(self, rel: str | None, thumb_rel: str | None = None) -> dict | None:
        """``{"src", "href", "width", "height"}`` of a picture shown as a thumbnail linking to full size."""
        if not self.exists(rel):
            return None
        shown_rel = thumb_rel if thumb_rel and self.exists(thumb_rel) else rel
        size = self.sizes.get(shown_rel)
        if size is None:   # a picture drawn without its size (the shared colour bar): read its header once
            size = self.sizes[shown_rel] = _image_size(self.out_dir / shown_rel)
        pixelated = max(size) < DISPLAY_MIN  # tiny scene pictures: the browser scales them up
        width, height = _shown_size(size)
        if self.self_contained:
            # browsers refuse to navigate to data: URLs, so the page embeds the full picture once and
            # shows it at thumbnail size; a click enlarges it in place (see report.js).
            return {"src": self._data_uri(self.out_dir / rel), "href": None, "width": width, "height": height,
                    "pixelated": pixelated}
        href = quote(rel)
        return {"src": href if shown_rel == rel else quote(shown_rel), "href": href,
                "width": width, "height": height, "pixelated": pixelated}

    def _data_uri(self, path: Path) -> str:
        mime = self.MIME.get(path.suffix.lower(), "application/octet-stream")
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:   # reads the header only
        return im.size


# --------------------------------------------------------------------------------------------------
# view models: what the template shows of the run and of each case


OUTCOME_ORDER = ("failed", "error", "passed", "skipped")


def _as_written(image: str | None, spec: str | None) -> str | None:
    """The image path as the spec's author wrote it: relative to the spec's folder when inside it."""
    if not image or not spec:
        return image
    folder = _spec_folder(spec)
    if image.startswith(folder):   # the usual case, without a system call per path component
        return image[len(folder):].replace(os.sep, "/")
    try:
        return Path(image).resolve().relative_to(Path(spec).resolve().parent).as_posix()
    except (ValueError, OSError):
        return image


@functools.lru_cache(maxsize=256)
def _spec_folder(spec: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(spec)), "")


# Every key the page reads, per kind of record. ``_filled`` gives each missing one the value None, so the
# template can subscript (``c["error"]``) where ``c.get("error")`` would cost a jinja2 call per use.
_CASE_KEYS = dict.fromkeys(("nodeid", "spec", "line", "case_id", "model", "image", "image_size", "top_k", "k",
                            "target", "checks", "regions", "crops", "assets", "kinds", "error", "features"))
_NESTED_KEYS = {
    "checks": dict.fromkeys(("kind", "outcome", "message", "metrics", "duration_s")),
    "top_k": dict.fromkeys(("index", "label", "prob", "expected")),
}
_METRIC_KEYS = dict.fromkeys(("name", "value", "threshold", "op", "passed"))
_TARGET_KEYS = dict.fromkeys(("index", "label"))
_REGIONS_KEYS = dict.fromkeys(("region", "avoid"))


def _filled(record: Mapping[str, Any] | None, keys: dict[str, None]) -> dict[str, Any] | None:
    return {**keys, **record} if record else None


def _page_record(case: Mapping[str, Any]) -> dict[str, Any]:
    """The case with every key the page reads present (records from other versions may lack some)."""
    c = {**_CASE_KEYS, **case}
    for key, keys in _NESTED_KEYS.items():
        c[key] = [{**keys, **entry} for entry in c[key] or ()]
    for check in c["checks"]:
        check["metrics"] = [{**_METRIC_KEYS, **m} for m in check["metrics"] or ()]
    c["target"] = _filled(c["target"], _TARGET_KEYS)
    c["regions"] = _filled(c["regions"], _REGIONS_KEYS)
    c["kinds"] = dict(c["kinds"] or {})
    return c


_NUMERIC_OPS = {">=": 1.0, ">": 1.0, "<=": -1.0, "<": -1.0}
_INDEX_METRIC = re.compile(r"^(\w+)\[(\d+)\]$")
NO_MARGIN = ""   # sort key of a check without a numeric margin: sorted last in either direction


def _margin(metric: Mapping[str, Any]) -> float | None:
    """How far a numeric metric is from its threshold, positive on the passing side; None for yes/no
    metrics (pointing game, top-1, membership) and metrics without a threshold."""
    sign = _NUMERIC_OPS.get(metric.get("op") or "")
    value, threshold = metric.get("value"), metric.get("threshold")
    if sign is None or isinstance(value, bool) or isinstance(threshold, bool):
        return None
    try:
        v, t = float(value), float(threshold)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(v) and math.isfinite(t)):
        return None
    return sign * (v - t)


def _label_of(index: Any, labels: Mapping[int, str]) -> str:
    try:
        i = int(index)
    except (TypeError, ValueError):
        return str(index)
    return f"{labels[i]} (#{i})" if i in labels else f"#{i}"


def _metric_view(m: Mapping[str, Any], labels: Mapping[int, str]) -> dict[str, Any]:
    """One metric row: the top-1 metric in labels, not indices; thresholds as written."""
    name, value, threshold = str(m.get("name") or ""), m.get("value"), m.get("threshold")
    shown_name = name
    indexed = _INDEX_METRIC.match(name)
    if indexed and int(indexed.group(2)) in labels:
        shown_name = f"{indexed.group(1)}[{labels[int(indexed.group(2))]}]"
    if name == "top1":
        value_text, threshold_text = _label_of(value, labels), _label_of(threshold, labels)
    elif isinstance(value, bool):
        value_text = ("hit" if value else "miss") if name == "pointing_game" else ("yes" if value else "no")
        threshold_text = "hit" if name == "pointing_game" else fmt_threshold(threshold)
    else:
        value_text, threshold_text = fmt_value(value, threshold), fmt_threshold(threshold)
    margin = _margin(m)
    return {"name": shown_name, "value": value_text, "op": m.get("op") or "", "threshold": threshold_text,
            "passed": bool(m.get("passed")), "margin": margin}


def _worst(check: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> tuple[str, Any]:
    """The check's worst margin to its thresholds, as (text, sort key): a failed yes/no metric ("miss")
    sorts before any numeric margin, a check without metrics (skipped, error) after all."""
    outcome = check.get("outcome") or "error"
    if not metrics:
        return outcome, NO_MARGIN
    failed_flags = [m for m in metrics if m["margin"] is None and not m["passed"]]
    margins = [m["margin"] for m in metrics if m["margin"] is not None]
    if failed_flags:
        return "miss" if failed_flags[0]["name"] == "pointing_game" else "FAIL", -1e9
    if margins:
        worst = min(margins)
        return _fmt_margin(worst), round(worst, 6)
    return ("ok" if outcome == "passed" else outcome), 1e9 if outcome == "passed" else -1e9


@functools.lru_cache(maxsize=1)
def _kind_templates() -> frozenset[str]:
    """The check kinds that ship a section of their own (``templates/kinds/<name>.html``)."""
    return frozenset(name[len("kinds/"):-len(".html")] for name in _env().list_templates()
                     if name.startswith("kinds/") and name.endswith(".html"))


def _kind_sections(case: Mapping[str, Any], assets: "_Assets") -> list[dict[str, Any]]:
    """Each check kind's own part of a card: its data and its pictures, laid out by its template."""
    pictures = (case["assets"] or {}).get("kinds") or {}
    sections = []
    for name in dict.fromkeys([*case["kinds"], *pictures]):
        if name not in _kind_templates():
            continue
        own = pictures.get(name) or {}
        sections.append({"name": name, "template": f"kinds/{name}.html", "data": case["kinds"].get(name),
                         "pictures": {k: assets.picture(v, own.get(f"{k}_thumb"))
                                      for k, v in own.items() if not k.endswith("_thumb")}})
    return sections


def _case_view(case: Mapping[str, Any], assets: _Assets) -> dict[str, Any]:
    """Everything one card shows, resolved to pictures and plain values (the template only lays out)."""
    case = _page_record(case)
    a = case["assets"] or {}
    features = []
    for f in case.get("features") or []:
        shape = list(f.get("shape") or [])
        c, h, w = (shape + [None, None, None])[:3]
        features.append({"layer": f.get("layer"), "maps": c, "h": h, "w": w, "shown": f.get("shown"),
                         "picture": assets.picture((a.get("grids") or {}).get(f.get("layer")))})
    nodeid = str(case.get("nodeid") or "")
    labels = {int(t["index"]): str(t["label"]) for t in case["top_k"] if t["index"] is not None}
    if case["target"] and case["target"]["index"] is not None:
        labels.setdefault(int(case["target"]["index"]), str(case["target"]["label"]))

    checks, skipped, worst = [], {}, {}
    for ch in case["checks"]:
        metrics = [_metric_view(m, labels) for m in ch["metrics"]]
        worst[ch["kind"]] = _worst(ch, metrics)
        if ch["outcome"] == "skipped":   # one line per distinct reason, not one per check
            skipped.setdefault(str(ch["message"] or "skipped"), []).append(ch["kind"])
            continue
        checks.append({"kind": ch["kind"], "outcome": ch["outcome"], "message": ch["message"],
                       "metrics": metrics, "duration": _ms(ch["duration_s"])})
    expected_class = _expected_class(case, labels)
    top1 = case["top_k"][0] if case["top_k"] else None
    k = case.get("k") or len(case["top_k"]) or None
    search = " ".join(str(x) for x in (case["case_id"], case["spec"], case["model"], expected_class or "",
                                       *(t["label"] for t in case["top_k"]),
                                       (case["target"] or {}).get("label") or "") if x).lower()
    energy = next((m.get("value") for ch in case["checks"] for m in ch["metrics"]
                   if m.get("name") == "energy_inside"), None)
    return {
        "case": case,
        "image_path": _as_written(case.get("image"), case.get("spec")),
        "anchor": "case-" + safe_stem(nodeid or str(case.get("case_id"))),
        "outcome": case.get("outcome") or "error",
        "image": assets.picture(a.get("image"), a.get("image_thumb")),
        "heatmap": assets.picture(a.get("heatmap"), a.get("heatmap_thumb")),
        "overlay": assets.picture(a.get("overlay"), a.get("overlay_thumb")),
        "colorbar": assets.picture(a.get("colorbar")),
        "kinds": _kind_sections(case, assets),
        "peak": a.get("peak"),
        "features": features,
        "duration": _ms(sum(float(c.get("duration_s") or 0.0) for c in case.get("checks") or [])),
        "checks": checks,
        "skipped": [{"reason": r, "kinds": kinds} for r, kinds in skipped.items()],
        "worst": worst,
        "k": k,
        "top_k": [{**t, "beyond_k": k is not None and i >= k} for i, t in enumerate(case["top_k"])],
        "top1": top1,
        "expected_class": expected_class,
        "energy": energy if isinstance(energy, (int, float)) and not isinstance(energy, bool) else None,
        "search": search,
    }


def _expected_class(case: Mapping[str, Any], labels: Mapping[int, str]) -> str | None:
    """The class a case is about, for the per-class summary: a dataset case's own class, else the top-1
    it expects, else an expected label of its top-k (none when that fell out of the top-k)."""
    if case.get("label") is not None:
        return str(case["label"])
    for ch in case["checks"]:
        for m in ch["metrics"]:
            if m.get("name") == "top1" and m.get("threshold") is not None:
                return _label_of(m["threshold"], labels).split(" (#")[0]
    expected = [t for t in case["top_k"] if t.get("expected")]
    if expected:
        return str(expected[0]["label"])
    return None


_RANK = {"failed": 0, "error": 1, "skipped": 2, "passed": 3}


def _order_key(view: Mapping[str, Any]) -> tuple:
    """The page's default order: failures first, then errors, skips, passes; within an outcome the
    smallest worst margin first (the case nearest to failing leads)."""
    margins = [k for _, k in view["worst"].values() if k != NO_MARGIN]
    return _RANK.get(view["outcome"], 1), min(margins) if margins else 1e9


class _NoPictures:
    """The picture views of the first pass: nothing is read or encoded for a row of the case table."""

    def picture(self, rel: str | None, thumb_rel: str | None = None) -> None:
        return None


#: what the case table, the filter counts and the class summary read of a case's view
_ROW_KEYS = ("anchor", "outcome", "search", "top1", "worst", "duration", "expected_class", "energy")


def _rows(cases: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The first pass: one small row per case (the table, the counts, the class summary), in the page's
    order, with the case's index for the second pass. Nothing else of a case is kept, so the page's
    memory does not grow with the cases' records, pictures or metrics."""
    rows = []
    for index, case in enumerate(cases):
        view = _case_view(case, _NoPictures())
        c = view["case"]
        row = {k: view[k] for k in _ROW_KEYS}
        top1 = row["top1"]
        row.update(index=index, outcome=shared_text(row["outcome"]), expected_class=shared_text(row["expected_class"]),
                   top1={"label": shared_text(top1["label"]), "prob": top1["prob"]} if top1 else None,
                   worst={shared_text(kind): margin for kind, margin in row["worst"].items()},
                   case={"case_id": c["case_id"], "spec": shared_text(c["spec"]), "line": c["line"],
                         "model": shared_text(c["model"]),
                         "checks": [{"kind": shared_text(ch["kind"]), "outcome": shared_text(ch["outcome"])}
                                    for ch in c["checks"]]})
        rows.append(row)
    rows.sort(key=_order_key)
    return rows


def _cards(cases: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], assets: _Assets) -> Iterator[dict]:
    """The second pass: each card's full view, built when the template reaches it, in the rows' order.
    The pictures' sizes recorded by the case are known to the picture views only while its card is built."""
    for row in rows:
        case = cases[row["index"]]
        sizes = ((case.get("assets") or {}).get("sizes") or {})
        assets.sizes.update(sizes)
        yield _case_view(case, assets)
        for key in sizes:
            assets.sizes.pop(key, None)


def _kinds(views: Sequence[Mapping[str, Any]]) -> list[str]:
    """The check kinds of the run, in the order they first appear (one column each in the case table)."""
    return list(dict.fromkeys(kind for v in views for kind in v["worst"]))


def _class_summary(views: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per expected class: cases, top-1 accuracy (prediction checks passed), focus checks passed,
    mean energy inside the region — the first place QA looks for a class the model gets wrong."""
    classes: dict[str, dict[str, Any]] = {}
    for v in views:
        if v["expected_class"] is None and v["top1"] is None:
            continue   # a spec-level card (gates) or a case with neither a class nor a prediction
        name = v["expected_class"] or "(no expected class)"
        row = classes.setdefault(name, {"label": name, "cases": 0, "pred": [0, 0], "focus": [0, 0], "energy": []})
        row["cases"] += 1
        for ch in v["case"]["checks"]:
            slot = {"prediction": "pred", "focus": "focus"}.get(ch["kind"])
            if slot and ch["outcome"] in ("passed", "failed"):
                row[slot][1] += 1
                row[slot][0] += ch["outcome"] == "passed"
        if v["energy"] is not None:
            row["energy"].append(float(v["energy"]))
    out = []
    for row in classes.values():
        p, f = row["pred"], row["focus"]
        out.append({"label": row["label"], "cases": row["cases"],
                    "accuracy": f"{p[0]}/{p[1]}" if p[1] else "—", "accuracy_sort": p[0] / p[1] if p[1] else 2,
                    "focus": f"{f[0]}/{f[1]}" if f[1] else "—", "focus_sort": f[0] / f[1] if f[1] else 2,
                    "energy": f"{statistics.fmean(row['energy']):.2f}" if row["energy"] else "—"})
    out.sort(key=lambda r: (r["accuracy_sort"], r["focus_sort"], r["label"]))
    return out


CONFUSION_MAX_CLASSES = 20
"""Up to this many expected classes the overview shows the whole top-1 confusion matrix; above it (an
ImageNet-sized set) only the most frequent confusions, a matrix nobody could read being no overview."""

HISTOGRAM_BINS = 10


def _overview(views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What a golden set's page shows before any card: the top-1 confusion (expected class x predicted
    top-1, "error" for a case with no prediction), its most frequent off-diagonal pairs, and histograms
    of the top-1 probability and of the energy inside the region, ten bins over [0, 1]."""
    from audit.gates import CaseOutcome, confusion

    table = confusion(CaseOutcome(case_id="", label=str(v["expected_class"]),   # confusion reads no id
                                  predicted=str(v["top1"]["label"]) if v["top1"] else None, correct=None)
                      for v in views if v["expected_class"] is not None)
    pairs = {(e, p): n for e, row in table.items() for p, n in row.items()}
    expected = sorted({e for e, _ in pairs})
    matrix = None
    if 0 < len(expected) <= CONFUSION_MAX_CLASSES:
        others = sorted({p for _, p in pairs} - set(expected) - {"error"})
        columns = expected + others + (["error"] if any(p == "error" for _, p in pairs) else [])
        matrix = {"columns": columns,
                  "rows": [{"label": e, "cells": [{"count": pairs.get((e, c), 0), "hit": c == e} for c in columns],
                            "total": sum(pairs.get((e, c), 0) for c in columns)} for e in expected]}
    confusions = sorted(((n, e, p) for (e, p), n in pairs.items() if e != p), key=lambda t: (-t[0], t[1], t[2]))
    histograms = []
    for name, values in (("top-1 probability", [v["top1"]["prob"] for v in views if v["top1"]]),
                         ("energy inside the region", [v["energy"] for v in views if v["energy"] is not None])):
        values = [float(x) for x in values if isinstance(x, (int, float)) and math.isfinite(float(x))]
        if not values:
            continue
        counts = [0] * HISTOGRAM_BINS
        for x in values:
            counts[min(HISTOGRAM_BINS - 1, max(0, int(x * HISTOGRAM_BINS)))] += 1
        top = max(counts)
        histograms.append({"name": name, "n": len(values), "median": f"{statistics.median(values):.2f}",
                           "bins": [{"range": f"{i / HISTOGRAM_BINS:.1f}–{(i + 1) / HISTOGRAM_BINS:.1f}",
                                     "count": c, "width": max(1, round(100 * c / top)) if c else 0} for i, c in enumerate(counts)]})
    return {"confusion": matrix, "confusions": [{"count": n, "expected": e, "predicted": p}
                                                for n, e, p in confusions[:10]],
            "histograms": histograms}


def _run_view(run: Mapping[str, Any], views: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Counts of CASES per outcome (what the filter buttons show and select), and of checks for the line
    under them."""
    counts = {k: 0 for k in OUTCOME_ORDER}
    for v in views:
        counts[v["outcome"]] = counts.get(v["outcome"], 0) + 1
    check_counts = {k: 0 for k in OUTCOME_ORDER}
    for v in views:
        for ch in v["case"]["checks"]:
            check_counts[ch["outcome"] or "error"] = check_counts.get(ch["outcome"] or "error", 0) + 1
    models = []
    for m in run.get("models") or []:
        source = str(m.get("source") or "")
        if m.get("checkpoint"):
            weights = f"checkpoint {m.get('checkpoint')}"
        elif source.startswith("zoo"):
            weights = "shipped weights"
        elif m.get("weights"):
            weights = f"weights {m.get('weights')}"
        else:
            weights = "random init"
        models.append({**m, "weights_text": weights})
    return {"run": run, "counts": counts, "check_counts": check_counts, "total": len(views), "models": models,
            "versions": run.get("versions") or {}, "duration": _run_seconds(run.get("duration_s"))}


# --------------------------------------------------------------------------------------------------
# results.json and index.html


def _results_json(run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]]) -> str:
    """``results.json`` as one string (see :func:`_results_json_chunks`)."""
    return "".join(_results_json_chunks(run, cases))


def _results_json_chunks(run: Mapping[str, Any], cases: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """``results.json``: plain JSON, NaN and inf as null, written a case at a time (the same bytes as one
    ``json.dumps`` of the whole document, without holding it).

    The cases were rebuilt from JSON records, so they usually are plain JSON already; the slower walk
    through ``_jsonable`` only runs for one that is not (numpy values, NaN from a metric, paths).
    """
    head = {"schema_version": SCHEMA_VERSION, "run": dict(run)}
    yield _dumps(head)[:-1] + ', "cases": ['
    for i, case in enumerate(cases):
        yield (", " if i else "") + _dumps(dict(case))
    yield "]}"


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(value), ensure_ascii=False)


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays, paths and tuples converted; NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(out_dir: Path, run: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], run_id: str,
                 self_contained: bool = False) -> Path:
    """Write ``results.json`` and ``index.html`` so the folder always holds one whole, readable report.

    Both are rendered into temp files next to their targets and moved in with ``os.replace``;
    ``index.html`` goes last and is the commit point. Only then are older runs' asset folders removed.
    Any exception (KeyboardInterrupt included) before that leaves the previous report untouched and
    removes this run's pictures (nothing will show them; on a full disk they would keep it full).

    Two runs into one folder: the commit and the pruning hold the folder's lock (``folder._folder_lock``),
    so ``results.json`` and ``index.html`` always come from the same run, and pruning skips the asset
    folders of runs still going (``folder._in_use``); the last run to commit owns the page. Temp files of
    killed runs (older than ``files.STALE_TEMP_S``) are removed at the commit.
    """
    out_dir = Path(out_dir)
    with committing(out_dir, run_id) as commit:
        out_dir.mkdir(parents=True, exist_ok=True)
        flush_assets()
        json_tmp = commit.stage(".results-", _results_json_chunks(run, cases))
        assets = _Assets(out_dir, self_contained)
        template = _env().get_template("report.html")
        rows = _rows(cases)
        html = template.generate(**_run_view(run, rows), rows=rows, cases=_cards(cases, rows, assets),
                                 kinds=_kinds(rows), classes=_class_summary(rows), overview=_overview(rows), run_id=run_id,
                                 self_contained=self_contained, nonce=secrets.token_urlsafe(12),
                                 schema_version=SCHEMA_VERSION)
        html_tmp = commit.stage(".index-", html)
        commit.publish([(json_tmp, "results.json"), (html_tmp, "index.html")],
                       keep=None if self_contained else run_id)
    return out_dir / "index.html"
