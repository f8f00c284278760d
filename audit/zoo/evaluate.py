"""Measure the zoo models through the product's own engine: ``python -m audit.zoo.evaluate``.

For each model, on fresh scenes (seeds from the ``evaluate`` range, disjoint from training and from
the shipped spec images), with and without the class-coded marker, print ``name=value`` lines:
accuracy of the top-1 class, pointing game (hottest pixel of the top-1 Grad-CAM inside the object's
box) and the median share of heat inside the box. The numbers in audit/zoo/README.md come from here.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from audit.zoo import ZOO
from audit.zoo.scenes import SEED_RANGES, Scene, make_scene

Explain = Callable[[Sequence[Image.Image]], tuple[list[int], list[np.ndarray]]]
"""images -> (top-1 class per image, Grad-CAM of the top-1 per image, HxW on the original image)."""


@dataclass(frozen=True)
class Scores:
    accuracy: float
    pointing_game: float
    median_energy_in_box: float


def box_mask(box: Sequence[int], shape: tuple[int, int]) -> np.ndarray:
    """Boolean HxW mask of a box (x0, y0, x1, y1; x1/y1 exclusive)."""
    x0, y0, x1, y1 = box
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def pointing_hit(heat: np.ndarray, box: Sequence[int]) -> bool:
    """Is the hottest pixel inside the box? (ties: the first in row-major order; all-zero: a miss)."""
    if not np.any(heat > 0):
        return False
    y, x = np.unravel_index(int(np.argmax(heat)), heat.shape)
    x0, y0, x1, y1 = box
    return bool(x0 <= x < x1 and y0 <= y < y1)


def energy_in_box(heat: np.ndarray, box: Sequence[int]) -> float:
    """Share of the heat inside the box; 0 for an all-zero map."""
    total = float(np.sum(heat, dtype=np.float64))
    if total <= 0:
        return 0.0
    return float(np.sum(heat[box_mask(box, heat.shape)], dtype=np.float64)) / total


def score(scenes: Sequence[Scene], predictions: Sequence[int], cams: Sequence[np.ndarray]) -> Scores:
    """Accuracy against the object's label, and focus of the top-1 Grad-CAM on the object's box."""
    correct = [p == s.label for p, s in zip(predictions, scenes)]
    hits = [pointing_hit(c, s.box) for c, s in zip(cams, scenes)]
    energies = [energy_in_box(c, s.box) for c, s in zip(cams, scenes)]
    return Scores(float(np.mean(correct)), float(np.mean(hits)), float(np.median(energies)))


def engine_explainer(name: str, batch_size: int = 64, weights_dir: Path | None = None) -> Explain:
    """Explain with the product: ``audit.load_model(name).explain(...)``, top-1 Grad-CAM.

    ``weights_dir`` evaluates candidate weights (``<dir>/<name>.pt``) instead of the shipped ones.
    """
    from audit import load_model

    engine = (load_model(name) if weights_dir is None
              else load_model(name, checkpoint=Path(weights_dir) / f"{name}.pt"))

    def explain(images: Sequence[Image.Image]) -> tuple[list[int], list[np.ndarray]]:
        explanations = engine.explain(list(images), top_k=1, batch_size=batch_size)
        return ([int(e.top_k[0].index) for e in explanations],
                [np.asarray(e.cam, dtype=np.float32) for e in explanations])

    return explain


def fresh_scenes(n: int, seed: int, marker: bool) -> list[Scene]:
    """``n`` scenes from ``seed`` on; the same seeds with and without marker (paired comparison)."""
    return [make_scene(seed + i, marker=marker) for i in range(n)]


def evaluate(names: Sequence[str], n: int, seed: int,
             explainer: Callable[[str], Explain] = engine_explainer) -> dict[str, float]:
    """``{"<model>.<clean|marker>.<metric>": value}`` for every model and condition."""
    results: dict[str, float] = {}
    conditions = {"clean": fresh_scenes(n, seed, False), "marker": fresh_scenes(n, seed, True)}
    for name in names:
        explain = explainer(name)
        for condition, scenes in conditions.items():
            predictions, cams = explain([s.image for s in scenes])
            scores = score(scenes, predictions, cams)
            for metric, value in vars(scores).items():
                results[f"{name}.{condition}.{metric}"] = value
    return dict(sorted(results.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Accuracy and Grad-CAM focus of the zoo models.")
    parser.add_argument("names", nargs="*", default=list(ZOO), help="models (default: all)")
    parser.add_argument("--n", type=int, default=1000, help="scenes per condition (default 1000)")
    parser.add_argument("--seed", type=int, default=SEED_RANGES["evaluate"][0],
                        help="first scene seed (default: start of the evaluate range)")
    parser.add_argument("--weights-dir", type=Path, default=None,
                        help="evaluate <dir>/<name>.pt instead of the shipped weights")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    explainer = functools.partial(engine_explainer, weights_dir=args.weights_dir)
    for key, value in evaluate(args.names, args.n, args.seed, explainer).items():
        print(f"{key}={value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
