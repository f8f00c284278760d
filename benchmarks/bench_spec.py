"""Spec loading benchmark: prints ``name=value`` lines only (milliseconds per case, medians of 3).

Run: ``/work/venv/bin/python benchmarks/bench_spec.py [CASES...]`` (default 8000 50000). Each spec is
plain generated YAML (no aliases) in block style, the shape ``model-audit snapshot`` writes: an id, an
image, an ``expect`` and a ``focus`` with a box per case. Issue 18 measured 1.4 ms per case before.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from audit.spec import load_spec


def write_spec(folder: Path, n: int) -> Path:
    (folder / "img.png").write_bytes(b"")  # the loader checks the image exists, never decodes it
    cases = [{"id": f"case-{i}", "image": "img.png", "expect": {"top1": "circle", "min_prob": 0.5},
              "focus": {"region": {"box": [1, 2, 30, 40]}, "min_energy": 0.3}} for i in range(n)]
    path = folder / f"s{n}.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def main(sizes: list[int]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = write_spec(Path(tmp), n)
            times = []
            for _ in range(3):
                started = time.perf_counter()
                spec = load_spec(path)
                times.append(time.perf_counter() - started)
            assert len(spec.cases) == n and not spec.case_errors
            print(f"spec_load_{n}_cases_s={statistics.median(times):.2f}")
            print(f"spec_load_{n}_ms_per_case={statistics.median(times) / n * 1000:.3f}")
            print(f"spec_size_{n}_cases_bytes={path.stat().st_size}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [8000, 50000])
