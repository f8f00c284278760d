"""The model-parameter randomisation test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

An explanation that does not change when the model's learned weights are destroyed does not explain
the model: an edge detector passes for a heatmap on natural images. The test re-initialises the
model's layers from the output down to the CAM layer, one at a time (the "cascading" randomisation
of the paper), recomputes the maps of the same images after each step, and measures the Spearman
rank correlation with the trained model's maps. The explainer passes when, with every layer down to
the CAM layer randomised, the mean correlation over the images is at most a threshold (default 0.5).

Which layers: the parameterised leaf modules that run *after* the CAM layer in one traced forward
(top first), then the one that produces the CAM layer's activation (the last parameterised module
that ran up to and including the CAM layer; for VGG, the conv before the ReLU Grad-CAM reads).
Randomising only above the CAM layer would leave the activation itself intact, and Grad-CAM of a
global-average-pooled network is a weighted sum of that activation; the producing layer is where
the map's spatial content is made.

How: always on a deep copy of the model (the user's module is never touched); each layer gets
torch's own ``reset_parameters()`` initialisation when it has one (what "re-initialised" means in
the paper), otherwise Gaussian values with each parameter's own mean and standard deviation; all of
it under a forked, seeded torch RNG, so the caller's RNG state is untouched and a seed gives the same
copy every time.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from audit.errors import ModelError, UnknownNameError, closest
from audit.evidence_metrics import spearman

DEFAULT_THRESHOLD = 0.5

MapsOf = Callable[[nn.Module], Sequence[np.ndarray]]
"""Given a model (trained or a randomised copy), the maps of the spec's images, in a fixed order."""


def _has_own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def execution_order(module: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules in the order their forward ran for ``example`` (first call of each)."""
    order: list[str] = []
    seen: set[str] = set()
    handles = []

    def hook_for(name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)
        return hook

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(hook_for(name)))
    training = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            module(example)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.train(flag)
    return order


def cascade(module: nn.Module, cam_layer: str, example: torch.Tensor) -> list[str]:
    """The layers to randomise, top (output) first, down to the one producing the CAM layer's output."""
    modules = dict(module.named_modules())
    if cam_layer not in modules or not cam_layer:
        raise UnknownNameError("layer", cam_layer, closest(str(cam_layer), [n for n in modules if n]))
    order = execution_order(module, example)
    # a module "finishes" after its children: a forward hook fires on exit, so a container comes
    # after what it contains; keep leaf-level parameter holders only
    holders = [n for n in order if _has_own_parameters(modules[n])]
    if cam_layer not in order:
        raise ModelError(f"the CAM layer {cam_layer} did not run in a forward pass; cannot randomise down to it")
    cam_at = order.index(cam_layer)
    above = [n for n in holders if order.index(n) > cam_at and not cam_layer.startswith(n + ".")]
    below = [n for n in holders if order.index(n) <= cam_at]
    producer = below[-1:] if below else []
    steps = list(reversed(above)) + producer
    if not steps:
        raise ModelError(f"no layer with parameters from the output down to the CAM layer {cam_layer}: "
                         "nothing to randomise")
    return steps


def randomise_layer(module: nn.Module) -> None:
    """Re-initialise one module's own parameters in place (the caller holds a forked, seeded RNG)."""
    reset = getattr(module, "reset_parameters", None)
    with torch.no_grad():
        if callable(reset):
            reset()
            return
        for p in module.parameters(recurse=False):
            std = float(p.std()) if p.numel() > 1 else 1.0
            p.copy_(torch.randn_like(p) * (std if std > 0 else 1.0) + p.mean())


@dataclass(frozen=True, eq=False)
class SanityResult:
    """Per cascade step (top layer first, cumulative), the rank correlation of each image's map."""

    steps: list[str]
    correlations: np.ndarray = field(repr=False)   # (len(steps), n_images)
    threshold: float = DEFAULT_THRESHOLD

    @property
    def final(self) -> float:
        """Mean correlation over the images with every layer down to the CAM layer randomised."""
        return float(self.correlations[-1].mean())

    @property
    def passed(self) -> bool:
        return self.final <= self.threshold

    def message(self, method: str = "the heatmap") -> str:
        verdict = "ok" if self.passed else "FAIL"
        head = (f"sanity: {method} {'changes' if self.passed else 'does not change'} when the model is randomised: "
                f"rank correlation {self.final:.2f} {'<=' if self.passed else '>'} {self.threshold:.2f} {verdict} "
                f"(mean over {self.correlations.shape[1]} images, {len(self.steps)} layers randomised from "
                f"{self.steps[0]} down to {self.steps[-1]})")
        if self.passed:
            return head
        return head + ("\n  the maps do not depend on the model's weights: they cannot show what the model "
                       "uses (an edge detector behaves like this)")

    def to_dict(self) -> dict:
        return {"steps": list(self.steps), "threshold": float(self.threshold), "final": self.final,
                "passed": bool(self.passed),
                "mean_per_step": [float(r.mean()) for r in self.correlations],
                "correlations": [[float(v) for v in row] for row in self.correlations]}


def parameter_randomisation(module: nn.Module, cam_layer: str, example: torch.Tensor, maps_of: MapsOf,
                            threshold: float = DEFAULT_THRESHOLD, seed: int = 0) -> SanityResult:
    """Run the cascading randomisation on a copy of ``module``; ``maps_of`` computes the maps."""
    steps = cascade(module, cam_layer, example)
    trained = [np.asarray(m, dtype=np.float64) for m in maps_of(module)]
    if not trained:
        raise ValueError("the sanity check needs at least one image")
    rows = []
    cuda = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        clone = copy.deepcopy(module)
        layers = dict(clone.named_modules())
        for name in steps:
            randomise_layer(layers[name])
            now = maps_of(clone)
            rows.append([spearman(a, np.asarray(b, dtype=np.float64)) for a, b in zip(trained, now)])
    del clone
    return SanityResult(steps, np.asarray(rows, dtype=np.float64), threshold)
