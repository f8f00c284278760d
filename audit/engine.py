"""The explanation engine: ONE forward pass per batch gives top-k, the CAMs of every target and feature maps.

Why it is fast (docs/ARCHITECTURE.md, "audit/engine.py"): parameters are frozen for the duration of
the call and the input does not require gradients, so the forward builds no autograd graph until the
CAM layer. A forward hook on that layer swaps its output for a fresh leaf tensor that requires grad;
only the layers *after* it are recorded, and ``torch.autograd.grad(score, leaf)`` runs back through
those alone (for VGG16: one max-pool and the classifier; for ViT-B/16 at the last block's first norm:
one attention block and the head). Several target classes per image cost one extra backward each over
the retained graph (one round of classes per backward), never another forward. Feature maps of any named
layer come from the same forward through forward hooks. Score-CAM, which needs no gradient, runs its
forward under ``no_grad`` and then its masked forwards (``audit/cams/score.py``).

Layer outputs are mapped to (B, C, h, w) by ``audit.layouts`` before any CAM method or feature grid sees
them (channels-last Swin stages, ViT tokens with the class token dropped); a layer that is no grid of at
least 2x2 cells is refused by name, with layers that would work.

Hooks live inside a context manager that removes them and restores the model's training flags and
``requires_grad`` flags in ``finally`` (torchcam's discipline), so a failure mid-forward leaves the
user's model exactly as it was. Every tensor the engine makes lives on the model's device.
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

from audit import cams as cam_methods
from audit import defaults
from audit.checks import Ranked  # one type for the engine's top-k and the checks
from audit.errors import ModelError, UnknownNameError, closest
from audit.images import Geometry, cam_to_original, load_image
from audit.layouts import Layout, LayerLayoutError, family_default_layer, layout_for
from audit.models import LoadedModel

_POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
            nn.Dropout2d, nn.Identity, nn.Flatten)
# top-level children that hold the classification head: the generic default-layer rule looks before them
_HEADS = ("classifier", "head", "heads", "fc")
# several targets per image: one backward per round of classes, or one vmapped backward of all rounds
# (``is_grads_batched``). benchmarks/bench_engine.py prints both (``*_3targets_loop_vs_bare`` and
# ``*_3targets_batched_vs_bare``); one run on 2 shared CPU cores gave the vmapped backward 3-16% less
# time (VGG16 0.62 vs 0.74 of a bare forward, ResNet-50 1.07 vs 1.11, ViT-B/16 1.35 vs 1.39), too
# close to that machine's noise to change the default before a quiet run confirms it.
BATCHED_GRADS = False
# a map whose largest value is under this share of its largest sum of |terms| is float32 rounding noise
# (sums of ~1000 float32 terms err by ~1e-6 of their magnitude; a real map is orders above)
NOISE = 1e-4


@dataclass(frozen=True)
class Explanation:
    """Everything the checks and the report need about one image; arrays are on the CPU.

    ``cam_method`` and ``cam_layer`` say how the maps were made (a baseline made otherwise is not
    comparable); ``cam_layout`` says how the layer's output was read as a grid ("NCHW 14x14, 512
    channels", "tokens (1 prefix token dropped, 196 -> 14x14, 768 channels)").
    """

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
    cam_method: str = cam_methods.DEFAULT
    cam_layout: str = ""


def gradcam(activation: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of a batch: ReLU(sum_c mean(dS/dA_c) * A_c), divided by its max.

    Returns the maps (B, h, w) in [0, 1] and a bool tensor (B,) marking all-zero maps, which stay
    all-zero instead of becoming NaN.
    """
    raw = cam_methods.get("gradcam").compute(activation, grad, None)  # type: ignore[arg-type]
    return cam_methods.normalise(raw)


# --------------------------------------------------------------------------------- the layer survey
@dataclass
class _Seen:
    """What one dry forward showed of a module: its first output's shape, how often it ran, when."""

    shape: tuple[int, ...] | None
    calls: int
    order: int
    pooling: bool


def survey(module: nn.Module, example: torch.Tensor) -> dict[str, _Seen]:
    """Every named module that runs in a forward of ``example``, in the order their outputs appear."""
    seen: dict[str, _Seen] = {}
    handles = []

    def record(name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            found = seen.get(name)
            if found is not None:
                found.calls += 1
                return
            tensor = _first_tensor(output)
            seen[name] = _Seen(tuple(tensor.shape) if tensor is not None else None, 1, len(seen),
                               isinstance(mod, _POOLING))
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
    return seen


def _first_tensor(output: Any) -> torch.Tensor | None:
    """The tensor a layer outputs (attention layers return (output, weights): the output)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def default_cam_layer(module: nn.Module, example: torch.Tensor | None = None,
                      seen: dict[str, _Seen] | None = None) -> str:
    """The layer the CAM explains when the spec names none.

    VGG-style models (a ``features`` Sequential whose last ReLU is followed only by pooling): that ReLU
    (VGG16: ``features.29``, 14x14 at 224). A family with a convention (``layouts.family_default_layer``:
    ViT's last block's first norm, Swin's last stage). Otherwise the last module, in execution order,
    whose output is a spatial grid (NCHW or NHWC, at least 2x2) and that is not pooling, looked for
    before the classification head first; found with one dry forward of ``example``. A model whose last
    grids are token sequences with no known convention is an error: the patch embedding would be a
    silently wrong default.
    """
    features = getattr(module, "features", None)
    if isinstance(features, nn.Sequential):
        children = list(features.named_children())
        relus = [i for i, (_, m) in enumerate(children) if isinstance(m, nn.ReLU)]
        if relus and all(isinstance(m, _POOLING) for _, m in children[relus[-1] + 1:]):
            return f"features.{children[relus[-1]][0]}"
    if seen is None:
        if example is None:
            raise ModelError("cannot find a default CAM layer without an example input; name cam_layer")
        seen = survey(module, example)
    ordered = sorted(seen, key=lambda n: seen[n].order)
    conventional = family_default_layer(module, ordered)
    if conventional is not None:
        return conventional
    size = int(example.shape[-1]) if example is not None else None
    grids, tokens = [], []
    for name in ordered:
        layout = _layout_or_none(module, name, seen[name], size)
        if layout is None:
            continue
        (tokens if layout.kind == "tokens" else grids).append(name)
    if tokens and (not grids or seen[tokens[-1]].order > seen[grids[-1]].order):
        norms = [n for n in tokens if n.rsplit(".", 1)[-1] in ("norm1", "ln_1", "layernorm_before")]
        if norms:
            return norms[-1]
        raise ModelError(f"{type(module).__name__} ends in token sequences and has no conventional CAM layer "
                         f"we know; name cam_layer (the first norm of the last block, e.g. {tokens[-1]!r})")
    if not grids:
        raise ModelError(f"{type(module).__name__} has no layer with a spatial map of at least 2x2 cells; "
                         "a CAM needs one")
    body = [n for n in grids if n.split(".", 1)[0] not in _HEADS]
    return (body or grids)[-1]


def _layout_or_none(module: nn.Module, name: str, seen: _Seen, size: int | None) -> Layout | None:
    if seen.shape is None or seen.calls != 1 or seen.pooling:
        return None
    try:
        return layout_for(module, name, seen.shape, input_size=size)
    except LayerLayoutError:
        return None


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
    """Forward hooks for one forward pass: the CAM layer's activation (a graph leaf), feature copies."""

    def __init__(self, cam_module: nn.Module, feature_modules: dict[str, nn.Module], gradient: bool):
        self.activation: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor | None] = {}
        self._gradient = gradient
        self._handles = [cam_module.register_forward_hook(self._cam_hook)]
        for name, sub in feature_modules.items():
            self._handles.append(sub.register_forward_hook(self._feature_hook(name)))

    def _cam_hook(self, mod: nn.Module, inputs: Any, output: Any) -> Any:
        tensor = _first_tensor(output)
        if tensor is None:
            return None
        if not self._gradient:
            self.activation = tensor.detach()
            return None
        # The leaf cuts the graph here: nothing before this layer is differentiated. Returning a clone
        # (not the leaf itself) keeps later in-place ops (ReLU(inplace=True)) legal and the leaf intact.
        leaf = tensor.detach().requires_grad_(True)
        self.activation = leaf
        if isinstance(output, torch.Tensor):
            return leaf.clone()
        return type(output)([leaf.clone(), *output[1:]])

    def _feature_hook(self, name: str):
        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            tensor = _first_tensor(output)
            # A copy on the CPU: a later in-place op must not change what we show.
            self.features[name] = None if tensor is None else tensor.detach().to("cpu", torch.float32, copy=True)
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
        self._seen: dict[str, _Seen] | None = None
        self._explainable: list[str] | None = None

    # -- names --------------------------------------------------------------------------------------
    def layer_names(self) -> list[str]:
        """Every named module, in definition order: the valid values of ``cam_layer`` and ``features``."""
        return [name for name in self._modules if name]

    def resolve_layer(self, name: str) -> nn.Module:
        """The module called ``name``, checked to give a grid the engine can map.

        An unknown name lists the three closest valid names (``UnknownNameError``); a layer whose output
        is no spatial map (a vector, a 1x1 map, attention windows, a layer the forward never runs or runs
        twice) is a ``LayerLayoutError`` naming its output shape and layers that can be explained.
        """
        module = self._modules.get(name) if name else None
        if module is None:
            raise UnknownNameError("layer", name, closest(str(name), self.layer_names()))
        self.layout_of(name)
        return module

    def layout_of(self, name: str) -> Layout:
        """How ``name``'s output is read as a grid, from the dry forward at the model's input size."""
        seen = self._survey().get(name)
        if seen is None:
            raise LayerLayoutError(name, None, "never appears: the model's forward pass does not run this layer",
                                   self._alternatives(name))
        if seen.calls > 1:
            raise LayerLayoutError(name, seen.shape, f"comes from a layer that runs {seen.calls} times in one "
                                   "forward, so no single map is its own", self._alternatives(name))
        if seen.shape is None:
            raise LayerLayoutError(name, None, "is not a tensor", self._alternatives(name))
        try:
            return layout_for(self.module, name, seen.shape, input_size=self._input_size())
        except LayerLayoutError as exc:
            raise LayerLayoutError(name, seen.shape, exc.reason, self._alternatives(name)) from None

    def explainable_layers(self) -> list[str]:
        """The layers whose output maps to a grid of at least 2x2 cells, in execution order."""
        if self._explainable is None:
            seen = self._survey()
            size = self._input_size()
            self._explainable = [n for n in sorted(seen, key=lambda n: seen[n].order)
                                 if _layout_or_none(self.module, n, seen[n], size) is not None]
        return list(self._explainable)

    def _alternatives(self, name: str, n: int = 4) -> list[str]:
        seen = self._survey()
        good = self.explainable_layers()
        try:
            default = self.default_cam_layer
        except ModelError:
            default = None
        picks = ([default] if default in good else []) + [c for c in closest(name, good, n + 1) if c != default]
        shown = []
        for pick in picks[:n]:
            layout = layout_for(self.module, pick, seen[pick].shape, input_size=self._input_size())  # type: ignore[arg-type]
            h, w = layout.grid
            shown.append(f"{pick!r} ({h}x{w}{', the default' if pick == default else ''})")
        return shown

    def _input_size(self) -> int:
        return int(self.loaded.preprocessing["squash"].size)

    def _survey(self) -> dict[str, _Seen]:
        if self._seen is None:
            size = self._input_size()
            example = torch.zeros(1, 3, size, size, device=self.loaded.device)
            try:
                self._seen = survey(self.module, example)
            except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as exc:
                # the user's model cannot run at its own preprocessing size: a model problem, said in a line
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                raise ModelError(f"{self.loaded.arch}: the model's forward fails on a {tuple(example.shape)} input "
                                 f"({type(exc).__name__}: {reason}); its preprocessing sets the input size "
                                 f"{size}: load weights of that size or a checkpoint built for it") from exc
        return self._seen

    @property
    def default_cam_layer(self) -> str:
        if self._default_cam_layer is None:
            size = self._input_size()
            example = torch.zeros(1, 3, size, size, device=self.loaded.device)
            self._default_cam_layer = default_cam_layer(self.module, example, seen=self._survey())
        return self._default_cam_layer

    def label(self, index: int) -> str:
        return self.categories.name(index) if index < len(self.categories) else f"class {index}"

    def resolve_class(self, label: str | int) -> int:
        return self.categories.resolve(label)

    # -- the work -----------------------------------------------------------------------------------
    def explain(self, images: Sequence[str | Path | Image.Image], top_k: int = defaults.TOP_K, cam_layer: str | None = None,
                feature_layers: Sequence[str] = (), targets: Sequence[Any] | None = None,
                preprocess: str = "squash", batch_size: int = 8,
                cam_method: str | None = None) -> list[Explanation]:
        """Explain each image: top-k, the CAM of the top-1 and of every target, feature maps.

        ``targets`` is None or one entry per image: a class (index or label) or a list of classes.
        ``cam`` of each result is the map of the first target when one is given, else of the top-1.
        ``cam_method``: a name from ``audit.cams.names()`` (default ``gradcam``).
        """
        if preprocess not in self.loaded.preprocessing:
            raise UnknownNameError("preprocess", preprocess, sorted(self.loaded.preprocessing))
        if targets is not None and len(targets) != len(images):
            raise ValueError(f"targets has {len(targets)} entries for {len(images)} images")
        # a method object (a session's registry hands over user-registered ones) or a built-in's name
        method = cam_method if hasattr(cam_method, "compute") else cam_methods.get(cam_method)
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
                                               cam_module, feature_modules, method))
        return results

    def _targets_of(self, entry: Any) -> list[int]:
        if entry is None:
            return []
        items = entry if isinstance(entry, (list, tuple)) else [entry]
        return [self.resolve_class(item) for item in items]

    def _explain_batch(self, batch: torch.Tensor, geometries: Sequence[Geometry], sources: list[str],
                       targets: list[list[int]], top_k: int, cam_name: str, cam_module: nn.Module,
                       feature_modules: dict[str, nn.Module], method: Any) -> list[Explanation]:
        n = batch.shape[0]
        with _frozen(self.module):
            capture = _Capture(cam_module, feature_modules, method.needs_gradient)
            try:
                with torch.enable_grad() if method.needs_gradient else torch.no_grad():
                    logits = self.module(batch)
            finally:
                capture.remove()
            if capture.activation is None:
                raise ModelError(f"cam layer {cam_name!r} is not used by the model's forward pass")
            layout = self._batch_layout(cam_name, capture.activation, batch)
            probs = torch.softmax(logits.detach().float(), dim=1)
            k = min(top_k, probs.shape[1])
            top_probs, top_idx = probs.topk(k, dim=1)
            classes = [list(dict.fromkeys([*t, int(top_idx[i, 0])])) if t else [int(top_idx[i, 0])]
                       for i, t in enumerate(targets)]
            lowres = self._cams(logits, capture.activation, layout, classes, batch, method, cam_name)
        features = {name: self._feature_maps(name, t, batch) for name, t in capture.features.items()}
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
                features={name: maps[i] for name, maps in features.items()},
                logits=logits_np[i], geometry=geometry, cam_layer=cam_name, probs=probs_np[i],
                cam_method=method.name, cam_layout=layout.describe()))
        assert len(out) == n
        return out

    def _batch_layout(self, name: str, output: torch.Tensor, batch: torch.Tensor) -> Layout:
        try:
            return layout_for(self.module, name, output.shape, input_size=int(batch.shape[-1]), batch=batch.shape[0])
        except LayerLayoutError as exc:
            raise LayerLayoutError(name, tuple(output.shape), exc.reason, self._alternatives(name)) from None

    def _feature_maps(self, name: str, output: torch.Tensor | None, batch: torch.Tensor) -> np.ndarray:
        """The (B, C, h, w) grids of a feature layer, channels first whatever the layer's own layout."""
        if output is None:
            raise LayerLayoutError(name, None, "is not a tensor", self._alternatives(name))
        layout = self._batch_layout(name, output, batch)
        return np.ascontiguousarray(layout.to_nchw(output).numpy())

    def _cams(self, logits: torch.Tensor, activation: torch.Tensor, layout: Layout, classes: list[list[int]],
              batch: torch.Tensor, method: Any, cam_name: str) -> dict[tuple[int, int], tuple[np.ndarray, bool]]:
        """The map of every (image, class) pair, computed by ``method`` on the layout-mapped activation."""
        pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
        rows = [i for i, _ in pairs]
        index = torch.tensor(rows, device=activation.device)
        gradient = None
        if method.needs_gradient:
            raw_grad = _pair_gradients(logits, activation, classes)
            _check_grid_gets_gradient(raw_grad, layout, cam_name, self, layout_shape=tuple(activation.shape))
            gradient = layout.to_nchw(raw_grad).float()
        mapped = layout.to_nchw(activation.detach()).float()[index]
        context = cam_methods.CamContext(inputs=batch, image_of_row=rows, class_of_row=[c for _, c in pairs],
                                         score=self._score, chunk=16)
        with torch.no_grad():
            terms = getattr(method, "terms", None)
            if terms is not None:
                parts = terms(mapped, gradient, context)
                raw = parts.sum(dim=1)
                # terms that cancel to rounding noise are a zero map (see audit/cams/gradient.py)
                noise = raw.abs().amax(dim=(1, 2)) <= NOISE * parts.abs().sum(dim=1).amax(dim=(1, 2))
                raw = torch.where(noise[:, None, None], torch.zeros_like(raw), raw)
            else:
                raw = method.compute(mapped, gradient, context)
            cam, empty = cam_methods.normalise(raw.float())
        cam_np, empty_np = cam.cpu().numpy(), empty.cpu().numpy()
        return {pair: (cam_np[p].astype(np.float32), bool(empty_np[p])) for p, pair in enumerate(pairs)}

    def _score(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of a batch with no graph (Score-CAM's masked inputs); the model is already frozen."""
        with torch.inference_mode():
            return self.module(inputs).float()


def _pair_gradients(logits: torch.Tensor, leaf: torch.Tensor, classes: list[list[int]]) -> torch.Tensor:
    """d logit[i, c] / d leaf[i] for every (image i, class c) pair, in pair order: (P, *leaf.shape[1:]).

    Round r takes the r-th class of every image that has one; images are independent in eval mode, so
    the gradient of the summed scores gives each image its own gradient. ``BATCHED_GRADS`` puts all the
    rounds in one vmapped backward instead (``is_grads_batched``).
    """
    rounds = max(len(c) for c in classes)
    per_round: list[torch.Tensor] = []
    if BATCHED_GRADS and rounds > 1:
        seeds = torch.zeros((rounds, *logits.shape), dtype=logits.dtype, device=logits.device)
        for i, cs in enumerate(classes):
            for r, c in enumerate(cs):
                seeds[r, i, c] = 1
        (grads,) = torch.autograd.grad(logits, leaf, grad_outputs=seeds, is_grads_batched=True)
        per_round = list(grads)
    else:
        for r in range(rounds):
            rows = [i for i, c in enumerate(classes) if len(c) > r]
            cols = [classes[i][r] for i in rows]
            score = logits[rows, cols].sum()
            (grad,) = torch.autograd.grad(score, leaf, retain_graph=r < rounds - 1)
            per_round.append(grad)
    return torch.stack([per_round[r][i] for i, cs in enumerate(classes) for r in range(len(cs))])


def _check_grid_gets_gradient(grad: torch.Tensor, layout: Layout, name: str, engine: Engine,
                              layout_shape: tuple[int, ...]) -> None:
    """A token layer after which only the class token reaches the scores gives empty maps: refuse it.

    (ViT's final norm: the head reads token 0 alone, so the 196 patch tokens get exactly zero gradient
    and every gradient CAM would be "empty" for a reason that has nothing to do with the image.)
    """
    if layout.kind != "tokens" or not layout.prefix_tokens:
        return
    grid, prefix = grad[:, layout.prefix_tokens:], grad[:, :layout.prefix_tokens]
    if not bool((grid != 0).any()) and bool((prefix != 0).any()):
        raise LayerLayoutError(
            name, layout_shape, "reaches the class scores only through its prefix (class) token: the patch "
            "tokens get no gradient, so every gradient CAM would be empty", engine._alternatives(name))


def _source(image: str | Path | Image.Image) -> str:
    if isinstance(image, (str, Path)):
        return str(image)
    return getattr(image, "filename", "") or "<image>"
