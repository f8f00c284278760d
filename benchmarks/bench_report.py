"""Report benchmarks: prints ``name=value`` lines only (times in milliseconds, medians).

Run: ``/work/venv/bin/python benchmarks/bench_report.py``. The grid part pins the 50 ms budget of
``feature_grid`` for VGG16 ``features.4`` (64 maps of 112x112); the end-to-end parts belong in ``main``.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from audit.report import feature_grid


def median_ms(fn, runs: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms (the median ignores the odd scheduler hiccup on shared cores)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000.0)
    return statistics.median(times)


def bench_grid() -> dict[str, float]:
    maps = np.random.default_rng(0).random((64, 112, 112), dtype=np.float32)
    return {"grid_ms": median_ms(lambda: feature_grid(maps))}


# ==================================================================================================
# main(): the lead extends this with the end-to-end parts (render_case_assets, write_report, ...).
# Keep the output format: one ``name=value`` line per measurement, nothing else on stdout.
# ==================================================================================================
def main() -> None:
    results: dict[str, float] = {}
    results.update(bench_grid())
    # --- end-to-end benchmarks go here (lead) ---
    for name, value in results.items():
        print(f"{name}={value:.2f}")


if __name__ == "__main__":
    main()
