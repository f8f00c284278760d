"""Properties that must hold for every input, checked with hypothesis on random heatmaps, boxes and bytes.

Metrics (docs/ARCHITECTURE.md, "audit/checks.py"): energy lies in [0, 1] and never drops when a region grows by a
union; with a unique maximum the pointing game at tolerance 0 is exactly "is the argmax inside R".
Feature grids: never NaN, the documented shape, each tile stretched to its own range. Spec loader: any
bytes at all (invalid UTF-8 included) give a Spec or a SpecError, nothing else.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from audit.checks import energy_inside, pointing_game
from audit.errors import SpecError
from audit.regions import region_mask
from audit.report import feature_grid, grid_columns
from audit.spec import is_spec_file, load_spec

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sizes = st.tuples(st.integers(1, 24), st.integers(1, 24))  # (width, height)
heat_values = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def box_in(draw, width: int, height: int) -> dict:
    x0 = draw(st.integers(0, width - 1))
    y0 = draw(st.integers(0, height - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y1 = draw(st.integers(y0 + 1, height))
    return {"box": [x0, y0, x1, y1]}


@st.composite
def heat_and_boxes(draw):
    width, height = draw(sizes)
    heat = draw(hnp.arrays(np.float32, (height, width), elements=heat_values))
    boxes = draw(st.lists(box_in(width, height), min_size=2, max_size=4))
    return heat, boxes, (width, height)


@st.composite
def heat_and_mask(draw):
    width, height = draw(sizes)
    heat = draw(hnp.arrays(np.float32, (height, width), elements=heat_values))
    mask = draw(hnp.arrays(np.bool_, (height, width)))
    assume(mask.any())
    return heat, mask


# ------------------------------------------------------------------------------------------- metrics

@PROPS
@given(heat_and_boxes())
def test_a_union_never_scores_below_any_of_its_parts(case):
    heat, boxes, size = case
    union = energy_inside(heat, region_mask(boxes, size, "."))
    for box in boxes:
        part = energy_inside(heat, region_mask(box, size, "."))
        assert union >= part - 1e-9, (box, part, union)
    assert union <= min(1.0, sum(energy_inside(heat, region_mask(b, size, ".")) for b in boxes)) + 1e-9


@PROPS
@given(heat_and_mask())
def test_energy_is_a_share_between_zero_and_one(case):
    heat, mask = case
    energy = energy_inside(heat, mask)
    assert 0.0 <= energy <= 1.0 and not math.isnan(energy)
    if not heat.any():
        assert energy == 0.0  # empty heatmap: nothing found, never NaN
    if mask.all() and heat.any():
        assert energy == pytest.approx(1.0)
    if heat.any():
        assert energy_inside(heat, mask) + (energy_inside(heat, ~mask) if (~mask).any() else 0.0) \
            == pytest.approx(1.0, abs=1e-6)


@PROPS
@given(heat_and_mask(), st.data())
def test_pointing_game_at_zero_tolerance_is_the_argmax_when_the_maximum_is_unique(case, data):
    heat, mask = case
    height, width = heat.shape
    assume(heat.size > 1)   # a one-pixel map is also uniform, and a uniform map points nowhere (its own test)
    y = data.draw(st.integers(0, height - 1))
    x = data.draw(st.integers(0, width - 1))
    heat = heat.copy()
    heat[y, x] = float(heat.max()) + 1.0  # a strict, unique maximum at (x, y)
    assert int(np.argmax(heat)) == y * width + x
    assert pointing_game(heat, mask, 0.0) == bool(mask[y, x])


# --------------------------------------------------------------------------------------------- grids

any_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)


@PROPS
@given(maps=hnp.arrays(np.float32, st.tuples(st.integers(1, 20), st.integers(1, 12), st.integers(1, 12)),
                       elements=any_floats),
       max_channels=st.none() | st.integers(1, 30), columns=st.none() | st.integers(1, 8),
       upscale=st.integers(1, 3))
def test_feature_grid_never_has_nan_and_has_the_documented_shape(maps, max_channels, columns, upscale):
    grid = feature_grid(maps, max_channels=max_channels, columns=columns, label=False, upscale=upscale)
    c, h, w = maps.shape
    n = c if max_channels is None else min(max_channels, c)
    cols = columns or grid_columns(n)
    rows = math.ceil(n / cols)
    th, tw = h * upscale, w * upscale
    assert grid.dtype == np.uint8 and grid.ndim == 2
    assert grid.shape == (rows * (th + 1) - 1, cols * (tw + 1) - 1)
    for i in range(n):  # each tile: its own min..max stretched to 0..255; constant (or non-finite) is black
        r, k = divmod(i, cols)
        tile = grid[r * (th + 1): r * (th + 1) + th, k * (tw + 1): k * (tw + 1) + tw]
        finite = np.nan_to_num(maps[i], nan=0.0, posinf=0.0, neginf=0.0).astype(np.float64)
        if np.ptp(finite) > 0:
            assert tile.min() == 0 and tile.max() == 255
        elif np.ptp(finite) == 0:
            assert (tile == 0).all()


@pytest.mark.parametrize("channel", [[-3e38, 0.0, 3e38], [0.0, 1e-45, 1e-45]], ids=["span-inf", "span-subnormal"])
def test_feature_grid_stretches_extreme_but_finite_channels_without_nan(channel):
    maps = np.array(channel, dtype=np.float32).reshape(1, 1, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        grid = feature_grid(maps, label=False)
    assert grid.shape == (1, 3) and grid.min() == 0 and grid.max() == 255


def test_feature_grid_of_zero_channels_is_an_empty_picture_not_a_crash():
    grid = feature_grid(np.zeros((0, 4, 4), np.float32))
    assert grid.dtype == np.uint8 and grid.ndim == 2


# ------------------------------------------------------------------------------------------ spec bytes

VALID = (b"model:\n  arch: shapes_vgg\ndefaults:\n  top_k: 3\ncases:\n  - id: a\n    image: img.png\n"
         b"    expect: {top1: circle}\n    focus: {region: {box: [0, 0, 5, 5]}}\n")
nasty = st.sampled_from([b"\xff", b"\xfe\xff", b"\xef\xbb\xbf", b"\x00", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80",
                         b"\t", b"\r", b"&a", b"*a", b"!!python/object:os.system", b"{", b"[", b"'", b'"',
                         b"\xf0\x9f\x90\x88", b"\x1b[2J", b"\\u0000", b"---\n", b"...\n", b": ", b"- "])


@st.composite
def spec_bytes(draw) -> bytes:
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 3))
        piece = draw(nasty | st.binary(min_size=1, max_size=4))
        data[at:at + cut] = piece
    return bytes(data)


@settings(max_examples=150, deadline=None)
@given(spec_bytes())
def test_the_loader_gives_a_spec_or_a_spec_error_for_any_bytes(content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "img.png").write_bytes(b"")
        path = Path(folder) / "fuzz.yaml"
        path.write_bytes(content)
        is_spec_file(path)  # never raises either
        try:
            load_spec(path)
        except SpecError as exc:
            assert str(exc).startswith(str(path)), str(exc)
            assert "Traceback" not in str(exc)


@pytest.mark.parametrize("content", [b"\xff\xfe" + "cases: []\n".encode("utf-16-le"),
                                     VALID.replace(b"circle", b"circ\xffle"),
                                     b"\xef\xbb\xbf" + VALID, VALID + b"\x00"])
def test_invalid_utf8_and_boms_give_a_spec_error_or_a_spec(tmp_path, content):
    (tmp_path / "img.png").write_bytes(b"")
    path = tmp_path / "odd.yaml"
    path.write_bytes(content)
    try:
        load_spec(path)
    except SpecError as exc:
        assert str(path) in str(exc)
