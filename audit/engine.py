"""The explanation engine: ONE forward pass per batch gives top-k, Grad-CAM and feature maps.

Why it is fast (see DESIGN.md, "Why one forward is enough"): parameters are frozen for the duration of
the call and the input does not require gradients, so the forward builds no autograd graph until the
CAM layer. A forward hook on that layer swaps its output for a fresh leaf tensor that requires grad;
only the layers *after* it are recorded, and ``torch.autograd.grad(score, leaf)`` runs back through
those alone (for VGG16: one max-pool and the classifier). Several target classes per image cost one
extra backward each over the retained graph, never another forward. Feature maps of any named layer
come from the same forward through forward hooks.

Hooks live inside a context manager that removes them and restores the model's training flags and
``requires_grad`` flags in ``finally`` (torchcam's discipline), so a failure mid-forward leaves the
user's model exactly as it was.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from audit.errors import ModelError, UnknownNameError, closest
from audit.images import Geometry, cam_to_original, load_image
from audit.models import LoadedModel

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
            nn.Dropout2d, nn.Identity, nn.Flatten)


@dataclass(frozen=True)
class Ranked:
    """One row of the top-k: class index, display label, softmax probability."""

    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class Explanation:
    """Everything the checks and the report need about one image; arrays are on the CPU."""

    source: str
    image_size: tuple[int, int]
    top_k: list[Ranked]
    cam: np.ndarray
    target: int
    cams: dict[int, np.ndarray]
    cams_lowres: dict[int, np.ndarray]
    cam_empty: dict[int, bool]
    features: dict[str, np.ndarray]
    logits: np.ndarray
    geometry: Geometry
    cam_layer: str
    probs: np.ndarray = field(repr=False, default=None)  # type: ignore[assignment]


def gradcam(activation: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a batch: ReLU(sum_c mean(dS/dA_c) * A_c), divided by its max.

    Returns the maps (B, h, w) in [0, 1] and a bool tensor (B,) marking all-zero maps, which stay
    all-zero instead of becoming NaN.
    """
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(dim=1))
    peak = cam.amax(dim=(1, 2))
    empty = ~(peak > 0) | ~torch.isfinite(peak)
    safe_peak = torch.where(empty, torch.ones_like(peak), peak)
    cam = torch.where(empty[:, None, None], torch.zeros_like(cam), cam / safe_peak[:, None, None])
    return cam, empty


def default_cam_layer(module: nn.Module, example: torch.Tensor | None = None) -> str:
    """The layer Grad-CAM explains when the spec names none.

    VGG-style models (a ``features`` Sequential whose last ReLU is followed only by pooling): that ReLU
    (VGG16: ``features.29``, 14x14 at 224). Otherwise the last module, in execution order, whose output
    is a spatial 4-D map (h*w > 1) and that is not a pooling layer: found with one dry forward of
    ``example``.
    """
    features = getattr(module, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        relus = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.ReLU)]
        if relus and all(isinstance(m, _POOLING) for _, m in children[relus[-1] + 1:]):
            return f"features.{children[relus[-1]][0]}"
    if example is None:
        raise ModelError("cannot find a default CAM layer without an example input; name cam_layer")
    order: list[str] = []
    handles = []

    def record(name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            if (isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] * output.shape[3] > 1
                    and not isinstance(mod, _POOLING)):
                order.append(name)
        return hook

    for name, sub in module.named_modules():
        if name:
            handles.append(sub.register_forward_hook(record(name)))
    try:
        with torch.no_grad(), _frozen(module):
            module(example)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ModelError(f"{type(module).__name__} has no layer with a spatial 4-D output; Grad-CAM needs one")
    return order[-1]


@contextlib.contextmanager
def _frozen(module: nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters for the duration; the previous state is restored afterwards."""
    training = {m: m.training for m in module.modules()}
    requires_grad = {p: p.requires_grad for p in module.parameters()}
    try:
        module.eval()
        for p in requires_grad:
            p.requires_grad_(False)
        yield
    finally:
        for m, flag in training.items():
            m.train(flag)
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)


class _Capture:
    """Forward hooks for one forward pass: the CAM layer's activation as a graph leaf, feature copies."""

    def __init__(self, module: nn.Module, cam_module: nn.Module, feature_modules: dict[str, nn.Module]):
        self.activation: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [cam_module.register_forward_hook(self._cam_hook)]
        for name, sub in feature_modules.items():
            self._handles.append(sub.register_forward_hook(self._feature_hook(name)))

    def _cam_hook(self, mod: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        # The leaf cuts the graph here: nothing before this layer is differentiated. Returning a clone
        # (not the leaf itself) keeps later in-place ops (ReLU(inplace=True)) legal and the leaf intact.
        leaf = output.detach().requires_grad_(True)
        self.activation = leaf
        return leaf.clone()

    def _feature_hook(self, name: str):
        def hook(mod: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # A copy on the CPU: a later in-place op must not change what we show.
            self.features[name] = output.detach().to("cpu", torch.float32, copy=True)
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Engine:
    """A loaded model plus the one-pass explanation machinery; built once per model per session."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.module = loaded.module
        self.categories = loaded.categories
        self._modules = dict(self.module.named_modules())
        self._default_cam_layer: str | None = None

    # -- names --------------------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Every named module, in definition order: the valid values of ``cam_layer`` and ``features``."""
        return [name for name in self._modules if name]

    def resolve_layer(self, name: str) -> nn.Module:
        """The module called ``name``; an unknown name lists the three closest valid names."""
        module = self._modules.get(name) if name else None
        if module is None:
            raise UnknownNameError("layer", name, closest(str(name), self.layer_names()))
        return module

    @property
    def default_cam_layer(self) -> str:
        if self._default_cam_layer is None:
            prep = self.loaded.preprocessing["squash"]
            example = torch.zeros(1, 3, prep.size, prep.size, device=self.loaded.device)
            self._default_cam_layer = default_cam_layer(self.module, example)
        return self._default_cam_layer

    def label(self, index: int) -> str:
        return self.categories.name(index) if index < len(self.categories) else f"class {index}"

    def resolve_class(self, label: str | int) -> int:
        return self.categories.resolve(label)

    # -- the work -----------------------------------------------------------------------------------
    def explain(self, images: Sequence[str | Path | Image.Image], top_k: int = 5, cam_layer: str | None = None,
                feature_layers: Sequence[str] = (), targets: Sequence[Any] | None = None,
                preprocess: str = "squash", batch_size: int = 8) -> list[Explanation]:
        """Explain each image: top-k, Grad-CAM for the top-1 and every target, feature maps.

        ``targets`` is None or one entry per image: a class (index or label) or a list of classes.
        ``cam`` of each result is the map of the first target when one is given, else of the top-1.
        """
        if preprocess not in self.loaded.preprocessing:
            raise UnknownNameError("preprocess", preprocess, sorted(self.loaded.preprocessing))
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"targets has {len(targets)} entries for {len(images)} images")
        cam_name = cam_layer or self.default_cam_layer
        cam_module = self.resolve_layer(cam_name)
        feature_modules = {name: self.resolve_layer(name) for name in dict.fromkeys(feature_layers)}
        wanted = [self._targets_of(targets[i] if targets is not None else None) for i in range(len(images))]
        prep = self.loaded.preprocessing[preprocess]
        results: list[Explanation] = []
        for start in range(0, len(images), max(1, batch_size)):
            chunk = images[start:start + batch_size]
            loaded = [load_image(img) for img in chunk]
            tensors, geometries = zip(*(prep.to_tensor(img) for img in loaded))
            batch = torch.stack(tensors).to(self.loaded.device)
            results.extend(self._explain_batch(batch, geometries, [_source(img) for img in chunk],
                                               wanted[start:start + batch_size], top_k, cam_name,
                                               cam_module, feature_modules))
        return results

    def _targets_of(self, entry: Any) -> list[int]:
        if entry is None:
            return []
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        return [self.resolve_class(item) for item in items]

    def _explain_batch(self, batch: torch.Tensor, geometries: Sequence[Geometry], sources: list[str],
                       targets: list[list[int]], top_k: int, cam_name: str, cam_module: nn.Module,
                       feature_modules: dict[str, nn.Module]) -> list[Explanation]:
        capture = _Capture(self.module, cam_module, feature_modules)
        try:
            with _frozen(self.module), torch.enable_grad():
                logits = self.module(batch)
                if capture.activation is None:
                    raise ModelError(f"cam layer {cam_name!r} is not used by the model's forward pass")
                activation = capture.activation
                probs = torch.softmax(logits.detach().float(), dim=1)
                k = min(top_k, probs.shape[1])
                top_probs, top_idx = probs.topk(k, dim=1)
                classes = [list(dict.fromkeys([*t, int(top_idx[i, 0])])) if t else [int(top_idx[i, 0])]
                           for i, t in enumerate(targets)]
                lowres = self._cams(logits, activation, classes)
        finally:
            capture.remove()
        logits_np = logits.detach().float().cpu().numpy()
        probs_np = probs.cpu().numpy()
        out = []
        for i, geometry in enumerate(geometries):
            cams_low = {c: lowres[(i, c)][0] for c in classes[i]}
            cams_full = {c: cam_to_original(m, geometry) for c, m in cams_low.items()}
            ranked = [Ranked(int(j), self.label(int(j)), float(p))
                      for p, j in zip(top_probs[i].tolist(), top_idx[i].tolist())]
            first = classes[i][0]
            out.append(Explanation(
                source=sources[i], image_size=geometry.original_size, top_k=ranked, cam=cams_full[first],
                target=first, cams=cams_full, cams_lowres=cams_low,
                cam_empty={c: lowres[(i, c)][1] for c in classes[i]},
                features={name: t[i].numpy() for name, t in capture.features.items()},
                logits=logits_np[i], geometry=geometry, cam_layer=cam_name, probs=probs_np[i]))
        return out

    @staticmethod
    def _cams(logits: torch.Tensor, activation: torch.Tensor,
              classes: list[list[int]]) -> dict[tuple[int, int], tuple[np.ndarray, bool]]:
        """Grad-CAM for every (image, class) pair: one backward per round of classes over one graph.

        Round r takes the r-th class of every image that has one; images are independent in eval
        mode, so the gradient of the summed scores gives each image its own gradient.
        """
        rounds = max(len(c) for c in classes)
        maps: dict[tuple[int, int], tuple[np.ndarray, bool]] = {}
        for r in range(rounds):
            rows = [i for i, c in enumerate(classes) if len(c) > r]
            cols = [classes[i][r] for i in rows]
            score = logits[rows, cols].sum()
            (grad,) = torch.autograd.grad(score, activation, retain_graph=r < rounds - 1)
            cam, empty = gradcam(activation.detach()[rows].float(), grad[rows].float())
            cam_np, empty_np = cam.cpu().numpy(), empty.cpu().numpy()
            for j, (i, c) in enumerate(zip(rows, cols)):
                maps[(i, c)] = (cam_np[j].astype(np.float32), bool(empty_np[j]))
        return maps


def _source(image: str | Path | Image.Image) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", "") or "<image>"
