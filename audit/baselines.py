"""Baselines: what a model did on each case, recorded once and compared on every later run.

Why: an upgrade (torch, torchvision, new weights, a changed preprocessing) can change predictions and
explanations without breaking any hand-written expectation. ``--audit-update-baselines`` records, per
case, the top-k, the low-resolution Grad-CAM (float16), a hash of the image, the model fingerprint and
the library versions; a normal run compares today's explanation with it under tolerances the spec can
set (README "Baselines: checking an upgrade").

Storage is one JSON + one ``.npy`` per case beside the spec (``<spec dir>/baselines/<spec stem>/``), so
pytest-xdist workers never write the same file and a review diff shows one case per file. The JSON is
sorted and indented for human review; probabilities are rounded to 6 decimals. Every file is written
through a temp file and ``os.replace``, the ``.npy`` first and the JSON last (the JSON is the commit
point: a baseline without its JSON does not exist).

This module never imports torch (numpy, cv2 and json only): versions come from package metadata.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import cv2
import numpy as np

from audit.checks import CheckResult, Metric
from audit.errors import AuditError
from audit.files import atomic_write, remove_stale_temps, sha256_file
from audit.versions import library_versions

__all__ = ["Baseline", "BaselineTolerance", "BaselineStore", "SCHEMA_VERSION", "safe_case_id", "sha256_file", "current_versions",
           "pearson", "hot_iou", "topk_overlap", "prob_drift", "compare", "deltas", "HOT_FRACTION"]

SCHEMA_VERSION = 1
HOT_FRACTION = 0.5
"""A pixel is "hot" at >= this fraction of its map's maximum (``hot_iou``)."""

UPDATE_HINT = "re-record with --audit-update-baselines"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 100
_JSON_FIELDS = ("case_id", "cam_layer", "heatmap", "image_sha256", "model_fingerprint", "preprocess",
                "recorded_at", "schema_version", "target", "top_k", "versions")


# ------------------------------------------------------------------------------------------- record

@dataclass(frozen=True)
class BaselineTolerance:
    """How far a run may drift from the recorded baseline (the ``baseline:`` key); these defaults are the
    documented ones."""

    top1_must_match: bool = True
    min_topk_overlap: float = 0.6
    max_prob_drift: float = 0.15
    min_heatmap_correlation: float = 0.7
    min_hot_iou: float = 0.4


@dataclass(frozen=True, eq=False)
class Baseline:
    """One case's recording (or today's observation in the same shape, to compare with it).

    ``heatmap`` is the low-resolution Grad-CAM of class ``target`` (ReLU'd, max-normalised, float16).
    ``probs`` is today's full softmax when known; it is never stored (a recording keeps only its top-k)
    and lets ``prob_drift`` see classes that left today's top-k. ``eq=False``: arrays compare by identity.
    """

    case_id: str
    top_k: list[dict[str, Any]]
    target: int
    heatmap: np.ndarray
    image_sha256: str
    model_fingerprint: str
    preprocess: str
    cam_layer: str
    versions: dict[str, str]
    recorded_at: str
    probs: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_explanation(cls, case_id: str, explanation: Any, image: str | Path, model_fingerprint: str,
                         preprocess: str, target: int | None = None,
                         image_sha256: str | None = None) -> "Baseline":
        """Build from an engine ``Explanation`` (duck-typed: ``top_k``, ``target``, ``cams_lowres``,
        ``cam_layer``, optional ``probs``).

        ``target``: the class whose heatmap is kept; default ``explanation.target`` (the focus target,
        else the top-1). Pass the recorded baseline's target when today's explanation has its map, so
        both sides show the same class. ``image_sha256`` skips re-hashing when the caller has it.
        """
        cams = explanation.cams_lowres
        chosen = int(target) if target is not None and int(target) in cams else int(explanation.target)
        probs = getattr(explanation, "probs", None)
        return cls(
            case_id=str(case_id),
            top_k=[_ranked_dict(r) for r in explanation.top_k],
            target=chosen,
            heatmap=np.asarray(cams[chosen], dtype=np.float32).astype(np.float16),
            image_sha256=image_sha256 or sha256_file(image),
            model_fingerprint=str(model_fingerprint),
            preprocess=str(preprocess),
            cam_layer=str(explanation.cam_layer),
            versions=current_versions(),
            recorded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            probs=None if probs is None else np.asarray(probs, dtype=np.float64))

    def label_of(self, index: int) -> str | None:
        for r in self.top_k:
            if int(r["index"]) == int(index):
                return str(r["label"])
        return None

    def to_json(self, npy_name: str) -> dict[str, Any]:
        """The reviewable JSON document (the heatmap itself lives in ``npy_name``)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "case_id": self.case_id,
            "top_k": [_ranked_dict(r) for r in self.top_k],
            "target": int(self.target),
            "heatmap": {"file": npy_name, "shape": [int(s) for s in self.heatmap.shape], "dtype": "float16"},
            "image_sha256": self.image_sha256,
            "model_fingerprint": self.model_fingerprint,
            "preprocess": self.preprocess,
            "cam_layer": self.cam_layer,
            "versions": {str(k): str(v) for k, v in self.versions.items()},
            "recorded_at": self.recorded_at,
        }


def _ranked_dict(r: Any) -> dict[str, Any]:
    """``{index, label, prob}`` from an engine ``Ranked`` or a dict; prob rounded to 6 decimals."""
    get = r.get if isinstance(r, Mapping) else (lambda k: getattr(r, k))
    return {"index": int(get("index")), "label": str(get("label")), "prob": round(float(get("prob")), 6)}


def current_versions() -> dict[str, str]:
    """torch / torchvision / model-audit versions, without importing torch."""
    return library_versions()


# -------------------------------------------------------------------------------------------- store

def safe_case_id(case_id: str) -> str:
    """A file-name stem for a case id: ``[A-Za-z0-9._-]`` kept, anything else replaced by ``_``.

    When anything was replaced (or the id is empty, starts with a dot, or is too long), ``-`` and the
    first 10 hex digits of the real id's sha1 are appended, so distinct ids never share a file. Plain
    ids stay readable as they are (``circle-01`` -> ``circle-01``).
    """
    text = str(case_id)
    clean = _SAFE.sub("_", text)
    changed = clean != text or not clean or clean.startswith(".") or len(clean) > _MAX_STEM
    if not changed:
        return clean
    clean = clean.lstrip(".")[:_MAX_STEM]
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{clean}-{digest}" if clean else digest


class BaselineStore:
    """The baselines of one spec file: ``<spec folder>/baselines/<spec stem>/<safe id>.json|.npy``."""

    def __init__(self, spec_path: str | Path):
        self.spec_path = Path(spec_path)
        self.folder = self.spec_path.parent / "baselines" / self.spec_path.stem

    def paths(self, case_id: str) -> tuple[Path, Path]:
        """(json, npy) of a case."""
        stem = safe_case_id(case_id)
        return self.folder / f"{stem}.json", self.folder / f"{stem}.npy"

    def exists(self) -> bool:
        """Whether any baseline was recorded for this spec (dot-files, such as a killed writer's temp
        ``.tmp-*.json``, are not recordings)."""
        return self.folder.is_dir() and any(not p.name.startswith(".") for p in self.folder.glob("*.json"))

    def load(self, case_id: str, num_classes: int | None = None) -> Baseline | None:
        """The recorded baseline, or None when none was recorded; an unusable file is an ``AuditError``.

        Everything is validated before it is used, because a baseline file is input from disk (edited
        by hand, merged badly, truncated by a full disk): the JSON against ``BASELINE_SCHEMA`` (no NaN
        or infinite numbers, bounded size and depth), the ``.npy`` header (2-D float16, the shape the
        JSON names, a file size that matches) before any array is allocated. ``num_classes`` (the
        model's label count, when known) range-checks the recorded class indices, so a bad index is
        this baseline's error, not an engine error for every case batched with it.
        """
        json_path, npy_path = self.paths(case_id)
        if not json_path.is_file():
            return None
        data = _read_json(json_path)
        baseline = _from_json(json_path, data)
        if baseline.case_id != str(case_id):
            raise _unusable(json_path, f"it holds case {baseline.case_id!r}, not {str(case_id)!r}")
        if num_classes is not None:
            for where, index in [("target", baseline.target)] + [
                    (f"top_k[{i}].index", int(r["index"])) for i, r in enumerate(baseline.top_k)]:
                if index >= num_classes:
                    raise _unusable(json_path, f"{where} is class {index}, but the model has {num_classes} "
                                               f"classes (0..{num_classes - 1})")
        if not npy_path.is_file():
            raise _unusable(npy_path, "file not found (the heatmap of " + json_path.name + ")")
        heat = _read_heatmap(npy_path, tuple(data["heatmap"]["shape"]))
        return replace(baseline, heatmap=heat)

    def save(self, baseline: Baseline) -> "Written":
        """Write the case's ``.npy`` then its JSON (the commit point), each atomically.

        A recording equal to the stored one in everything but ``recorded_at`` leaves both files
        byte-identical (re-recording must not churn git diffs): ``Written.changed`` is then False.
        """
        json_path, npy_path = self.paths(baseline.case_id)
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.folder)   # a killed recording's leftovers; young ones may be a worker's
        heat = np.ascontiguousarray(np.asarray(baseline.heatmap, dtype=np.float16))
        document = baseline.to_json(npy_path.name)
        if self._same_as_stored(json_path, npy_path, document, heat):
            return Written([json_path, npy_path], changed=False)
        atomic_write(npy_path, lambda fh: np.save(fh, heat, allow_pickle=False), durable=True)
        text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(json_path, lambda fh: fh.write(text.encode("utf-8")), durable=True)
        return Written([json_path, npy_path], changed=True)

    @staticmethod
    def _same_as_stored(json_path: Path, npy_path: Path, document: dict, heat: np.ndarray) -> bool:
        try:
            stored = json.loads(json_path.read_text(encoding="utf-8"))
            old_heat = np.load(npy_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return False
        if not isinstance(stored, dict):
            return False
        ignore = ("recorded_at",)
        same_doc = ({k: v for k, v in stored.items() if k not in ignore}
                    == {k: v for k, v in document.items() if k not in ignore})
        return same_doc and old_heat.dtype == heat.dtype and old_heat.shape == heat.shape and bool(
            np.array_equal(old_heat, heat))

    def unused(self, case_ids: Iterable[str]) -> list[Path]:
        """Recorded files (JSON and heatmap) of cases the spec no longer has."""
        if not self.folder.is_dir():
            return []
        wanted = {self.paths(case_id)[0].name for case_id in case_ids}
        out = []
        for json_path in sorted(self.folder.glob("*.json")):
            if json_path.name.startswith(".") or json_path.name in wanted:
                continue
            out.append(json_path)
            npy = json_path.with_suffix(".npy")
            if npy.is_file():
                out.append(npy)
        return out


@dataclass(frozen=True)
class Written:
    """What ``BaselineStore.save`` did: the two files, and whether their content changed."""

    paths: list[Path]
    changed: bool

    def __iter__(self):
        return iter(self.paths)

    def __getitem__(self, index: int) -> Path:
        return self.paths[index]


MAX_JSON_BYTES = 1 << 20
"""A baseline JSON is a few kilobytes; anything larger is not one (and is not read into memory)."""
MAX_HEATMAP_SIDE = 4096
_LABEL = {"type": "string", "maxLength": 10_000}
BASELINE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": list(_JSON_FIELDS),
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "case_id": _LABEL,
        "top_k": {"type": "array", "minItems": 1, "maxItems": 100_000, "items": {
            "type": "object", "required": ["index", "label", "prob"], "additionalProperties": False,
            "properties": {"index": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1},
                           "label": _LABEL, "prob": {"type": "number", "minimum": 0, "maximum": 1}}}},
        "target": {"type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1},
        "heatmap": {"type": "object", "required": ["file", "shape", "dtype"], "additionalProperties": False,
                    "properties": {"file": {"type": "string"}, "dtype": {"const": "float16"},
                                   "shape": {"type": "array", "minItems": 2, "maxItems": 2, "items": {
                                       "type": "integer", "minimum": 1, "maximum": MAX_HEATMAP_SIDE}}}},
        "image_sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "model_fingerprint": _LABEL,
        "preprocess": _LABEL,
        "cam_layer": _LABEL,
        "recorded_at": _LABEL,
        "versions": {"type": "object", "additionalProperties": _LABEL},
    },
}
"""What a baseline JSON must look like before any of it is used (JSON Schema 2020-12)."""


def _read_json(path: Path) -> Any:
    """The parsed JSON of a baseline file, refusing what is not a plain, finite, small document."""
    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"number {text} is out of range")
        return value

    def constant(text: str) -> float:
        raise ValueError(f"{text} is not a number JSON allows")

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:
            raise _unusable(path, f"larger than {MAX_JSON_BYTES // 1024} KiB: not a baseline file")
        return json.loads(raw.decode("utf-8"), parse_float=finite, parse_constant=constant)
    except RecursionError:
        raise _unusable(path, "nested too deeply: not a baseline file") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:   # JSONDecodeError is a ValueError
        raise _unusable(path, _reason(exc)) from None


def _validator() -> Any:
    global _VALIDATOR
    if _VALIDATOR is None:
        from jsonschema import Draft202012Validator

        _VALIDATOR = Draft202012Validator(BASELINE_SCHEMA)
    return _VALIDATOR


_VALIDATOR: Any = None


def _from_json(path: Path, data: Any) -> Baseline:
    if isinstance(data, dict) and "schema_version" in data and data["schema_version"] != SCHEMA_VERSION:
        raise _unusable(path, f"schema_version {data['schema_version']!r}, this model-audit reads {SCHEMA_VERSION}")
    errors = sorted(_validator().iter_errors(data), key=lambda e: (list(e.absolute_path), e.message))
    if errors:
        first = errors[0]
        where = _json_path(first.absolute_path)
        message = first.message if len(first.message) <= 200 else first.message[:200] + "…"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise _unusable(path, f"malformed field {where}: {message}{more}" if where else f"malformed: {message}{more}")
    indices = [int(r["index"]) for r in data["top_k"]]
    if len(set(indices)) != len(indices):
        raise _unusable(path, "malformed field top_k: a class is listed twice")
    return Baseline(case_id=data["case_id"], top_k=[_ranked_dict(r) for r in data["top_k"]],
                    target=int(data["target"]), heatmap=np.zeros((0, 0), np.float16),
                    image_sha256=data["image_sha256"], model_fingerprint=data["model_fingerprint"],
                    preprocess=data["preprocess"], cam_layer=data["cam_layer"], versions=dict(data["versions"]),
                    recorded_at=data["recorded_at"])


def _json_path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _read_heatmap(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The ``.npy`` heatmap, after its header proved it is the small 2-D float16 array the JSON names."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unknown .npy format version {version}")
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            header, fortran, dtype = reader(fh)   # numpy bounds the header's own size (10 000 bytes)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
            if dtype != np.dtype("<f2") or len(header) != 2 or fortran:
                raise _unusable(path, f"expected a 2-D float16 heatmap, found {dtype} {header}")
            if tuple(header) != shape:
                raise _unusable(path, f"the heatmap is {header[0]}x{header[1]} but the baseline JSON says "
                                      f"{shape[0]}x{shape[1]}")
            if size != offset + 2 * header[0] * header[1]:
                raise _unusable(path, f"the file holds {size - offset} bytes of data, its header says "
                                      f"{2 * header[0] * header[1]} (truncated or padded)")
            heat = np.fromfile(fh, dtype="<f2", count=header[0] * header[1]).reshape(header)
    except AuditError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise _unusable(path, _reason(exc)) from None
    if not np.all(np.isfinite(heat)) or heat.min() < 0 or heat.max() > 1:
        raise _unusable(path, "the heatmap holds values outside 0..1 (or NaN): not a recorded Grad-CAM")
    return heat


def _unusable(path: Path, reason: str) -> AuditError:
    return AuditError(f"baseline {path} cannot be used: {reason}; delete it and {UPDATE_HINT}")


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------ metrics

def _as_map(a: Any) -> np.ndarray:
    arr = np.nan_to_num(np.asarray(a, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {arr.shape}")
    return arr


def _aligned(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both maps as float64, ``b`` resized (bilinear) onto ``a``'s shape when they differ."""
    a, b = _as_map(a), _as_map(b)
    if a.shape != b.shape:
        b = cv2.resize(b.astype(np.float32), (a.shape[1], a.shape[0]),
                       interpolation=cv2.INTER_LINEAR).astype(np.float64)
    return a, b


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation of two heatmaps (``b`` resized onto ``a``); never NaN.

    A constant map has no correlation: two constant maps give 1.0 when equal, else 0.0; one constant
    map against a varying one gives 0.0.
    """
    a, b = _aligned(a, b)
    da, db = a - a.mean(), b - b.mean()
    na, nb = math.sqrt(float((da * da).sum())), math.sqrt(float((db * db).sum()))
    scale = max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))
    flat_a, flat_b = na <= 1e-12 * scale, nb <= 1e-12 * scale
    if flat_a or flat_b:
        return 1.0 if flat_a and flat_b and np.allclose(a, b, rtol=0, atol=1e-6 * scale) else 0.0
    r = float((da * db).sum()) / (na * nb)
    return float(min(1.0, max(-1.0, r)))


def _hot(m: np.ndarray, fraction: float) -> np.ndarray:
    peak = float(m.max())
    if not peak > 0:
        return np.zeros(m.shape, dtype=bool)
    return m >= fraction * peak


def hot_iou(a: Any, b: Any, fraction: float = HOT_FRACTION) -> float:
    """IoU of {a >= fraction*max a} and {b >= fraction*max b} (``b`` resized onto ``a``).

    A map with no positive pixel has no hot area; both empty -> 1.0 (nothing moved), one empty -> 0.0.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    a, b = _aligned(a, b)
    ha, hb = _hot(a, fraction), _hot(b, fraction)
    union = int(np.logical_or(ha, hb).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(ha, hb).sum()) / union


def topk_overlap(then_indices: Iterable[int], now_indices: Iterable[int]) -> float:
    """Share of the baseline's top-k classes still in today's top-k (1.0 for an empty baseline)."""
    then = list(dict.fromkeys(int(i) for i in then_indices))
    now = {int(i) for i in now_indices}
    if not then:
        return 1.0
    return sum(1 for i in then if i in now) / len(then)


def prob_drift(then_top_k: Sequence[Any], now_probs: Mapping[int, float]) -> float:
    """Largest |p_then - p_now| over the baseline's top-k classes; a class absent from ``now_probs``
    counts as p_now = 0 (pass today's full softmax to avoid that bound)."""
    drift = 0.0
    for r in then_top_k:
        entry = _ranked_dict(r)
        drift = max(drift, abs(entry["prob"] - float(now_probs.get(entry["index"], 0.0))))
    return float(drift)


def _now_probs(now: Baseline) -> dict[int, float]:
    probs = {int(r["index"]): float(r["prob"]) for r in now.top_k}
    if now.probs is not None:
        full = np.asarray(now.probs, dtype=np.float64).ravel()
        probs.update({i: float(full[i]) for i in range(len(full))})
    return probs


# ------------------------------------------------------------------------------------------ compare

def _get(tolerance: Any, name: str) -> Any:
    return getattr(tolerance if tolerance is not None else BaselineTolerance(), name)


def _who(b: Baseline, index: int) -> str:
    label = b.label_of(index)
    return f"{label!r} (#{index})" if label is not None else f"#{index}"


def model_changes(then: Baseline, now: Baseline) -> list[str]:
    """What changed about the model since the recording ("fingerprint 1234abcd → 9876fedc", "torch a → b")."""
    changes = []
    if then.model_fingerprint != now.model_fingerprint:
        changes.append(f"fingerprint {then.model_fingerprint[:8]} → {now.model_fingerprint[:8]}")
    for key in sorted(set(then.versions) | set(now.versions)):
        a, b = then.versions.get(key, "?"), now.versions.get(key, "?")
        if a != b:
            changes.append(f"{key} {a} → {b}")
    return changes


def _setup_changes(then: Baseline, now: Baseline) -> list[str]:
    changes = []
    if then.preprocess != now.preprocess:
        changes.append(f"preprocess {then.preprocess} → {now.preprocess}")
    if then.cam_layer != now.cam_layer:
        changes.append(f"cam_layer {then.cam_layer} → {now.cam_layer}")
    return changes


def compare(then: Baseline, now: Baseline, tolerance: Any = None) -> CheckResult:
    """Today's observation against the recording, as a ``CheckResult("baseline")``.

    ``tolerance``: any object with ``top1_must_match``, ``min_topk_overlap``, ``max_prob_drift``,
    ``min_heatmap_correlation``, ``min_hot_iou`` (``BaselineTolerance``); None: its defaults.
    A changed image fails (stale baseline), whatever the numbers say. A changed model or library is not
    a failure by itself: it is what an upgrade looks like, and the message says so.
    """
    __tracebackhide__ = True
    d = deltas(then, now)
    t1_then, t1_now = int(then.top_k[0]["index"]), int(now.top_k[0]["index"])
    must_match = bool(_get(tolerance, "top1_must_match"))
    min_overlap = float(_get(tolerance, "min_topk_overlap"))
    max_drift = float(_get(tolerance, "max_prob_drift"))
    min_corr = float(_get(tolerance, "min_heatmap_correlation"))
    min_iou = float(_get(tolerance, "min_hot_iou"))
    now_probs = _now_probs(now)
    k = len(then.top_k)
    gone = [int(r["index"]) for r in then.top_k if int(r["index"]) not in {int(x["index"]) for x in now.top_k[:k]}]
    drift_row = max(then.top_k, key=lambda r: abs(float(r["prob"]) - now_probs.get(int(r["index"]), 0.0)))
    di = int(drift_row["index"])
    p_now = now_probs.get(di)
    rows = [
        (Metric("top1", t1_now, t1_then, "==", t1_now == t1_then or not must_match),
         f"then {_who(then, t1_then)} p={then.top_k[0]['prob']:.3f}, now {_who(now, t1_now)} "
         f"p={now.top_k[0]['prob']:.3f}" + ("" if must_match else " (top1_must_match: false)")),
        (Metric("topk_overlap", d["topk_overlap"], min_overlap, ">=", d["topk_overlap"] >= min_overlap),
         f"{k - len(gone)} of the baseline's {k} top classes still in today's top-{k}"
         + (f"; gone: {', '.join(_who(then, i) for i in gone)}" if gone else "")),
        (Metric("prob_drift", d["prob_drift"], max_drift, "<=", d["prob_drift"] <= max_drift),
         f"largest change p({_who(then, di)}) {float(drift_row['prob']):.3f} → "
         + (f"{p_now:.3f}" if p_now is not None else "not in today's top-k (counted as 0)")),
        (Metric("heatmap_correlation", d["heatmap_correlation"], min_corr, ">=", d["heatmap_correlation"] >= min_corr),
         _heat_why(then, now)),
        (Metric("hot_iou", d["hot_iou"], min_iou, ">=", d["hot_iou"] >= min_iou),
         f"overlap of the areas >= {HOT_FRACTION:g} of each map's maximum"),
    ]
    metrics = tuple(m for m, _ in rows)
    notes = []
    changes = model_changes(then, now)
    if changes:
        notes.append("model changed since the baseline: " + "; ".join(changes))
    setup = _setup_changes(then, now)
    if setup:
        notes.append("setup changed since the baseline: " + "; ".join(setup))
    recorded = f"recorded {then.recorded_at}"
    if then.image_sha256 != now.image_sha256:
        lines = [f"baseline: image changed since the baseline was recorded (sha256 {then.image_sha256[:8]}… → "
                 f"{now.image_sha256[:8]}…): {UPDATE_HINT}", *notes, f"comparison with the stale baseline ({recorded}):"]
        lines += [f"  {m}: {why}" for m, why in rows]
        return CheckResult("baseline", False, "\n".join(lines), metrics)
    failed = [m for m in metrics if not m.passed]
    if not failed:
        head = (f"baseline: matches ({recorded}): top1 {_who(now, t1_now)} {then.top_k[0]['prob']:.3f} → "
                f"{now.top_k[0]['prob']:.3f}, " + ", ".join(str(m) for m in metrics[1:]))
        return CheckResult("baseline", True, "\n".join([head, *notes]), metrics)
    lines = [f"baseline: {len(failed)} of {len(rows)} comparisons failed ({recorded}; "
             f"if the change is intended, {UPDATE_HINT})", *notes]
    lines += [f"  {m}: {why}" for m, why in rows]
    return CheckResult("baseline", False, "\n".join(lines), metrics)


def _heat_why(then: Baseline, now: Baseline) -> str:
    what = f"Pearson correlation of the low-res heatmaps of {_who(then, then.target)}"
    if then.target != now.target:
        what = (f"Pearson correlation of the low-res heatmaps of {_who(then, then.target)} (then) and "
                f"{_who(now, now.target)} (now)")
    if tuple(then.heatmap.shape) != tuple(now.heatmap.shape):
        what += f"; today's {now.heatmap.shape[1]}x{now.heatmap.shape[0]} map resized onto the baseline's " \
                f"{then.heatmap.shape[1]}x{then.heatmap.shape[0]}"
    return what


def deltas(then: Baseline, now: Baseline) -> dict[str, Any]:
    """The numbers the report's "compared with the baseline" table shows for a case (JSON-ready)."""
    t_then, t_now = then.top_k[0], now.top_k[0]
    return {
        "heatmap_correlation": pearson(then.heatmap, now.heatmap),
        "hot_iou": float(hot_iou(then.heatmap, now.heatmap)),
        "top1_then": f"{t_then['label']} (#{t_then['index']}) {float(t_then['prob']):.3f}",
        "top1_now": f"{t_now['label']} (#{t_now['index']}) {float(t_now['prob']):.3f}",
        "prob_drift": prob_drift(then.top_k, _now_probs(now)),
        "topk_overlap": topk_overlap([r["index"] for r in then.top_k],
                                     [r["index"] for r in now.top_k[:len(then.top_k)]]),
        "image_changed": then.image_sha256 != now.image_sha256,
        "recorded_with": {**then.versions, "fingerprint": then.model_fingerprint[:12],
                          "recorded_at": then.recorded_at},
    }
