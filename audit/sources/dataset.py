"""The ``dataset:`` case source: a spec's cases read from a golden set instead of typed by hand.

```yaml
dataset:
  coco: annotations/instances_val.json    # or: voc: Annotations/ | folder: images/ | manifest: cases.csv
  images: images/                         # COCO: required; VOC: default ../JPEGImages; manifest: optional
  annotation: bbox                        # COCO: segmentation (default) or bbox
  labels_map: {cat: [tabby, tiger cat]}   # dataset class -> model labels (any of)
  limit: 500                              # a deterministic sample (by case id hash)
```

Each image becomes one case in YAML form: ``id`` (from the file name), ``image``, ``label`` (the dataset
class), ``labels`` (the model labels it stands for) and ``annotations`` (``{class: Region}``, the union
of every instance of each class; ``annotation`` is the case's own class). The spec's ``defaults`` then
say what to check (``expect: {top1_is_label: true}``, ``focus: {region: annotation}``), exactly as for
hand-written cases. Paths are relative to the spec's folder. The reading itself is
:mod:`audit.sources.readers`; images the set leaves out (no annotation, class not in ``labels_map``)
are named in one warning, never dropped silently. An image with a bad record (a box with negative
width, a malformed VOC file) is a case that errors with that record's message: the rest of the set runs.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator

from audit.errors import SpecError
from audit.sources import readers
from audit.sources.base import CaseSource, Location, SourceCase

FORMATS = ("coco", "voc", "folder", "manifest")

_PATH = {"type": "string", "minLength": 1}

SCHEMA = {
    "description": "Read the cases from a golden set (one case per image) instead of listing them "
                   "under cases:. Give exactly one of coco, voc, folder, manifest.",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "coco": {**_PATH, "description": "COCO instances JSON (bbox and segmentation polygons/RLE; every "
                                         "instance of a class joined into one region)"},
        "voc": {**_PATH, "description": "folder of Pascal VOC / ILSVRC XML annotations (1-based pixel boxes)"},
        "folder": {**_PATH, "description": "ImageFolder root: one subfolder per class, no regions"},
        "manifest": {**_PATH, "description": "CSV (path,label[,id][,x0,y0,x1,y1]) or JSONL manifest"},
        "images": {**_PATH, "description": "folder the annotation file's image names are relative to "
                                           "(required for coco; voc: default ../JPEGImages beside the XML "
                                           "folder; manifest: default the manifest's folder)"},
        "annotation": {"enum": list(readers.COCO_REGIONS),
                       "description": "COCO: the region of an instance is its segmentation (default; its "
                                      "bbox when it has none) or its bbox"},
        "labels_map": {
            "type": "object", "minProperties": 1,
            "description": "dataset class -> model label or list of model labels (any of them is right); "
                           "images with no mapped class are left out",
            "additionalProperties": {"oneOf": [
                {"type": ["string", "integer"]},
                {"type": "array", "minItems": 1, "items": {"type": ["string", "integer"]}}]}},
        "limit": {"type": "integer", "minimum": 1,
                  "description": "a deterministic sample of this many images (chosen by case id hash, "
                                 "kept in file order)"},
    },
    "oneOf": [{"required": [f]} for f in FORMATS],
}


class DatasetSource(CaseSource):
    key = "dataset"
    schema = SCHEMA

    def cases(self, raw: Any, ctx: Any) -> Iterator[SourceCase]:
        read = self.read(raw, ctx)
        base = Path(ctx.base_dir)
        for case in readers.sample(read.cases, raw.get("limit")):
            yield SourceCase(raw=case_raw(case, base),
                             location=Location(case.source, None, f"dataset[{case.id}]", record=case.record),
                             error=case.error)

    def read(self, raw: Any, ctx: Any) -> readers.DatasetRead:
        """The whole set (before ``limit``); problems of the ``dataset:`` block or of the annotation
        files are ``SpecError``s: the spec cannot run without its cases."""
        fmt = next(f for f in FORMATS if f in raw)
        base = Path(ctx.base_dir)
        source = _existing(base, raw[fmt], f"dataset.{fmt}", ctx, folder=fmt in ("voc", "folder"))
        images = None
        if "images" in raw:
            images = _existing(base, raw["images"], "dataset.images", ctx, folder=True)
        elif fmt == "coco":
            raise ctx.error("dataset.images", "a COCO set needs images: the folder its file_name entries "
                                              "are relative to")
        if "annotation" in raw and fmt != "coco":
            raise ctx.error("dataset.annotation", f"annotation: {raw['annotation']} applies to COCO sets "
                                                  f"only ({fmt} annotations are boxes)")
        labels_map = raw.get("labels_map")
        try:
            if fmt == "coco":
                read = readers.read_coco(source, images, labels_map, raw.get("annotation", "segmentation"))
            elif fmt == "voc":
                read = readers.read_voc(source, images, labels_map)
            elif fmt == "folder":
                if images is not None:
                    raise ctx.error("dataset.images", "an ImageFolder set is its own images folder: "
                                                      "remove images:")
                read = readers.read_folder(source, labels_map)
            else:
                read = readers.read_manifest(source, images, labels_map)
        except SpecError as exc:
            if exc.path is None:   # the spec's own problems (labels_map, a missing library): at its line
                key = "dataset.labels_map" if exc.message.startswith("labels_map:") else f"dataset.{fmt}"
                raise ctx.error(key, exc.message) from None
            raise
        if not read.cases:
            raise ctx.error(f"dataset.{fmt}", f"{raw[fmt]} holds no usable image"
                            + (f" ({len(read.skipped)} left out: {read.skipped[0]}, ...)" if read.skipped else ""))
        if read.skipped:
            shown = "; ".join(read.skipped[:3]) + ("; ..." if len(read.skipped) > 3 else "")
            warnings.warn(DatasetWarning(f"{ctx.path}: dataset: {len(read.skipped)} of "
                                         f"{len(read.skipped) + len(read.cases)} images left out: {shown}"),
                          stacklevel=2)
        return read


class DatasetWarning(UserWarning):
    """Images of a golden set that are not cases (no annotation, class not in labels_map)."""


def case_raw(case: readers.DatasetCase, base_dir: Path) -> dict:
    """A dataset case in YAML form: what the spec builder merges ``defaults`` into (the image path
    relative to the spec's folder, as a hand-written case has it)."""
    image = case.image if case.image.is_absolute() else Path(os.path.relpath(case.image, base_dir))
    raw = {"id": case.id, "image": image.as_posix(), "label": case.label, "labels": list(case.model_labels),
           "annotations": {name: readers.region_of(parts) for name, parts in case.annotations.items()}}
    return raw if case.label is not None else {k: v for k, v in raw.items() if k not in ("label", "labels")}


def _existing(base: Path, value: str, key: str, ctx: Any, folder: bool) -> Path:
    path = Path(value) if Path(value).is_absolute() else base / value
    if not path.exists():
        raise ctx.error(key, f"{value} not found (relative to the spec's folder {base})")
    if folder and not path.is_dir():
        raise ctx.error(key, f"{value} is a file; give a folder")
    if not folder and path.is_dir():
        raise ctx.error(key, f"{value} is a folder; give the annotation file")
    return path


SOURCE = DatasetSource()
