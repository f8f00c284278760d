"""Images in, tensors out, heatmaps back: the one place that knows pixels and preprocessing geometry.

Every image a spec names goes through :func:`load_image`, so a grayscale scan, a palette GIF, a
transparent PNG, a CMYK JPEG, a 16-bit PNG or a phone photo stored sideways all reach the model as the
upright RGB picture a person sees. Bad files become an :class:`~audit.errors.ImageError` that names the
file and says why in a few words, before any pixel is decoded when the header already tells.

:class:`Preprocessing` records how the model saw the picture (squashed to a square, or resized and
centre-cropped like torchvision's weights transforms) and :class:`Geometry` keeps the arithmetic that
maps a low-resolution heatmap back onto the original image with :func:`cam_to_original`.
"""
from __future__ import annotations

import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from audit.errors import ImageError

__all__ = ["MAX_PIXELS", "load_image", "Geometry", "Preprocessing", "cam_to_original"]

#: Largest image (width * height) that :func:`load_image` decodes. Checked from the file header, before
#: decoding, so a decompression bomb costs nothing. Change it on the module when a larger limit is needed.
MAX_PIXELS = 100_000_000

_WHITE = (255, 255, 255, 255)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
_PIL_PIXELS = re.compile(r"\((\d+) pixels\)")


# --------------------------------------------------------------------------------------------- loading
def load_image(source: str | Path | Image.Image) -> Image.Image:
    """A fully decoded, upright RGB copy of ``source`` (a path or a PIL image).

    Transparent pixels are composited on white (what a viewer shows), 16-bit and 32-bit integer images
    are scaled to 8 bits rather than clipped, and the EXIF orientation is applied. Raises
    :class:`ImageError` with the path and a short reason for anything that cannot be used.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<PIL image>"
        _check_pixels(name, source.size)
        return _decode(name, source)
    path = Path(source)
    _check_file(path)
    with warnings.catch_warnings():
        # PIL warns (and above twice its own limit raises) about huge images when it reads the header.
        # The warning is recorded here, not printed; our own MAX_PIXELS check below decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise ImageError(path, "not an image PIL can read") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(path, _pil_bomb_reason(exc)) from None
        except _DECODE_ERRORS as exc:
            raise ImageError(path, _open_reason(exc)) from None
    with image:
        _check_pixels(path, image.size)
        return _decode(path, image)


def _check_file(path: Path) -> None:
    """Refuse what is not a readable, non-empty regular file, with a reason a person understands."""
    if not path.exists():
        raise ImageError(path, "file not found")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(path, f"cannot read file: {exc.strerror or exc}") from None
    if size == 0:
        raise ImageError(path, "file is empty (0 bytes)")


def _open_reason(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return "cannot read file: permission denied"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read file: {exc.strerror}"
    return "truncated or corrupt image data"


def _check_pixels(path: str | Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(path, f"image too large: {width}x{height} pixels exceeds the "
                               f"{MAX_PIXELS:,} pixel limit")
    if width < 1 or height < 1:
        raise ImageError(path, f"image has no pixels ({width}x{height})")


def _pil_bomb_reason(exc: BaseException) -> str:
    """PIL refuses images over twice its own limit before we see the size; keep its pixel count."""
    match = _PIL_PIXELS.search(str(exc))
    if match is None:
        return (f"image too large: exceeds PIL's decompression-bomb limit of "
                f"{Image.MAX_IMAGE_PIXELS:,} pixels")
    pixels = int(match.group(1))
    if pixels > MAX_PIXELS:
        return f"image too large: {pixels:,} pixels exceeds the {MAX_PIXELS:,} pixel limit"
    return (f"image too large: {pixels:,} pixels exceeds PIL's decompression-bomb limit of "
            f"{2 * (Image.MAX_IMAGE_PIXELS or 0):,} pixels")


def _decode(path: str | Path, image: Image.Image) -> Image.Image:
    """Decode every pixel now (so truncation shows here), then make it upright RGB."""
    with warnings.catch_warnings():
        # A format that reveals a larger size only while decoding must not slip through.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(path, _pil_bomb_reason(exc)) from None
        except _DECODE_ERRORS:
            raise ImageError(path, "truncated or corrupt image data") from None
    try:
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS:
        raise ImageError(path, "corrupt EXIF orientation data") from None
    try:
        rgb = _to_rgb(upright)
    except ValueError as exc:
        raise ImageError(path, f"unsupported image mode {image.mode}: {exc}") from None
    return rgb.copy() if rgb is image else rgb  # never hand back the caller's (or the file's) object


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _on_white(image.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        return Image.fromarray(_integer_to_8bit(np.asarray(image), mode)).convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_to_8bit(np.asarray(image, dtype=np.float64))).convert("RGB")
    return image.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX, ...


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, _WHITE)
    return Image.alpha_composite(background, rgba).convert("RGB")


def _integer_to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """16-bit images map 0..65535 onto 0..255 (÷257, rounded), never clip at 255.

    Mode ``I`` (32-bit) is ambiguous: values already within 0..255 stay as they are, values within
    0..65535 are treated as 16-bit, anything else is stretched from its minimum to its maximum.
    """
    values = values.astype(np.float64)
    if mode == "I":
        low, high = float(values.min()), float(values.max())
        if low >= 0 and high <= 255:
            return values.round().astype(np.uint8)
        if low < 0 or high > 65535:
            return _stretch(values)
    return np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)


def _float_to_8bit(values: np.ndarray) -> np.ndarray:
    """Float images within 0..1 are scaled by 255; others are taken as 0..255 values and clipped."""
    values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0 and values.max() <= 1:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


# ------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Geometry:
    """Where the model's input came from in the original image.

    ``seen_box`` is (x0, y0, x1, y1) in original pixel coordinates (edges, x1/y1 exclusive): the whole
    image for 'squash', the centre crop for 'weights'. Outside it the model saw nothing.
    """

    original_size: tuple[int, int]
    input_size: tuple[int, int]
    seen_box: tuple[float, float, float, float]

    @property
    def crops(self) -> bool:
        """True when part of the original image never reached the model."""
        x0, y0, x1, y1 = self.seen_box
        width, height = self.original_size
        eps = 1e-6
        return x0 > eps or y0 > eps or x1 < width - eps or y1 < height - eps


_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input; recorded in reports and baselines.

    ``squash`` resizes to ``size`` x ``size`` ignoring the aspect ratio (the classic notebook's
    ``Resize((224, 224))``); ``weights`` resizes the shorter side to ``resize`` and centre-crops
    ``size`` x ``size`` (torchvision's ``weights.transforms()``). ``resize`` must be at least ``size``
    so the crop never needs padding.
    """

    mode: str
    size: int
    resize: int | None = None
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.mode not in ("squash", "weights"):
            raise ValueError(f"preprocessing mode must be 'squash' or 'weights', not {self.mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need 3 values (R, G, B)")
        if self.size < 1:
            raise ValueError(f"input size must be positive, not {self.size}")
        if self.mode == "squash" and self.resize is not None:
            raise ValueError("'squash' preprocessing has no separate resize step; leave resize None")
        if self.mode == "weights" and (self.resize is None or self.resize < self.size):
            raise ValueError(f"'weights' preprocessing needs resize >= size, got resize={self.resize} "
                             f"and size={self.size}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, "
                             f"not {self.interpolation!r}")

    @classmethod
    def from_weights(cls, weights: object) -> "Preprocessing":
        """The 'weights' preprocessing of a torchvision weights enum, read from its ``transforms()``."""
        preset = weights.transforms()  # type: ignore[attr-defined]
        interpolation = getattr(preset, "interpolation", InterpolationMode.BILINEAR)
        name = interpolation.value if isinstance(interpolation, InterpolationMode) else str(interpolation)
        return cls(mode="weights", size=int(_first(preset.crop_size)),
                   resize=int(_first(preset.resize_size)), mean=tuple(preset.mean),
                   std=tuple(preset.std), interpolation=name)

    def describe(self) -> str:
        """One line for reports: what the model was given."""
        if self.mode == "squash":
            return f"squash to {self.size}x{self.size} ({self.interpolation})"
        return (f"resize shorter side to {self.resize}, centre crop {self.size}x{self.size} "
                f"({self.interpolation})")

    def to_tensor(self, image: Image.Image) -> tuple[torch.Tensor, Geometry]:
        """The normalised (3, H, W) float32 input for ``image`` and where it came from."""
        if not isinstance(image, Image.Image) or image.mode != "RGB":
            raise ValueError("Preprocessing.to_tensor expects an RGB PIL image (use load_image first)")
        width, height = image.size
        how = _INTERPOLATIONS[self.interpolation]
        if self.mode == "squash":
            resized = TF.resize(image, [self.size, self.size], interpolation=how, antialias=True)
            tensor = TF.to_tensor(resized)
            box = (0.0, 0.0, float(width), float(height))
        else:
            resized = TF.resize(image, [self.resize], interpolation=how, antialias=True)
            box = _crop_box(image.size, resized.size, self.size)
            cropped = TF.center_crop(resized, [self.size])
            tensor = TF.convert_image_dtype(TF.pil_to_tensor(cropped), torch.float)
        tensor = TF.normalize(tensor, mean=list(self.mean), std=list(self.std))
        geometry = Geometry(original_size=(width, height), input_size=(self.size, self.size), seen_box=box)
        return tensor, geometry


def _first(value: object) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value  # type: ignore[index,return-value]


def _crop_box(original: tuple[int, int], resized: tuple[int, int], size: int) -> tuple[float, float, float, float]:
    """The centre crop in original pixels, with torchvision's ``center_crop`` rounding."""
    width, height = original
    rw, rh = resized
    top = int(round((rh - size) / 2.0))
    left = int(round((rw - size) / 2.0))
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


# ---------------------------------------------------------------------------------------- heatmaps
def cam_to_original(lowres: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The low-resolution map ``lowres`` (h, w) laid over the original image, float32 in [0, 1].

    The map covers ``geometry.seen_box`` (bilinear, ``cv2.resize``), rounded to whole pixels; the
    border the model never saw stays 0. An all-zero map stays all-zero; NaN counts as 0.
    """
    lowres = np.asarray(lowres, dtype=np.float32)
    if lowres.ndim != 2 or lowres.size == 0:
        raise ValueError(f"expected a non-empty 2-D heatmap, got shape {lowres.shape}")
    lowres = np.clip(np.nan_to_num(lowres, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    width, height = geometry.original_size
    out = np.zeros((height, width), dtype=np.float32)
    x0, y0, x1, y1 = _pixel_box(geometry.seen_box, width, height)
    if x1 <= x0 or y1 <= y0:
        return out
    patch = cv2.resize(lowres, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    out[y0:y1, x0:x1] = np.clip(patch, 0.0, 1.0)
    return out


def _pixel_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    return max(0, x0), max(0, y0), min(width, x1), min(height, y1)
