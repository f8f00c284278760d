"""Perturbations of a decoded original image: the counterfactuals behind the ``invariance`` check.

Every transform works on the decoded original (RGB PIL image) *before* preprocessing, so a variant's
heatmap maps back onto the original exactly like the original's does (docs/ARCHITECTURE.md, "audit/perturb.py"). Each
is a small function registered in :data:`TRANSFORMS` under the name a spec uses (``occlude``,
``paste``, ``hflip``, ``jpeg``, ``gaussian_blur``, ``brightness``, ``corruption``), and each is
deterministic: the same image, masks, parameter and seed give the same bytes (noise is drawn from a
seeded ``numpy.random.default_rng``; the ImageNet-C corruptions run under a seeded, then restored,
global numpy RNG because that library draws from it).

Occlusion must not add a cue of its own: a black box is a known confound (the model may react to the
box rather than to what it hides), so OpenCV inpainting is the default fill and the local mean the
next most honest one.

This module never imports torch: variants are plain PIL images, and the engine batches them with the
originals.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import cv2
import numpy as np
from PIL import Image, ImageEnhance

from audit.errors import AuditError, closest

FILLS: tuple[str, ...] = ("inpaint", "mean", "blur", "noise", "black")
"""How an occluded region is filled; ``inpaint`` (OpenCV Telea) is the honest default."""

DEFAULT_FILL = "inpaint"
INPAINT_RADIUS = 3
"""Neighbourhood (pixels) cv2.inpaint draws from; 3 is OpenCV's documented typical value."""

MEAN_RING_PX = 3
"""Width of the ring around a region whose mean colour fills it (``fill: mean``)."""


class PerturbError(AuditError):
    """A perturbation that cannot be applied as written (patch outside the image, bad quality, ...)."""


@dataclass(frozen=True)
class Applied:
    """A perturbed copy of an image and what was done to it.

    ``describe`` completes "top-1 circle 0.99 -> star 0.81 when ..." ("the avoid region is
    inpainted"). ``geometric`` transforms move pixels; ``map_heat`` maps a heatmap of the original onto
    the variant's frame (the flipped heatmap for ``hflip``) so the variant's own map can be compared
    with it. Photometric transforms leave ``map_heat`` None.
    """

    image: Image.Image
    describe: str
    geometric: bool = False
    map_heat: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Transform:
    """A registered transform: its spec name, whether it moves pixels, and the function applying it."""

    name: str
    geometric: bool
    apply: Callable[..., Applied]
    doc: str = ""


TRANSFORMS: dict[str, Transform] = {}


def register(name: str, geometric: bool = False) -> Callable[[Callable[..., Applied]], Callable[..., Applied]]:
    """Decorator adding a transform to :data:`TRANSFORMS` under ``name``."""

    def wrap(fn: Callable[..., Applied]) -> Callable[..., Applied]:
        TRANSFORMS[name] = Transform(name, geometric, fn, (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return wrap


def _rgb(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def _check_mask(mask: np.ndarray, image: Image.Image, what: str) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    w, h = image.size
    if mask.shape != (h, w):
        raise ValueError(f"{what} mask has shape {mask.shape}, the image is {w}x{h}")
    if not mask.any():
        raise PerturbError(f"cannot occlude {what}: the region contains no pixel")
    return mask


# --------------------------------------------------------------------------------------------- occlude


def fill_region(pixels: np.ndarray, mask: np.ndarray, fill: str = DEFAULT_FILL, seed: int = 0) -> np.ndarray:
    """``pixels`` (HxWx3 uint8) with the pixels under ``mask`` replaced according to ``fill``.

    inpaint: OpenCV's Telea inpainting from the surrounding pixels (no new edge, no new colour).
    mean: the mean colour of a ring of ``MEAN_RING_PX`` pixels around the region (the local mean; the
    image's mean when the region covers everything). blur: the region taken from a strongly blurred
    copy (sigma a tenth of the image's long side). noise: uniform noise from ``seed``. black: zeros
    (a known confound, kept for comparison with published occlusion studies).
    """
    if fill not in FILLS:
        raise PerturbError(f"unknown fill {fill!r}; use one of {', '.join(FILLS)}")
    out = pixels.copy()
    if fill == "inpaint":
        return cv2.inpaint(np.ascontiguousarray(pixels), mask.astype(np.uint8) * 255, INPAINT_RADIUS,
                           cv2.INPAINT_TELEA)
    if fill == "mean":
        kernel = np.ones((2 * MEAN_RING_PX + 1, 2 * MEAN_RING_PX + 1), np.uint8)
        ring = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ~mask
        source = pixels[ring] if ring.any() else pixels.reshape(-1, 3)
        out[mask] = np.rint(source.mean(axis=0)).astype(np.uint8)
    elif fill == "blur":
        sigma = max(1.0, 0.1 * max(pixels.shape[:2]))
        blurred = cv2.GaussianBlur(pixels, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)
        out[mask] = blurred[mask]
    elif fill == "noise":
        rng = np.random.default_rng(seed)
        out[mask] = rng.integers(0, 256, size=(int(mask.sum()), 3), dtype=np.uint8)
    else:  # black
        out[mask] = 0
    return out


@register("occlude")
def occlude(image: Image.Image, mask: np.ndarray, fill: str = DEFAULT_FILL, seed: int = 0,
            what: str = "the region") -> Applied:
    """Hide a region (bool mask, rows y) by filling it: the counterfactual "without this part"."""
    mask = _check_mask(mask, image, what)
    pixels = fill_region(_rgb(image), mask, fill, seed)
    verb = {"inpaint": "inpainted", "mean": "filled with its surroundings' mean colour",
            "blur": "blurred out", "noise": "filled with noise", "black": "blacked out"}[fill]
    return Applied(Image.fromarray(pixels), f"{what} is {verb}",
                   meta={"transform": "occlude", "fill": fill, "pixels": int(mask.sum())})


# ----------------------------------------------------------------------------------------------- paste


@register("paste")
def paste(image: Image.Image, patch: Image.Image, at: tuple[int, int], name: str = "the patch") -> Applied:
    """Paste a foreign patch with its top-left corner at ``at`` = (x, y): the ImageNet-W protocol.

    An RGBA/LA/P-with-transparency patch is alpha-composited; any other mode is pasted opaque. The
    patch must lie wholly inside the image: a clipped patch would test something else than written.
    """
    x, y = (int(v) for v in at)
    if (x, y) != tuple(at):
        raise PerturbError(f"paste position {list(at)} must be whole pixels")
    w, h = image.size
    pw, ph = patch.size
    if x < 0 or y < 0 or x + pw > w or y + ph > h:
        raise PerturbError(f"{name} ({pw}x{ph}) pasted at [{x}, {y}] goes outside the {w}x{h} image")
    base = image.convert("RGB")
    has_alpha = patch.mode in ("RGBA", "LA") or (patch.mode == "P" and "transparency" in patch.info)
    if has_alpha:
        rgba = patch.convert("RGBA")
        base.paste(rgba.convert("RGB"), (x, y), rgba.getchannel("A"))
    else:
        base.paste(patch.convert("RGB"), (x, y))
    return Applied(base, f"{name} is pasted at [{x}, {y}]",
                   meta={"transform": "paste", "at": [x, y], "size": [pw, ph]})


# ----------------------------------------------------------------------------------------- geometric


def _fliplr(heat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(heat[:, ::-1])


@register("hflip", geometric=True)
def hflip(image: Image.Image) -> Applied:
    """Mirror left-right; the heatmap of the mirrored image should be the mirrored heatmap."""
    flipped = image.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return Applied(flipped, "the image is flipped horizontally", geometric=True, map_heat=_fliplr,
                   meta={"transform": "hflip"})


# -------------------------------------------------------------------------------------- photometric


@register("jpeg")
def jpeg(image: Image.Image, quality: int) -> Applied:
    """Re-encode as JPEG at ``quality`` (1..95, PIL's scale) and decode again."""
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise PerturbError(f"jpeg quality must be a whole number in 1..95, got {quality!r}")
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as decoded:
        out = decoded.convert("RGB")
    return Applied(out, f"the image is JPEG-compressed at quality {quality}",
                   meta={"transform": "jpeg", "quality": quality})


@register("gaussian_blur")
def gaussian_blur(image: Image.Image, sigma: float) -> Applied:
    """Gaussian blur with standard deviation ``sigma`` pixels (OpenCV, reflected borders)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0 < sigma <= 100:
        raise PerturbError(f"gaussian_blur sigma must be a number in (0, 100] pixels, got {sigma!r}")
    pixels = cv2.GaussianBlur(_rgb(image), (0, 0), sigmaX=float(sigma), sigmaY=float(sigma),
                              borderType=cv2.BORDER_REFLECT_101)
    return Applied(Image.fromarray(pixels), f"the image is blurred (Gaussian, sigma {sigma:g} px)",
                   meta={"transform": "gaussian_blur", "sigma": float(sigma)})


@register("brightness")
def brightness(image: Image.Image, factor: float) -> Applied:
    """Scale brightness by ``factor`` (PIL ImageEnhance: 1 unchanged, 0.7 darker, 1.3 brighter)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 10:
        raise PerturbError(f"brightness factor must be a number in (0, 10], got {factor!r}")
    out = ImageEnhance.Brightness(image.convert("RGB")).enhance(float(factor))
    return Applied(out, f"the brightness is scaled by {factor:g}",
                   meta={"transform": "brightness", "factor": float(factor)})


# ---------------------------------------------------------------------------- ImageNet-C corruptions

CORRUPTION_SEVERITIES = (1, 2, 3, 4, 5)


@contextlib.contextmanager
def _pkg_resources_for_import() -> Iterator[None]:
    """Let ``imagecorruptions`` import where setuptools no longer ships ``pkg_resources``.

    imagecorruptions 1.1.2 (the maintained ImageNet-C implementation on PyPI) imports
    ``resource_filename`` from ``pkg_resources``, which setuptools >= 81 removed. Only for the
    duration of that import, a stand-in resolving package-relative paths is placed in
    ``sys.modules`` and removed again: nothing outside imagecorruptions' own namespace keeps it.
    """
    try:
        importlib.import_module("pkg_resources")
        yield
        return
    except ImportError:
        pass
    shim = types.ModuleType("pkg_resources")

    def resource_filename(package: str, resource: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[package].__file__), resource)

    shim.resource_filename = resource_filename  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = shim
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is shim:
            del sys.modules["pkg_resources"]


def _imagecorruptions() -> Any:
    if "imagecorruptions" in sys.modules:
        return sys.modules["imagecorruptions"]
    try:
        with _pkg_resources_for_import():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return importlib.import_module("imagecorruptions")
    except ImportError as exc:
        raise PerturbError("the corruption transform needs the imagecorruptions package: "
                           f"pip install 'model-audit[corruptions]' ({exc})") from None


def corruption_names() -> list[str]:
    """The 19 corruption names imagecorruptions knows (the 15 ImageNet-C ones and 4 extra)."""
    return list(_imagecorruptions().get_corruption_names("all"))


@contextlib.contextmanager
def _seeded_global_numpy(seed: int) -> Iterator[None]:
    """imagecorruptions draws from numpy's global RNG: seed it for the call, then restore its state."""
    state = np.random.get_state()
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        np.random.set_state(state)


@register("corruption")
def corruption(image: Image.Image, name: str, severity: int, seed: int = 0) -> Applied:
    """An ImageNet-C corruption (Hendrycks & Dietterich 2019) at severity 1..5, via imagecorruptions."""
    lib = _imagecorruptions()
    names = list(lib.get_corruption_names("all"))
    if name not in names:
        raise PerturbError(f"unknown corruption {name!r}; did you mean: "
                           + ", ".join(repr(n) for n in closest(str(name), names)))
    if isinstance(severity, bool) or severity not in CORRUPTION_SEVERITIES:
        raise PerturbError(f"corruption severity must be one of 1..5, got {severity!r}")
    pixels = _rgb(image)
    try:
        with _seeded_global_numpy(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = lib.corrupt(pixels, corruption_name=name, severity=severity)
    except (TypeError, AttributeError) as exc:
        # imagecorruptions 1.1.2 calls APIs that newer scikit-image / numpy removed (multichannel=,
        # np.float_) for glass_blur, gaussian_blur and fog: say so instead of a traceback.
        working = [n for n in names if n not in ("glass_blur", "gaussian_blur", "fog")]
        raise PerturbError(f"corruption {name!r} does not run with the installed imagecorruptions and its "
                           f"dependencies ({type(exc).__name__}: {exc}); use gaussian_blur: <sigma> for "
                           f"blur, or one of {', '.join(working)}") from None
    out = np.asarray(out)
    if out.shape[:2] != pixels.shape[:2]:
        # a few corruptions (frost, fog) crop or resize internally on small images: back to our size
        out = cv2.resize(out.astype(np.float32), (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_LINEAR)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Applied(Image.fromarray(out), f"ImageNet-C {name} at severity {severity} is applied",
                   meta={"transform": "corruption", "name": name, "severity": severity})
