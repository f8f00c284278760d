"""Expected regions of a spec turned into pixel masks of the original image (pure numpy, no torch).

A spec names where the model should look (or must not look) as a box, a box in fractions of the image,
a polygon, a mask file, or a list of these (their union). Every focus metric compares a heatmap with a
boolean mask, so this module has one job: turn the spec's raw value into that mask, exactly and with
one pixel rule for every kind, and refuse regions that cannot be what the author meant.

Coordinates are those of the original image: x runs along columns, y along rows, (0, 0) is the top-left
corner of the top-left pixel, and pixel (x, y) covers [x, x+1) x [y, y+1), its centre at (x+0.5, y+0.5).

The pixel rule, the same for boxes and polygons: **a pixel is inside when its centre is inside**.
- box [x0, y0, x1, y1] (x1/y1 exclusive): pixel (x, y) is inside when x0 <= x+0.5 < x1 and
  y0 <= y+0.5 < y1; for integer corners that is simply x0 <= x < x1 and y0 <= y < y1. Fractional
  corners are allowed (box_rel produces them).
- polygon: even-odd rule on the pixel centre, with a half-open boundary (a centre exactly on a left or
  top edge is inside, on a right or bottom edge outside), so a rectangle written as a polygon selects
  exactly the pixels of the same box, and two polygons sharing an edge never both claim a pixel on it.
- mask file: non-zero pixels (any channel) are inside; the file must have the image's size.

Errors are ``SpecError`` without a location: the caller knows the spec line and adds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from audit.errors import SpecError, closest

KINDS = ("box", "box_rel", "polygon", "mask")
UNION = " \u222a "  # " ∪ "

Point = tuple[float, float]


# ------------------------------------------------------------------------------------------ typed regions

class Region:
    """A region parsed once from the spec (or a dataset annotation): it knows its mask, outline and name.

    ``mask`` and ``outline`` validate against the image (a region that leaves the image or holds no pixel
    centre is a ``SpecError``); ``describe`` never raises.
    """

    __slots__ = ()   # the shapes below keep slots: a golden set holds one region per annotated case

    def mask(self, image_size: tuple[int, int], base_dir: Path | str = ".") -> np.ndarray:
        raise NotImplementedError

    def outline(self, image_size: tuple[int, int], base_dir: Path | str = ".") -> list[list[Point]]:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def parts(self) -> tuple["Region", ...]:
        return (self,)

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, slots=True)
class Box(Region):
    """``[x0, y0, x1, y1]`` in pixels of the original image, x1/y1 exclusive; fractional corners allowed."""

    x0: float
    y0: float
    x1: float
    y1: float

    def _pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return _box(list(self.corners()), width, height, self._raw())

    def corners(self) -> tuple[float, float, float, float]:
        return (self.x0, self.y0, self.x1, self.y1)

    def _raw(self) -> dict:
        return {"box": list(self.corners())}

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        width, height = _check_size(image_size)
        return _require_pixels(_box_mask(self._pixels(width, height), width, height), self._raw())

    def outline(self, image_size, base_dir=".") -> list[list[Point]]:
        width, height = _check_size(image_size)
        return [_corners(self._pixels(width, height))]

    def describe(self) -> str:
        return f"box {_fmt_value(list(self.corners()))}"


@dataclass(frozen=True)
class RelBox(Box):
    """``[x0, y0, x1, y1]`` as fractions of the image's width and height, in [0, 1]."""

    def _raw(self) -> dict:
        return {"box_rel": list(self.corners())}

    def _pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        return _box_rel(list(self.corners()), width, height, self._raw())

    def describe(self) -> str:
        return f"box_rel {_fmt_value(list(self.corners()))}"


@dataclass(frozen=True, slots=True)
class Polygon(Region):
    """Points ``[[x, y], ...]`` in pixels; even-odd rule on pixel centres, half-open boundary."""

    points: tuple[Point, ...]

    def _checked(self, width: int, height: int) -> list[Point]:
        return _polygon([list(p) for p in self.points], width, height, {"polygon": self.points})

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        width, height = _check_size(image_size)
        return _require_pixels(_polygon_mask(self._checked(width, height), width, height), {"polygon": self.points})

    def outline(self, image_size, base_dir=".") -> list[list[Point]]:
        width, height = _check_size(image_size)
        points = self._checked(width, height)
        _require_pixels(_polygon_mask(points, width, height), {"polygon": self.points})
        return [[(float(x), float(y)) for x, y in points]]

    def describe(self) -> str:
        n = len(self.points)
        return f"polygon ({n} point{'s' if n != 1 else ''})"


@dataclass(frozen=True, slots=True)
class MaskFile(Region):
    """An image file of the image's size (relative to the spec's folder); non-zero pixels are inside."""

    path: str

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        width, height = _check_size(image_size)
        return _require_pixels(_mask_file(self.path, width, height, Path(base_dir), {"mask": self.path}),
                               {"mask": self.path})

    def outline(self, image_size, base_dir=".") -> list[list[Point]]:
        return _mask_contours(self.mask(image_size, base_dir))

    def describe(self) -> str:
        return f"mask {self.path}"


@dataclass(frozen=True, eq=False, slots=True)
class MaskArray(Region):
    """An in-memory bool mask (h, w) of the original image, e.g. a COCO segmentation decoded by pycocotools.

    ``name`` says where it came from in messages ("annotation 12 of instances.json").
    """

    array: np.ndarray
    name: str = "mask"

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        width, height = _check_size(image_size)
        arr = np.asarray(self.array, dtype=bool)
        if arr.shape != (height, width):
            raise SpecError(f"{self.name} is {arr.shape[1]}x{arr.shape[0]} but the image is "
                            f"{width}x{height}: a mask must have the image's size")
        return _require_pixels(arr.copy(), {"mask": self.name})

    def outline(self, image_size, base_dir=".") -> list[list[Point]]:
        return _mask_contours(self.mask(image_size, base_dir))

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class Union(Region):
    """The union of its parts; every part is validated on its own (a union never hides an empty part)."""

    members: tuple[Region, ...]

    def parts(self) -> tuple[Region, ...]:
        return tuple(p for m in self.members for p in m.parts())

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        width, height = _check_size(image_size)
        out = np.zeros((height, width), dtype=bool)
        for part in self.parts():
            out |= part.mask(image_size, base_dir)
        return out

    def outline(self, image_size, base_dir=".") -> list[list[Point]]:
        return [line for part in self.parts() for line in part.outline(image_size, base_dir)]

    def describe(self) -> str:
        return UNION.join(p.describe() for p in self.parts())


def parse(raw: Any) -> Region:
    """The typed region of a spec value: ``{box: ...}``, ``{box_rel: ...}``, ``{polygon: ...}``,
    ``{mask: file}``, a list of these (the union), or a :class:`Region` as it is.

    Checks what can be checked without the image (kinds, numbers, corner order, >= 3 polygon points);
    the image-dependent checks (inside the image, not empty) happen in ``mask``/``outline``.
    """
    if isinstance(raw, Region):
        return raw
    parts = _parts(raw)
    typed = [_typed(part) for part in parts]
    return typed[0] if len(typed) == 1 and isinstance(raw, dict) else Union(tuple(typed))


def _typed(part: dict) -> Region:
    kind, value = _kind(part)
    if kind in ("box", "box_rel"):
        x0, y0, x1, y1 = _numbers(value, 4, f"{kind} [x0, y0, x1, y1]")
        _order(x0, y0, x1, y1, part)
        if kind == "box_rel" and (min(x0, y0) < 0 or max(x1, y1) > 1):
            raise SpecError(f"{describe(part)} goes outside the image: box_rel values are fractions "
                            f"of the width and height, in [0, 1]")
        return (Box if kind == "box" else RelBox)(x0, y0, x1, y1)
    if kind == "polygon":
        if not isinstance(value, (list, tuple)) or len(value) < 3:
            raise SpecError(f"polygon must be a list of at least 3 [x, y] points, got {value!r}")
        return Polygon(tuple(tuple(_numbers(p, 2, "each polygon point [x, y]")) for p in value))  # type: ignore[misc]
    if kind == "mask":
        if isinstance(value, np.ndarray):
            return MaskArray(value)
        if not isinstance(value, (str, Path)) or not str(value):
            raise SpecError(f"mask must be the path of an image file, got {value!r}")
        return MaskFile(str(value))
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------- public

def region_mask(region: Any, image_size: tuple[int, int], base_dir: Path | str) -> np.ndarray:
    """The pixels of ``region`` (a spec value or a :class:`Region`) as a bool array (h, w) for an image of
    ``image_size`` = (w, h). Rows are y, columns x."""
    return parse(region).mask(image_size, base_dir)


def describe(region: Any) -> str:
    """Short text naming a region in messages and the report; never raises (it describes bad input too)."""
    if isinstance(region, Region):
        return region.describe()
    if isinstance(region, (list, tuple)):
        if not region:
            return "empty region list"
        return UNION.join(describe(part) for part in region)
    if not isinstance(region, dict):
        return f"region {region!r}"
    known = [k for k in KINDS if k in region]
    if len(known) != 1:
        return f"region {_fmt_value(region)}"
    kind = known[0]
    value = region[kind]
    if kind in ("box", "box_rel"):
        return f"{kind} {_fmt_value(value)}"
    if kind == "polygon":
        n = len(value) if isinstance(value, (list, tuple)) else 0
        return f"polygon ({n} point{'s' if n != 1 else ''})"
    return f"mask {value}"


def region_outline(region: Any, image_size: tuple[int, int], base_dir: Path | str) -> list[list[Point]]:
    """Closed outlines of ``region`` in original-image pixel coordinates, for drawing in the report.

    Boxes give their 4 corners (pixel edges, so [0, 0, w, h] frames the whole image), polygons their
    points as written, masks the contours of their pixels (``cv2.findContours``, outer boundaries and
    holes, through the centres of the boundary pixels). Validates like ``region_mask``.
    """
    return parse(region).outline(image_size, base_dir)


# ------------------------------------------------------------------------------------------- structure

def seen_box(image_size: tuple[int, int], preprocessing: Any) -> tuple[float, float, float, float]:
    """The part of the original image (x0, y0, x1, y1, pixel edges) the model sees under a preprocessing.

    ``preprocessing`` is duck-typed (``audit.images.Preprocessing``: ``mode``, ``size``, ``resize``):
    ``squash`` sees the whole image; ``weights`` resizes the shorter side to ``resize`` and crops the
    centre ``size`` x ``size``, with torchvision's rounding (the same box ``Preprocessing.to_tensor``
    reports, computed without touching a pixel, so a spec can be checked before the forward pass).
    """
    width, height = _check_size(image_size)
    if getattr(preprocessing, "mode", "squash") != "weights":
        return 0.0, 0.0, float(width), float(height)
    resize, size = int(preprocessing.resize), int(preprocessing.size)
    short, long_ = (width, height) if width <= height else (height, width)
    new_long = int(resize * long_ / short)   # torchvision's resize of the shorter side
    rw, rh = (resize, new_long) if width <= height else (new_long, resize)
    top, left = int(round((rh - size) / 2.0)), int(round((rw - size) / 2.0))
    sx, sy = width / rw, height / rh
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def check_seen(mask: np.ndarray, seen: Sequence[float], what: str, role: str = "region") -> None:
    """Refuse a region the model never sees: no pixel of ``mask`` has its centre inside ``seen``.

    Such a region makes its checks meaningless: an avoid region there always passes (no heat can fall
    outside the input), an expected region always fails. ``what`` names it as the spec wrote it
    (``describe``); ``role`` is "region" or "avoid". Raises ``SpecError`` without a location.
    """
    h, w = mask.shape
    x0, y0, x1, y1 = (float(v) for v in seen)
    cols = (np.arange(w) + 0.5 >= x0) & (np.arange(w) + 0.5 < x1)
    rows = (np.arange(h) + 0.5 >= y0) & (np.arange(h) + 0.5 < y1)
    if mask[np.ix_(rows, cols)].any():
        return
    never = "always pass" if role == "avoid" else "never pass"
    raise SpecError(f"{what} lies entirely outside the part of the {w}x{h} image the model sees "
                    f"(x {_fmt_num(round(x0, 1))}..{_fmt_num(round(x1, 1))}, y {_fmt_num(round(y0, 1))}.."
                    f"{_fmt_num(round(y1, 1))} after the centre crop of preprocess: weights), so its check would "
                    f"{never}; move it inside that part, or use preprocess: squash")


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive (w, h), got {image_size!r}")
    return width, height


def _parts(region: Any) -> list[dict]:
    """The dicts of a region or of a (possibly nested) union, in order."""
    if isinstance(region, dict):
        return [region]
    if isinstance(region, (list, tuple)):
        if not region:
            raise SpecError("region list is empty: give at least one box, box_rel, polygon or mask")
        parts: list[dict] = []
        for item in region:
            parts.extend(_parts(item))
        return parts
    raise SpecError(f"a region is a mapping such as {{box: [x0, y0, x1, y1]}} or a list of them, "
                    f"got {region!r}")


def _kind(part: dict) -> tuple[str, Any]:
    known = [k for k in KINDS if k in part]
    if len(known) == 1 and len(part) == 1:
        return known[0], part[known[0]]
    if len(known) > 1:
        raise SpecError(f"a region has exactly one kind, got {', '.join(known)} together; "
                        f"use a list of regions for a union")
    unknown = [k for k in part if k not in KINDS]
    if not unknown:
        raise SpecError("region is empty: give one of box, box_rel, polygon, mask")
    hint = closest(str(unknown[0]), KINDS, n=1)
    msg = f"unknown region kind {unknown[0]!r}; expected one of {', '.join(KINDS)}"
    if hint:
        msg += f" (did you mean {hint[0]!r}?)"
    raise SpecError(msg)


def _require_pixels(mask: np.ndarray, part: dict) -> np.ndarray:
    if not mask.any():
        raise SpecError(f"region {describe(part)} is empty: it contains no pixel centre")
    return mask


# ----------------------------------------------------------------------------------------------- boxes

def _numbers(value: Any, n: int, what: str) -> list[float]:
    ok = (isinstance(value, (list, tuple)) and len(value) == n
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                  for v in value))
    if not ok:
        raise SpecError(f"{what} must be {n} numbers, got {value!r}")
    return [float(v) for v in value]


def _box(value: Any, width: int, height: int, part: dict) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = _numbers(value, 4, "box [x0, y0, x1, y1]")
    _order(x0, y0, x1, y1, part)
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
        raise SpecError(f"{describe(part)} goes outside the {width}x{height} image "
                        f"(x must lie in [0, {width}], y in [0, {height}])")
    return x0, y0, x1, y1


def _box_rel(value: Any, width: int, height: int, part: dict) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = _numbers(value, 4, "box_rel [x0, y0, x1, y1]")
    _order(x0, y0, x1, y1, part)
    if min(x0, y0) < 0 or max(x1, y1) > 1:
        raise SpecError(f"{describe(part)} goes outside the image: box_rel values are fractions "
                        f"of the width and height, in [0, 1]")
    return x0 * width, y0 * height, x1 * width, y1 * height


def _order(x0: float, y0: float, x1: float, y1: float, part: dict) -> None:
    if x0 > x1 or y0 > y1:
        raise SpecError(f"{describe(part)} has its corners swapped: expected [x0, y0, x1, y1] "
                        f"with x0 < x1 and y0 < y1 (x runs along columns, y along rows)")
    if x0 == x1 or y0 == y1:
        raise SpecError(f"region {describe(part)} is empty")


def _box_mask(box: tuple[float, float, float, float], width: int, height: int) -> np.ndarray:
    """Pixels whose centre c satisfies x0 <= c < x1 (same for y): indices ceil(x0-0.5) .. ceil(x1-0.5)-1."""
    x0, y0, x1, y1 = box
    mask = np.zeros((height, width), dtype=bool)
    xs, xe = math.ceil(x0 - 0.5), math.ceil(x1 - 0.5)
    ys, ye = math.ceil(y0 - 0.5), math.ceil(y1 - 0.5)
    mask[max(ys, 0):max(ye, 0), max(xs, 0):max(xe, 0)] = True
    return mask


def _corners(box: tuple[float, float, float, float]) -> list[Point]:
    x0, y0, x1, y1 = box
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# -------------------------------------------------------------------------------------------- polygons

def _polygon(value: Any, width: int, height: int, part: dict) -> list[Point]:
    if not isinstance(value, (list, tuple)) or len(value) < 3:
        raise SpecError(f"polygon must be a list of at least 3 [x, y] points, got {value!r}")
    points = [tuple(_numbers(p, 2, "each polygon point [x, y]")) for p in value]
    outside = [p for p in points if not (0 <= p[0] <= width and 0 <= p[1] <= height)]
    if outside:
        x, y = outside[0]
        raise SpecError(f"{describe(part)} goes outside the {width}x{height} image: point "
                        f"[{_fmt_num(x)}, {_fmt_num(y)}] (x must lie in [0, {width}], y in [0, {height}])")
    return points  # type: ignore[return-value]


def _polygon_mask(points: Sequence[Point], width: int, height: int) -> np.ndarray:
    """Even-odd crossing test (PNPOLY) on pixel centres, vectorised over the polygon's bounding box.

    A horizontal ray from the centre to +x crosses edge (a, b) when exactly one end is strictly below
    the centre's y (``(ya > cy) != (yb > cy)``) and the crossing lies strictly right of it. This
    half-open rule makes left/top edges inclusive and right/bottom edges exclusive, like boxes.
    """
    pts = np.asarray(points, dtype=np.float64)
    mask = np.zeros((height, width), dtype=bool)
    xs = np.arange(max(math.floor(pts[:, 0].min()) - 1, 0), min(math.ceil(pts[:, 0].max()) + 1, width))
    ys = np.arange(max(math.floor(pts[:, 1].min()) - 1, 0), min(math.ceil(pts[:, 1].max()) + 1, height))
    if xs.size == 0 or ys.size == 0:
        return mask
    cx = xs[None, :] + 0.5
    cy = ys[:, None] + 0.5
    inside = np.zeros((ys.size, xs.size), dtype=bool)
    for (xa, ya), (xb, yb) in zip(pts, np.roll(pts, -1, axis=0)):
        if ya == yb:
            continue  # horizontal edges never straddle a ray
        straddles = (ya > cy) != (yb > cy)  # (rows, 1)
        x_cross = xa + (cy - ya) * (xb - xa) / (yb - ya)  # (rows, 1)
        inside ^= straddles & (cx < x_cross)
    mask[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] = inside
    return mask


# ----------------------------------------------------------------------------------------------- masks

def _mask_file(value: Any, width: int, height: int, base_dir: Path, part: dict) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not isinstance(value, (str, Path)) or not str(value):
        raise SpecError(f"mask must be the path of an image file, got {value!r}")
    path = Path(value) if Path(value).is_absolute() else base_dir / value
    if not path.is_file():
        raise SpecError(f"mask file {value} not found (looked for {path})")
    try:
        with Image.open(path) as img:
            # the size check comes from the header, before decoding: a wrong or huge file costs nothing
            size = _upright_size(img)
            if size != (width, height):
                raise SpecError(f"mask {value} is {size[0]}x{size[1]} but the image is {width}x{height}: "
                                f"a mask must have the image's size")
            img = ImageOps.exif_transpose(img)
            if img.mode == "P":
                img = img.convert("RGBA")  # palette index 0 is not necessarily black
            pixels = np.asarray(img)
    except SpecError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SpecError(f"mask file {value} cannot be read ({path}): {exc}") from None
    return pixels.any(axis=2) if pixels.ndim == 3 else pixels != 0


def _upright_size(img: Any) -> tuple[int, int]:
    """The size after EXIF rotation, as the image loader sees the photo."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not the spec author's concern here
        orientation = 1
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _mask_contours(mask: np.ndarray) -> list[list[Point]]:
    import cv2

    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    return [[(float(x) + 0.5, float(y) + 0.5) for x, y in c.reshape(-1, 2)] for c in contours]


# ------------------------------------------------------------------------------------------ formatting

def _fmt_num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return str(int(v))
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _fmt_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt_value(v)}" for k, v in value.items()) + "}"
    return _fmt_num(value)
