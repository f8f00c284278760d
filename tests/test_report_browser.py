"""The report as QA sees it: opened from file:// in headless Chromium, no errors, pictures load, filters work."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from audit import report as R
from audit.kinds import Picture

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing under CI (.ci/run installs it)")
        pytest.skip(f"{CHROMIUM} not installed")
    if os.environ.get("CI"):
        from playwright import sync_api   # under CI a missing playwright is a failure, not a skip
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def fake_case(asset_dir: Path, case_id: str, outcome: str) -> dict:
    """A case as the plugin builds it, with real pictures made from numpy (no model involved)."""
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.zeros((64, 64, 3), np.uint8)
    arr[(xx - 20) ** 2 + (yy - 24) ** 2 < 100] = (240, 240, 240)
    heat = np.exp(-((xx - 20) ** 2 + (yy - 24) ** 2) / 200.0).astype(np.float32)
    maps = np.random.default_rng(0).random((64, 16, 16), np.float32)
    assets = {} if outcome == "error" else R.render_case_assets(
        asset_dir, case_id, Image.fromarray(arr, "RGB"), heat,
        [[(10, 14), (30, 14), (30, 34), (10, 34)]], [[(40, 40), (60, 40), (60, 60), (40, 60)]],
        (4, 0, 60, 64), {"features.4": maps}, {"features.4": None},
        extra={("baseline", "heatmap"): Picture(heat=heat.T)})
    return {"nodeid": f"specs/shapes/basic.yaml::{case_id}", "spec": "specs/shapes/basic.yaml", "line": 7,
            "case_id": case_id, "model": "shapes", "image": "img/circle.png", "image_size": [64, 64],
            "outcome": outcome,
            "top_k": [] if outcome == "error" else [
                {"index": 0, "label": "circle", "prob": 0.81, "expected": True},
                {"index": 2, "label": "square", "prob": 0.12, "expected": False}],
            "target": None if outcome == "error" else {"index": 0, "label": "circle"},
            "checks": [] if outcome == "error" else [
                {"kind": "focus", "outcome": outcome, "message": f"focus {outcome}",
                 "metrics": [{"name": "energy_inside", "value": 0.4 if outcome == "failed" else 0.8,
                              "threshold": 0.5, "op": ">=", "passed": outcome == "passed"}],
                 "duration_s": 0.01}],
            "regions": {"region": "box [10, 14, 31, 35]", "avoid": "box [40, 40, 61, 61]"},
            "seen_box": [4, 0, 60, 64], "crops": False, "assets": assets,
            "kinds": {} if outcome == "error" else {"baseline": {
                "heatmap_correlation": 0.97, "hot_iou": 0.8, "top1_then": "circle", "top1_now": "circle",
                "prob_drift": 0.01, "topk_overlap": 1.0, "recorded_with": {"torch": "2.3.0"}}},
            "error": "ImageError: img/broken.png: truncated file" if outcome == "error" else None,
            "features": [] if outcome == "error" else [{"layer": "features.4", "shape": [64, 16, 16], "shown": 64}]}


def build_report(out: Path, self_contained: bool = False) -> Path:
    R.check_writable(out)
    run_id, asset_dir = R.new_run_dir(out)
    cases = [fake_case(asset_dir, "circle-01", "failed"), fake_case(asset_dir, "circle-02", "passed"),
             fake_case(asset_dir, "broken-03", "error")]
    run = {"started": "2024-05-01T10:00:00", "duration_s": 2.5,
           "models": [{"key": "shapes", "arch": "shapes_vgg", "weights": "DEFAULT", "checkpoint": None,
                       "fingerprint": "ab" * 32, "preprocess": "squash", "device": "cpu", "source": "zoo"}],
           "versions": {"torch": "2.3.0", "torchvision": "0.18.0", "model_audit": "0.1.0", "python": "3.11"},
           "counts": {"passed": 1, "failed": 1, "skipped": 0, "error": 1}, "args": ["specs/"], "device": "cpu"}
    return R.write_report(out, run, cases, run_id, self_contained=self_contained)


def open_page(browser, index: Path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(index.resolve().as_uri())
    page.wait_for_load_state("load")
    return page, problems


def visible_cards(page) -> list[str]:
    return page.eval_on_selector_all("article.card", "cs => cs.filter(c => !c.hidden && c.offsetParent !== null)"
                                                     ".map(c => c.dataset.caseId)")


@pytest.mark.parametrize("self_contained", [False, True], ids=["folder", "one-file"])
def test_report_opens_from_file_without_errors_and_filters_work(browser, tmp_path, self_contained):
    index = build_report(tmp_path / "reports", self_contained)
    page, problems = open_page(browser, index)
    try:
        sizes = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(sizes) >= 2 * 6
        assert all(complete and width > 0 for _, complete, width in sizes), sizes
        assert visible_cards(page) == ["circle-01", "circle-02", "broken-03"]

        page.click("button[data-filter=failed]")
        assert visible_cards(page) == ["circle-01"]
        page.click("button[data-filter=error]")
        assert visible_cards(page) == ["broken-03"]
        page.click("button[data-filter=all]")
        page.fill("#search", "02")
        assert visible_cards(page) == ["circle-02"]
        page.fill("#search", "")
        page.click("button[data-filter=failed]")

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        if os.environ.get("REPORT_SAMPLE_SCREENSHOT") and not self_contained:
            page.click("button[data-filter=all]")
            page.screenshot(path=os.environ["REPORT_SAMPLE_SCREENSHOT"], full_page=True)
        assert problems == []
    finally:
        page.close()


def test_filter_in_the_url_is_applied_on_load(browser, tmp_path):
    index = build_report(tmp_path / "reports")
    page = browser.new_page()
    try:
        page.goto(index.resolve().as_uri() + "#failed")
        assert visible_cards(page) == ["circle-01"]
    finally:
        page.close()


def test_report_of_the_shipped_specs_opens_with_every_image_decoded(browser, pytester, monkeypatch, tmp_path):
    """The acceptance run: `pytest specs/ examples/shortcut --audit-report` as QA opens it."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    out = tmp_path / "reports"
    result = pytester.runpytest(str(repo / "specs"), str(repo / "examples" / "shortcut"), "--audit-report", str(out),
                                "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*model-audit report: *index.html*"])
    page, problems = open_page(browser, out / "index.html")
    try:
        sizes = page.evaluate("Array.from(document.images).map(i => [i.currentSrc, i.complete, i.naturalWidth])")
        assert len(sizes) >= 4 * 22
        assert all(complete and width > 0 for _, complete, width in sizes), [s for s in sizes if not s[2]]
        page.click("button[data-filter=failed]")
        failed = visible_cards(page)
        assert len(failed) == 6 and all(card.endswith("-01") for card in failed)
        page.click("button[data-filter=skipped]")
        assert any("grace-hopper" in card for card in visible_cards(page))
        page.click("button[data-filter=all]")
        shot = tmp_path / "shipped-report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        assert problems == []
    finally:
        page.close()
