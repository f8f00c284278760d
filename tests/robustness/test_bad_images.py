"""Bad and unusual image files, generated here, each in a spec beside two good shipped scenes.

Broken files (empty, truncated, not an image, absurd dimensions) must error their own case with the path
and a reason, while the good cases still pass and the report stays valid. Valid but unusual files
(1x1, 10000x10, 16-bit, CMYK, palette with transparency, EXIF-rotated) must load and run.
"""
from __future__ import annotations

import io
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from audit.errors import ImageError
from audit.images import load_image

from .conftest import (SHAPES, assert_good_cases_passed, assert_no_traceback, check_report, good_cases,
                       outcomes_of, run_with_report, write_spec)

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


# ------------------------------------------------------------------------------------------ makers

def _scene() -> Image.Image:
    with Image.open(SHAPES / "circle-01.png") as im:
        return im.convert("RGB")


def _encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(width: int, height: int) -> bytes:
    """A PNG that is all header: a valid IHDR (with its CRC) claiming width x height RGB, a tiny IDAT, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
            + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b""))


def truncated_jpeg() -> bytes:
    data = _encoded(_scene(), "JPEG", quality=95)
    return data[: len(data) // 2]


def truncated_png() -> bytes:
    data = _encoded(_scene(), "PNG")
    return data[: len(data) // 2]


def sixteen_bit() -> bytes:
    grey = np.asarray(_scene().convert("L"), dtype=np.uint16) * 257
    image = Image.fromarray(grey)
    assert image.mode.startswith("I;16")
    return _encoded(image, "PNG")


def cmyk_jpeg() -> bytes:
    image = _scene().convert("CMYK")
    return _encoded(image, "JPEG", quality=95)


def palette_with_transparency() -> bytes:
    image = _scene().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = _encoded(image, "PNG", transparency=int(np.asarray(image)[0, 0]))
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "P" and "transparency" in check.info
    return data


def exif_rotated() -> bytes:
    """Stored 64 wide x 32 high, with EXIF orientation 6: a viewer shows it 32 wide x 64 high."""
    stored = _scene().crop((0, 16, 64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encoded(stored, "JPEG", quality=95, exif=exif.tobytes())


def solid(width: int, height: int) -> Callable[[], bytes]:
    def make() -> bytes:
        return _encoded(Image.new("RGB", (width, height), (200, 30, 30)), "PNG")
    return make


BROKEN = [
    pytest.param("zero.jpg", lambda: b"", "empty", id="zero-bytes"),
    pytest.param("half.jpg", truncated_jpeg, "truncated", id="truncated-jpeg"),
    pytest.param("half.png", truncated_png, "truncated", id="truncated-png"),
    pytest.param("notes.jpg", lambda: b"shopping list: milk, eggs\n" * 20, "not an image", id="text-named-jpg"),
    pytest.param("bomb.png", lambda: png_header(50_000, 50_000), "too large", id="decompression-bomb-header"),
    pytest.param("big.png", lambda: png_header(12_000, 10_000), "too large", id="over-our-pixel-limit"),
]

UNUSUAL = [
    pytest.param("one.png", solid(1, 1), [1, 1], id="1x1"),
    pytest.param("wide.png", solid(10_000, 10), [10_000, 10], id="10000x10"),
    pytest.param("deep.png", sixteen_bit, [64, 64], id="16-bit"),
    pytest.param("cmyk.jpg", cmyk_jpeg, [64, 64], id="cmyk"),
    pytest.param("palette.png", palette_with_transparency, [64, 64], id="palette-transparency"),
    pytest.param("rotated.jpg", exif_rotated, [32, 64], id="exif-rotated"),
]


def bad_case(name: str) -> dict:
    """A case on the generated image, with a region that fits any image size."""
    return {"id": "odd", "image": f"images/{name}", "expect": {"top1": "circle"},
            "focus": {"region": {"box_rel": [0, 0, 1, 1]}, "min_energy": 0.5}}


def _run(pytester: pytest.Pytester, scenes: dict, name: str, content: bytes) -> tuple[pytest.RunResult, Path]:
    image = pytester.path / "images" / name
    image.write_bytes(content)
    write_spec(pytester, "img.yaml", [good_cases(scenes)[0], bad_case(name), good_cases(scenes)[1]])
    return run_with_report(pytester), image


# ------------------------------------------------------------------------------------------- broken

@pytest.mark.parametrize("name, make, reason", BROKEN)
def test_broken_image_errors_its_own_case_with_path_and_reason(pytester, scenes, name, make, reason):
    result, _ = _run(pytester, scenes, name, make())
    assert_good_cases_passed(result, "img.yaml", scenes)
    assert outcomes_of(result, "img.yaml::odd::") == {"img.yaml::odd::prediction": "error",
                                                      "img.yaml::odd::focus": "error"}
    out = result.stdout.str()
    message_lines = [line for line in out.splitlines() if f"images/{name}" in line and reason in line]
    assert message_lines and all("img.yaml:" in line for line in message_lines), out[-3000:]
    assert_no_traceback(result)
    report = check_report(pytester, ["circle-01", "odd", "square-01"])
    odd = report.case("odd")
    assert odd["outcome"] == "error" and f"images/{name}" in odd["error"] and reason in odd["error"]
    assert {c["outcome"] for c in odd["checks"]} == {"error"}
    assert report.case("circle-01")["outcome"] == "passed"


@pytest.mark.parametrize("width, height", [(50_000, 50_000), (2**31 - 1, 2**31 - 1), (12_000, 10_000)])
def test_decompression_bomb_header_is_refused_fast_without_allocating(tmp_path, width, height):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(width, height))
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(ImageError, match="too large") as info:
            load_image(path)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seconds < 2.0
    assert peak < 16 * 2**20, f"refusing a {width}x{height} header allocated {peak / 2**20:.0f} MiB"
    message = str(info.value)
    assert str(path) in message and f"{width}x{height}" in message or f"{width * height:,} pixels" in message
    assert "limit" in message


# ------------------------------------------------------------------------------------------ unusual

@pytest.mark.parametrize("name, make, upright", UNUSUAL)
def test_unusual_but_valid_image_loads_and_runs(pytester, scenes, name, make, upright):
    result, _ = _run(pytester, scenes, name, make())
    assert_good_cases_passed(result, "img.yaml", scenes)
    odd = outcomes_of(result, "img.yaml::odd::")
    assert set(odd) == {"img.yaml::odd::prediction", "img.yaml::odd::focus"}
    assert "error" not in odd.values() and "skipped" not in odd.values(), (odd, result.stdout.str()[-3000:])
    assert_no_traceback(result)
    report = check_report(pytester, ["circle-01", "odd", "square-01"])
    case = report.case("odd")
    assert case["error"] is None and case["image_size"] == upright
    assert case["assets"].get("overlay") and case["assets"].get("heatmap")
    # box_rel [0, 0, 1, 1] is the whole image: all of a non-empty heatmap lies inside it
    focus = next(c for c in case["checks"] if c["kind"] == "focus")
    energy = next(m for m in focus["metrics"] if m["name"] == "energy_inside")
    assert energy["value"] == pytest.approx(1.0) or "empty heatmap" in focus["message"]


def test_exif_rotation_is_applied_to_the_pixels_not_only_the_size(tmp_path):
    path = tmp_path / "rotated.jpg"
    path.write_bytes(exif_rotated())
    upright = np.asarray(load_image(path), dtype=np.int16)
    expected = np.asarray(_scene().crop((0, 16, 64, 48)).transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert upright.shape == expected.shape == (64, 32, 3)
    assert np.abs(upright - expected).mean() < 8  # JPEG noise only; a wrong rotation differs by far more


def test_sixteen_bit_image_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    path.write_bytes(sixteen_bit())
    loaded = np.asarray(load_image(path))
    grey = np.asarray(_scene().convert("L"))
    assert np.array_equal(loaded[..., 0], grey) and np.array_equal(loaded[..., 2], grey)


def test_transparent_palette_pixels_are_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    path.write_bytes(palette_with_transparency())
    with Image.open(path) as raw:
        transparent = np.asarray(raw) == raw.info["transparency"]
    loaded = np.asarray(load_image(path))
    assert transparent.any() and (loaded[transparent] == 255).all()
