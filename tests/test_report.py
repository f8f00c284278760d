"""The report: pictures QA can read, one card per case, escaped text, atomic writes, one-file mode."""
from __future__ import annotations

import base64
import io
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from audit import report as R
from audit.report import page as report_page
from audit.kinds import Picture
from audit.errors import AuditError

XSS = "<script>alert(1)</script>"


# ---------------------------------------------------------------------------------------------
# helpers


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, attrs, parent, [], []

    def iter(self, tag: str | None = None):
        for child in self.children:
            if tag is None or child.tag == tag:
                yield child
            yield from child.iter(tag)

    def all_text(self) -> str:
        return "".join(self.text) + "".join(c.all_text() for c in self.children)

    def has_class(self, name: str) -> bool:
        return name in (self.attrs.get("class") or "").split()


class TreeBuilder(HTMLParser):
    """A small element tree from the stdlib parser (no lxml dependency); void elements have no children."""

    VOID = {"meta", "img", "br", "input", "link", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def parse(path: Path) -> Node:
    builder = TreeBuilder()
    builder.feed(path.read_text(encoding="utf-8"))
    builder.close()
    return builder.root


def scene(size: int = 64) -> Image.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    cv2.circle(arr, (size // 3, size // 3), size // 6, (250, 250, 250), -1)
    return Image.fromarray(arr, "RGB")


def box_outline(x0, y0, x1, y1):
    return [(x0, y0), (x1 - 1, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)]


def run_dict(counts=None) -> dict:
    return {"started": "2024-05-01T10:00:00", "duration_s": 4.25,
            "models": [{"key": "shapes", "arch": "shapes_vgg", "weights": "DEFAULT", "checkpoint": None,
                        "fingerprint": "0123456789abcdef" * 4, "preprocess": "squash", "device": "cpu",
                        "source": "zoo"}],
            "versions": {"torch": "2.3.0", "torchvision": "0.18.0", "model_audit": "0.1.0", "python": "3.11.9"},
            "counts": counts or {"passed": 1, "failed": 1, "skipped": 0, "error": 1},
            "args": ["specs/shapes"], "device": "cpu"}


def make_case(asset_dir: Path | None, case_id: str, outcome: str, label: str = "circle",
              message: str = "energy inside the region 0.31 < 0.5", with_assets: bool = True) -> dict:
    assets = {}
    if asset_dir is not None and with_assets:
        heat = np.zeros((8, 8), np.float32)
        heat[2:5, 2:5] = 1.0
        assets = R.render_case_assets(asset_dir, case_id, scene(), heat, [box_outline(10, 10, 32, 32)],
                                      [box_outline(40, 40, 60, 60)], None,
                                      {"features.4": np.random.default_rng(1).random((12, 16, 16), np.float32)},
                                      {"features.4": None}, extra={("baseline", "heatmap"): Picture(heat=heat.T)})
        R.flush_assets()  # pictures are written on a background thread
    return {"nodeid": f"specs/shapes/basic.yaml::{case_id}", "spec": "specs/shapes/basic.yaml", "line": 12,
            "case_id": case_id, "model": "shapes", "image": "specs/shapes/img/c.png", "image_size": [64, 64],
            "outcome": outcome,
            "top_k": [{"index": 0, "label": label, "prob": 0.7, "expected": True},
                      {"index": 1, "label": "square", "prob": 0.2, "expected": False},
                      {"index": 2, "label": "triangle", "prob": 0.1, "expected": False}],
            "target": {"index": 0, "label": label},
            "checks": [{"kind": "prediction", "outcome": "passed", "message": "circle is top-1", "metrics": [],
                        "duration_s": 0.01},
                       {"kind": "focus", "outcome": outcome if outcome != "error" else "failed", "message": message,
                        "metrics": [{"name": "energy_inside", "value": 0.31, "threshold": 0.5, "op": ">=",
                                     "passed": False},
                                    {"name": "pointing_game", "value": 1.0, "threshold": 1.0, "op": ">=",
                                     "passed": True}],
                        "duration_s": 0.02}],
            "regions": {"region": "box [10, 10, 32, 32]", "avoid": "box [40, 40, 60, 60]"},
            "seen_box": None, "crops": False, "assets": assets,
            "kinds": {"baseline": {"heatmap_correlation": 0.93, "hot_iou": 0.61, "top1_then": "circle", "top1_now": label,
                         "prob_drift": -0.02, "topk_overlap": 1.0,
                         "recorded_with": {"torch": "2.2.0", "fingerprint": "0123456789ab"}}},
            "error": "ImageError: specs/shapes/img/c.png: truncated file" if outcome == "error" else None,
            "features": [{"layer": "features.4", "shape": [12, 16, 16], "shown": 12}] if assets else []}


@pytest.fixture
def report_dir(tmp_path):
    out = tmp_path / "reports"
    R.check_writable(out)
    run_id, asset_dir = R.new_run_dir(out)
    return out, run_id, asset_dir


def cards(root: Node) -> list[Node]:
    return [n for n in root.iter("article") if n.has_class("card")]


# ---------------------------------------------------------------------------------------------
# feature grid


@pytest.mark.parametrize("channels, cols, rows", [(64, 11, 6), (72, 12, 6), (6, 1, 6), (96, 16, 6), (512, 23, 23)])
def test_feature_grid_uses_the_classic_notebook_layout(channels, cols, rows):
    grid = R.feature_grid(np.random.default_rng(0).random((channels, 10, 20), np.float32), label=False)
    assert grid.dtype == np.uint8
    assert grid.shape == (rows * 11 - 1, cols * 21 - 1)


def test_feature_grid_shows_only_the_first_max_channels():
    maps = np.zeros((512, 8, 8), np.float32)
    maps[:, 0, 0] = 1.0
    grid = R.feature_grid(maps, max_channels=72, label=False)
    assert grid.shape == (6 * 9 - 1, 12 * 9 - 1)


def test_feature_grid_has_one_pixel_separators_between_tiles():
    grid = R.feature_grid(np.zeros((4, 5, 5), np.float32), columns=2, label=False, separator=200)
    assert grid.shape == (11, 11)
    assert (grid[5, :] == 200).all() and (grid[:, 5] == 200).all()
    assert (grid[:5, :5] == 0).all()


def test_feature_grid_normalises_each_channel_to_its_own_range():
    maps = np.stack([np.linspace(5, 6, 100, dtype=np.float32).reshape(10, 10),
                     np.linspace(-1000, 3000, 100, dtype=np.float32).reshape(10, 10)])
    grid = R.feature_grid(maps, columns=2, label=False)
    first, second = grid[:10, :10], grid[:10, 11:21]
    assert first.min() == 0 and first.max() == 255
    assert second.min() == 0 and second.max() == 255
    assert first[0, 0] == 0 and first[-1, -1] == 255


def _reference_tiles(maps: np.ndarray) -> np.ndarray:
    """Each channel stretched to 0..255 in float64, one at a time: the obvious way, as an oracle."""
    out = []
    for m in maps.astype(np.float64):
        lo, hi = m.min(), m.max()
        out.append(np.zeros_like(m) if hi == lo else (m - lo) * (255.0 / (hi - lo)))
    return np.clip(np.floor(np.array(out) + 0.5), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("offset, span", [(0.0, 1.0), (1e6, 1e-2), (-3e4, 7e4), (1e30, 1e29), (-3e38, 6e38)])
def test_feature_grid_tiles_equal_a_float64_reference(offset, span):
    rng = np.random.default_rng(4)
    maps = (offset + span * rng.random((6, 9, 11))).astype(np.float32)
    maps[0] = np.float32(offset)                     # a constant channel
    if span > 1e38:                                  # both ends of float32 in one channel
        maps[1, 0, 0], maps[1, 0, 1] = -3.4e38, 3.4e38
    grid = R.feature_grid(maps, columns=6, label=False)
    tiles = np.stack([grid[:9, i * 12:i * 12 + 11] for i in range(6)])
    expected = _reference_tiles(maps)
    assert np.abs(tiles.astype(int) - expected).max() <= 1   # float32 rounding may move a pixel by one


@pytest.mark.parametrize("channels", [12, 10])   # rows filled exactly, and a last row with two empty cells
def test_feature_grid_puts_channel_i_in_row_i_div_cols_and_column_i_mod_cols(channels):
    maps = np.zeros((channels, 6, 5), np.float32)
    for i in range(channels):
        maps[i, i // 5, i % 5] = 1.0                 # each channel has its one bright pixel somewhere else
    grid = R.feature_grid(maps, columns=4, label=False, separator=100)
    assert grid.shape == (3 * 7 - 1, 4 * 6 - 1)
    for i in range(channels):
        row, col = divmod(i, 4)
        tile = grid[row * 7:row * 7 + 6, col * 6:col * 6 + 5]
        assert tile[i // 5, i % 5] == 255 and np.count_nonzero(tile) == 1, i
    for empty in range(channels, 12):
        row, col = divmod(empty, 4)
        assert (grid[row * 7:row * 7 + 6, col * 6:col * 6 + 5] == 100).all()


def test_feature_grid_constant_and_nan_channels_are_black():
    maps = np.stack([np.full((10, 10), 7.0, np.float32), np.full((10, 10), np.nan, np.float32)])
    grid = R.feature_grid(maps, columns=2, label=False)
    assert (grid[:10, :10] == 0).all() and (grid[:10, 11:] == 0).all()


def test_feature_grid_labels_tiles_with_their_channel_index():
    maps = np.zeros((3, 40, 40), np.float32)
    labelled = R.feature_grid(maps, columns=3)
    assert labelled[:15, :15].max() == 255          # white digits on the black box
    assert (labelled[20:, :40] == 0).all()           # the rest of the tile stays untouched


def test_feature_grid_labels_fit_tiles_even_with_many_channels_of_16_px():
    grid = R.feature_grid(np.zeros((512, 16, 16), np.float32))
    assert grid.shape == (23 * 17 - 1, 23 * 17 - 1)
    tile_511 = grid[22 * 17:22 * 17 + 16, 5 * 17:5 * 17 + 16]   # the last tile: 511 = 22 * 23 + 5
    assert tile_511.max() > 200                                 # white label pixels, cut at the edge


def test_feature_grid_upscale_repeats_pixels():
    maps = np.arange(4, dtype=np.float32).reshape(1, 2, 2)
    grid = R.feature_grid(maps, upscale=3, label=False)
    assert grid.shape == (6, 6)
    assert (grid[:3, :3] == 0).all() and (grid[3:, 3:] == 255).all()


# ---------------------------------------------------------------------------------------------
# colours, overlay, regions


def test_colorize_is_cv2_jet_in_rgb_order():
    heat = np.array([[0.0, 1.0]], np.float32)
    rgb = R.colorize(heat)
    assert rgb.shape == (1, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 2] > 100 and rgb[0, 0, 0] == 0      # 0 → blue
    assert rgb[0, 1, 0] > 100 and rgb[0, 1, 2] == 0      # 1 → red


@pytest.mark.parametrize("name", sorted(R.COLORMAPS))
def test_colorize_equals_cv2_apply_color_map_for_every_colormap(name):
    heat = np.random.default_rng(3).random((17, 23), np.float32)
    heat[0, :3] = [np.nan, -1.0, 2.0]
    u8 = np.uint8(np.clip(np.nan_to_num(heat, nan=0.0), 0, 1) * 255.0 + 0.5)
    expected = cv2.applyColorMap(u8, R.COLORMAPS[name])[..., ::-1]
    np.testing.assert_array_equal(R.colorize(heat, name.upper()), expected)


def test_colorize_unknown_colormap_names_the_choices():
    with pytest.raises(AuditError, match="viridis"):
        R.colorize(np.zeros((2, 2)), "viridiss")


def test_overlay_is_the_classic_heatmap_times_04_plus_image():
    img = np.array([[[10, 20, 30], [250, 250, 255]]], np.uint8)
    heat = np.array([[0.0, 1.0]], np.float32)
    bgr = cv2.applyColorMap(np.uint8(255 * heat), cv2.COLORMAP_JET)
    expected = np.clip(np.rint(bgr[..., ::-1].astype(np.float64) * 0.4 + img), 0, 255).astype(np.uint8)
    got = np.asarray(R.overlay(Image.fromarray(img, "RGB"), heat))
    np.testing.assert_array_equal(got, expected)
    assert got[0, 1, 0] == 255   # saturated, not wrapped around


def test_blend_rounds_and_saturates_like_the_float_formula_for_every_pair_of_values():
    colour, image = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8))
    colour, image = np.repeat(colour[..., None], 3, axis=2), np.repeat(image[..., None], 3, axis=2)
    expected = np.clip(np.rint(colour.astype(np.float32) * 0.4 + image), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(R._blend(image, colour), expected)


def test_colorbar_has_both_ends_of_the_colormap_and_tick_labels():
    bar = R.colorbar("jet", 200)
    assert bar.shape[0] == 200 and bar.shape[2] == 3
    col = bar[:, 8]
    assert col[10, 0] > 100 and col[10, 2] < 50        # red (1) near the top
    assert col[-10, 2] > 100 and col[-10, 0] < 50      # blue (0) near the bottom
    assert (bar[:, 20:] < 100).all(axis=2).any()       # dark tick text right of the bar


def test_draw_regions_outlines_expected_region_in_green_and_avoid_in_red():
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    out = np.asarray(R.draw_regions(img, [box_outline(10, 10, 50, 50)], [box_outline(60, 60, 90, 90)], None))
    green = (out[..., 1] > 150) & (out[..., 0] < 80) & (out[..., 2] < 80)
    red = (out[..., 0] > 150) & (out[..., 1] < 80)
    assert green[10, 30] and green[30, 10] and not green[30, 30]
    assert red[60:62, 60:90].any() and not red[75, 75]


def test_draw_regions_greys_out_what_the_model_never_saw():
    img = Image.new("RGB", (200, 100), (0, 0, 200))
    out = np.asarray(R.draw_regions(img, [], [], (50, 0, 150, 100)))
    assert tuple(out[50, 100]) == (0, 0, 200)               # seen part untouched
    assert abs(int(out[90, 20, 0]) - int(out[90, 20, 2])) < 80   # outside pushed to grey
    assert out[50, 50, 0] > 200 and out[50, 50, 2] < 50     # amber seen box


def test_draw_regions_leaves_the_image_alone_when_the_model_saw_everything():
    img = Image.new("RGB", (50, 40), (9, 9, 9))
    out = np.asarray(R.draw_regions(img, None, None, (0, 0, 50, 40)))
    assert (out == 9).all()


# ---------------------------------------------------------------------------------------------
# case assets


def test_safe_stem_survives_any_case_id():
    stems = {R.safe_stem(s) for s in ["a/b", "a\\b", XSS, "ü∆🙂", "..", "a b", "a-b"]}
    assert len(stems) == 7
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s) and not s.startswith(".") for s in stems)


def test_render_case_assets_writes_decodable_files_sized_for_the_screen(report_dir):
    out, run_id, asset_dir = report_dir
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    heat = np.random.default_rng(1).random((14, 14), np.float32)
    maps = np.random.default_rng(2).random((512, 7, 7), np.float32)
    a = R.render_case_assets(asset_dir, "dog/01 <b>", photo, heat, [box_outline(100, 100, 900, 900)], [],
                             (250, 0, 1750, 1500), {"features.30": maps}, {"features.30": 72},
                             extra={("baseline", "heatmap"): Picture(heat=heat)}, thumb_size=200)
    R.flush_assets()  # pictures are written on a background thread
    pictures = {key: (a[key], a[f"{key}_thumb"]) for key in ["image", "heatmap", "overlay"]}
    pictures["baseline"] = (a["kinds"]["baseline"]["heatmap"], a["kinds"]["baseline"]["heatmap_thumb"])
    for full_rel, thumb_rel in pictures.values():
        assert full_rel.startswith(f"assets/{run_id}/")
        with Image.open(out / full_rel) as full:
            assert full.size == (1024, 768)
            assert full.format == "JPEG"
        with Image.open(out / thumb_rel) as thumb:
            assert thumb.size == (200, 150)
    with Image.open(out / a["grids"]["features.30"]) as grid:
        grid.load()
        assert grid.format == "PNG" and grid.mode == "L"
        assert grid.size == (12 * 50 - 1, 6 * 50 - 1)      # 72 maps, 7x7 upscaled x7 to 49 px tiles
    with Image.open(out / a["colorbar"]) as bar:
        assert bar.format == "PNG"
    assert not [p for p in asset_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_render_case_assets_upscales_tiny_scenes_so_qa_can_see_them(report_dir):
    out, _, asset_dir = report_dir
    a = R.render_case_assets(asset_dir, "c1", scene(64), np.ones((64, 64), np.float32), [], [], None, {}, {})
    R.flush_assets()  # pictures are written on a background thread
    with Image.open(out / a["image"]) as im:   # outlines drawn at twice the size, so they stay thin
        assert im.size == (128, 128)
    shown = report_page._Assets(out, self_contained=False).picture(a["image"], a["image_thumb"])
    assert (shown["width"], shown["height"], shown["pixelated"]) == (256, 256, True)
    for key in ["heatmap", "overlay"]:          # kept at the scene's size, scaled up by the page
        with Image.open(out / a[key]) as im:
            assert im.size == (64, 64)
        shown = report_page._Assets(out, self_contained=False).picture(a[key], a[f"{key}_thumb"])
        assert (shown["width"], shown["height"], shown["pixelated"]) == (256, 256, True)
    assert a["grids"] == {}
    assert a["kinds"] == {}


@pytest.mark.parametrize("side", [64, 300, 1500])   # enlarged, kept, shrunk for the screen
def test_render_case_assets_draws_regions_on_the_image_and_overlay_not_on_heatmaps(report_dir, side):
    out, _, asset_dir = report_dir
    grey = Image.new("RGB", (side, side), (128, 128, 128))
    box = box_outline(side // 4, side // 4, side // 2, side // 2)
    a = R.render_case_assets(asset_dir, f"grey{side}", grey, np.zeros((7, 7), np.float32), [box], [box],
                             None, {}, {}, extra={("baseline", "heatmap"): Picture(heat=np.zeros((7, 7), np.float32))})
    R.flush_assets()

    def spread(key: str) -> int:   # the largest difference between two pixels, over the three channels
        with Image.open(out / a[key]) as im:
            px = np.asarray(im.convert("RGB")).astype(int)
        return int((px.max(axis=(0, 1)) - px.min(axis=(0, 1))).max())

    assert spread("image") > 100                 # green and red outlines on grey
    assert spread("overlay") > 100               # ... and on the overlay, where QA reads the focus
    a["baseline"] = a["kinds"]["baseline"]["heatmap"]
    for key in ["heatmap", "baseline"]:
        assert spread(key) <= 2, key             # one flat colour (JPEG may round by a level)


def test_avoid_outline_shows_red_and_white_on_a_red_and_on_a_white_background(report_dir):
    out, _, asset_dir = report_dir
    outline = box_outline(16, 16, 48, 48)
    for colour in [(255, 0, 0), (255, 255, 255)]:
        img = np.full((64, 64, 3), colour, np.uint8)
        R._draw_regions(img, None, [outline], None, scale=1.0)
        edge = img[16, 16:48].astype(int)                # the top edge of the box
        distance = np.abs(edge - np.array(colour)).sum(axis=1)
        assert (distance > 200).sum() >= 8, colour       # a good part of the edge stands out


def test_pointing_game_cases_get_the_hottest_point_marked_on_the_overlay(report_dir):
    out, _, asset_dir = report_dir
    heat = np.zeros((64, 64), np.float32)
    heat[40, 10] = 1.0
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    a = R.render_case_assets(asset_dir, "peak", grey, heat, None, None, None, {}, {}, mark_peak=True)
    b = R.render_case_assets(asset_dir, "nopeak", grey, heat, None, None, None, {}, {})
    R.flush_assets()
    assert a["peak"] == [10.5, 40.5] and "peak" not in b
    with Image.open(out / a["overlay"]) as im, Image.open(out / b["overlay"]) as im2:
        diff = np.abs(np.asarray(im, int) - np.asarray(im2, int)).sum(axis=2)
    ys, xs = np.nonzero(diff > 60)
    assert len(xs) and abs(xs.mean() - 10) < 3 and abs(ys.mean() - 40) < 3   # the cross sits on the peak


def test_seen_only_kind_maps_are_laid_onto_the_seen_box_with_the_crop_border(report_dir):
    out, _, asset_dir = report_dir
    img = Image.new("RGB", (400, 300), (128, 128, 128))
    seen = (50.0, 0.0, 350.0, 300.0)                     # a centre crop of the 400x300 photo
    ones = np.ones((7, 7), np.float32)
    a = R.render_case_assets(asset_dir, "crop", img, None, None, None, seen, {}, {},
                             extra={("baseline", "heatmap"): Picture(heat=ones, seen_only=True),
                                    ("baseline", "today"): Picture(heat=ones * 0.5, seen_only=True)})
    R.flush_assets()
    jet0 = R.colorize(np.zeros((1, 1), np.float32))[0, 0]
    for key in ["heatmap", "today"]:
        with Image.open(out / a["kinds"]["baseline"][key]) as im:
            px = np.asarray(im.convert("RGB")).astype(int)
        assert np.abs(px[150, 20] - jet0).sum() < 30, key       # outside the crop: the map is zero there
        assert np.abs(px[150, 200] - jet0).sum() > 100, key     # inside: the map
        assert np.abs(px[150, 50:53] - np.array(R.SEEN)).sum(axis=1).min() < 120, key   # amber border


def test_render_case_assets_without_heatmap_writes_only_the_image(report_dir):
    out, _, asset_dir = report_dir
    a = R.render_case_assets(asset_dir, "c1", scene(), None, None, None, None, None, None)
    R.flush_assets()  # pictures are written on a background thread
    assert set(a) == {"image", "image_thumb", "grids", "sizes", "kinds"} and a["kinds"] == {}


def test_a_picture_opencv_cannot_write_fails_with_the_reason_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(cv2, "imwrite", lambda *a, **k: False)     # OpenCV says no more than this
    R._write_picture(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "ok.jpg"))
    with Image.open(tmp_path / "ok.jpg") as im:                     # written by Python instead
        assert im.format == "JPEG" and im.size == (4, 4)
    missing = tmp_path / "gone" / "x.png"
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone"))):
        R._write_picture(np.zeros((4, 4), np.uint8), str(missing))


def test_write_picture_stores_rgb_in_the_right_channel_order(tmp_path):
    pixels = np.zeros((2, 3, 3), np.uint8)
    pixels[..., 0] = 200                                            # pure red
    R._write_picture(pixels, str(tmp_path / "red.png"))
    with Image.open(tmp_path / "red.png") as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)


# ---------------------------------------------------------------------------------------------
# report folder


def test_the_page_is_compiled_once_and_then_read_from_jinja2s_cache(tmp_path, monkeypatch):
    import jinja2

    cache = R._template_cache()
    cache.directory = str(tmp_path)                  # a fresh cache, not the user's
    compiled = []
    real_compile = jinja2.Environment.compile

    def counting_compile(self, *args, **kwargs):
        compiled.append(args[1] if len(args) > 1 else kwargs.get("name"))
        return real_compile(self, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", counting_compile)
    for _ in range(2):
        monkeypatch.setattr(report_page, "_ENV", None)
        monkeypatch.setattr(report_page, "_template_cache", lambda: cache)
        report_page._env().get_template("report.html")
    assert compiled.count("report.html") == 1        # the second environment loaded it from the cache
    assert list(tmp_path.iterdir())


def test_a_cache_that_cannot_be_written_or_read_is_skipped(tmp_path, monkeypatch):
    import jinja2.bccache

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    cache = R._template_cache()
    cache.directory = str(tmp_path)
    monkeypatch.setattr(jinja2.bccache.tempfile, "NamedTemporaryFile", no_space)
    monkeypatch.setattr(report_page, "_template_cache", lambda: cache)
    monkeypatch.setattr(report_page, "_ENV", None)
    assert report_page._env().get_template("report.html").render   # compiled, and the failed write was skipped
    (tmp_path / "entry").write_bytes(b"x")
    monkeypatch.setattr(cache, "_get_cache_filename", lambda bucket: str(tmp_path / "entry"))
    monkeypatch.setattr(jinja2.bccache.Bucket, "load_bytecode", no_space)
    monkeypatch.setattr(report_page, "_ENV", None)
    assert report_page._env().get_template("report.html").render   # a cache entry that cannot be read is skipped


def test_check_writable_creates_the_folder(tmp_path):
    R.check_writable(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()
    assert list((tmp_path / "a" / "b").iterdir()) == []


def test_check_writable_names_the_folder_it_cannot_write(tmp_path):
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "reports"
    with pytest.raises(AuditError, match=re.escape(f"report folder {target} is not writable: ")):
        R.check_writable(target)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through chmod 0o500")
def test_check_writable_rejects_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(AuditError, match="not writable"):
            R.check_writable(ro)
    finally:
        ro.chmod(0o700)


def test_new_run_dir_is_unique_under_assets(tmp_path):
    ids = {R.new_run_dir(tmp_path)[0] for _ in range(5)}
    assert len(ids) == 5
    assert all(R.RUN_ID_PATTERN.match(i) and (tmp_path / "assets" / i).is_dir() for i in ids)


def three_cases(asset_dir: Path) -> list[dict]:
    return [make_case(asset_dir, "circle-01", "failed"), make_case(asset_dir, "circle-02", "passed"),
            make_case(asset_dir, "broken-03", "error", with_assets=False)]


def test_write_report_has_one_card_per_case_failures_first(report_dir):
    out, run_id, asset_dir = report_dir
    cases = three_cases(asset_dir)
    index = R.write_report(out, run_dict(), cases, run_id)
    assert index == out / "index.html"
    found = cards(parse(index))
    assert [c.attrs["data-outcome"] for c in found] == ["failed", "error", "passed"]
    assert [c.attrs["data-case-id"] for c in found] == ["circle-01", "broken-03", "circle-02"]
    assert "specs/shapes/basic.yaml:12" in found[0].all_text()


def test_cards_show_the_image_path_as_the_spec_wrote_it(report_dir, tmp_path):
    out, run_id, _ = report_dir
    spec = tmp_path / "specs" / "a.yaml"
    outside = tmp_path / "elsewhere" / "b.png"
    cases = [{**make_case(None, "inside", "passed"), "spec": str(spec), "image": str(spec.parent / "images" / "a.png")},
             {**make_case(None, "outside", "passed"), "spec": str(spec), "image": str(outside)}]
    R.write_report(out, run_dict(), cases, run_id)
    cards = [n for n in parse(out / "index.html").iter("article")]
    codes = [next(c for c in card.iter("code") if c.attrs.get("title")) for card in cards]
    assert [c.all_text() for c in codes] == ["images/a.png", str(outside)]
    assert codes[0].attrs["title"] == str(spec.parent / "images" / "a.png")   # the full path on hover


def test_write_report_images_exist_and_thumbnails_link_to_full_size(report_dir):
    out, run_id, asset_dir = report_dir
    root = parse(R.write_report(out, run_dict(), three_cases(asset_dir), run_id))
    imgs = list(root.iter("img"))
    assert len(imgs) >= 2 * 6
    for img in imgs:
        assert (out / img.attrs["src"]).is_file(), img.attrs["src"]
        assert int(img.attrs["width"]) > 0 and int(img.attrs["height"]) > 0
    links = [a for a in root.iter("a") if any(True for _ in a.iter("img"))]
    assert links and all((out / a.attrs["href"]).is_file() for a in links)
    failed = cards(root)[0]
    alts = {i.attrs["alt"] for i in failed.iter("img")}
    assert {"image with regions", "heatmap", "baseline heatmap", "overlay", "colour bar: 0 to 1",
            "feature maps of features.4"} <= alts


def test_write_report_shows_top_k_metrics_baseline_and_grids(report_dir):
    out, run_id, asset_dir = report_dir
    card = cards(parse(R.write_report(out, run_dict(), three_cases(asset_dir), run_id)))[0]
    topk = next(s for s in card.iter("section") if s.has_class("topk"))
    rows = list(next(topk.iter("tbody")).iter("tr"))
    assert len(rows) == 3
    assert rows[0].has_class("expected") and not rows[1].has_class("expected")
    bars = [s.attrs["style"] for s in topk.iter("span") if s.has_class("bar")]
    assert bars == ["width: 70.0%", "width: 20.0%", "width: 10.0%"]
    metrics = [m for m in card.iter("table") if m.has_class("metrics")]
    cells = [[td.all_text().strip() for td in tr.iter("td")] for tr in next(metrics[0].iter("tbody")).iter("tr")]
    assert cells == [["energy_inside", "0.31", ">=", "0.5", "-0.190", "FAIL"],
                     ["pointing_game", "1.00", ">=", "1", "+0.000", "pass"]]
    pres = [p.all_text() for p in card.iter("pre")]
    assert "energy inside the region 0.31 < 0.5" in pres
    baseline = next(s for s in card.iter("section") if s.has_class("baseline"))
    assert "circle → circle" in baseline.all_text()
    assert not [t for t in baseline.iter("table") if t.has_class("metrics")]   # the check's table says it once
    grid = next(s for s in card.iter("section") if s.has_class("grid"))
    assert "features.4: 12 maps of 16×16, showing 12" in grid.all_text()


def test_write_report_shows_errors_prominently_and_run_header(report_dir):
    out, run_id, asset_dir = report_dir
    root = parse(R.write_report(out, run_dict(), three_cases(asset_dir), run_id))
    err = next(c for c in cards(root) if c.attrs["data-outcome"] == "error")
    assert [p.all_text() for p in err.iter("pre") if p.has_class("error-message")] == [
        "ImageError: specs/shapes/img/c.png: truncated file"]
    header = next(h for h in root.iter("header") if h.has_class("run"))
    text = header.all_text()
    for needle in ["shapes_vgg", "shipped weights", "0123456789ab", "squash", "torch 2.3.0",
                   "torchvision 0.18.0", "model-audit 0.1.0", "4.25 s", "1 failed", "1 error", "1 passed"]:
        assert needle in text, needle
    assert "1 errors" not in text
    assert "0123456789abcdef0123" not in text    # fingerprint shortened
    assert "weights DEFAULT" not in text          # a zoo model's weights are the ones it ships with
    nav = next(n for n in root.iter("nav") if n.has_class("filters"))
    filters = [b.attrs["data-filter"] for b in nav.iter("button")]
    assert filters == ["all", "failed", "error", "passed", "skipped"]


def test_write_report_page_needs_nothing_from_the_network(report_dir):
    out, run_id, asset_dir = report_dir
    html = R.write_report(out, run_dict(), three_cases(asset_dir), run_id).read_text()
    assert "http://" not in html and "https://" not in html and "<link" not in html
    root = parse(out / "index.html")
    assert all("src" not in s.attrs for s in root.iter("script"))


def test_write_report_escapes_everything_from_specs_and_labels(report_dir):
    out, run_id, asset_dir = report_dir
    case = make_case(asset_dir, XSS, "failed", label=XSS, message=XSS)
    case["regions"]["region"] = XSS
    case["error"] = XSS
    run = run_dict()
    run["models"][0]["arch"] = XSS
    html = R.write_report(out, run, [case], run_id).read_text()
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    root = parse(out / "index.html")
    scripts = list(root.iter("script"))
    assert len(scripts) == 1 and "alert(1)" not in scripts[0].all_text()
    card = cards(root)[0]
    assert card.attrs["data-case-id"] == XSS     # attribute value, decoded by the parser: data, not markup
    assert XSS in card.all_text()


@pytest.mark.parametrize("value, expected", [(float("nan"), None), (float("inf"), None), (np.float64("nan"), None),
                                             (np.float32(0.5), 0.5), (Path("x"), "x"), (0.25, 0.25)])
def test_results_json_is_plain_json_with_null_for_nan_and_inf(value, expected):
    text = R._results_json({"args": []}, [{"case_id": "a", "checks": [{"metrics": [{"value": value}]}]}])
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["cases"][0]["checks"][0]["metrics"][0]["value"] == expected


def test_write_report_writes_results_json(report_dir):
    out, run_id, asset_dir = report_dir
    cases = three_cases(asset_dir)
    cases[0]["checks"][1]["metrics"][0]["value"] = np.float32(float("nan"))
    R.write_report(out, run_dict(), cases, run_id)
    data = json.loads((out / "results.json").read_text())
    assert data["schema_version"] == 1
    assert data["run"]["versions"]["torch"] == "2.3.0"
    assert [c["case_id"] for c in data["cases"]] == ["circle-01", "circle-02", "broken-03"]
    assert data["cases"][0]["checks"][1]["metrics"][0]["value"] is None
    assert data["cases"][0]["assets"]["grids"]["features.4"].startswith(f"assets/{run_id}/")


def test_write_report_removes_only_older_runs_we_created(tmp_path):
    out = tmp_path / "r"
    old_id, old_dir = R.new_run_dir(out)
    R.write_report(out, run_dict(), [make_case(old_dir, "a", "passed")], old_id)
    (out / "assets" / "mine").mkdir()
    (out / "notes.txt").write_text("keep")
    new_id, new_dir = R.new_run_dir(out)
    R.write_report(out, run_dict(), [make_case(new_dir, "a", "passed")], new_id)
    assert sorted(p.name for p in (out / "assets").iterdir()) == sorted(["mine", new_id])
    assert (out / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_crash_while_rendering_leaves_the_previous_report_intact(tmp_path, monkeypatch, exc):
    out = tmp_path / "r"
    old_id, old_dir = R.new_run_dir(out)
    R.write_report(out, run_dict(), [make_case(old_dir, "a", "passed")], old_id)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    new_id, new_dir = R.new_run_dir(out)
    cases = [make_case(new_dir, f"c{i}", "failed") for i in range(3)]
    real = report_page._case_view
    calls = []

    def explode_on_second(case, assets):
        calls.append(case["case_id"])
        if len(calls) == 2:
            raise exc
        return real(case, assets)

    monkeypatch.setattr(report_page, "_case_view", explode_on_second)   # _views looks it up there
    with pytest.raises(type(exc)):
        R.write_report(out, run_dict(), cases, new_id)
    assert calls == ["c0", "c1"]        # it really died midway through the page
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before              # same files, same bytes: no temp files, old page untouched
    assert (out / "assets" / old_id).is_dir()


def test_self_contained_report_is_one_file_with_inlined_pictures(report_dir):
    out, run_id, asset_dir = report_dir
    index = R.write_report(out, run_dict(), three_cases(asset_dir), run_id, self_contained=True)
    assert not (out / "assets").exists()
    assert sorted(p.name for p in out.iterdir()) == ["index.html", "results.json"]
    root = parse(index)
    imgs = list(root.iter("img"))
    assert len(imgs) >= 12
    for img in imgs:
        src = img.attrs["src"]
        assert src.startswith("data:image/"), src[:40]
        header, payload = src.split(",", 1)
        with Image.open(io.BytesIO(base64.b64decode(payload))) as im:
            im.load()
            assert im.size[0] > 0
    assert not [a for a in root.iter("a") if "assets/" in (a.attrs.get("href") or "")]


# ---------------------------------------------------------------------------------------------
# the page at many cases: numbers as written, margins, labels, one skip line, the case table


@pytest.mark.parametrize("threshold, text", [(0.999, "0.999"), (0.5, "0.5"), (0.1, "0.1"), (1, "1"),
                                             (0.12345, "0.12345"), (1e-05, "1e-05"), (None, "—")])
def test_thresholds_print_as_they_were_written(threshold, text):
    assert R.fmt_threshold(threshold) == text


@pytest.mark.parametrize("value, threshold, text", [(0.4996, 0.5, "0.4996"), (0.31, 0.5, "0.31"),
                                                    (0.9985, 0.999, "0.9985"), (0.99, 0.999, "0.990"),
                                                    (0.5, 0.5, "0.50"), (0.123456, None, "0.12")])
def test_values_keep_their_relation_to_the_threshold(value, threshold, text):
    shown = R.fmt_value(value, threshold)
    assert shown == text
    if threshold is not None:   # the printed value compares with the threshold as the value does
        assert (float(shown) < threshold) == (value < threshold) and (float(shown) > threshold) == (value > threshold)


@pytest.mark.parametrize("p, text", [(0.9996, "99.96%"), (1.0, "100.0%"), (0.5, "50.0%"), (0.99999, "99.999%")])
def test_probabilities_never_round_up_to_a_certainty(p, text):
    assert R.fmt_prob(p) == text


def test_case_table_row_has_worst_margin_per_check_and_labels_in_the_top1_metric(report_dir):
    out, run_id, asset_dir = report_dir
    case = make_case(asset_dir, "flip-01", "failed")
    case["k"] = 2
    case["checks"][0] = {"kind": "prediction", "outcome": "failed", "message": "top1 square", "duration_s": 0.0123,
                         "metrics": [{"name": "top1", "value": 1, "threshold": 0, "op": "==", "passed": False},
                                     {"name": "not_in_top_k[2]", "value": False, "threshold": None, "op": "",
                                      "passed": True},
                                     {"name": "min_prob", "value": 0.2, "threshold": 0.15, "op": ">=", "passed": True}]}
    root = parse(R.write_report(out, run_dict(), [case], run_id))
    table = next(t for t in root.iter("table") if t.attrs.get("id") == "cases")
    heads = [th.all_text().strip() for th in next(table.iter("thead")).iter("th")]
    assert heads == ["outcome", "case", "spec", "model", "top-1", "p", "prediction", "focus", "time"]
    row = next(next(table.iter("tbody")).iter("tr"))
    cells = [td.all_text().strip() for td in row.iter("td")]
    assert cells[6] == "FAIL" and cells[7] == "\u22120.190"           # worst margins: a flag, then a number
    assert cells[8] == "32 ms"                                       # durations in ms
    card = cards(root)[0]
    metrics = next(t for t in card.iter("table") if t.has_class("metrics"))
    rows = [[td.all_text().strip() for td in tr.iter("td")] for tr in next(metrics.iter("tbody")).iter("tr")]
    assert rows[0][:4] == ["top1", "square (#1)", "==", "circle (#0)"]   # labels, not indices
    assert rows[1][0] == "not_in_top_k[triangle]"
    topk = next(s for s in card.iter("section") if s.has_class("topk"))
    assert next(topk.iter("h3")).all_text().startswith("top-2")        # the spec's k, not the rows shown
    assert [tr.has_class("beyond") for tr in next(topk.iter("tbody")).iter("tr")] == [False, False, True]


def test_a_card_says_each_skip_reason_once(report_dir):
    out, run_id, asset_dir = report_dir
    case = make_case(asset_dir, "skip-01", "skipped", with_assets=False)
    for check in case["checks"]:
        check.update(outcome="skipped", metrics=[], message="weights vgg16 IMAGENET1K_V1 are not available offline")
    root = parse(R.write_report(out, run_dict(), [case], run_id))
    card = cards(root)[0]
    lines = [p.all_text() for p in card.iter("p") if p.has_class("skip-reason")]
    assert len(lines) == 1 and "prediction, focus: weights vgg16" in lines[0]
    assert not [s for s in card.iter("section") if s.has_class("check")]


def test_filter_buttons_count_cases_not_checks(report_dir):
    out, run_id, asset_dir = report_dir
    cases = [make_case(None, f"c{i}", "failed") for i in range(3)] + [make_case(None, "ok", "passed")]
    root = parse(R.write_report(out, run_dict({"passed": 4, "failed": 3, "error": 0, "skipped": 0}), cases, run_id))
    buttons = {b.attrs["data-filter"]: b.all_text() for b in root.iter("button") if "data-filter" in b.attrs}
    assert buttons["failed"] == "Failed (3)" and buttons["passed"] == "Passed (1)" and buttons["all"] == "All (4)"


def test_per_class_summary_counts_top1_and_focus_per_expected_class(report_dir):
    out, run_id, asset_dir = report_dir
    a = make_case(None, "a", "failed")
    b = make_case(None, "b", "passed")
    for c in (a, b):
        c["checks"][0]["metrics"] = [{"name": "top1", "value": 0, "threshold": 0, "op": "==", "passed": True}]
    b["checks"][1]["metrics"][0].update(value=0.8, passed=True)
    root = parse(R.write_report(out, run_dict(), [a, b], run_id))
    table = next(t for t in root.iter("table") if t.has_class("classes"))
    rows = [[td.all_text().strip() for td in tr.iter("td")] for tr in next(table.iter("tbody")).iter("tr")]
    assert rows == [["circle", "2", "2/2", "1/2", "0.56"]]


def test_results_json_streamed_a_case_at_a_time_is_the_whole_documents_json():
    run = {"args": ["specs/"], "duration_s": 1.5}
    cases = [{"case_id": "a", "checks": [{"metrics": [{"value": 0.25}]}]}, {"case_id": "b", "label": "é"}]
    whole = json.dumps({"schema_version": R.SCHEMA_VERSION, "run": run, "cases": cases}, ensure_ascii=False)
    assert R._results_json(run, cases) == whole
    assert json.loads(R._results_json(run, [])) == {"schema_version": R.SCHEMA_VERSION, "run": run, "cases": []}


def test_the_page_reads_cases_one_at_a_time_from_a_lazy_sequence(report_dir):
    """What the controller hands write_report parses a case when it is read: the page takes any sequence
    and reads each case only while it needs it (a first pass for the table, then one card at a time)."""
    out, run_id, asset_dir = report_dir
    built = three_cases(asset_dir)
    reads: list[int] = []

    class Lazy:
        def __len__(self):
            return len(built)

        def __getitem__(self, i):
            reads.append(i)
            return json.loads(json.dumps(built[i]))

        def __iter__(self):
            return (self[i] for i in range(len(self)))

    root = parse(R.write_report(out, run_dict(), Lazy(), run_id))
    assert len(cards(root)) == 3
    assert sorted(reads) == sorted([0, 1, 2] * 3)   # results.json, the table pass, the card pass


def test_the_picture_writer_holds_a_bounded_queue_and_still_reports_an_early_failure():
    """10,000 cases must not keep 10,000 futures (or a backlog of pixels): finished jobs are dropped as
    new ones come, at most MAX_PENDING wait, and a job that failed long before ``flush`` still fails it."""
    import threading

    from audit.report.assets import _AssetWriter

    writer = _AssetWriter()
    writer.MAX_PENDING = 4
    gate = threading.Event()

    def fail() -> None:
        raise OSError("disk full")

    writer.submit(fail)
    threading.Timer(0.3, gate.set).start()   # the jobs block until then: the queue fills up
    most = 0
    for _ in range(40):
        writer.submit(gate.wait, 5)
        most = max(most, len(writer._pending))
    assert most <= writer.MAX_PENDING
    with pytest.raises(OSError, match="disk full"):
        writer.flush()
    writer.flush()   # the failure is said once; a new run starts clean
    assert not writer._pending


def test_overview_of_a_set_with_many_classes_lists_confusions_instead_of_a_matrix():
    views = [{"expected_class": f"c{i}", "top1": {"label": f"c{i}" if i % 3 else "c0", "prob": 0.5 + i / 100},
              "energy": None} for i in range(30)]
    views.append({"expected_class": "c1", "top1": None, "energy": 0.95})   # an errored case: no top-1
    views.append({"expected_class": None, "top1": {"label": "c5", "prob": 1.0}, "energy": 1.0})
    out = report_page._overview(views)
    assert out["confusion"] is None   # 30 classes: no 30 x 30 table
    assert out["confusions"][0] == {"count": 1, "expected": "c1", "predicted": "error"}
    assert len(out["confusions"]) == 10 and all(c["expected"] != c["predicted"] for c in out["confusions"])
    probability, energy = out["histograms"]
    assert probability["n"] == 31 and [b["count"] for b in probability["bins"]][5:] == [10, 10, 10, 0, 1]
    assert energy["n"] == 2 and energy["bins"][-1]["count"] == 2   # 1.0 falls in the last bin
    small = report_page._overview(views[:3])
    assert small["confusion"]["columns"] == ["c0", "c1", "c2"]
    assert [[cell["count"] for cell in r["cells"]] for r in small["confusion"]["rows"]] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
