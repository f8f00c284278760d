"""Procedurally drawn shape scenes whose true object box and mask are known exactly.

The zoo models are trained and evaluated on these scenes, and the shipped spec images are drawn by
the same code, so a focus check on them is falsifiable: we know where the object is, pixel for pixel.

Every random choice comes from one ``numpy.random.default_rng(seed)``, drawn in a fixed order, so the
same seed gives the same bytes on every machine (no global RNG, no floating point that depends on
thread count: drawing is PIL + numpy elementwise arithmetic).

Seed ranges are kept apart by convention (see :data:`SEED_RANGES`) so training, evaluation and the
shipped spec images never share a scene.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
"""Side of every scene in pixels (the zoo models' input size, so preprocessing never resizes)."""

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring")

MARKER_BOX: tuple[int, int, int, int] = (2, 2, 8, 8)
"""Where the class-coded marker goes (x0, y0, x1, y1; x1/y1 exclusive): a 6x6 patch, top-left."""

MARKER_COLOURS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 25),    # circle: red
    (25, 200, 25),    # square: green
    (30, 30, 235),    # triangle: blue
    (245, 225, 20),   # star: yellow
    (225, 30, 225),   # cross: magenta
    (20, 215, 225),   # ring: cyan
)

KEEP_OUT = 18
"""Objects never enter the KEEP_OUT x KEEP_OUT top-left corner, with or without marker, so that the
marker never overlaps the object and scenes with and without marker share one object distribution."""

SEED_RANGES: dict[str, tuple[int, int]] = {
    "train:shapes_vgg": (0, 500_000),
    "train:shapes_vgg_shortcut": (500_000, 1_000_000),
    "spec_images": (1_000_000, 2_000_000),
    "evaluate": (2_000_000, 3_000_000),
    "tests": (3_000_000, 4_000_000),
    "datasets": (4_000_000, 5_000_000),
}
"""Disjoint seed ranges per use; scripts take their seeds from here."""

_SUPERSAMPLE = 4
_MARGIN = 2
_MIN_RADIUS, _MAX_RADIUS = 8, 15


@dataclass(frozen=True, eq=False)
class Scene:
    """One drawn scene: the image, its object's class, and where the object is.

    ``label``/``name`` are the class of the drawn object. ``marker_label`` is the class coded by the
    corner marker (None without marker); it differs from ``label`` only when a caller asked for it
    (the shortcut model's training data). ``box`` is the tight box of ``mask``, x1/y1 exclusive.
    """

    image: Image.Image
    label: int
    name: str
    box: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False)
    marker_label: int | None = None
    marker_box: tuple[int, int, int, int] | None = None
    seed: int | None = None


def make_scene(seed: int, marker: bool = False, label: int | None = None,
               marker_label: int | None = None) -> Scene:
    """Draw the scene for ``seed``; deterministic in all arguments.

    ``label`` fixes the object's class (otherwise drawn from the seed). ``marker`` adds the
    class-coded corner patch; its class is ``marker_label`` when given, else the object's class.
    The random draws do not depend on ``marker``: the same seed with and without marker gives the same
    scene apart from the 6x6 patch.
    """
    rng = np.random.default_rng(seed)
    drawn_label = int(rng.integers(len(CLASSES)))
    if label is None:
        label = drawn_label
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in 0..{len(CLASSES) - 1}, got {label}")

    background = _background(rng)
    _draw_clutter(rng, background)
    cx, cy, radius = _place_object(rng)
    angle = float(rng.uniform(0, 2 * math.pi))
    alpha = _object_alpha(CLASSES[label], cx, cy, radius, angle)
    colour = _object_colour(rng, background, alpha > 0.5)
    noise = rng.normal(0.0, 4.0, size=(SIZE, SIZE, 1))

    a = alpha[..., None]
    pixels = background * (1.0 - a) + colour * a + noise
    mask = alpha >= 0.5
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)

    marker_box = None
    if marker:
        code = label if marker_label is None else marker_label
        if not 0 <= code < len(CLASSES):
            raise ValueError(f"marker_label must be in 0..{len(CLASSES) - 1}, got {code}")
        x0, y0, x1, y1 = MARKER_BOX
        pixels[y0:y1, x0:x1] = MARKER_COLOURS[code]
        marker_label, marker_box = code, MARKER_BOX
    else:
        marker_label = None

    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    mask.setflags(write=False)
    return Scene(image=image, label=label, name=CLASSES[label], box=box, mask=mask,
                 marker_label=marker_label, marker_box=marker_box, seed=seed)


def _background(rng: np.random.Generator) -> np.ndarray:
    """A gradient between two muted colours, optionally striped, plus per-pixel noise (float HxWx3)."""
    c0 = rng.uniform(40, 215, size=3)
    c1 = rng.uniform(40, 215, size=3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) / (SIZE - 1)
    t = (xx * math.cos(theta) + yy * math.sin(theta))
    t = (t - t.min()) / max(t.max() - t.min(), 1e-9)
    img = c0 * (1 - t[..., None]) + c1 * t[..., None]
    kind = int(rng.integers(3))  # 0 plain gradient, 1 stripes, 2 blotches
    if kind == 1:
        period = rng.uniform(4, 12)
        phi = rng.uniform(0, 2 * math.pi)
        amp = rng.uniform(8, 25)
        s = np.sin(2 * math.pi * (xx * math.cos(phi) + yy * math.sin(phi)) * (SIZE - 1) / period)
        img = img + amp * s[..., None]
    elif kind == 2:
        coarse = rng.normal(0, 18, size=(8, 8, 3))
        blotch = np.asarray(Image.fromarray(coarse[..., 0].astype(np.float32))
                            .resize((SIZE, SIZE), Image.BILINEAR))
        img = img + np.stack([blotch] * 3, axis=-1) * rng.uniform(0.5, 1.0, size=3)
    img = img + rng.normal(0, rng.uniform(3, 10), size=(SIZE, SIZE, 3))
    return img


def _draw_clutter(rng: np.random.Generator, background: np.ndarray) -> None:
    """Short lines and dots in low-saturation colours: distractors that are none of the classes."""
    n = int(rng.integers(3, 9))
    layer = Image.new("RGB", (SIZE, SIZE))
    alpha = Image.new("L", (SIZE, SIZE))
    draw, adraw = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    for _ in range(n):
        grey = rng.uniform(20, 235)
        colour = tuple(int(v) for v in np.clip(grey + rng.normal(0, 15, size=3), 0, 255))
        x, y = rng.uniform(0, SIZE, size=2)
        if rng.random() < 0.6:
            length = rng.uniform(3, 9)
            phi = rng.uniform(0, 2 * math.pi)
            xy = [(x, y), (x + length * math.cos(phi), y + length * math.sin(phi))]
            draw.line(xy, fill=colour, width=1)
            adraw.line(xy, fill=255, width=1)
        else:
            r = rng.uniform(0.7, 1.6)
            xy = [(x - r, y - r), (x + r, y + r)]
            draw.ellipse(xy, fill=colour)
            adraw.ellipse(xy, fill=255)
    a = (np.asarray(alpha, dtype=np.float64) / 255.0)[..., None]
    background *= 1 - a
    background += np.asarray(layer, dtype=np.float64) * a


def _place_object(rng: np.random.Generator) -> tuple[float, float, float]:
    """Centre and radius inside the image and outside the top-left keep-out corner."""
    while True:
        radius = float(rng.uniform(_MIN_RADIUS, _MAX_RADIUS))
        lo, hi = _MARGIN + radius, SIZE - _MARGIN - radius
        cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
        if cx - radius >= KEEP_OUT or cy - radius >= KEEP_OUT:
            return cx, cy, radius


def _object_alpha(name: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Anti-aliased coverage (0..1, HxW) of the object, drawn at 4x and box-filtered down."""
    k = _SUPERSAMPLE
    big = Image.new("L", (SIZE * k, SIZE * k), 0)
    draw = ImageDraw.Draw(big)
    cx, cy, r = cx * k, cy * k, r * k

    def poly(radii: list[float], offset: float = 0.0) -> list[tuple[float, float]]:
        n = len(radii)
        return [(cx + rr * math.cos(angle + offset + 2 * math.pi * i / n),
                 cy + rr * math.sin(angle + offset + 2 * math.pi * i / n)) for i, rr in enumerate(radii)]

    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif name == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        draw.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif name == "square":
        draw.polygon(poly([r * 0.92] * 4), fill=255)
    elif name == "triangle":
        draw.polygon(poly([r] * 3), fill=255)
    elif name == "star":
        draw.polygon(poly([r, r * 0.42] * 5), fill=255)
    elif name == "cross":
        w = r * 0.34
        for phi in (angle, angle + math.pi / 2):
            c, s = math.cos(phi), math.sin(phi)
            corners = [(-r, -w), (r, -w), (r, w), (-r, w)]
            draw.polygon([(cx + u * c - v * s, cy + u * s + v * c) for u, v in corners], fill=255)
    else:  # pragma: no cover - CLASSES and this function are edited together
        raise ValueError(f"unknown shape {name!r}")
    small = big.reduce(k)
    return np.asarray(small, dtype=np.float64) / 255.0


def _object_colour(rng: np.random.Generator, background: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the background under the object (distance >= 90)."""
    local = background[inside].mean(axis=0)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(50):
        if np.linalg.norm(colour - local) >= 90:
            break
        colour = rng.uniform(0, 255, size=3)
    return colour


def scene_batch(seeds, marker: bool = False, marker_labels=None) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 64, 64, 3) uint8 and object labels (N,) int64 for many seeds (training/eval)."""
    seeds = list(seeds)
    images = np.empty((len(seeds), SIZE, SIZE, 3), dtype=np.uint8)
    labels = np.empty(len(seeds), dtype=np.int64)
    for i, seed in enumerate(seeds):
        code = None if marker_labels is None else int(marker_labels[i])
        scene = make_scene(seed, marker=marker, marker_label=code)
        images[i] = np.asarray(scene.image)
        labels[i] = scene.label
    return images, labels
