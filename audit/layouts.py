"""Layer output layouts: how a layer's output maps onto a spatial grid, decided before any CAM method runs.

Why a module of its own: a CAM method needs a (B, C, h, w) map, and reading a channels-last Swin stage
(B, 7, 7, 768) or a ViT token sequence (B, 197, 768) as channels-first gives a "heatmap" of no meaning
without any error. So the layout of a layer is decided first, from the model family when we know it
(torchvision ViT / Swin / ConvNeXt blocks / MaxViT windows, timm's ``num_prefix_tokens``), else from the
shapes, and anything that is not unambiguously a grid of at least 2x2 cells is refused with one line
that names the layer, its output shape and layers that would work.

Shape rules (the model input is square: every preprocessing here resizes to size x size):
- 4-D (B, a, b, c): channels-first when b == c != a, channels-last when a == b != c; a == b == c only
  with family knowledge; anything else (MaxViT's (B, windows, tokens, C)) is not a grid.
- 3-D (B, N, C): tokens; N = k prefix tokens (class, distillation, register tokens) + a square h x h grid
  with the input side a multiple of h (the patch size). k comes from the family (torchvision ViT: 1; timm:
  ``num_prefix_tokens``), else the one k <= 16 that fits; several fits are ambiguous and refused.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from audit.errors import UnknownNameError

MIN_CELLS = 2          # a map needs at least 2x2 cells: a 1x1 map is constant and points anywhere
MAX_PREFIX_TOKENS = 16  # class + distillation + register tokens we look for when the family says nothing


@dataclass(frozen=True)
class Layout:
    """How one layer's output maps to (B, C, h, w): ``kind`` is "nchw", "nhwc" or "tokens"."""

    kind: str
    grid: tuple[int, int]
    channels: int
    prefix_tokens: int = 0

    def to_nchw(self, output: torch.Tensor) -> torch.Tensor:
        """The (B, C, h, w) view of an output (or of its gradient: the mapping is a pure reshape)."""
        if self.kind == "nchw":
            return output
        if self.kind == "nhwc":
            return output.permute(0, 3, 1, 2)
        h, w = self.grid
        grid = output[:, self.prefix_tokens:, :]
        return grid.reshape(grid.shape[0], h, w, grid.shape[2]).permute(0, 3, 1, 2)

    def describe(self) -> str:
        h, w = self.grid
        if self.kind == "tokens":
            prefix = f"{self.prefix_tokens} prefix token{'s' if self.prefix_tokens != 1 else ''} dropped, "
            return f"tokens ({prefix}{h * w} -> {h}x{w}, {self.channels} channels)"
        return f"{self.kind.upper()} {h}x{w}, {self.channels} channels"


class LayerLayoutError(UnknownNameError):
    """A named layer whose output is not a spatial map we can explain or draw.

    A subclass of ``UnknownNameError`` on purpose: every caller that places a bad layer name at its spec
    line (``cam_layer``, ``features[i]``) places this one too, with the same one-line message style.
    """

    def __init__(self, layer: str, shape: Sequence[int] | None, reason: str, alternatives: Sequence[str] = ()):
        self.layer = layer
        self.shape = tuple(shape) if shape is not None else None
        self.reason = reason
        shown = f"output {self.shape}" if self.shape is not None else "output"
        message = f"layer {layer!r} cannot be explained: its {shown} {reason}"
        if alternatives:
            message += "; layers that can: " + ", ".join(alternatives)
        self.kind, self.name, self.suggestions = "layer", layer, list(alternatives)
        Exception.__init__(self, message)


# ------------------------------------------------------------------------------------- model families
def family(model: nn.Module) -> str | None:
    """The model family whose layouts we know by construction (None: decide from the shapes)."""
    cls = type(model)
    module = cls.__module__ or ""
    if module.startswith("torchvision.models"):
        return {"VisionTransformer": "vit", "SwinTransformer": "swin", "ConvNeXt": "convnext",
                "MaxVit": "maxvit"}.get(cls.__name__, "torchvision")
    if module.startswith("timm."):
        return "timm"
    return None


_CONVNEXT_CHANNELS_LAST = re.compile(r"(^|\.)block\.[1-5](\.|$)")
_MAXVIT_WINDOWS = re.compile(r"_attention\.(partition_op|partition_swap|attn_layer|stochastic_dropout|"
                             r"mlp_layer|departition_swap)(\.|$)")


def _family_kind(fam: str | None, model: nn.Module, name: str, ndim: int) -> str | None:
    """The layout the family fixes for this layer: "nchw", "nhwc", "tokens", "windows", or None."""
    if fam == "swin":
        if name == "features.0.0":
            return "nchw"
        if name == "norm" or name == "features" or name.startswith("features."):
            return "nhwc"
        return None
    if fam == "convnext" and ndim == 4:
        return "nhwc" if _CONVNEXT_CHANNELS_LAST.search(name) else "nchw"
    if fam == "maxvit" and _MAXVIT_WINDOWS.search(name):
        return "windows"
    if fam == "vit":
        return "tokens" if ndim == 3 else None
    if fam == "torchvision" and ndim == 4:
        return "nchw"
    return None


def _family_prefix(fam: str | None, model: nn.Module) -> int | None:
    if fam == "vit":
        return 1  # torchvision's ViT: one class token, no registers
    prefix = getattr(model, "num_prefix_tokens", None)  # timm ViT / DeiT / register models
    return int(prefix) if isinstance(prefix, int) else None


# ---------------------------------------------------------------------------------------- the mapping
def layout_for(model: nn.Module, name: str, shape: Sequence[int], input_size: int | None = None,
               batch: int | None = None) -> Layout:
    """The layout of ``name``'s output of ``shape``; ``LayerLayoutError`` when it is no usable grid."""
    shape = tuple(int(s) for s in shape)
    fam = family(model)
    if batch is not None and shape and shape[0] != batch:
        raise LayerLayoutError(name, shape, f"does not have the batch ({batch}) first: not a map per image")
    kind = _family_kind(fam, model, name, len(shape))
    if kind == "windows":
        raise LayerLayoutError(name, shape, "holds attention windows (batch, windows, tokens, channels), not "
                               "one spatial grid; explain the attention layer's output "
                               f"({name.split('_attention.')[0]}_attention) instead")
    if len(shape) == 4:
        layout = _four_d(name, shape, kind)
    elif len(shape) == 3:
        layout = _tokens(name, shape, _family_prefix(fam, model), input_size)
    elif len(shape) == 2:
        raise LayerLayoutError(name, shape, "is a vector per image, not a spatial map")
    else:
        raise LayerLayoutError(name, shape, f"has {len(shape)} dimensions; a map is (B, C, h, w), (B, h, w, C) "
                               "or tokens (B, N, C)")
    h, w = layout.grid
    if h < MIN_CELLS or w < MIN_CELLS:
        raise LayerLayoutError(name, shape, f"is a {h}x{w} map: a map needs at least {MIN_CELLS}x{MIN_CELLS} "
                               "cells (a constant map would pass the pointing game anywhere)")
    return layout


def _four_d(name: str, shape: tuple[int, ...], kind: str | None) -> Layout:
    _, a, b, c = shape
    if kind == "nchw":
        return Layout("nchw", (b, c), a)
    if kind == "nhwc":
        return Layout("nhwc", (a, b), c)
    first, last = b == c, a == b
    if first and not last:
        return Layout("nchw", (b, c), a)
    if last and not first:
        return Layout("nhwc", (a, b), c)
    if first and last:
        if a * a < MIN_CELLS * MIN_CELLS:
            return Layout("nchw", (b, c), a)  # refused below as a 1x1 map either way
        raise LayerLayoutError(name, shape, "is ambiguous: channels-first and channels-last read the same "
                               "square shape, and the model family does not say which it is")
    raise LayerLayoutError(name, shape, "is not a square spatial grid in either channels-first or "
                           "channels-last order")


def _tokens(name: str, shape: tuple[int, ...], prefix: int | None, input_size: int | None) -> Layout:
    _, n, channels = shape
    candidates = [prefix] if prefix is not None else list(range(0, min(MAX_PREFIX_TOKENS, n) + 1))
    fits = []
    for k in candidates:
        side = math.isqrt(max(n - k, 0))
        if side * side != n - k or side < 1:
            continue
        if prefix is None and input_size is not None and input_size % side:
            continue  # the patch size must divide the input side
        fits.append((k, side))
    if len(fits) == 1:
        k, side = fits[0]
        return Layout("tokens", (side, side), channels, k)
    if not fits:
        told = f" after {prefix} prefix token(s)" if prefix is not None else ""
        raise LayerLayoutError(name, shape, f"is not a sequence of tokens on a square grid{told}")
    options = ", ".join(f"{k} prefix + {s}x{s}" for k, s in fits)
    raise LayerLayoutError(name, shape, f"is an ambiguous token sequence ({options}) and the model does not "
                           "say how many prefix tokens it has (set num_prefix_tokens on the model)")


# ------------------------------------------------------------------------------------- default layers
def family_default_layer(model: nn.Module, names: Sequence[str]) -> str | None:
    """The layer a family is explained at by convention, when the generic rule would pick a wrong one.

    ViT: the last encoder block's first norm (pytorch-grad-cam's guide): the last layer where the patch
    tokens still reach the class token, through the last self-attention. Swin: the last stage (NHWC).
    """
    fam = family(model)
    if fam == "vit":
        blocks = [n for n in names if re.fullmatch(r"encoder\.layers\.[^.]+\.ln_1", n)]
        return blocks[-1] if blocks else None
    if fam == "swin":
        if "norm" in names:
            return "norm"
        stages = [n for n in names if re.fullmatch(r"features\.\d+", n)]
        return stages[-1] if stages else None
    if fam == "timm" or _family_prefix(fam, model) is not None:
        blocks = [n for n in names if re.fullmatch(r"blocks\.\d+\.norm1", n)]
        if blocks:
            return blocks[-1]
    return None
