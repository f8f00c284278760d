"""Golden sets in the formats teams already keep, read into one case per image (no torch).

A regression gate is a set of hundreds to tens of thousands of annotated images; typing them as YAML
cases is not an option, and the annotations already exist: COCO instances JSON, Pascal VOC XML (also
how ImageNet's ILSVRC validation boxes ship), class folders, CSV/JSONL manifests. Each reader turns
one of them into :class:`DatasetCase` records: a stable id from the file name, the image path, the
dataset's class, and per class the annotated region as spec region values.

Rules every reader follows:

* One case per image. An image annotated with several classes takes as its label the class with the
  largest annotated area (ties: the first class in the file's category order); with a ``labels_map``
  only mapped classes count, and an image with no usable class is skipped and listed in
  :attr:`DatasetRead.skipped` (never silently dropped).
* A class's region is the union of **every** instance of it: a pointing game against one instance's
  box is inflated when another instance of the class gets the heat (Score-CAM#23, ADL#10).
* Boxes become ``{"box": [x0, y0, x1, y1]}`` in 0-based pixel edges, x1/y1 exclusive (the spec's own
  convention): COCO ``[x, y, w, h]`` is ``[x, y, x + w, y + h]``; VOC's 1-based inclusive pixel
  indices are ``[xmin - 1, ymin - 1, xmax, ymax]``. COCO segmentations (polygons, RLE, crowd RLE) go
  through pycocotools, exactly as COCO's own evaluation rasterises them, and stay compressed
  (:class:`RLEMask`) until a case is prepared, so 10,000 cases cost a few MB.
* Errors are :class:`~audit.errors.SpecError` naming the annotation file and the record
  (``instances.json: annotation 1234: bbox has negative width``). A bad record that belongs to one
  image (a box, a polygon, an object of a VOC file, a manifest row) makes that image an errored case
  (:attr:`DatasetCase.error`): one bad box must not stop the other 9,999 images. A problem of the file
  itself (not JSON, no ``images`` list, a record naming no image) is raised: nothing can be read.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping, Sequence
from xml.etree import ElementTree as ET

import numpy as np

from audit import regions
from audit.errors import SpecError, closest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""What ImageFolder counts as an image (torchvision's IMG_EXTENSIONS), compared case-insensitively."""

EDGE_SLACK_PX = 1.0
"""COCO/VOC coordinates are floats rounded by annotation tools: a box or polygon that overshoots the
image by at most this much is clipped to it; anything further out is an error in the annotation."""


# ------------------------------------------------------------------------------------------- records

@dataclass(frozen=True, eq=False)
class RLEMask(regions.Region):
    """One class's pixels as a COCO compressed RLE (``{"size": [h, w], "counts": bytes}``): a region.

    Kept compressed because a golden set holds thousands of them; ``mask`` decodes on demand (one
    case at a time, while it is prepared). ``name`` says where it came from, for messages.
    """

    rle: Mapping[str, Any] = field(repr=False)
    name: str = "segmentation"

    @property
    def image_size(self) -> tuple[int, int]:
        """(w, h) of the image the mask belongs to."""
        h, w = self.rle["size"]
        return int(w), int(h)

    def array(self) -> np.ndarray:
        """Bool (h, w): True inside."""
        return _decode(self.rle)

    def area(self) -> int:
        mask_utils = coco_masks()
        return int(mask_utils.area(dict(self.rle)))

    def mask(self, image_size, base_dir=".") -> np.ndarray:
        return regions.MaskArray(self.array(), self.name).mask(image_size, base_dir)

    def outline(self, image_size, base_dir=".") -> list:
        return regions.MaskArray(self.array(), self.name).outline(image_size, base_dir)

    def describe(self) -> str:
        return self.name


def region_of(parts: Sequence[Any]) -> regions.Region:
    """The typed region of an annotation's parts (boxes and RLE masks): one part, or their union."""
    typed = [regions.parse(p) for p in parts]
    return typed[0] if len(typed) == 1 else regions.Union(tuple(typed))


def coco_masks() -> Any:
    """pycocotools' mask module (the optional ``datasets`` extra), or a one-line error saying how to get it."""
    try:
        from pycocotools import mask as mask_utils
    except ModuleNotFoundError:
        raise SpecError("COCO annotations need pycocotools: pip install 'model-audit[datasets]' "
                        "(or pip install pycocotools)") from None
    return mask_utils


def _decode(rle: Mapping[str, Any]) -> np.ndarray:
    """pycocotools' decode as bool; its NumPy-2 DeprecationWarning (``__array__`` without ``copy``)
    is about pycocotools' own code and silenced for this call only."""
    mask_utils = coco_masks()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*__array__")
        return mask_utils.decode(dict(rle)).astype(bool)


@dataclass(frozen=True, eq=False)
class DatasetCase:
    """One image of a golden set.

    ``label`` is the dataset's class, ``model_labels`` the model labels it stands for (any of:
    ``labels_map[label]``, else the class itself). ``annotations`` maps each annotated class to its
    region as a spec region value: a list of parts, each ``{"box": [x0, y0, x1, y1]}`` or an
    :class:`RLEMask`; a list is a union. ``image_size`` is the (w, h) the annotation file declares
    (None when it declares none); the case source compares it with the decoded image.
    ``source``/``record`` say where the case came from, for messages. ``error`` is set when a record
    of the image is bad: the case cannot run and reports that error (its ``label`` is the best guess
    or None, its ``annotations`` empty).
    """

    id: str
    image: Path
    label: str
    model_labels: tuple[str, ...]
    annotations: Mapping[str, list]
    image_size: tuple[int, int] | None
    source: Path
    record: str
    error: SpecError | None = None

    @property
    def region(self) -> list | None:
        """The region of the case's own label, or None (ImageFolder sets, unannotated manifest rows)."""
        return self.annotations.get(self.label)


@dataclass(frozen=True)
class DatasetRead:
    """The cases of a set in file order, the classes it knows, and the images left out with why."""

    cases: list[DatasetCase]
    categories: tuple[str, ...]
    skipped: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------ shared helpers

def stable_hash(case_id: str) -> int:
    """A hash of a case id that is the same on every machine and Python (sampling and shards use it)."""
    return int.from_bytes(hashlib.sha1(case_id.encode("utf-8")).digest()[:8], "big")


def sample(cases: Sequence[DatasetCase], limit: int | None) -> list[DatasetCase]:
    """``limit`` cases chosen by the hash of their id, kept in file order.

    Chosen by id hash, not "the first N", so that the sample covers every class of a sorted set and a
    case stays in the sample when the set grows (only cases whose hash ranks higher can push it out).
    """
    if limit is None or limit >= len(cases):
        return list(cases)
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    keep = set(sorted(range(len(cases)), key=lambda i: (stable_hash(cases[i].id), cases[i].id))[:limit])
    return [case for i, case in enumerate(cases) if i in keep]


def normalise_labels_map(raw: Mapping[str, Any] | None, categories: Iterable[str],
                         where: str) -> dict[str, tuple[str, ...]] | None:
    """``{category: label | [labels]}`` checked against the set's classes (``where`` names the file).

    A key that is no class of the set would silently map nothing, so it is an error with the
    closest class names.
    """
    if raw is None:
        return None
    known = list(dict.fromkeys(categories))
    out: dict[str, tuple[str, ...]] = {}
    for category, labels in raw.items():
        category = str(category)
        if category not in known:
            hint = closest(category, known)
            raise SpecError(f"labels_map: {category!r} is not a class of {where}"
                            + (f"; did you mean: {', '.join(repr(h) for h in hint)}" if hint else
                               " (it has no classes)"))
        values = labels if isinstance(labels, (list, tuple)) else [labels]
        if not values or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
            raise SpecError(f"labels_map: {category!r} must map to a model label or a non-empty list "
                            f"of them, got {labels!r}")
        out[category] = tuple(str(v) for v in values)
    return out


def _model_labels(label: str, labels_map: Mapping[str, tuple[str, ...]] | None) -> tuple[str, ...]:
    if labels_map is None:
        return (label,)
    return labels_map[label]


def _pick_label(areas: Mapping[str, float], order: Sequence[str],
                labels_map: Mapping[str, tuple[str, ...]] | None) -> str | None:
    """The class with the largest area among the usable ones; ties go to the first in ``order``."""
    usable = [c for c in order if c in areas and (labels_map is None or c in labels_map)]
    if not usable:
        return None
    return max(usable, key=lambda c: (areas[c], -usable.index(c)))


_ID_UNSAFE = re.compile(r"[\s:]|[^\x20-\x7e\u00a0-\uffff]")


def _case_id(name: str) -> str:
    """The case id of an image file: its path as written without the image suffix, ``/`` written as
    ``.`` and whitespace, ``:`` or control characters as ``_``.

    Ids end up in pytest node ids (``spec.yaml::<id>::focus``), where ``/``, ``::`` and whitespace
    would break ``-k`` and ``--lf``; two files that map to one id are an error (``_unique_ids``).
    """
    path = PurePosixPath(name.replace("\\", "/"))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        path = path.with_suffix("")
    return _ID_UNSAFE.sub("_", ".".join(p for p in path.parts if p not in ("", "/", ".")))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _whole(v: float) -> float | int:
    """Integral floats as ints, so messages say box [3, 4, 10, 12], not [3.0, 4.0, 10.0, 12.0]."""
    return int(v) if v == int(v) else v


def _clip(v: float, hi: float) -> float:
    return min(max(v, 0.0), hi)


def _box_area_union(boxes: Sequence[Sequence[float]], size: tuple[int, int] | None) -> float:
    """Pixel count of a union of boxes (pixel-centre rule), or the sum of areas without an image size."""
    if size is None:
        return float(sum((b[2] - b[0]) * (b[3] - b[1]) for b in boxes))
    w, h = size
    covered = np.zeros((h, w), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        covered[math.ceil(y0 - 0.5):math.ceil(y1 - 0.5), math.ceil(x0 - 0.5):math.ceil(x1 - 0.5)] = True
    return float(covered.sum())


def _errored_case(case_id: str, image: Path, named: Sequence[str], order: Sequence[str],
                  labels_map: Mapping[str, tuple[str, ...]] | None, source: Path, record: str,
                  error: SpecError) -> DatasetCase | None:
    """The case of an image with a bad record: it errors with that record's message.

    ``named`` are the classes its records name (good and bad ones, as far as they could be read). With a
    ``labels_map`` that maps none of them the image would not be a case anyway, so it is skipped (None),
    not made an error of a class nobody audits; when no class could be read it is an error (it may be one
    of the audited ones). The label is the first usable class named, for the gates' per-class table.
    """
    usable = [c for c in order if c in named and (labels_map is None or c in labels_map)]
    if named and not usable:
        return None
    label = usable[0] if usable else None
    return DatasetCase(id=case_id, image=image, label=label,
                       model_labels=_model_labels(label, labels_map) if label is not None else (),
                       annotations={}, image_size=None, source=source, record=record, error=error)


def _unique_ids(cases: list[DatasetCase], path: Path) -> None:
    seen: dict[str, str] = {}
    for case in cases:
        if case.id in seen:
            raise SpecError(f"{case.record}: case id {case.id!r} (from the file name) is used twice "
                            f"(also {seen[case.id]}); file names must be unique without their suffix",
                            path)
        seen[case.id] = case.record


# --------------------------------------------------------------------------------------------- COCO

COCO_REGIONS = ("segmentation", "bbox")


def read_coco(path: Path | str, images: Path | str, labels_map: Mapping[str, Any] | None = None,
              region: str = "segmentation") -> DatasetRead:
    """A COCO instances file; ``images`` is the folder the ``file_name`` entries are relative to.

    ``region="segmentation"`` (default) uses each instance's segmentation (its bbox when it has
    none); ``"bbox"`` uses the boxes only.
    """
    path, images = Path(path), Path(images)
    if region not in COCO_REGIONS:
        raise ValueError(f"region must be one of {COCO_REGIONS}, got {region!r}")
    doc = _load_json(path)
    if not isinstance(doc, dict):
        raise SpecError(f"a COCO instances file is a JSON object with images, annotations and "
                        f"categories, got {type(doc).__name__}", path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise SpecError(f"has no {key!r} list: not a COCO instances file", path)

    categories: dict[int, str] = {}
    for i, cat in enumerate(doc["categories"]):
        cid = _int(cat.get("id")) if isinstance(cat, dict) else None
        name = cat.get("name") if isinstance(cat, dict) else None
        if cid is None or not isinstance(name, str) or not name:
            raise SpecError(f"categories[{i}]: needs an integer id and a name, got {cat!r}", path)
        if cid in categories:
            raise SpecError(f"category {cid}: id used twice ({categories[cid]!r} and {name!r})", path)
        if name in categories.values():
            raise SpecError(f"category {cid}: name {name!r} used twice", path)
        categories[cid] = name
    order = list(categories.values())
    labels_map = normalise_labels_map(labels_map, order, path.name)

    image_info: dict[int, tuple[str, int, int]] = {}
    bad: dict[int, SpecError] = {}          # image id -> the first bad record of that image
    bad_classes: dict[int, list[str]] = {}  # image id -> the classes its bad annotations name
    for i, img in enumerate(doc["images"]):
        iid = _int(img.get("id")) if isinstance(img, dict) else None
        if iid is None:
            raise SpecError(f"images[{i}]: needs an integer id, got {img!r}", path)
        name, w, h = img.get("file_name"), _int(img.get("width")), _int(img.get("height"))
        if not isinstance(name, str) or not name:
            raise SpecError(f"image {iid}: file_name must be a non-empty string, got {name!r}", path)
        if iid in image_info:
            raise SpecError(f"image {iid}: id used twice ({image_info[iid][0]} and {name})", path)
        if w is None or h is None or w <= 0 or h <= 0:
            bad[iid] = SpecError(f"image {iid}: width and height must be positive integers, "
                                 f"got {img.get('width')!r} x {img.get('height')!r}", path)
            w = h = 0
        image_info[iid] = (name, w, h)

    # per image, per class: boxes and RLEs of every instance
    parts: dict[int, dict[str, tuple[list, list]]] = {}
    for i, ann in enumerate(doc["annotations"]):
        aid = _int(ann.get("id")) if isinstance(ann, dict) else None
        record = f"annotation {aid}" if aid is not None else f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise SpecError(f"{record}: must be an object, got {ann!r}", path)
        iid, cid = ann.get("image_id"), ann.get("category_id")
        if iid not in image_info:   # no image to hang the error on: the file is wrong
            raise SpecError(f"{record}: image_id {iid!r} is not in images", path)
        if iid in bad:
            if cid in categories:
                bad_classes.setdefault(iid, []).append(categories[cid])
            continue
        try:
            if cid not in categories:
                raise SpecError(f"{record}: category_id {cid!r} is not in categories", path)
            name, w, h = image_info[iid]
            box = _coco_bbox(ann.get("bbox"), w, h, record, path)
            rle = None
            if region == "segmentation" and ann.get("segmentation") not in (None, [], {}):
                rle = _coco_rle(ann["segmentation"], w, h, record, path)
        except SpecError as exc:
            bad[iid] = exc
            if cid in categories:
                bad_classes.setdefault(iid, []).append(categories[cid])
            continue
        boxes, rles = parts.setdefault(iid, {}).setdefault(categories[cid], ([], []))
        if rle is not None:
            rles.append(rle)
        else:
            boxes.append(box)

    mask_utils = coco_masks()
    cases: list[DatasetCase] = []
    skipped: list[str] = []
    for iid, (name, w, h) in image_info.items():
        record = f"image {iid} ({name})"
        per_class = parts.get(iid)
        if iid in bad:
            named = [*(per_class or {}), *bad_classes.get(iid, ())]
            case = _errored_case(_case_id(name), images / name, named, order, labels_map, path, record, bad[iid])
            if case is None:
                skipped.append(f"{record}: none of its classes ({', '.join(dict.fromkeys(named))}) is in labels_map")
            else:
                cases.append(case)
            continue
        if not per_class:
            skipped.append(f"{record}: no annotation, so no label")
            continue
        annotations: dict[str, list] = {}
        areas: dict[str, float] = {}
        for cat, (boxes, rles) in per_class.items():
            region_parts: list = []
            area_rles = []
            if rles:
                merged = mask_utils.merge(rles) if len(rles) > 1 else rles[0]
                region_parts.append(RLEMask(merged, f"segmentation of {cat!r} ({len(rles)} instance"
                                                    f"{'s' if len(rles) != 1 else ''})"))
                area_rles.append(merged)
            if boxes:
                region_parts.extend({"box": list(b)} for b in boxes)
                area_rles.extend(mask_utils.frPyObjects(np.array(
                    [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in boxes], dtype=np.float64), h, w))
            annotations[cat] = region_parts
            union = mask_utils.merge(area_rles) if len(area_rles) > 1 else area_rles[0]
            areas[cat] = float(mask_utils.area(union))
        label = _pick_label(areas, order, labels_map)
        if label is None:
            skipped.append(f"{record}: none of its classes ({', '.join(annotations)}) is in labels_map")
            continue
        cases.append(DatasetCase(id=_case_id(name), image=images / name, label=label,
                                 model_labels=_model_labels(label, labels_map), annotations=annotations,
                                 image_size=(w, h), source=path, record=record))
    _unique_ids(cases, path)
    return DatasetRead(cases, tuple(order), tuple(skipped))


def _coco_bbox(raw: Any, w: int, h: int, record: str, path: Path) -> tuple[float, float, float, float]:
    values = [_number(v) for v in raw] if isinstance(raw, list) and len(raw) == 4 else None
    if values is None or None in values:
        raise SpecError(f"{record}: bbox must be 4 numbers [x, y, width, height], got {raw!r}", path)
    x, y, bw, bh = values
    if bw < 0:
        raise SpecError(f"{record}: bbox has negative width ({raw!r}; COCO boxes are [x, y, width, height])",
                        path)
    if bh < 0:
        raise SpecError(f"{record}: bbox has negative height ({raw!r}; COCO boxes are [x, y, width, height])",
                        path)
    if bw == 0 or bh == 0:
        raise SpecError(f"{record}: bbox {raw!r} is empty (width or height 0)", path)
    x1, y1 = x + bw, y + bh
    if x < -EDGE_SLACK_PX or y < -EDGE_SLACK_PX or x1 > w + EDGE_SLACK_PX or y1 > h + EDGE_SLACK_PX:
        raise SpecError(f"{record}: bbox {raw!r} goes outside the {w}x{h} image", path)
    box = tuple(_whole(v) for v in (_clip(x, w), _clip(y, h), _clip(x1, w), _clip(y1, h)))
    if box[0] >= box[2] or box[1] >= box[3]:
        raise SpecError(f"{record}: bbox {raw!r} lies on the edge of the {w}x{h} image: no pixel inside",
                        path)
    return box


def _coco_rle(segm: Any, w: int, h: int, record: str, path: Path) -> dict:
    """Any COCO segmentation as one compressed RLE, through pycocotools like COCO.annToRLE."""
    mask_utils = coco_masks()
    if isinstance(segm, list):
        polygons = []
        for j, poly in enumerate(segm):
            coords = [_number(v) for v in poly] if isinstance(poly, list) else None
            if coords is None or None in coords or len(coords) < 6 or len(coords) % 2:
                raise SpecError(f"{record}: segmentation polygon {j} must be a flat list of at least 3 "
                                f"x, y pairs, got {_short(poly)}", path)
            xs, ys = coords[0::2], coords[1::2]
            if (min(xs) < -EDGE_SLACK_PX or min(ys) < -EDGE_SLACK_PX or max(xs) > w + EDGE_SLACK_PX
                    or max(ys) > h + EDGE_SLACK_PX):
                raise SpecError(f"{record}: segmentation polygon {j} goes outside the {w}x{h} image", path)
            polygons.append(coords)
        return mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if size != [h, w]:
            raise SpecError(f"{record}: segmentation RLE size {size!r} is not the image's [height, width] "
                            f"[{h}, {w}]", path)
        if isinstance(counts, list):
            if not all(_int(c) is not None and c >= 0 for c in counts) or sum(counts) != h * w:
                raise SpecError(f"{record}: uncompressed RLE counts must be non-negative integers summing "
                                f"to {h * w} (height x width)", path)
            return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
        if isinstance(counts, str):
            rle = {"size": [h, w], "counts": counts.encode("ascii", "replace")}
            try:
                mask_utils.area(rle)
                _decode(rle)
            except Exception as exc:  # pycocotools raises ValueError or its own errors on bad strings
                raise SpecError(f"{record}: segmentation RLE counts cannot be decoded ({exc})", path) from None
            return rle
        raise SpecError(f"{record}: segmentation RLE counts must be a string or a list of integers, "
                        f"got {type(counts).__name__}", path)
    raise SpecError(f"{record}: segmentation must be a list of polygons or an RLE object, "
                    f"got {type(segm).__name__}", path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _load_json(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise SpecError("annotation file not found", path) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a JSON annotation file", path) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}", path) from None


# ------------------------------------------------------------------------------------------ VOC XML

_ILSVRC_SUFFIXES = (".JPEG", ".jpg", ".jpeg", ".png")


def read_voc(folder: Path | str, images: Path | str | None = None,
             labels_map: Mapping[str, Any] | None = None) -> DatasetRead:
    """A folder of Pascal VOC / ILSVRC annotation XML files (one per image), read in name order.

    ``images`` defaults to the ``JPEGImages`` folder beside ``folder`` (the VOC layout). ILSVRC's
    ``<filename>`` has no suffix; the image is then the first of ``.JPEG``, ``.jpg``, ``.jpeg``,
    ``.png`` that exists. ``difficult`` and ``truncated`` objects belong to their class's region.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError("VOC annotation folder not found" if not folder.exists()
                        else "is a file: give the folder of VOC .xml annotation files", folder)
    images = Path(images) if images is not None else folder.parent / "JPEGImages"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".xml" and not p.name.startswith("."))
    if not files:
        raise SpecError("holds no .xml annotation files", folder)
    parsed: list[tuple[str, tuple[int, int] | None, list] | SpecError] = []
    named: list[str] = []   # every class, also those of files that failed validation
    for xml in files:
        try:
            parsed.append(_voc_file(xml))
            named += [cls for cls, _ in parsed[-1][2]]
        except SpecError as exc:   # this image's case errors; the other files are still read
            parsed.append(exc)
            named += _voc_names(xml)
    order = list(dict.fromkeys(named))
    labels_map = normalise_labels_map(labels_map, order, f"{folder}")
    cases: list[DatasetCase] = []
    skipped: list[str] = []
    for xml, entry in zip(files, parsed):
        record = xml.name
        if isinstance(entry, SpecError):
            name = _voc_filename(xml) or xml.stem
            case = _errored_case(_case_id(name), _voc_image(images, name), _voc_names(xml), order, labels_map,
                                 xml, record, entry)
            if case is None:
                skipped.append(f"{record}: none of its classes is in labels_map")
            else:
                cases.append(case)
            continue
        name, size, objects = entry
        if not objects:
            skipped.append(f"{record}: no object, so no label")
            continue
        per_class: dict[str, list] = {}
        for cls, box in objects:
            per_class.setdefault(cls, []).append(box)
        areas = {cls: _box_area_union(boxes, size) for cls, boxes in per_class.items()}
        label = _pick_label(areas, order, labels_map)
        if label is None:
            skipped.append(f"{record}: none of its classes ({', '.join(per_class)}) is in labels_map")
            continue
        annotations = {cls: [{"box": list(b)} for b in boxes] for cls, boxes in per_class.items()}
        cases.append(DatasetCase(id=_case_id(name), image=_voc_image(images, name), label=label,
                                 model_labels=_model_labels(label, labels_map), annotations=annotations,
                                 image_size=size, source=xml, record=record))
    _unique_ids(cases, folder)
    return DatasetRead(cases, tuple(order), tuple(skipped))


def _voc_image(images: Path, name: str) -> Path:
    path = images / name
    if PurePosixPath(name).suffix or path.exists():
        return path
    for suffix in _ILSVRC_SUFFIXES:
        candidate = images / (name + suffix)
        if candidate.exists():
            return candidate
    return path


def _voc_root(xml: Path) -> ET.Element | None:
    try:
        return ET.parse(xml).getroot()
    except (ET.ParseError, OSError):
        return None


def _voc_filename(xml: Path) -> str | None:
    """The ``<filename>`` of a VOC file that failed validation, when it can be parsed at all (the case id
    stays the one the fixed file will give)."""
    root = _voc_root(xml)
    return ((root.findtext("filename") or "").strip() or None) if root is not None else None


def _voc_names(xml: Path) -> list[str]:
    """The object classes a VOC file that failed validation names, as far as it parses."""
    root = _voc_root(xml)
    return [] if root is None else [n for n in ((o.findtext("name") or "").strip() for o in root.findall("object")) if n]


def _voc_file(xml: Path) -> tuple[str, tuple[int, int] | None, list[tuple[str, tuple]]]:
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise SpecError(f"not well-formed XML: {exc}", xml) from None
    except OSError as exc:
        raise SpecError(f"cannot be read: {exc.strerror or exc}", xml) from None
    name = (root.findtext("filename") or "").strip()
    if not name:
        raise SpecError("has no <filename>: not a VOC annotation", xml)
    size = None
    size_el = root.find("size")
    if size_el is not None:
        w, h = (_xml_number(size_el, tag, "size", xml) for tag in ("width", "height"))
        if w <= 0 or h <= 0 or w != int(w) or h != int(h):
            raise SpecError(f"size {w:g}x{h:g} must be positive whole pixels", xml)
        size = (int(w), int(h))
    objects = []
    for j, obj in enumerate(root.findall("object"), start=1):
        cls = (obj.findtext("name") or "").strip()
        record = f"object {j}" + (f" ({cls})" if cls else "")
        if not cls:
            raise SpecError(f"{record}: has no <name>", xml)
        bnd = obj.find("bndbox")
        if bnd is None:
            raise SpecError(f"{record}: has no <bndbox>", xml)
        xmin, ymin, xmax, ymax = (_xml_number(bnd, tag, record, xml) for tag in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise SpecError(f"{record}: bndbox has its corners swapped (xmin {xmin:g}, xmax {xmax:g}, "
                            f"ymin {ymin:g}, ymax {ymax:g})", xml)
        if xmin < 1 or ymin < 1:
            raise SpecError(f"{record}: bndbox xmin {xmin:g}, ymin {ymin:g}: VOC boxes are 1-based "
                            f"pixel indices (the first pixel is 1)", xml)
        if size is not None and (xmax > size[0] or ymax > size[1]):
            raise SpecError(f"{record}: bndbox xmax {xmax:g}, ymax {ymax:g} goes outside the "
                            f"{size[0]}x{size[1]} image", xml)
        objects.append((cls, tuple(_whole(v) for v in (xmin - 1, ymin - 1, xmax, ymax))))
    return name, size, objects


def _xml_number(parent: ET.Element, tag: str, record: str, xml: Path) -> float:
    text = parent.findtext(tag)
    try:
        value = float(text.strip()) if text is not None else None
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise SpecError(f"{record}: <{tag}> must be a number, got {text!r}", xml)
    return _whole(value)


# -------------------------------------------------------------------------------------- ImageFolder

def read_folder(folder: Path | str, labels_map: Mapping[str, Any] | None = None) -> DatasetRead:
    """torchvision's ImageFolder layout: ``folder/<class>/**/<image>``; no regions.

    Classes are the subfolder names in sorted order; files without an image suffix and hidden
    entries are not cases (as in ImageFolder). Case ids are ``<class>/<path without suffix>``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SpecError("image folder not found" if not folder.exists() else
                        "is a file: give the folder whose subfolders are the classes", folder)
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SpecError("has no class subfolders (ImageFolder layout: <folder>/<class>/<image>)", folder)
    labels_map = normalise_labels_map(labels_map, classes, f"{folder}")
    cases: list[DatasetCase] = []
    skipped: list[str] = []
    for cls in classes:
        if labels_map is not None and cls not in labels_map:
            skipped.append(f"{cls}/: class not in labels_map")
            continue
        for path in sorted((folder / cls).rglob("*")):
            rel = path.relative_to(folder)
            if (path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in rel.parts)
                    or not path.is_file()):
                continue
            cases.append(DatasetCase(id=_case_id(rel.as_posix()), image=path, label=cls,
                                     model_labels=_model_labels(cls, labels_map), annotations={},
                                     image_size=None, source=folder, record=rel.as_posix()))
    _unique_ids(cases, folder)
    return DatasetRead(cases, tuple(classes), tuple(skipped))


# -------------------------------------------------------------------------------------- manifests

_BOX_COLUMNS = ("x0", "y0", "x1", "y1")


def read_manifest(path: Path | str, images: Path | str | None = None,
                  labels_map: Mapping[str, Any] | None = None) -> DatasetRead:
    """A CSV (header ``path,label[,id][,x0,y0,x1,y1]``) or JSONL (``{"path", "label", "id"?,
    "box"?: [x0, y0, x1, y1], "boxes"?: [[...], ...]}`` per line) manifest.

    Paths are relative to ``images``, else to the manifest's folder. Boxes are 0-based pixel edges,
    x1/y1 exclusive (the spec's ``box``). Rows naming the same image add their boxes to it (several
    instances); they must agree on the label. Other CSV columns are allowed and ignored.
    """
    path = Path(path)
    base = Path(images) if images is not None else path.parent
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = list(_csv_rows(path))
    elif suffix in (".jsonl", ".ndjson"):
        rows = list(_jsonl_rows(path))
    else:
        raise SpecError(f"a manifest is a .csv or .jsonl file, got {path.suffix or 'no suffix'}", path)
    if not rows:
        raise SpecError("manifest has no rows", path)

    order = list(dict.fromkeys(label for _, _, label, _, _, _ in rows if label))
    labels_map = normalise_labels_map(labels_map, order, path.name)
    merged: dict[str, dict] = {}
    ids: dict[str, str] = {}
    for record, image, label, case_id, boxes, error in rows:
        entry = merged.get(image)
        if entry is None:
            case_id = case_id or _case_id(image)
            if case_id in ids:
                raise SpecError(f"{record}: case id {case_id!r} is used twice (also {ids[case_id]})", path)
            ids[case_id] = record
            merged[image] = {"record": record, "label": label, "id": case_id, "boxes": list(boxes), "error": error}
            continue
        if entry["error"] is None and error is not None:
            entry["error"] = error
        elif entry["error"] is None and label and entry["label"] and entry["label"] != label:
            entry["error"] = SpecError(f"{record}: {image} is labelled {label!r} here but {entry['label']!r} "
                                       f"on {entry['record']}; one image has one label", path)
        elif entry["error"] is None and case_id and case_id != entry["id"]:
            entry["error"] = SpecError(f"{record}: {image} has id {case_id!r} here but {entry['id']!r} on "
                                       f"{entry['record']}", path)
        entry["boxes"].extend(boxes)
        entry["label"] = entry["label"] or label
    cases: list[DatasetCase] = []
    skipped: list[str] = []
    for image, entry in merged.items():
        label = entry["label"]
        if entry["error"] is not None:
            case = _errored_case(entry["id"], base / image, [label] if label else [], order, labels_map, path,
                                 entry["record"], entry["error"])
            if case is None:
                skipped.append(f"{entry['record']}: class {label!r} is not in labels_map")
            else:
                cases.append(case)
            continue
        if labels_map is not None and label not in labels_map:
            skipped.append(f"{entry['record']}: class {label!r} is not in labels_map")
            continue
        annotations = {label: [{"box": list(b)} for b in entry["boxes"]]} if entry["boxes"] else {}
        cases.append(DatasetCase(id=entry["id"], image=base / image, label=label,
                                 model_labels=_model_labels(label, labels_map), annotations=annotations,
                                 image_size=None, source=path, record=entry["record"]))
    return DatasetRead(cases, tuple(order), tuple(skipped))


def _manifest_box(values: Sequence[Any], record: str, path: Path) -> tuple[float, ...]:
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise SpecError(f"{record}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] is empty or has its corners "
                        f"swapped: expected x0 < x1 and y0 < y1 (x1, y1 exclusive)", path)
    if x0 < 0 or y0 < 0:
        raise SpecError(f"{record}: box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] starts outside the image "
                        f"(pixel edges start at 0)", path)
    return tuple(_whole(v) for v in (x0, y0, x1, y1))


def _csv_rows(path: Path):
    try:
        fh = path.open(newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError("manifest not found", path) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a manifest file", path) from None
    with fh:
        reader = csv.DictReader(fh)
        try:
            header = reader.fieldnames or []
        except UnicodeDecodeError:
            raise SpecError("not UTF-8 text", path) from None
        for need in ("path", "label"):
            if need not in header:
                hint = closest(need, header, n=1)
                raise SpecError(f"line 1: the header has no {need!r} column"
                                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                                + "; expected path,label[,id][,x0,y0,x1,y1]", path)
        box_cols = [c for c in _BOX_COLUMNS if c in header]
        if box_cols and len(box_cols) != 4:
            missing = [c for c in _BOX_COLUMNS if c not in header]
            raise SpecError(f"line 1: box columns need all of x0,y0,x1,y1; missing {','.join(missing)}", path)
        try:
            for row in reader:
                record = f"line {reader.line_num}"
                image, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
                case_id = (row.get("id") or "").strip() or None
                try:
                    boxes = _csv_boxes(row, image, label, box_cols, record, path)
                except SpecError as exc:
                    if not image:   # no image to hang the error on
                        raise
                    yield record, image, label, case_id, [], exc
                    continue
                yield record, image, label, case_id, boxes, None
        except UnicodeDecodeError:
            raise SpecError(f"line {reader.line_num + 1}: not UTF-8 text", path) from None
        except csv.Error as exc:
            raise SpecError(f"line {reader.line_num}: not valid CSV: {exc}", path) from None


def _csv_boxes(row: Mapping[Any, Any], image: str, label: str, box_cols: Sequence[str], record: str,
               path: Path) -> list[tuple[float, ...]]:
    """The boxes of one CSV row, after checking the row (a SpecError names the row)."""
    if None in row:
        raise SpecError(f"{record}: more fields than the header has columns", path)
    if not image or not label:
        raise SpecError(f"{record}: path and label must not be empty", path)
    if not box_cols:
        return []
    cells = [(row.get(c) or "").strip() for c in _BOX_COLUMNS]
    if not any(cells):
        return []
    if not all(cells):
        raise SpecError(f"{record}: give all of x0,y0,x1,y1 or none, got {','.join(cells)}", path)
    try:
        values = [float(c) for c in cells]
    except ValueError:
        raise SpecError(f"{record}: box values must be numbers, got {','.join(cells)}", path) from None
    if not all(math.isfinite(v) for v in values):
        raise SpecError(f"{record}: box values must be finite, got {','.join(cells)}", path)
    return [_manifest_box(values, record, path)]


def _jsonl_rows(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise SpecError("manifest not found", path) from None
    except IsADirectoryError:
        raise SpecError("is a folder, not a manifest file", path) from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path) from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = f"line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SpecError(f"{record}: not valid JSON: {exc.msg} (column {exc.colno})", path) from None
        if not isinstance(row, dict):
            raise SpecError(f"{record}: must be a JSON object with path and label", path)
        unknown = [k for k in row if k not in ("path", "label", "id", "box", "boxes")]
        if unknown:
            hint = closest(str(unknown[0]), ("path", "label", "id", "box", "boxes"), n=1)
            raise SpecError(f"{record}: unknown key {unknown[0]!r}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""), path)
        image, label, case_id = row.get("path"), row.get("label"), row.get("id")
        if not isinstance(image, str) or not image.strip():
            raise SpecError(f"{record}: path must be a non-empty string, got {image!r}", path)
        usable_label = not isinstance(label, bool) and isinstance(label, (str, int)) and str(label).strip() != ""
        usable_id = case_id is None or (isinstance(case_id, str) and case_id.strip() != "")
        try:   # from here on the row names its image: a problem is that image's case's error
            if not usable_label:
                raise SpecError(f"{record}: label must be a non-empty string, got {label!r}", path)
            if not usable_id:
                raise SpecError(f"{record}: id must be a non-empty string, got {case_id!r}", path)
            boxes = _jsonl_boxes(row, record, path)
        except SpecError as exc:
            boxes, error = [], exc
        else:
            error = None
        yield (record, image.strip(), str(label).strip() if usable_label else "",
               case_id.strip() if case_id and usable_id else None, boxes, error)


def _jsonl_boxes(row: Mapping[str, Any], record: str, path: Path) -> list[tuple[float, ...]]:
    if "boxes" in row and not isinstance(row["boxes"], list):
        raise SpecError(f"{record}: boxes must be a list of [x0, y0, x1, y1]", path)
    boxes = []
    for raw in ([row["box"]] if "box" in row else []) + list(row.get("boxes") or []):
        values = [_number(v) for v in raw] if isinstance(raw, list) and len(raw) == 4 else None
        if values is None or None in values:
            raise SpecError(f"{record}: a box is 4 numbers [x0, y0, x1, y1], got {raw!r}", path)
        boxes.append(_manifest_box(values, record, path))
    return boxes
