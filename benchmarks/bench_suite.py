"""What a whole `pytest specs/` run costs, against the unavoidable work: loading the model and one bare
forward pass per image.

Two suites are generated in a temporary folder: N shapes cases on the offline `shapes_vgg`, and M VGG16
cases (random weights, generated 224x224 images). Each run happens in a fresh Python process, as a user
would run it. Prints one ``name=value`` line per figure:

* ``shapes_suite_ratio`` / ``vgg16_suite_ratio``: the suite's time inside ``pytest.main`` over
  (model load in a fresh process, torch import included) + N x (bare no-grad forward of one image);
  ``shapes_suite_ratio_lean``: the same with ``-p no:logging -p no:hypothesispytest``, since pytest's
  per-item logging capture and hypothesis' plugin cost more than the tiny model's forward pass;
* ``rss_ratio_200_vs_20``: peak RSS of the 200-case shapes run over that of a 20-case run;
* ``xdist_speedup``: wall time of the shapes suite serial over ``-n 2`` (process start included);
  ``xdist_speedup_vgg16`` the same for the VGG16 suite, and ``xdist_speedup_vgg16_one_thread`` with
  ``OMP_NUM_THREADS=1`` on both sides: a serial run's torch already uses every core for the
  convolutions, so this last figure is the one that shows what the workers themselves add.

The bare baseline is what a user's script does: ``import torch``, load the model, call it. The plugin
pauses the garbage collector while it loads the model (a plain ``import torch`` spends ~0.3 s in
collection passes), so ``shapes_suite_ratio_strict`` also gives the baseline that head start, to show
the overhead with nothing counted as free.

    python benchmarks/bench_suite.py [--shapes 200] [--vgg 32] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from _environment import as_on_a_users_machine

RUN_PYTEST = textwrap.dedent("""
    import json, resource, sys, time
    import pytest
    start = time.perf_counter()
    code = pytest.main(sys.argv[1:])
    took = time.perf_counter() - start
    print("BENCH " + json.dumps({"seconds": took, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                                 "exit": int(code)}))
""")

BARE = textwrap.dedent("""
    import gc, json, statistics, sys, time
    start = time.perf_counter()
    strict = sys.argv[4] == "strict"
    if strict:
        gc.disable()   # the plugin's own head start: no collection passes during the load
    import torch
    import audit
    engine = audit.load_model(sys.argv[1], **json.loads(sys.argv[2]))
    if strict:
        gc.freeze(); gc.enable()
    load = time.perf_counter() - start
    size = engine.loaded.preprocessing["squash"].size
    x = torch.rand(1, 3, size, size)
    times = []
    with torch.no_grad():
        engine.module(x)
        for _ in range(int(sys.argv[3])):
            t = time.perf_counter(); engine.module(x); times.append(time.perf_counter() - t)
    print("BENCH " + json.dumps({"load": load, "forward": statistics.median(times)}))
""")


def _bench_json(cmd: list[str], cwd: Path) -> dict:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"benchmark run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def shapes_suite(folder: Path, n: int) -> Path:
    from audit.zoo.scenes import make_scene

    (folder / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        scene = make_scene(10_000_000 + i)
        name = f"scene-{i:04d}.png"
        scene.image.save(folder / "images" / name)
        cases.append({"id": f"scene-{i:04d}", "image": f"images/{name}", "expect": {"top1": scene.name},
                      "focus": {"region": {"box": list(scene.box)}, "min_energy": 0.1}})
    path = folder / "shapes.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def vgg_suite(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        name = f"noise-{i:03d}.png"
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(folder / "images" / name)
        cases.append({"id": f"noise-{i:03d}", "image": f"images/{name}",
                      "expect": {"not_in_top_k": [0]},
                      "focus": {"region": {"box_rel": [0.25, 0.25, 0.75, 0.75]}, "min_energy": 0.0}})
    path = folder / "vgg16.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "vgg16", "weights": None, "seed": 0}, "cases": cases},
                                   sort_keys=False))
    return path


def suite_ratio(spec: Path, n: int, arch: str, load_kwargs: dict, *extra: str,
                strict: bool = False, repeats: int = 1) -> tuple[float, dict]:
    """The run's time over the bare baseline's, each the median of ``repeats`` fresh processes taken in
    turn (run, bare, run, bare, ...), so a slow minute on shared cores hits both sides alike."""
    runs, bares = [], []
    for _ in range(repeats):
        runs.append(_bench_json([sys.executable, "-c", RUN_PYTEST, str(spec), "-q", "-p", "no:cacheprovider", *extra],
                                spec.parent))
        bare = _bench_json([sys.executable, "-c", BARE, arch, json.dumps(load_kwargs), "20",
                            "strict" if strict else "plain"], spec.parent)
        bares.append(bare["load"] + n * bare["forward"])
    run = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    return run["seconds"] / statistics.median(bares), run


def xdist_walls(spec: Path, **env: str) -> tuple[float, float]:
    """Wall times of ``pytest spec`` and ``pytest spec -n 2``, each a fresh process (start included)."""
    import os

    def wall(*extra: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pytest", str(spec), "-q", "-p", "no:cacheprovider", *extra],
                       cwd=spec.parent, capture_output=True, check=False, env={**os.environ, **env})
        return time.perf_counter() - start

    return wall(), wall("-n", "2")


def xdist_speedup(spec: Path, name: str = "", **env: str) -> float:
    """Serial wall time over ``-n 2`` wall time; prints both (``xdist_serial_s<name>``, ``xdist_n2_s<name>``)."""
    serial, parallel = xdist_walls(spec, **env)
    print(f"xdist_serial_s{name}={serial:.2f}")
    print(f"xdist_n2_s{name}={parallel:.2f}")
    return serial / parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", type=int, default=200)
    parser.add_argument("--vgg", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="runs per shapes figure (the median is printed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shapes = shapes_suite(root / "shapes", args.shapes)
        small = shapes_suite(root / "shapes20", 20)
        vgg = vgg_suite(root / "vgg", args.vgg)
        as_on_a_users_machine(shapes)
        print("bytecode_cache=on")

        ratio, big_run = suite_ratio(shapes, args.shapes, "shapes_vgg", {}, repeats=args.repeats)
        print(f"shapes_suite_s={big_run['seconds']:.2f}")
        print(f"shapes_suite_ratio={ratio:.2f}")
        # the same run without two plugins of the dev environment that cost ~2 ms per item
        lean, _ = suite_ratio(shapes, args.shapes, "shapes_vgg", {}, "-p", "no:logging", "-p", "no:hypothesispytest",
                              repeats=args.repeats)
        print(f"shapes_suite_ratio_lean={lean:.2f}")
        strict, _ = suite_ratio(shapes, args.shapes, "shapes_vgg", {}, strict=True, repeats=args.repeats)
        print(f"shapes_suite_ratio_strict={strict:.2f}")
        small_run = _bench_json([sys.executable, "-c", RUN_PYTEST, str(small), "-q", "-p", "no:cacheprovider"],
                                small.parent)
        print(f"rss_ratio_200_vs_20={big_run['maxrss_kb'] / small_run['maxrss_kb']:.2f}")

        print(f"xdist_speedup={xdist_speedup(shapes):.2f}")

        ratio, vgg_run = suite_ratio(vgg, args.vgg, "vgg16", {"weights": None, "seed": 0})
        print(f"vgg16_suite_s={vgg_run['seconds']:.2f}")
        print(f"vgg16_suite_ratio={ratio:.2f}")
        print(f"xdist_speedup_vgg16={xdist_speedup(vgg, '_vgg16'):.2f}")
        print(f"xdist_speedup_vgg16_one_thread={xdist_speedup(vgg, '_vgg16_one_thread', OMP_NUM_THREADS='1'):.2f}")


if __name__ == "__main__":
    main()
