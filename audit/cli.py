"""The ``model-audit`` command: explain images, snapshot a starter spec, install weights, run specs,
compare two models on the same specs.

Why a command next to the pytest plugin: the classic notebook workflow (one image in, top-5 table,
heatmap, overlay and feature grids out) is how people look at a model before they write a spec, and a
spec is easier to write from a snapshot of what the model does today. ``compare`` answers "what changes
if we swap this model for that one?" case by case, most divergent first.

Errors: bad arguments are argparse's (usage line + message, exit 2); a user mistake (``AuditError``:
unknown model, missing image, unknown layer, unavailable weights) is one line
``model-audit: error: <message>`` on stderr with exit 2 and no traceback. Anything else is our bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from audit import defaults
from audit.errors import AuditError, ImageError, ModelError
from audit.files import atomic_write, atomic_write_bytes

PROG = "model-audit"
NONE_WEIGHTS = ("none", "null", "random")

# ----------------------------------------------------------------------------------------- helpers


def _say(*parts: Any, err: bool = False) -> None:
    print(*parts, file=sys.stderr if err else sys.stdout)


def _progress(items: Iterable[Any], total: int, desc: str, quiet: bool) -> Iterable[Any]:
    """A tqdm bar on stderr for multi-item runs, only on a terminal and without --quiet."""
    if quiet or total <= 1 or not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit="batch", file=sys.stderr, leave=False)


def _weights_arg(value: str | None, checkpoint: Any) -> str | None:
    """``--weights``: DEFAULT unless a checkpoint is given; none/null/random mean random init."""
    if value is None:
        return None if checkpoint else "DEFAULT"
    return None if value.strip().lower() in NONE_WEIGHTS else value


@dataclass(frozen=True)
class ModelChoice:
    """A model as the command line names it; ``text`` is how the user wrote it."""

    arch: str
    weights: str | None
    checkpoint: str | None = None
    labels: str | None = None
    seed: int | None = None
    text: str = ""

    def load(self, device: str):
        import audit
        seed = self.seed if self.weights is None and self.checkpoint is None else None
        if self.weights is None and self.checkpoint is None and seed is None:
            seed = defaults.SEED
        from audit.errors import WeightsUnavailable
        try:
            return audit.load_model(self.arch, weights=self.weights, checkpoint=self.checkpoint,
                                    labels=self.labels, device=device, seed=seed)
        except WeightsUnavailable as exc:
            if self.checkpoint is None and self.weights is not None and "zoo" not in str(exc):
                raise WeightsUnavailable(f"{exc}; to install a file downloaded elsewhere: {PROG} weights "
                                         f"{self.arch} --weights {self.weights} --from FILE") from None
            raise


def _model_from_args(args: argparse.Namespace) -> ModelChoice:
    weights = _weights_arg(args.weights, args.checkpoint)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise ModelError(f"checkpoint {args.checkpoint}: file not found")
    if args.labels and not Path(args.labels).is_file():
        raise ModelError(f"labels file {args.labels}: file not found")
    return ModelChoice(args.model, weights, args.checkpoint, args.labels, args.seed, args.model)


def parse_model(text: str, labels: str | None = None) -> ModelChoice:
    """``ARCH`` / ``ARCH:WEIGHTS`` (``none`` = random init, seed 0) / ``ARCH@CHECKPOINT_PATH``."""
    text = text.strip()
    if "@" in text:
        arch, _, path = text.partition("@")
        if not arch or not path:
            raise AuditError(f"model {text!r}: write ARCH@CHECKPOINT_PATH, e.g. vgg16@runs/best.pt")
        if not Path(path).is_file():
            raise ModelError(f"model {text!r}: checkpoint {path}: file not found")
        return ModelChoice(arch, None, path, labels, None, text)
    arch, sep, weights = text.partition(":")
    if not arch or (sep and not weights):
        raise AuditError(f"model {text!r}: write ARCH, ARCH:WEIGHTS or ARCH@CHECKPOINT_PATH, e.g. vgg16:IMAGENET1K_V1")
    return ModelChoice(arch, _weights_arg(weights or None, None), None, labels, None, text)


def _check_images(paths: Sequence[str]) -> list[Path]:
    """Fail on a missing image before a model is loaded (seconds for VGG16)."""
    out = []
    for p in paths:
        path = Path(p)
        if not path.exists():
            raise ImageError(path, "file not found")
        if path.is_dir():
            raise ImageError(path, "is a directory, not an image file")
        out.append(path)
    return out


def _explain(engine, images: Sequence[Any], quiet: bool, batch_size: int, **kwargs: Any) -> list:
    """The engine's batched explain, one call per batch so the progress bar can move."""
    batch_size = max(1, batch_size)
    chunks = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    results: list = []
    for chunk in _progress(chunks, len(chunks), "explain", quiet):
        results.extend(engine.explain(list(chunk), batch_size=batch_size, **kwargs))
    return results


def _unique_stems(paths: Sequence[Path]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        stem = p.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        out.append(stem if seen[stem] == 1 else f"{stem}-{seen[stem]}")
    return out


def _save_png(picture: Any, path: Path) -> None:
    import io

    from PIL import Image
    if not isinstance(picture, Image.Image):
        picture = Image.fromarray(picture)
    buffer = io.BytesIO()
    picture.save(buffer, "PNG")
    atomic_write_bytes(path, buffer.getvalue())


def _grid_channels(channels: int) -> int:
    """The classic notebook's feature grids: a 64-channel layer in full, otherwise the first 72 maps."""
    return channels if channels == 64 else min(channels, 72)


# ----------------------------------------------------------------------------------------- explain

def _cam_methods(engine, value: str | None, allow_all: bool) -> list[str]:
    """The CAM methods --cam-method names (``all``: every registered one, for explain); unknown: one line."""
    from audit import cams

    if value is not None and value.lower() == "all":
        if not allow_all:
            raise AuditError("--cam-method all draws every method side by side: it is for 'explain'; "
                             f"name one of {', '.join(cams.names())}")
        return cams.names()
    return [cams.get(value).name]


def _side_by_side(image: Any, explained: dict[str, Any], colormap: str) -> Any:
    """One picture: the overlay of every method in a row, each captioned with its name."""
    from PIL import Image, ImageDraw

    from audit import report

    tile_w = min(256, image.width) if image.width >= 64 else 128
    tile_h = max(1, round(image.height * tile_w / image.width))
    caption = 16
    sheet = Image.new("RGB", (tile_w * len(explained), tile_h + caption), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, e) in enumerate(explained.items()):
        tile = report.overlay(image, e.cam, colormap).resize((tile_w, tile_h), Image.BILINEAR)
        sheet.paste(tile, (i * tile_w, caption))
        draw.text((i * tile_w + 4, 2), name + (" (empty)" if e.cam_empty[e.target] else ""), fill="black")
    return sheet


def cmd_explain(args: argparse.Namespace) -> int:
    from audit import report
    from audit.images import load_image

    paths = _check_images(args.images)
    if args.out:
        _output_folder(args.out, "--out")   # before the model loads: a bad folder costs nothing
    choice = _model_from_args(args)
    engine = choice.load(args.device)
    methods = _cam_methods(engine, args.cam_method, allow_all=True)
    cam_layer = args.cam_layer or None
    if cam_layer:
        engine.resolve_layer(cam_layer)
    for layer in args.layers:
        engine.resolve_layer(layer)
    by_method = {}
    for method in methods:
        by_method[method] = _explain(engine, [str(p) for p in paths], args.quiet, args.batch_size, top_k=args.top_k,
                                     cam_layer=cam_layer, feature_layers=list(args.layers) if method == methods[0]
                                     else [], preprocess=args.preprocess, cam_method=method)
    explanations = by_method[methods[0]]
    out_dir = Path(args.out) if args.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for n, (path, stem, e) in enumerate(zip(paths, _unique_stems(paths), explanations)):
        files: dict[str, Any] = {}
        if out_dir is not None:
            image = load_image(path)
            if len(methods) == 1:
                files["heatmap"] = str(out_dir / f"{stem}-heatmap.png")
                _save_png(report.colorize(e.cam, args.colormap), Path(files["heatmap"]))
                files["overlay"] = str(out_dir / f"{stem}-overlay.png")
                _save_png(report.overlay(image, e.cam, args.colormap), Path(files["overlay"]))
            else:
                per_method = {}
                for method in methods:
                    m = by_method[method][n]
                    safe = re.sub(r"[^A-Za-z0-9._-]", "_", method.replace("+", "p"))
                    heat, over = out_dir / f"{stem}-{safe}-heatmap.png", out_dir / f"{stem}-{safe}-overlay.png"
                    _save_png(report.colorize(m.cam, args.colormap), heat)
                    _save_png(report.overlay(image, m.cam, args.colormap), over)
                    per_method[method] = {"heatmap": str(heat), "overlay": str(over)}
                files["methods"] = per_method
                files["side_by_side"] = str(out_dir / f"{stem}-methods.png")
                _save_png(_side_by_side(image, {m: by_method[m][n] for m in methods}, args.colormap),
                          Path(files["side_by_side"]))
            grids = {}
            for layer in args.layers:
                maps = e.features[layer]
                grid_path = out_dir / f"{stem}-{re.sub(r'[^A-Za-z0-9._-]+', '_', layer)}.png"
                _save_png(report.feature_grid(maps, _grid_channels(maps.shape[0])), grid_path)
                grids[layer] = str(grid_path)
            files["features"] = grids
        record = {"image": str(path), "top_k": [{"index": r.index, "label": r.label, "prob": r.prob}
                                                for r in e.top_k],
                  "cam_layer": e.cam_layer, "cam_method": e.cam_method, "files": files}
        if len(methods) > 1:
            record["cam_methods"] = methods
        records.append(record)
    if args.json:
        _say(json.dumps(records, indent=2, ensure_ascii=False))
        return 0
    _say(f"model: {engine.loaded.source}; cam layer {explanations[0].cam_layer if explanations else '-'}; "
         f"cam method {', '.join(methods)}")
    for rec in records:
        _say()
        _say(rec["image"])
        width = max([5, *(len(r["label"]) for r in rec["top_k"])])
        _say(f"  {'index':>5}  {'label':<{width}}  probability")
        for r in rec["top_k"]:
            _say(f"  {r['index']:>5}  {r['label']:<{width}}  {r['prob']:.4f}")
        for kind, value in rec["files"].items():
            for layer, f in (value.items() if isinstance(value, dict) else [(None, value)]):
                for what, one in (f.items() if isinstance(f, dict) else [(kind, f)]):
                    _say(f"  wrote {one}" + (f"  ({what} of {layer})" if layer else f"  ({what})"))
    return 0


# ---------------------------------------------------------------------------------------- snapshot

def _floor2(value: float) -> float:
    """Round down to 2 decimals (a floor must never be above what was measured), never below 0."""
    return max(0.0, math.floor(round(value * 100, 6)) / 100)


def _label_value(engine, index: int, label: str) -> str | int:
    """The label name when it resolves back to this index, else the index (ImageNet has two 'crane')."""
    try:
        if engine.resolve_class(label) == index:
            return label
    except AuditError:
        pass
    return int(index)


def _case_id(stem: str, used: set[str]) -> str:
    base = "-".join(stem.replace("::", "-").replace("/", "-").split()) or "image"
    base = base[:190]
    cid, n = base, 1
    while cid in used:
        n += 1
        cid = f"{base}-{n}"
    used.add(cid)
    return cid


def _path_for_spec(path: Path, relative_to: str | None) -> str:
    if relative_to is None:
        return path.as_posix()
    return Path(os.path.relpath(path.resolve(), Path(relative_to).resolve())).as_posix()


def _spec_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Block mappings, and lists of plain values on one line ([x0, y0, x1, y1]); a subclass, so
        PyYAML's own dumpers are untouched."""

    def represent_list(dumper: yaml.SafeDumper, data: list) -> Any:
        flat = all(isinstance(v, (str, int, float, bool)) or v is None for v in data)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)

    Dumper.add_representer(list, represent_list)
    return Dumper


def cmd_snapshot(args: argparse.Namespace) -> int:
    import yaml

    paths = _check_images(args.images)
    choice = _model_from_args(args)
    engine = choice.load(args.device)
    (method,) = _cam_methods(engine, args.cam_method, allow_all=False)
    if args.cam_layer:
        engine.resolve_layer(args.cam_layer)
    explanations = _explain(engine, [str(p) for p in paths], args.quiet, args.batch_size, top_k=max(5, args.top_k),
                            cam_layer=args.cam_layer, preprocess=args.preprocess, cam_method=method)
    model: dict[str, Any] = {"arch": choice.arch}
    if choice.checkpoint:
        model["checkpoint"] = _path_for_spec(Path(choice.checkpoint), args.relative_to)
    else:
        model["weights"] = choice.weights
        if choice.weights is None:
            model["seed"] = args.seed if args.seed is not None else defaults.SEED
    model["preprocess"] = args.preprocess
    if args.cam_layer:
        model["cam_layer"] = args.cam_layer
    if args.cam_method:
        model["cam_method"] = method
    if choice.labels:
        model["labels"] = _path_for_spec(Path(choice.labels), args.relative_to)
    cases = []
    notes: list[str] = []   # per case: how its focus box was drawn, or why there is none
    used: set[str] = set()
    for path, e in zip(paths, explanations):
        top = e.top_k
        case: dict[str, Any] = {"id": _case_id(path.stem, used), "image": _path_for_spec(path, args.relative_to)}
        if args.top_k != 5:
            case["top_k"] = args.top_k
        expect: dict[str, Any] = {"top1": _label_value(engine, top[0].index, top[0].label),
                                  "any_in_top_k": [_label_value(engine, r.index, r.label) for r in top[:3]]}
        floor = _floor2(top[0].prob - args.min_prob_margin)
        if floor > 0:
            expect["min_prob"] = floor
        case["expect"] = expect
        focus, note = _suggest_focus(e.cams[top[0].index], e.image_size, e.geometry.seen_box, args.energy_margin,
                                     top[0].label)
        if focus is not None:
            case["focus"] = focus
        else:
            _say(f"{PROG}: snapshot: {path}: no focus region suggested: {note}", err=True)
        notes.append(note)
        cases.append(case)
    where = (f"relative to {args.relative_to}" if args.relative_to
             else "as given: save this spec in the current directory")
    header = (f"# generated by model-audit snapshot on {_dt.date.today().isoformat()}: review before committing\n"
              f"# model: {engine.loaded.source}\n"
              f"# expectations are what the model does today, loosened by --min-prob-margin {args.min_prob_margin:g}\n"
              f"# and --energy-margin {args.energy_margin:g}; image paths are {where}.\n")
    body = yaml.dump({"model": model, "cases": cases}, Dumper=_spec_dumper(), sort_keys=False, allow_unicode=True,
                     width=100)
    sys.stdout.write(header + _with_notes(body, notes))
    return 0


# A suggested box must say something about this image: the bounding box of the hot part (>= half the
# maximum) when it covers at most this share of what the model saw, and only with an energy floor that
# a heatmap spread evenly over that part would not reach (else the check could not fail for a reason).
MAX_BOX_SHARE = 0.5


def _suggest_focus(heat, image_size, seen_box, margin: float, label: str) -> tuple[dict | None, str]:
    """(focus block or None, one line: how the box was drawn, or why none is suggested)."""
    import numpy as np

    from audit import checks, regions

    if not heat.size or not float(heat.max()) > 0:
        return None, f"the Grad-CAM map of {label} is zero everywhere"
    ys, xs = np.nonzero(heat >= 0.5 * float(heat.max()))
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    mask = regions.region_mask({"box": box}, image_size, ".")
    x0, y0, x1, y1 = seen_box
    seen_area = max(1.0, (x1 - x0) * (y1 - y0))
    cx0, cy0, cx1, cy1 = max(box[0], x0), max(box[1], y0), min(box[2], x1), min(box[3], y1)
    share = max(0.0, cx1 - cx0) * max(0.0, cy1 - cy0) / seen_area
    energy = checks.energy_inside(heat, mask)
    floor = _floor2(energy - margin)
    drawn = (f"box = bounding box of the heat >= 0.5 x its maximum for {label} (covers {share:.0%} of what the "
             f"model sees; {energy:.0%} of the heat inside today)")
    if share > MAX_BOX_SHARE:
        return None, (f"the heat >= 0.5 x its maximum for {label} spreads over {share:.0%} of what the model sees "
                      f"(nothing discriminative: a box that large cannot fail); draw the region yourself")
    if floor <= share:
        return None, (f"{energy:.0%} of the heat lies in the hot box, and min_energy {floor:.2f} (minus the "
                      f"margin) would not beat an even heatmap over a box of {share:.0%} of the image; "
                      f"draw the region yourself")
    return {"region": {"box": box}, "min_energy": floor}, drawn


def _with_notes(body: str, notes: list[str]) -> str:
    """The YAML with each case's note as a comment: above its focus block, or above its id when there
    is none (yaml.dump writes no comments; each case has one ``- id:`` line and at most one ``focus:``)."""
    import re

    lines, out, case = body.splitlines(keepends=True), [], -1
    pending = None
    for line in lines:
        if re.match(r"^- id: ", line):
            case += 1
            pending = notes[case] if case < len(notes) else None
            if pending is not None and "box = " not in pending:
                out.append(f"# no focus suggested: {pending}\n")
                pending = None
        elif pending is not None and re.match(r"^  focus:", line):
            out.append(f"  # {pending}\n")
            pending = None
        out.append(line)
    return "".join(out)


# ----------------------------------------------------------------------------------------- weights

def expected_prefix(file_name: str) -> str | None:
    """The sha256 prefix torchvision puts in its file names (``vgg16-397923af.pth`` -> ``397923af``)."""
    stem = Path(file_name).name.split(".", 1)[0]
    if "-" not in stem:
        return None
    prefix = stem.rsplit("-", 1)[1].lower()
    return prefix if len(prefix) >= 6 and all(c in "0123456789abcdef" for c in prefix) else None


def cmd_weights(args: argparse.Namespace) -> int:
    """Where torchvision keeps a model's pretrained weights, and installing a copy there: every step is the
    loader's own (:mod:`audit.models`), so what this command accepts is exactly what a spec then loads."""
    from audit import models

    entry = models.zoo().get(args.name)
    if entry is not None:
        path = Path(entry.weights_path)
        state = "present" if path.is_file() else "MISSING (reinstall model-audit or run python -m audit.zoo.train)"
        _say(f"{args.name} is a zoo model: its weights ship in the package: {path} ({state})")
        if args.source:
            raise AuditError(f"{args.name} is a zoo model; its weights ship with model-audit and cannot be replaced "
                             "with --from (use checkpoint: <path> in the spec for other weights)")
        return 0 if path.is_file() else 1
    models.check_arch(args.name)
    member = models.weights_enum(args.name, args.weights)
    target = models.hub_file(member)
    prefix = expected_prefix(target.name)
    title = f"{args.name} {member.name}" + ("" if args.weights.upper() == member.name else f" ({args.weights})")
    if args.source is None:
        _say(f"weights {title}")
        _say(f"  expected at   {target}")
        _say(f"  present       {'yes' if target.is_file() else 'no'}")
        _say(f"  sha256 prefix {prefix or 'unknown (no hash in the file name)'}")
        _say(f"  download from {member.url}")
        if not target.is_file():
            _say(f"  to install a downloaded copy: {PROG} weights {args.name} --weights {member.name} --from FILE")
        return 0 if target.is_file() else 1
    return _install(Path(args.source), target, prefix, title, args)


def _install(source: Path, target: Path, prefix: str | None, title: str, args: argparse.Namespace) -> int:
    """Check ``source`` (hash, safe load, strict fit) before anything is written, then replace ``target``
    atomically: the file itself, or its bare state_dict when it holds a wrapper or ``module.`` keys."""
    import torch

    from audit import models
    from audit.files import sha256_file

    if not source.is_file():
        raise AuditError(f"--from {source}: file not found")
    digest = sha256_file(source)
    if not args.no_check:
        if prefix is None:
            raise AuditError(f"cannot check {source}: the weights file name {target.name} carries no sha256 prefix; "
                             "pass --no-check to install it anyway")
        if not digest.startswith(prefix):
            raise AuditError(f"{source} has sha256 {digest[:12]}…, but {title} expects {prefix}… (the hash in "
                             f"{target.name}): this is not that file; pass --no-check to install it anyway")
    state, as_saved = models.read_weights_file(source, f"--from {source}")
    models.load_into(models.torchvision_skeleton(args.name), state, str(source), args.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    replaced = target.is_file()
    if as_saved:
        with open(source, "rb") as src:
            atomic_write(target, lambda fh: shutil.copyfileobj(src, fh), durable=True)
    else:
        atomic_write(target, lambda fh: torch.save(state, fh), durable=True)
    check = "hash not checked (--no-check)" if args.no_check else f"sha256 {digest[:12]}… matches"
    how = "" if as_saved else " (its bare state_dict, as torchvision reads it)"
    _say(f"{'replaced' if replaced else 'installed'} {target}{how}: {check}, {len(state)} tensors fit {args.name}")
    _say(f"weights {title} now load offline")
    return 0


# --------------------------------------------------------------------------------------------- run

def cmd_run(args: argparse.Namespace) -> int:
    import pytest

    rest = list(args.pytest_args)
    has_report = any(a == "--audit-report" or a.startswith("--audit-report=") for a in rest)
    extra = [] if has_report or args.no_report else ["--audit-report", args.report]
    return int(pytest.main([*args.specs, *extra, *rest]))


# ----------------------------------------------------------------------------------------- compare

def _spec_files(items: Sequence[str]) -> list[Path]:
    from audit.spec import is_spec_file
    files: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.y*ml") if is_spec_file(p) and "baselines" not in p.parts)
        elif path.is_file():
            files.append(path)
        else:
            raise AuditError(f"spec {item}: file not found")
    if not files:
        raise AuditError(f"no spec files (*.yaml with a top-level cases: key) in {', '.join(items)}")
    return files


def _load_specs(files: Sequence[Path]) -> tuple[list[Any], list[str]]:
    """The specs, read by the plugin's own loader (YAML cases and every case source, ``dataset:`` included),
    and a line for each case that cannot run."""
    from audit.spec import load_spec
    specs, skipped = [], []
    for f in files:
        spec = load_spec(f)
        specs.append(spec)
        skipped += [f"{f}: case {case.id}: {case.error}" for case in spec.cases if case.error is not None]
    return specs, skipped


def _top(r: Any) -> dict[str, Any]:
    return {"index": int(r.index), "label": str(r.label), "prob": float(r.prob)}


SPEC_MODEL = "spec"


def _choice_for(text: str, labels: str | None, spec: Any) -> ModelChoice | None:
    """The model one side runs on a spec's cases; None for ``spec``: the spec's own model block, exactly
    as the plugin runs it (weights or checkpoint, labels, seed, preprocess, CAM layer and method). Any
    other model uses the spec's ``labels:`` when it has the spec's architecture and no labels of its own
    were given (a fine-tuned checkpoint keeps its classes)."""
    m = spec.model
    if text.strip().lower() == SPEC_MODEL:
        return None
    choice = parse_model(text, labels)
    if choice.labels is None and m.labels is not None and choice.arch == m.arch:
        return dataclasses.replace(choice, labels=str(m.labels))
    return choice


def _side_model(choice: ModelChoice | None, cam_layer: str | None, spec: Any) -> Any:
    """The ``ModelSpec`` a side runs: the spec's own, or the chosen model with the spec's preprocessing and
    CAM method (both maps made the same way), and its CAM layer when the architecture is the spec's;
    ``--a-cam-layer`` wins."""
    m = spec.model
    if choice is not None:
        random_init = choice.weights is None and choice.checkpoint is None
        same_arch = choice.arch == m.arch
        m = dataclasses.replace(
            m, arch=choice.arch, weights=choice.weights,
            checkpoint=Path(choice.checkpoint).resolve() if choice.checkpoint else None,
            labels=Path(choice.labels).resolve() if choice.labels else None,
            seed=(choice.seed if choice.seed is not None else defaults.SEED) if random_init else None,
            cam_layer=m.cam_layer if same_arch else None, cam_method=m.cam_method)
    return dataclasses.replace(m, cam_layer=cam_layer) if cam_layer else m


def _side_error(side: str, text: str, choice: ModelChoice | None, exc: AuditError) -> AuditError:
    """A side's model that cannot load or explain: one line naming the side (a spec's own model block
    keeps the spec line the session located it at)."""
    from audit.errors import SpecError, WeightsUnavailable

    message = exc.message if isinstance(exc, SpecError) and choice is not None else str(exc)
    if choice is not None and choice.checkpoint is None and choice.weights is not None and \
            ("not available offline" in message or isinstance(exc, WeightsUnavailable)):
        message += (f"; to install a file downloaded elsewhere: {PROG} weights {choice.arch} --weights "
                    f"{choice.weights} --from FILE")
    return AuditError(f"--{side.lower()} {text}: {message}")


@dataclass(frozen=True)
class FailOn:
    """A ``--fail-on`` rule: ``flip`` (any top-1 flip), ``flips>N``, ``correlation<X``."""

    text: str
    kind: str            # "flips" | "correlation"
    limit: float

    def broken_by(self, rows: list[dict]) -> list[dict]:
        if self.kind == "flips":
            flips = [r for r in rows if r["flip"]]
            return flips if len(flips) > self.limit else []
        return [r for r in rows if r["heatmap_correlation"] < self.limit]


def _fail_on(text: str) -> FailOn:
    t = text.strip().lower().replace(" ", "")
    if t in ("flip", "flips"):
        return FailOn(text, "flips", 0)
    found = re.fullmatch(r"flips>(\d+)", t)
    if found:
        return FailOn(text, "flips", int(found.group(1)))
    found = re.fullmatch(r"correlation<([0-9]*\.?[0-9]+)", t)
    if found and float(found.group(1)) <= 1:
        return FailOn(text, "correlation", float(found.group(1)))
    raise argparse.ArgumentTypeError(f"{text!r}: write flip, flips>N or correlation<X (X in 0..1), "
                                     f"e.g. --fail-on flip --fail-on correlation<0.5")


def cmd_compare(args: argparse.Namespace) -> int:
    """Two models on the same cases, through the plugin's own session: cases from the spec loader (any
    case source), models loaded once each, images explained in batches that share preprocessing, CAM
    layer and method, regions masked as the plugin masks them; the page is the report's."""
    from audit import baselines, checks
    from audit.registry import Registry
    from audit.report.compare import write_compare
    from audit.session import AuditSession, CaseRef

    files = _spec_files(args.specs)
    specs, skipped = _load_specs(files)
    cases = [(spec, case) for spec in specs for case in spec.cases if case.error is None]
    if not cases:
        for line in skipped:
            _say(f"{PROG}: skipped {line.splitlines()[0]}", err=True)
        raise AuditError("no usable case in " + ", ".join(map(str, files)))
    _check_images([str(case.image) for _, case in cases])
    _output_folder(args.out, "--out")   # before either model runs
    sides = {"A": (args.a, args.a_labels, args.a_cam_layer), "B": (args.b, args.b_labels, args.b_cam_layer)}
    # the explanations only: no check kind runs (they would ask for perturbed variants nobody reads)
    session = AuditSession(device=args.device, batch_size=args.batch_size,
                           registry=Registry.default().with_check_kinds())
    choices = {(k, spec.path): _choice_for(text, labels, spec) for k, (text, labels, _) in sides.items() for spec in specs}
    side_specs = {(k, spec.path): dataclasses.replace(spec, model=_side_model(choices[k, spec.path], sides[k][2], spec))
                  for k in sides for spec in specs}
    for (k, path), spec in side_specs.items():   # every model loads (or fails, in one line) before any image
        try:
            engine = session.engine(spec.model)   # loaded once per model, whatever the CAM layer
            if spec.model.cam_layer:
                engine.resolve_layer(spec.model.cam_layer)
        except AuditError as exc:
            raise _side_error(k, sides[k][0], choices[k, path], exc) from None
    # no feature grids: compare shows none, and a spec's layers may not exist in the other model
    refs = {(k, n): CaseRef(f"{k}::{spec.path}::{case.id}", side_specs[k, spec.path],
                            dataclasses.replace(case, features=()))
            for k in sides for n, (spec, case) in enumerate(cases)}
    session.schedule([(ref, 1) for ref in refs.values()])
    observed: dict[tuple[str, int], Any] = {}
    for key, ref in _progress(refs.items(), len(refs), "explain", args.quiet):
        try:
            observed[key] = session.observe(ref.nodeid)
        except AuditError as exc:   # this case's image or layer: the others still compare
            skipped.append(f"{ref.spec.path}: case {ref.case.id}: {exc}")
    for line in dict.fromkeys(skipped):   # a bad image is one line, not one per side
        _say(f"{PROG}: skipped {line.splitlines()[0]}", err=True)
    usable = [n for n in range(len(cases)) if ("A", n) in observed and ("B", n) in observed]
    if not usable:
        raise AuditError("no case could be explained by both models in " + ", ".join(map(str, files)))
    rows, pictures = [], {}
    for n in usable:
        spec, case = cases[n]
        oa, ob = observed["A", n], observed["B", n]
        ea, eb = oa.explanation, ob.explanation
        ta, tb = ea.top_k[0], eb.top_k[0]
        prob_b = float(eb.probs[ta.index]) if eb.probs is not None and ta.index < len(eb.probs) else None
        energy_a = energy_b = None
        region_desc, region_error, outlines, avoid = None, None, None, None
        focus = case.checks.get("focus")
        if focus is not None and focus.region:
            region_desc = focus.region.describe()
            try:
                mask = session.region_mask(oa, focus.region, "focus.region")
                outlines = focus.region.outline(ea.image_size, Path(spec.path).parent)
                energy_a = checks.energy_inside(ea.cams[ta.index], mask)
                energy_b = checks.energy_inside(eb.cams[tb.index], mask)
            except AuditError as exc:
                region_error = str(exc)
        if focus is not None and focus.avoid:
            with contextlib.suppress(AuditError):
                avoid = focus.avoid.outline(ea.image_size, Path(spec.path).parent)
        row = {"spec": str(spec.path), "case_id": str(case.id), "image": str(case.image),
               "line": case.location.line,
               "model_a": _side_text(choices["A", spec.path], spec), "model_b": _side_text(choices["B", spec.path], spec),
               "top1_a": _top(ta), "top1_b": _top(tb), "flip": ta.index != tb.index,
               "top_k_a": [_top(r) for r in ea.top_k[:5]], "top_k_b": [_top(r) for r in eb.top_k[:5]],
               "prob_of_a_top1_under_b": prob_b,
               "heatmap_correlation": baselines.pearson(ea.cams_lowres[ta.index], eb.cams_lowres[tb.index]),
               "region": region_desc, "region_error": region_error, "energy_a": energy_a, "energy_b": energy_b,
               "avoid": focus.avoid.describe() if focus is not None and focus.avoid else None}
        rows.append(row)
        pictures[id(row)] = (oa.image, ea.cam, eb.cam, ea.geometry.seen_box, eb.geometry.seen_box, outlines, avoid)
    rows.sort(key=lambda r: (not r["flip"], r["heatmap_correlation"]))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    verdicts = []
    for rule in args.fail_on or ():
        broken = rule.broken_by(rows)
        verdicts.append({"rule": rule.text, "passed": not broken, "cases": [r["case_id"] for r in broken]})
        for r in broken:
            r.setdefault("broken", []).append(rule.text)
    summary = {}
    for k in sides:
        models = [side_specs[k, spec.path].model for spec in specs]
        loaded = [session.engine(m).loaded for m in models]
        summary[k] = {"given": ", ".join(sorted({_side_text(choices[k, spec.path], spec) for spec in specs})),
                      "source": "; ".join(sorted({e.source for e in loaded})),
                      "fingerprint": ", ".join(f[:12] for f in sorted({e.fingerprint for e in loaded}))}
    _print_compare(rows, summary)
    out = write_compare(Path(args.out), rows, summary, verdicts, lambda row: pictures[id(row)], args.colormap,
                        lambda items, total: _progress(items, total, "pictures", args.quiet))
    _say(f"\nreport: {out / 'index.html'}")
    failed = [v for v in verdicts if not v["passed"]]
    for v in verdicts:
        n = len(v["cases"])
        detail = (f"{n} {'case' if n == 1 else 'cases'}: {', '.join(v['cases'][:5])}{', ...' if n > 5 else ''}"
                  if n else "ok")
        _say(f"{PROG} compare: --fail-on {v['rule']}: {'FAILED' if not v['passed'] else 'passed'} ({detail})",
             err=not v["passed"])
    return 1 if failed else 0


def _side_text(choice: ModelChoice | None, spec: Any) -> str:
    """How a side's model is named in the table and the page."""
    return f"spec {Path(spec.path).name}: {spec.model.arch}" if choice is None else choice.text


def _print_compare(rows: list[dict], summary: dict) -> None:
    _say(f"A: {summary['A']['given']} ({summary['A']['source']})")
    _say(f"B: {summary['B']['given']} ({summary['B']['source']})")
    flips = sum(r["flip"] for r in rows)
    _say(f"{len(rows)} {'case' if len(rows) == 1 else 'cases'}, {flips} top-1 {'flip' if flips == 1 else 'flips'}; "
         f"most divergent first")
    def name(t: dict) -> str:
        return f"{t['label']} {t['prob']:.3f}"
    wid = max([4, *(len(r["case_id"]) for r in rows)])
    wa = max([8, *(len(name(r["top1_a"])) for r in rows)])
    wb = max([8, *(len(name(r["top1_b"])) for r in rows)])
    _say(f"{'rank':>4}  {'case':<{wid}}  {'top1 A':<{wa}}  {'top1 B':<{wb}}  flip  correlation  energy A  energy B")
    for r in rows:
        ea = "-" if r["energy_a"] is None else f"{r['energy_a']:.2f}"
        eb = "-" if r["energy_b"] is None else f"{r['energy_b']:.2f}"
        _say(f"{r['rank']:>4}  {r['case_id']:<{wid}}  {name(r['top1_a']):<{wa}}  {name(r['top1_b']):<{wb}}  "
             f"{'FLIP' if r['flip'] else 'no':<4}  {r['heatmap_correlation']:>11.3f}  {ea:>8}  {eb:>8}")


# ------------------------------------------------------------------------------------------ parser

class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _model_options(p: argparse.ArgumentParser, default_model: str = "vgg16") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=default_model, metavar="ARCH",
                   help=f"torchvision model name or zoo model (shapes_vgg, shapes_vgg_shortcut); default {default_model}")
    g.add_argument("--weights", default=None, metavar="NAME",
                   help="weights enum name (DEFAULT, IMAGENET1K_V1) or 'none' for random init; default DEFAULT "
                        "(none with --checkpoint)")
    g.add_argument("--checkpoint", default=None, metavar="PATH", help="a state_dict or TorchScript file")
    g.add_argument("--labels", default=None, metavar="FILE", help="category names (JSON or .txt) overriding the model's")
    g.add_argument("--seed", type=int, default=None, help=f"seed of a random init (--weights none); default {defaults.SEED}")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    g.add_argument("--preprocess", choices=("squash", "weights"), default="squash",
                   help="squash: resize the whole image (default); weights: the weights' resize + centre crop")
    g.add_argument("--cam-layer", default=None, metavar="NAME", help="layer the CAM explains (default: engine's rule)")
    g.add_argument("--cam-method", default=None, metavar="NAME",
                   help="gradcam (default), gradcam++, xgradcam, hirescam, layercam, scorecam; "
                        "explain also takes 'all' (every method side by side)")
    g.add_argument("--batch-size", type=_positive, default=defaults.BATCH_SIZE, metavar="N",
                   help=f"images per forward pass (default {defaults.BATCH_SIZE})")


def _output_folder(path: str, option: str) -> Path:
    """The folder an option names, created and proven writable now, so a bad one fails before any model
    loads (an existing file, a read-only place), with one line instead of a traceback at the end."""
    from audit import report

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise AuditError(f"{option} {out} is a file, not a folder: give a folder to write into")
    try:
        report.check_writable(out)
    except AuditError as exc:
        raise AuditError(f"{option}: {exc}") from None
    return out


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _fraction(value: str) -> float:
    f = float(value)
    if not 0 <= f <= 1:
        raise argparse.ArgumentTypeError(f"must be in 0..1, got {value}")
    return f


EXPLAIN_EPILOG = """\
examples:
  model-audit explain cat.jpg                               # vgg16 DEFAULT weights (the classic notebook)
  model-audit explain a.jpg b.jpg --model shapes_vgg --out out/ --layers features.3
  model-audit explain hopper.jpg --model vgg16 --weights none --json
  model-audit explain hopper.jpg --model resnet50 --cam-method all --out out/   # every method side by side

With --out DIR, writes per image <stem>-heatmap.png, <stem>-overlay.png and one <stem>-<layer>.png
feature grid per --layers layer (64 channels: all of them, otherwise the first 72). With
--cam-method all: <stem>-<method>-heatmap.png and -overlay.png per method and <stem>-methods.png,
every method's overlay side by side.
"""

SNAPSHOT_EPILOG = """\
example:
  cd specs/mine && model-audit snapshot images/*.jpg --model vgg16 > cats.yaml
  model-audit snapshot data/imgs/*.png --model shapes_vgg --relative-to specs/ > specs/shapes.yaml

Writes a starter spec to stdout: per image the current top-1, any of the top-3, a probability floor
(top-1 probability minus --min-prob-margin, rounded down) and a focus box around the heat >= 0.5 of
its maximum with an energy floor (current energy minus --energy-margin). Image paths in a spec are
relative to the spec file: save the spec in the current directory, or pass --relative-to DIR with the
folder the spec will be saved in. Review the expectations before committing.
"""

WEIGHTS_EPILOG = """\
examples:
  model-audit weights vgg16                                   # where IMAGENET1K_V1 is expected, present?
  model-audit weights vgg16 --from ~/Downloads/vgg16-397923af.pth
  model-audit weights resnet50 --weights IMAGENET1K_V2 --from r50.pth --no-check

Weights live in torch.hub.get_dir()/checkpoints (TORCH_HOME/hub/checkpoints). torchvision file names
carry the first hex digits of the file's sha256 (vgg16-397923af.pth): --from checks that prefix, that
the file loads with torch.load(weights_only=True) and fits the architecture, then copies it there.
Exit codes: 0 present / installed, 1 not present, 2 refused.
"""

RUN_EPILOG = """\
examples:
  model-audit run specs/
  model-audit run specs/ -- -k circle -x          # everything after -- goes to pytest
  model-audit run specs/shapes --report out/ -- -n 2

Same as: pytest SPECS --audit-report reports/ [PYTEST ARGS]; returns pytest's exit code.
"""

COMPARE_EPILOG = """\
examples:
  model-audit compare examples/shortcut --a shapes_vgg --b shapes_vgg_shortcut
  model-audit compare specs/imagenet --a vgg16:IMAGENET1K_V1 --b resnet50:IMAGENET1K_V2 --out reports/cmp
  model-audit compare specs/ --a vgg16:IMAGENET1K_V1 --b vgg16@runs/finetuned.pt

  model-audit compare specs/ --b resnet50:IMAGENET1K_V2 --fail-on flip --fail-on 'correlation<0.5'

A model is ARCH (default weights), ARCH:WEIGHTS (a weights name, or none for random init with seed 0),
ARCH@CHECKPOINT_PATH (a state_dict or TorchScript file) or spec (each spec's own model block, the
default for --a). A model of the spec's architecture without --a-labels/--b-labels uses the spec's
labels: file. Both models run on every case of the specs (with each spec's preprocess); cases are
ranked most divergent first: top-1 flips, then the lowest Pearson correlation of the two heatmaps.
Writes <out>/index.html and <out>/compare.json. Exit codes: 0, or 1 when a --fail-on rule is broken.
"""


def build_parser() -> argparse.ArgumentParser:
    from audit import __version__

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=_Formatter,
        description="Audit image classifiers: explain images, snapshot specs, install weights, run specs, "
                    "compare models.",
        epilog="examples:\n  model-audit explain cat.jpg --model vgg16\n  model-audit run specs/ -- -k circle\n\n"
               f"'{PROG} COMMAND --help' shows each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("explain", help="top-k, Grad-CAM heatmap, overlay and feature grids of images",
                       description="Explain images: the top-k table, and with --out the heatmap, overlay and "
                                   "feature-map grids.", epilog=EXPLAIN_EPILOG, formatter_class=_Formatter)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _model_options(p)
    p.add_argument("--layers", nargs="+", default=[], metavar="LAYER",
                   help="layers to draw as feature-map grids (e.g. features.4 features.21)")
    p.add_argument("--top-k", type=_positive, default=5, metavar="K", help="rows of the table (default 5)")
    p.add_argument("--out", default=None, metavar="DIR", help="write the pictures here")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--colormap", choices=defaults.COLORMAPS, default=defaults.COLORMAP,
                   help=f"heatmap colours (default {defaults.COLORMAP})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("snapshot", help="write a starter spec from what a model does today",
                       description="Write a starter spec (YAML, stdout) from the model's current predictions "
                                   "and heatmaps.", epilog=SNAPSHOT_EPILOG, formatter_class=_Formatter)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    _model_options(p)
    p.add_argument("--top-k", type=_positive, default=5, metavar="K", help="top_k of the cases (default 5)")
    p.add_argument("--min-prob-margin", type=_fraction, default=0.1, metavar="P",
                   help="min_prob = top-1 probability minus this, rounded down (default 0.1)")
    p.add_argument("--energy-margin", type=_fraction, default=0.1, metavar="E",
                   help="min_energy = current energy in the box minus this, rounded down (default 0.1)")
    p.add_argument("--relative-to", default=None, metavar="DIR",
                   help="write image (and checkpoint/labels) paths relative to DIR: the spec's folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("weights", help="where torchvision weights are expected; install a downloaded file",
                       description="Show where pretrained weights are expected, or install a file you "
                                   "downloaded elsewhere (--from).", epilog=WEIGHTS_EPILOG,
                       formatter_class=_Formatter)
    p.add_argument("name", metavar="NAME", help="torchvision model name (vgg16) or zoo model")
    p.add_argument("--weights", default="DEFAULT", metavar="NAME", help="weights enum name (default DEFAULT)")
    p.add_argument("--from", dest="source", default=None, metavar="FILE", help="install this file")
    p.add_argument("--no-check", action="store_true", help="skip the sha256 prefix check (custom files)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("run", help="run specs with pytest and write the HTML report",
                       description="Run specs through pytest with the HTML report on.", epilog=RUN_EPILOG,
                       formatter_class=_Formatter)
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec files or folders")
    p.add_argument("--report", default="reports/", metavar="DIR", help="report folder (default reports/)")
    p.add_argument("--no-report", action="store_true", help="no HTML report")
    p.set_defaults(func=cmd_run, pytest_args=[])

    p = sub.add_parser("compare", help="run two models on the same specs, most divergent cases first",
                       description="Compare two models case by case on the images of specs.",
                       epilog=COMPARE_EPILOG, formatter_class=_Formatter)
    p.add_argument("specs", nargs="+", metavar="SPEC", help="spec files or folders")
    p.add_argument("--a", default=SPEC_MODEL, metavar="MODEL",
                   help="ARCH, ARCH:WEIGHTS, ARCH@CHECKPOINT_PATH, or spec: each spec's own model block "
                        "(weights or checkpoint, labels); default spec")
    p.add_argument("--b", required=True, metavar="MODEL", help="ARCH, ARCH:WEIGHTS, ARCH@CHECKPOINT_PATH or spec")
    p.add_argument("--fail-on", type=_fail_on, action="append", metavar="RULE",
                   help="exit 1 when a rule is broken: flip (any top-1 flip), flips>N, correlation<X (a case's "
                        "heatmap correlation below X); repeatable")
    p.add_argument("--a-labels", default=None, metavar="FILE", help="labels file of model A")
    p.add_argument("--b-labels", default=None, metavar="FILE", help="labels file of model B")
    p.add_argument("--a-cam-layer", default=None, metavar="NAME", help="Grad-CAM layer of model A")
    p.add_argument("--b-cam-layer", default=None, metavar="NAME", help="Grad-CAM layer of model B")
    p.add_argument("--out", default="reports/compare", metavar="DIR", help="report folder (default reports/compare)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default cpu)")
    p.add_argument("--batch-size", type=_positive, default=defaults.BATCH_SIZE, metavar="N",
                   help=f"images per forward pass (default {defaults.BATCH_SIZE})")
    p.add_argument("--colormap", choices=defaults.COLORMAPS, default=defaults.COLORMAP,
                   help=f"overlay colours (default {defaults.COLORMAP})")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("merge", help="combine the reports of --audit-shard runs into one report and verdict",
                       description="Merge the results.json of shard runs (pytest --audit-shard K/N "
                                   "--audit-report DIR) into one report; the set-level gates are recomputed "
                                   "over every shard. Exit 1 when any check or gate failed or errored.",
                       epilog=MERGE_EPILOG, formatter_class=_Formatter)
    p.add_argument("shards", nargs="+", metavar="SHARD_REPORT", help="report folders (or results.json files)")
    p.add_argument("--out", default="reports/", metavar="DIR", help="merged report folder (default reports/)")
    p.add_argument("--self-contained", action="store_true", help="one HTML file with the images inlined")
    p.set_defaults(func=cmd_merge)
    return parser


MERGE_EPILOG = """examples:
  pytest specs/ --audit-shard 1/3 --audit-report reports/shard-1   # one CI job per shard
  model-audit merge reports/shard-1 reports/shard-2 reports/shard-3 --out reports/"""


def cmd_merge(args: argparse.Namespace) -> int:
    from audit.merge import merge, regate_from_specs, verdict

    index, run = merge(args.shards, args.out, self_contained=args.self_contained, regate=regate_from_specs)
    counts = run["counts"]
    _say(f"merged {len(args.shards)} shards: {counts['passed']} passed, {counts['failed']} failed, "
         f"{counts['error']} errors, {counts['skipped']} skipped; report: {index}")
    return verdict(run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``model-audit``; returns the exit code (0 ok, 1 not ok, 2 usage or user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if argv and argv[0] == "run" and "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "run":
        args.pytest_args = pytest_args
    try:
        return int(args.func(args))
    except AuditError as exc:
        sys.stdout.flush()
        _say(f"{PROG}: error: {exc}", err=True)
        return 2
    except KeyboardInterrupt:
        _say(f"{PROG}: interrupted", err=True)
        return 130
    except BrokenPipeError:
        # `model-audit explain ... | head`: the reader left; not an error worth a traceback
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
