"""CAM methods: a registry of named ways to turn a layer's activation (and its gradient) into a map.

Why a registry: the engine owns the one forward pass, the layout mapping and the normalisation; a method
only says how to weigh the (B, C, h, w) activation. Every method returns the raw map; the engine applies
ReLU, divides by the max and flags all-zero maps (``normalise``), so no method can return NaN or a map of
another scale. Definitions follow pytorch-grad-cam 1.5.7 (its constants included) so the tests can hold
each method to it within 1e-4; torchcam 0.5.0 agrees for gradcam, xgradcam and layercam.

Users add methods with ``register`` (or ``registry.add_cam_method`` from ``pytest_audit_register``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from audit.errors import UnknownNameError, closest

DEFAULT = "gradcam"


@dataclass
class CamContext:
    """What a method may need beyond the activation and gradient of its rows.

    Row p of the activation is image ``image_of_row[p]`` explained for class ``class_of_row[p]`` (an
    image explained for two classes has two rows). ``inputs`` is the model input batch (one per image);
    ``score(x)`` runs the model on a batch (no gradients, hooks off, chunked by the caller) and returns
    the logits; ``chunk`` is how many masked inputs one call of ``score`` may take.
    """

    inputs: torch.Tensor
    image_of_row: list[int]
    class_of_row: list[int]
    score: Callable[[torch.Tensor], torch.Tensor]
    chunk: int = 16
    cache: dict = field(default_factory=dict)


class CamMethod(Protocol):
    name: str
    needs_gradient: bool
    description: str

    def compute(self, activation: torch.Tensor, gradient: torch.Tensor | None,
                context: CamContext) -> torch.Tensor:
        """The raw map (P, h, w) of ``activation`` (P, C, h, w), before ReLU and normalisation."""


_METHODS: dict[str, CamMethod] = {}


def register(method: CamMethod) -> CamMethod:
    """Add (or replace) a method under ``method.name``."""
    _METHODS[method.name] = method
    return method


def get(name: str | None) -> CamMethod:
    """The method called ``name`` (None: the default); an unknown name lists the closest ones."""
    key = DEFAULT if name is None else str(name).lower()
    found = _METHODS.get(key)
    if found is None:
        raise UnknownNameError("CAM method", name, closest(str(name), _METHODS),
                               hint="known: " + ", ".join(_METHODS))
    return found


def names() -> list[str]:
    """The registered method names, the built-in ones first in their documented order."""
    return list(_METHODS)


def normalise(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU, then divide each map by its max; all-zero (or non-finite) maps stay zero and are flagged.

    Returns the maps (P, h, w) in [0, 1] and a bool tensor (P,) marking the empty ones.
    """
    cam = torch.relu(raw)
    peak = cam.amax(dim=(1, 2))
    empty = ~(peak > 0) | ~torch.isfinite(peak)
    safe_peak = torch.where(empty, torch.ones_like(peak), peak)
    cam = torch.where(empty[:, None, None], torch.zeros_like(cam), cam / safe_peak[:, None, None])
    return cam, empty


from audit.cams import gradient as _gradient  # noqa: E402  (registers the built-in methods in order)
from audit.cams import score as _score  # noqa: E402,F401

#: the built-in methods by name; a session's ``audit.registry.Registry`` starts from these, and a user's
#: method registered there (``pytest_audit_register``) reaches the engine as an object, never through here
METHODS = dict(_METHODS)

__all__ = ["CamContext", "CamMethod", "DEFAULT", "METHODS", "get", "names", "normalise", "register"]
