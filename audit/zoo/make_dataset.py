"""Write a golden set of shape scenes in a standard annotation format.

``python -m audit.zoo.make_dataset --n N --format coco|voc|folder|csv|jsonl OUT``

Teams keep their golden sets as COCO instances JSON, Pascal VOC XML, class folders or CSV manifests;
this writes the same formats from :mod:`audit.zoo.scenes`, where every object's box and mask are
known exactly, so the dataset readers and the set-level gates can be tested offline against the
truth, and a 10,000-image run can be benchmarked without downloading anything.

Layouts (every format is what its own tools expect):

* ``coco``: ``OUT/images/<name>.png`` and ``OUT/annotations/instances.json`` (one annotation per
  scene: ``bbox`` [x, y, w, h] of the object's pixels, ``segmentation`` the exact mask as a
  compressed RLE written by pycocotools, ``area`` its pixel count; ``--segmentation none`` omits it).
* ``voc``: ``OUT/JPEGImages/<name>.png`` and ``OUT/Annotations/<name>.xml`` with 1-based inclusive
  pixel boxes, as the VOC devkit writes them (pixel columns x0..x1-1 are xmin=x0+1, xmax=x1).
* ``folder``: ``OUT/<class>/<name>.png`` (torchvision ImageFolder: no regions).
* ``csv``: ``OUT/images/<name>.png`` and ``OUT/cases.csv`` with ``path,label,x0,y0,x1,y1`` (path
  relative to the manifest; the box in 0-based pixel edges, x1/y1 exclusive, as a spec's ``box``).
* ``jsonl``: the same as one JSON object per line in ``OUT/cases.jsonl`` (``box`` a 4-list).

Every format also gets ``OUT/truth.json``: per image file its seed, class and exact box, so a test
can compare what a reader returns with what was drawn.

Scenes are balanced: scene ``i`` has class ``i % 6`` and seed ``--first-seed + i`` (default: the
start of the ``datasets`` range of :data:`audit.zoo.scenes.SEED_RANGES`). ``--marker`` adds the
class-coded corner marker (the shortcut twin's cue) to every scene. The output is deterministic in
the arguments: the same command writes the same bytes.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import numpy as np

from audit.zoo.scenes import CLASSES, SEED_RANGES, SIZE, Scene, make_scene

FORMATS = ("coco", "voc", "folder", "csv", "jsonl")
SEGMENTATIONS = ("rle", "none")


def scenes(n: int, first_seed: int, marker: bool = False):
    """(file name, scene) for the ``n`` scenes of a set, class ``i % 6`` for scene ``i``."""
    for i in range(n):
        scene = make_scene(first_seed + i, marker=marker, label=i % len(CLASSES))
        yield f"{scene.name}-{i:05d}.png", scene


def write_dataset(out: Path, n: int, fmt: str, first_seed: int | None = None, marker: bool = False,
                  segmentation: str = "rle") -> Path:
    """Write the set and return the file or folder a spec's ``dataset:`` names for it."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if segmentation not in SEGMENTATIONS:
        raise ValueError(f"segmentation must be one of {', '.join(SEGMENTATIONS)}, got {segmentation!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    first_seed = SEED_RANGES["datasets"][0] if first_seed is None else first_seed
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image_dir = {"voc": out / "JPEGImages", "folder": out}.get(fmt, out / "images")
    truth: dict[str, dict] = {}
    coco = _CocoWriter() if fmt == "coco" else None
    rows: list[dict] = []
    for file_name, scene in scenes(n, first_seed, marker):
        folder = image_dir / scene.name if fmt == "folder" else image_dir
        folder.mkdir(parents=True, exist_ok=True)
        scene.image.save(folder / file_name, optimize=False)
        rel = (folder / file_name).relative_to(out).as_posix()
        truth[rel] = {"seed": scene.seed, "label": scene.name, "box": list(scene.box),
                      **({"marker_box": list(scene.marker_box)} if scene.marker_box else {})}
        if coco is not None:
            coco.add(file_name, scene, segmentation)
        elif fmt == "voc":
            _write_voc(out / "Annotations" / (Path(file_name).stem + ".xml"), file_name, scene)
        elif fmt in ("csv", "jsonl"):
            rows.append({"path": rel, "label": scene.name, "box": list(scene.box)})
    (out / "truth.json").write_text(json.dumps(
        {"first_seed": first_seed, "n": n, "marker": marker, "images": truth}, indent=1) + "\n")
    if coco is not None:
        target = out / "annotations" / "instances.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(coco.document(), separators=(",", ":")) + "\n")
        return target
    if fmt == "voc":
        return out / "Annotations"
    if fmt == "folder":
        return out
    if fmt == "csv":
        target = out / "cases.csv"
        with target.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "label", "x0", "y0", "x1", "y1"])
            for row in rows:
                writer.writerow([row["path"], row["label"], *row["box"]])
        return target
    target = out / "cases.jsonl"
    target.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return target


class _CocoWriter:
    """Accumulates the images/annotations/categories lists of a COCO instances file."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, file_name: str, scene: Scene, segmentation: str) -> None:
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": file_name, "width": SIZE, "height": SIZE})
        x0, y0, x1, y1 = scene.box
        ann = {"id": len(self.annotations) + 1, "image_id": image_id, "category_id": scene.label + 1,
               "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(scene.mask.sum()), "iscrowd": 0}
        if segmentation == "rle":
            from audit.sources.readers import coco_masks
            mask_utils = coco_masks()
            rle = mask_utils.encode(np.asfortranarray(scene.mask.astype(np.uint8)))
            ann["segmentation"] = {"size": [int(v) for v in rle["size"]],
                                   "counts": rle["counts"].decode("ascii")}
        self.annotations.append(ann)

    def document(self) -> dict:
        categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                      for i, name in enumerate(CLASSES)]
        return {"info": {"description": "model-audit shape scenes (audit.zoo.make_dataset)"},
                "images": self.images, "annotations": self.annotations, "categories": categories}


def _write_voc(path: Path, file_name: str, scene: Scene) -> None:
    """One VOC annotation; boxes 1-based and inclusive (the devkit's convention)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "JPEGImages"
    ET.SubElement(root, "filename").text = file_name
    size = ET.SubElement(root, "size")
    for tag, value in (("width", SIZE), ("height", SIZE), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    obj = ET.SubElement(root, "object")
    ET.SubElement(obj, "name").text = scene.name
    ET.SubElement(obj, "difficult").text = "0"
    box = ET.SubElement(obj, "bndbox")
    x0, y0, x1, y1 = scene.box
    for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
        ET.SubElement(box, tag).text = str(value)
    ET.indent(root)
    path.write_bytes(ET.tostring(root, encoding="utf-8") + b"\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m audit.zoo.make_dataset",
        description="Write a golden set of shape scenes with exact boxes and masks.",
        epilog="example: python -m audit.zoo.make_dataset --n 120 --format coco --marker specs/shapes-dataset")
    parser.add_argument("out", type=Path, help="output folder (created)")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--format", choices=FORMATS, required=True)
    parser.add_argument("--first-seed", type=int, default=None,
                        help=f"seed of the first scene (default {SEED_RANGES['datasets'][0]}, "
                             "the start of the 'datasets' seed range)")
    parser.add_argument("--marker", action="store_true",
                        help="draw the class-coded corner marker (the shortcut twin's cue) in every scene")
    parser.add_argument("--segmentation", choices=SEGMENTATIONS, default="rle",
                        help="COCO only: exact masks as compressed RLE (default) or none")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1:
        print(f"make_dataset: error: --n must be at least 1, got {args.n}", file=sys.stderr)
        return 2
    target = write_dataset(args.out, args.n, args.format, args.first_seed, args.marker, args.segmentation)
    print(f"wrote {args.n} scenes ({args.format}) to {args.out}; annotations: {target}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
