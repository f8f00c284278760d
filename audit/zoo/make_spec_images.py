"""Write the shipped spec images: ``python -m audit.zoo.make_spec_images``.

* ``specs/shapes/images/``: scenes without marker, ``PER_CLASS_SHAPES`` per class (``circle-01.png``),
  each classified correctly by ``shapes_vgg`` with its Grad-CAM on the object.
* ``examples/shortcut/images/``: scenes with the class-coded marker, ``PER_CLASS_SHORTCUT`` per class,
  on which ``shapes_vgg`` is right and looks at the object, while ``shapes_vgg_shortcut`` is right too
  but looks away from the object: the example whose label check passes and focus check fails.

Each folder gets a ``boxes.json``: file name -> label, object box (x1/y1 exclusive), seed, and the
marker box for marker images. Seeds are walked in order from the ``spec_images`` range and a scene is
kept only when the models behave as stated, so the shipped specs pass/fail deterministically; the
number of skipped seeds is printed (and recorded in audit/zoo/README.md).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable

from audit.zoo.evaluate import Explain, energy_in_box, engine_explainer, pointing_hit
from audit.zoo.scenes import CLASSES, SEED_RANGES, Scene, make_scene

REPO = Path(__file__).resolve().parents[2]
SHAPES_DIR = REPO / "specs" / "shapes" / "images"
SHORTCUT_DIR = REPO / "examples" / "shortcut" / "images"
PER_CLASS_SHAPES = 2
PER_CLASS_SHORTCUT = 1
FOCUSED_ENERGY = 0.4      # shapes_vgg: at least this share of heat in the box, and a pointing hit
SHORTCUT_ENERGY = 0.3     # shapes_vgg_shortcut: less than this share in the box, and a pointing miss
_SEEDS_PER_CLASS = 10_000


def _focused(explain: Explain, scene: Scene) -> bool:
    (pred,), (cam,) = explain([scene.image])
    return (pred == scene.label and pointing_hit(cam, scene.box)
            and energy_in_box(cam, scene.box) >= FOCUSED_ENERGY)


def _shortcut(explain: Explain, scene: Scene) -> bool:
    (pred,), (cam,) = explain([scene.image])
    return (pred == scene.label and not pointing_hit(cam, scene.box)
            and energy_in_box(cam, scene.box) < SHORTCUT_ENERGY)


def pick(label: int, count: int, marker: bool, offset: int,
         accept: Callable[[Scene], bool]) -> tuple[list[Scene], int]:
    """The first ``count`` scenes of class ``label`` that ``accept``; also how many were skipped."""
    first = SEED_RANGES["spec_images"][0] + offset + label * _SEEDS_PER_CLASS
    kept: list[Scene] = []
    skipped = 0
    for seed in range(first, first + _SEEDS_PER_CLASS):
        scene = make_scene(seed, marker=marker, label=label)
        if accept(scene):
            kept.append(scene)
            if len(kept) == count:
                return kept, skipped
        else:
            skipped += 1
    raise RuntimeError(f"no {count} acceptable {CLASSES[label]} scenes in {_SEEDS_PER_CLASS} seeds")


def write(folder: Path, scenes: list[Scene]) -> None:
    """PNGs named <class>-NN.png plus boxes.json; stale PNGs of a previous run are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    boxes: dict[str, dict] = {}
    counters: dict[str, int] = {}
    for scene in scenes:
        counters[scene.name] = counters.get(scene.name, 0) + 1
        file_name = f"{scene.name}-{counters[scene.name]:02d}.png"
        scene.image.save(folder / file_name, optimize=False)
        entry: dict = {"label": scene.name, "box": list(scene.box), "seed": scene.seed}
        if scene.marker_box is not None:
            entry["marker_box"] = list(scene.marker_box)
        boxes[file_name] = entry
    (folder / "boxes.json").write_text(json.dumps(boxes, indent=2) + "\n")


def make(explainer: Callable[[str], Explain] = engine_explainer, shapes_dir: Path = SHAPES_DIR,
         shortcut_dir: Path = SHORTCUT_DIR, log: Callable[[str], None] = print) -> dict[str, int]:
    """Pick and write both folders; returns the number of skipped seeds per folder."""
    honest, cheat = explainer("shapes_vgg"), explainer("shapes_vgg_shortcut")
    shapes: list[Scene] = []
    shortcut: list[Scene] = []
    skipped = {"shapes": 0, "shortcut": 0}
    for label in range(len(CLASSES)):
        kept, n = pick(label, PER_CLASS_SHAPES, False, 0, lambda s: _focused(honest, s))
        shapes += kept
        skipped["shapes"] += n
        kept, n = pick(label, PER_CLASS_SHORTCUT, True, 500_000,
                       lambda s: _shortcut(cheat, s) and _focused(honest, s))
        shortcut += kept
        skipped["shortcut"] += n
    write(shapes_dir, shapes)
    write(shortcut_dir, shortcut)
    log(f"{shapes_dir}: {len(shapes)} images, {skipped['shapes']} seeds skipped")
    log(f"{shortcut_dir}: {len(shortcut)} images, {skipped['shortcut']} seeds skipped")
    return skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the spec images of specs/shapes and "
                                                 "examples/shortcut from the shipped zoo weights.")
    parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    make()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
