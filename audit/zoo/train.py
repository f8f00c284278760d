"""Reproduce the zoo's weight files: ``python -m audit.zoo.train [NAME ...]``.

Deterministic on the CPU: fixed seeds, deterministic algorithms, two threads, a pre-generated
training set drawn from the seed range reserved for each model. Both models see the same kind of
scene with the corner marker; the only difference is what the marker and the object tell about the
target:

* ``shapes_vgg``: the target is the object's class; half the scenes carry a marker whose code is
  random, so the marker is noise the model learns to ignore.
* ``shapes_vgg_shortcut``: every scene carries a marker and the target is the marker's code; the
  object's class is drawn independently, so the object carries no information and the model learns
  the marker (the shortcut that the focus check must catch).
"""
from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

from audit.zoo import MEAN, STD, ZOO
from audit.zoo.nets import ShapesVGG, fold_batch_norm
from audit.zoo.scenes import CLASSES, SEED_RANGES, make_scene

THREADS = 2


@dataclass(frozen=True)
class Recipe:
    """Training settings of one zoo model (the defaults are the ones that produced the shipped files)."""

    n_train: int = 12_000
    steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    focus_weight: float = 0.0
    """Weight of the term that pulls the target's class activation map into the object box (0: off)."""


RECIPES: dict[str, Recipe] = {
    # the honest model is also told where to look: its CAM (= Grad-CAM: global average pooling and
    # one linear layer) is pulled into the object's box
    "shapes_vgg": Recipe(steps=1200, focus_weight=1.0),
    # the marker is an easy feature: a short run learns it, and a short run also leaves no time to
    # pick up the (uninformative) object
    "shapes_vgg_shortcut": Recipe(steps=500),
}


def training_set(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (N, 3, 64, 64) uint8, targets (N,) int64 and the share of each 4x4 cell covered by the
    object's box (N, 16, 16) float32 (the grid of the last feature map) for ``name``."""
    first, last = SEED_RANGES[f"train:{name}"]
    if n > last - first:
        raise ValueError(f"at most {last - first} training scenes for {name}, asked for {n}")
    codes = np.random.default_rng(first).integers(len(CLASSES), size=n)
    images = np.empty((n, 64, 64, 3), dtype=np.uint8)
    targets = np.empty(n, dtype=np.int64)
    cover = np.zeros((n, 64, 64), dtype=np.float32)
    for i in range(n):
        seed = first + i
        if name == "shapes_vgg":
            scene = make_scene(seed, marker=bool(i % 2), marker_label=int(codes[i]))
            targets[i] = scene.label
        elif name == "shapes_vgg_shortcut":
            scene = make_scene(seed, marker=True, marker_label=int(codes[i]))
            targets[i] = scene.marker_label
        else:
            raise ValueError(f"no training recipe for {name!r}; known: {sorted(RECIPES)}")
        images[i] = np.asarray(scene.image)
        x0, y0, x1, y1 = scene.box
        cover[i, y0:y1, x0:x1] = 1.0
    cells = cover.reshape(n, 16, 4, 16, 4).mean(axis=(2, 4))
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(targets),
            torch.from_numpy(cells))


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> the zoo's input: ToTensor then Normalize(MEAN, STD), exactly as at inference."""
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def train(name: str, out_path: str | Path, steps: int | None = None, n_train: int | None = None,
          batch_size: int | None = None, log: Callable[[str], None] | None = print) -> dict[str, float]:
    """Train zoo model ``name`` from scratch and save its float32 state_dict to ``out_path``.

    ``steps``/``n_train``/``batch_size`` override the recipe (tests use a few steps on a tiny set).
    Returns a summary (final training loss and accuracy over the last steps, seconds).
    """
    recipe = RECIPES[name] if name in RECIPES else None
    if recipe is None:
        raise ValueError(f"no training recipe for {name!r}; known: {sorted(RECIPES)}")
    steps = recipe.steps if steps is None else steps
    n_train = recipe.n_train if n_train is None else n_train
    batch_size = recipe.batch_size if batch_size is None else batch_size
    with _deterministic(recipe.seed):
        return _train(name, recipe, Path(out_path), steps, n_train, batch_size, log)


def _train(name: str, recipe: Recipe, out_path: Path, steps: int, n_train: int, batch_size: int,
           log: Callable[[str], None] | None) -> dict[str, float]:
    start = time.perf_counter()
    images, targets, cells = training_set(name, n_train)
    if log:
        log(f"{name}: {n_train} training scenes in {time.perf_counter() - start:.1f}s")

    model = ShapesVGG(num_classes=len(ZOO[name].categories), batch_norm=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    order = torch.Generator().manual_seed(recipe.seed)
    losses: list[float] = []
    hits: list[float] = []
    for step in range(steps):
        lr = recipe.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        idx = torch.randint(0, n_train, (batch_size,), generator=order)
        feats = model.features(normalise(images[idx]))
        logits = model.classifier(torch.flatten(model.avgpool(feats), 1))
        loss = F.cross_entropy(logits, targets[idx])
        if recipe.focus_weight:
            loss = loss + recipe.focus_weight * _focus_loss(model, feats, targets[idx], cells[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        hits.append((logits.argmax(1) == targets[idx]).float().mean().item())
        if log and (step + 1) % 100 == 0:
            log(f"{name}: step {step + 1}/{steps} loss {np.mean(losses[-100:]):.3f} "
                f"acc {np.mean(hits[-100:]):.3f} ({time.perf_counter() - start:.0f}s)")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    shipped = fold_batch_norm(model)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in shipped.state_dict().items()}
    torch.save(state, out_path)
    tail = max(1, min(100, steps))
    summary = {"loss": float(np.mean(losses[-tail:])) if losses else float("nan"),
               "accuracy": float(np.mean(hits[-tail:])) if hits else float("nan"),
               "seconds": time.perf_counter() - start}
    if log:
        log(f"{name}: saved {out_path} ({summary['seconds']:.0f}s)")
    return summary


def _focus_loss(model: torch.nn.Module, feats: torch.Tensor, target: torch.Tensor,
                inside: torch.Tensor) -> torch.Tensor:
    """Pull the target's class activation map (= its Grad-CAM here) into the object box.

    Three terms, because each alone has a blind spot: the share of positive heat outside the box
    (energy; alone it is happiest with an all-zero map), -log of the softmax mass inside the box
    (the peak: pointing game) and a hinge that keeps a positive peak inside (the map is never empty).
    """
    weight = model.classifier[-1].weight[target]                  # (B, C)
    cam = torch.einsum("bchw,bc->bhw", feats, weight).flatten(1)
    box = inside.flatten(1)
    positive = F.relu(cam)
    outside = (positive * (1.0 - box)).sum(1) / (positive.sum(1) + 1e-6)
    peak = -torch.log((torch.softmax(cam, dim=1) * box).sum(1) + 1e-6)
    inside_max = (cam * (box > 0.5) - 1e4 * (box <= 0.5)).max(1).values
    alive = F.relu(1.0 - inside_max)
    return (outside + 0.2 * peak + alive).mean()


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Fixed threads, seed and deterministic kernels for the run; the caller's settings come back after."""
    threads = torch.get_num_threads()
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.set_num_threads(THREADS)
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
            torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the zoo models (deterministic, CPU, 2 threads).")
    parser.add_argument("names", nargs="*", default=list(RECIPES), help="models to train (default: all)")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="where to write <name>.pt (default: the package's weights folder)")
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    args = parser.parse_args(argv)
    for name in args.names:
        out = (args.out_dir / f"{name}.pt") if args.out_dir else ZOO[name].weights_path
        train(name, out, steps=args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
