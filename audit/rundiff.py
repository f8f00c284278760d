"""Two runs' ``results.json`` compared under the tolerance that batching allows.

A case's numbers depend, in their last float32 bits, on the batch it was run in: a convolution over 16
images and one over a single image sum their terms in another order (oneDNN picks its blocking by batch
size), so a serial run (batches of ``--audit-batch-size``) and ``-n 2`` (each worker observes its cases
alone under ``--dist load``) differ by ~1e-7 in probabilities and metrics (measured: 337 values, max
1.2e-7, on the shipped specs) and never in an outcome that was not already on a threshold's edge.
Making every result independent of batching would mean a forward pass per image, which costs what
batching saves; so the results are equal under ``REL_TOL`` / ``ABS_TOL`` instead, two orders of
magnitude above what batching changes and far below what any threshold in a spec resolves.

What a run owns and another cannot share is not compared: timings, the command line, the run's
statistics (forward passes differ by design between serial and ``-n``), and asset paths (named after
the run). Messages are compared with their numbers read as numbers: "0.98" and "0.98" are equal, and
one printed rounding apart ("0.35" / "0.36" from 0.3549999 / 0.3550001) is allowed where the values
behind it are within the tolerance.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

#: relative tolerance between two runs' numbers (batching changes them by ~1e-7 relative)
REL_TOL = 1e-5
#: absolute tolerance: probabilities and metrics live in [0, 1] (batching changes them by <= 2.4e-7)
ABS_TOL = 1e-5
#: pictures: mean absolute difference in 8-bit levels (a heat value on a rounding edge moves a pixel 1 level)
PICTURE_MEAN_TOL = 0.5
#: keys whose values belong to one run: its clock, its command line, its own statistics, its files
RUN_OWN_KEYS = frozenset({"started", "duration_s", "observe_s", "args", "stats", "assets", "_path"})

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def differences(a: Any, b: Any, rel_tol: float = REL_TOL, abs_tol: float = ABS_TOL) -> list[str]:
    """Every place where two results documents differ beyond the tolerance, as ``path: a != b`` lines.

    An empty list means the two runs gave the same verdicts, metrics and top-k within the tolerance.
    Cases are matched by node id, so the order in which workers finished does not matter.
    """
    return list(_walk(_by_nodeid(a), _by_nodeid(b), "", rel_tol, abs_tol))


def _by_nodeid(doc: Any) -> Any:
    if isinstance(doc, Mapping) and isinstance(doc.get("cases"), list):
        doc = dict(doc)
        doc["cases"] = {str(c.get("nodeid") or c.get("case_id")): c for c in doc["cases"]}
    return doc


def _walk(a: Any, b: Any, path: str, rel_tol: float, abs_tol: float) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if key in RUN_OWN_KEYS:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                yield f"{where}: only in {'the second' if key not in a else 'the first'} run"
                continue
            yield from _walk(a[key], b[key], where, rel_tol, abs_tol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            yield f"{path}: {len(a)} items != {len(b)} items"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{path}[{i}]", rel_tol, abs_tol)
    elif _is_number(a) and _is_number(b):
        if not _close(float(a), float(b), rel_tol, abs_tol):
            yield f"{path}: {a!r} != {b!r}"
    elif isinstance(a, str) and isinstance(b, str):
        if a != b and not _same_text(a, b, rel_tol, abs_tol):
            yield f"{path}: {a!r} != {b!r}"
    elif type(a) is not type(b) or a != b:   # True == 1 in Python, not in a verdict
        yield f"{path}: {a!r} != {b!r}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _close(x: float, y: float, rel_tol: float, abs_tol: float) -> bool:
    if math.isnan(x) or math.isnan(y):
        return math.isnan(x) and math.isnan(y)
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def _same_text(a: str, b: str, rel_tol: float, abs_tol: float) -> bool:
    """Equal words, and numbers equal up to the tolerance or one unit of their last printed digit."""
    if _NUMBER.sub("#", a) != _NUMBER.sub("#", b):
        return False
    for x, y in zip(_NUMBER.findall(a), _NUMBER.findall(b)):
        if x == y:
            continue
        decimals = len(x.partition(".")[2]) if "e" not in x.lower() else 0
        unit = 10.0 ** -decimals if decimals else 0.0
        if not (_close(float(x), float(y), rel_tol, abs_tol) or abs(float(x) - float(y)) <= unit * 1.0001):
            return False
    return True


def picture_differences(folder_a: Path | str, doc_a: Mapping[str, Any], folder_b: Path | str,
                        doc_b: Mapping[str, Any], mean_tol: float = PICTURE_MEAN_TOL) -> list[str]:
    """Pictures of the same case and name whose pixels differ by more than ``mean_tol`` levels on average.

    Asset paths carry the run's id, so pictures are matched by case and asset name, not by path.
    """
    import numpy as np
    from PIL import Image

    cases_a, cases_b = _by_nodeid(doc_a)["cases"], _by_nodeid(doc_b)["cases"]
    found: list[str] = []
    for nodeid, case in cases_a.items():
        other = (cases_b.get(nodeid) or {}).get("assets") or {}
        for name, rel in _pictures(case.get("assets") or {}):
            rel_b = dict(_pictures(other)).get(name)
            if rel_b is None:
                found.append(f"{nodeid}: picture {name} only in the first run")
                continue
            with Image.open(Path(folder_a) / rel) as pa, Image.open(Path(folder_b) / rel_b) as pb:
                x, y = np.asarray(pa, dtype=np.int16), np.asarray(pb, dtype=np.int16)
            if x.shape != y.shape:
                found.append(f"{nodeid}: picture {name}: {x.shape} != {y.shape}")
            elif (mean := float(np.abs(x - y).mean())) > mean_tol:
                found.append(f"{nodeid}: picture {name} differs by {mean:.2f} levels on average")
    return found


def _pictures(assets: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    for name, value in assets.items():
        if isinstance(value, str) and value.endswith((".png", ".jpg")) and not name.endswith("_thumb"):
            yield prefix + name, value
        elif isinstance(value, Mapping):
            yield from _pictures(value, f"{prefix}{name}.")
