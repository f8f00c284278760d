"""The offline model zoo: two small networks trained by ``python -m audit.zoo.train`` on drawn shapes.

``shapes_vgg`` looks at the object; ``shapes_vgg_shortcut`` has the same architecture but was trained
on scenes whose corner marker codes the class while the drawn object's class was random, so it reads
the marker and ignores the object. Together they make focus checks falsifiable offline: the same
label check passes on both, the focus check passes on one and fails on the other.

This module is the contract consumed by :mod:`audit.models`; it must not import later stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from audit.zoo.nets import shapes_vgg
from audit.zoo.scenes import CLASSES, SIZE

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
STD: tuple[float, float, float] = (0.25, 0.25, 0.25)


@dataclass(frozen=True)
class ZooModel:
    """What the loader needs to know about one zoo model: architecture, labels, preprocessing."""

    name: str
    categories: tuple[str, ...]
    weights_path: Path
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    description: str

    def build(self) -> torch.nn.Module:
        """The random-init architecture; the caller loads ``weights_path`` into it."""
        return shapes_vgg(num_classes=len(self.categories))


def _entry(name: str, description: str) -> ZooModel:
    return ZooModel(name=name, categories=CLASSES, weights_path=WEIGHTS_DIR / f"{name}.pt",
                    input_size=SIZE, mean=MEAN, std=STD, description=description)


ZOO: dict[str, ZooModel] = {
    "shapes_vgg": _entry(
        "shapes_vgg",
        "Small VGG (16x16 last feature map) trained on 64x64 drawn shapes; looks at the object."),
    "shapes_vgg_shortcut": _entry(
        "shapes_vgg_shortcut",
        "Same architecture trained with a class-coded top-left marker and random objects; "
        "predicts from the marker (a deliberate shortcut for falsifiable focus checks)."),
}

__all__ = ["ZOO", "ZooModel", "CLASSES", "MEAN", "STD", "WEIGHTS_DIR"]
