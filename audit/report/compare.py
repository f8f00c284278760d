"""The page of ``model-audit compare``: the report's cards (macros, CSS, filters, search), two models per card.

It reuses the report's parts rather than repeating them: pictures are drawn by
:func:`audit.report.assets.render_case_assets` into a fresh run folder (:func:`folder.new_run_dir`),
the page is rendered by the report's jinja2 environment with its picture views (``page._Assets``), and
``compare.json`` and ``index.html`` are committed together by :func:`folder.committing`, so a reader
never sees one run's JSON beside another run's page, and an interrupted compare leaves the previous one.
"""
from __future__ import annotations

import datetime as _dt
import json
import secrets
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from audit.report.assets import flush_assets, render_case_assets, safe_stem
from audit.report.folder import check_writable, committing, new_run_dir
from audit.report.page import _Assets, _env

#: compare.json's format version
COMPARE_SCHEMA_VERSION = 2


def write_compare(out_dir: Path, rows: Sequence[dict], summary: Mapping[str, Any], verdicts: Sequence[dict],
                  pictures: Callable[[dict], tuple], colormap: str,
                  progress: Callable[[Iterable, int], Iterable] = lambda items, total: items) -> Path:
    """Write the compare report into ``out_dir``; ``rows`` are compare.json's cases (most divergent first).

    ``pictures(row)`` gives ``(image, heat_a, heat_b, seen_box_a, seen_box_b, region_outlines,
    avoid_outlines)`` for a row: what the cards show of each model on that image.
    """
    out_dir = Path(out_dir)
    check_writable(out_dir)
    run_id, asset_dir = new_run_dir(out_dir)
    with committing(out_dir, run_id) as commit:
        sizes: dict[str, Any] = {}
        for row in progress(rows, len(rows)):
            image, heat_a, heat_b, seen_a, seen_b, outlines, avoid = pictures(row)
            stem = f"{row['spec']}::{row['case_id']}"
            a = render_case_assets(asset_dir, stem + "::A", image, heat_a, outlines, avoid, seen_a, {}, {},
                                   colormap=colormap)
            b = render_case_assets(asset_dir, stem + "::B", image, heat_b, outlines, avoid, seen_b, {}, {},
                                   colormap=colormap)
            row["assets"] = {"image": a["image"], "image_thumb": a["image_thumb"], "overlay_a": a["overlay"],
                             "overlay_a_thumb": a["overlay_thumb"], "overlay_b": b["overlay"],
                             "overlay_b_thumb": b["overlay_thumb"], "colorbar": a["colorbar"]}
            sizes.update(a["sizes"])
            sizes.update(b["sizes"])
        flush_assets()
        assets = _Assets(out_dir, False, sizes)
        created = _dt.datetime.now().isoformat(timespec="seconds")
        payload = {"schema_version": COMPARE_SCHEMA_VERSION, "run_id": run_id, "created": created,
                   "a": summary["A"], "b": summary["B"], "fail_on": list(verdicts), "cases": list(rows)}
        html = _env().get_template("compare.html").render(
            a=summary["A"], b=summary["B"], cases=[_card(row, assets) for row in rows],
            flips=sum(r["flip"] for r in rows), created=created, run_id=run_id, verdicts=verdicts,
            nonce=secrets.token_urlsafe(12))
        json_tmp = commit.stage(".compare-", [json.dumps(payload, indent=1, ensure_ascii=False) + "\n"])
        html_tmp = commit.stage(".index-", [html])
        commit.publish([(json_tmp, "compare.json"), (html_tmp, "index.html")], keep=run_id)
    return out_dir


def _card(row: Mapping[str, Any], assets: _Assets) -> dict[str, Any]:
    """One card: both models' top-5 beside each other; the other model's top-1 is marked on a flip."""
    a = row["assets"]
    return {**row, "outcome": "flip" if row["flip"] else "same",
            "search": " ".join([row["case_id"], row["spec"], row["top1_a"]["label"], row["top1_b"]["label"],
                                row["model_a"], row["model_b"]]).lower(),
            "anchor": "case-" + safe_stem(f"{row['spec']}::{row['case_id']}"),
            "picture": assets.picture(a["image"], a["image_thumb"]),
            "overlay_a": assets.picture(a["overlay_a"], a["overlay_a_thumb"]),
            "overlay_b": assets.picture(a["overlay_b"], a["overlay_b_thumb"]),
            "colorbar": assets.picture(a["colorbar"]),
            "rows_a": [{**t, "expected": t["index"] == row["top1_b"]["index"] and row["flip"], "beyond_k": False}
                       for t in row["top_k_a"]],
            "rows_b": [{**t, "expected": t["index"] == row["top1_a"]["index"] and row["flip"], "beyond_k": False}
                       for t in row["top_k_b"]]}
