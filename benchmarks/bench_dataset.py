"""A golden set at scale: 10,000 shapes scenes from a COCO file, one ``pytest`` run, against the work
nobody can avoid (loading the model and one bare forward pass per image, in batches).

Prints ``name=value`` lines:

* ``dataset_suite_ratio``: wall time of the run inside ``pytest.main`` (fresh process, report written)
  over (model load in a fresh process + N x the bare no-grad forward per image at the run's batch
  size). Target <= 1.3. ``..._no_report`` without ``--audit-report``, ``..._no_logging`` also with
  ``-p no:logging``; ``per_item_overhead_ms``: what each pytest item costs beyond the forward pass.
* ``pytest_floor_s``: pytest alone running as many items that do nothing; ``dataset_suite_ratio_over_pytest_floor``:
  the wall time over (ideal + that floor), what model-audit adds beyond pytest and the forward passes.
* ``rss_ratio_10000_vs_1000``: peak RSS of the N-case run over that of a 1,000-case run. Target <= 1.2.
  ``rss_growth_kb_per_case`` is the slope behind it, next to ``pytest_floor_rss_ratio`` and
  ``pytest_floor_rss_growth_kb_per_case``: the same for pytest alone running two no-op items per case.
* ``report_first_paint_s``: the report's first paint in headless Chromium (file://, Performance API
  ``first-paint``). Target <= 2 s.
* ``decode_serial_ms_per_image``, ``decode_threads_ms_per_image``, ``decode_dataloader_ms_per_image``:
  decoding + preprocessing of the set's images on the main thread, in a 2-thread pool and in a
  2-worker ``torch.utils.data.DataLoader``, next to ``forward_ms_per_image``: what overlapping the
  decoding with the forward could save at most.

    python benchmarks/bench_dataset.py [--n 10000] [--small 1000] [--batch-size 16]

A 10,000-case run takes minutes on two shared cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from _environment import as_on_a_users_machine

REPO = Path(__file__).resolve().parents[1]

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
    import json, sys, time
    start = time.perf_counter()
    import torch
    import audit
    engine = audit.load_model("shapes_vgg")
    load = time.perf_counter() - start
    batch, n = int(sys.argv[1]), int(sys.argv[2])
    size = engine.loaded.preprocessing["squash"].size
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        engine.module(x)
        t = time.perf_counter()
        for _ in range(max(1, n // batch)):
            engine.module(x)
        per_image = (time.perf_counter() - t) / (max(1, n // batch) * batch)
    print("BENCH " + json.dumps({"load": load, "forward": per_image}))
""")

SPEC = """\
model: {arch: shapes_vgg}
dataset:
  coco: set/annotations/instances.json
  images: set/images
  annotation: bbox
defaults:
  expect: {top1_is_label: true}
  focus: {region: annotation, pointing_game: true, min_energy: 0.4}
gates:
  min_top1_accuracy: 0.95
  min_pointing_game_rate: 0.85
"""


def _bench_json(cmd: list[str], cwd: Path) -> dict:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"benchmark run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def make_suite(folder: Path, n: int) -> Path:
    from audit.zoo.make_dataset import write_dataset
    from audit.zoo.scenes import SEED_RANGES

    write_dataset(folder / "set", n, "coco", first_seed=SEED_RANGES["datasets"][0] + 500_000)
    (folder / "golden.yaml").write_text(SPEC)
    return folder / "golden.yaml"


def run_suite(folder: Path, batch_size: int, *extra: str) -> dict:
    result = _bench_json([sys.executable, "-c", RUN_PYTEST, "golden.yaml", "-q", "-p", "no:cacheprovider",
                          "--audit-batch-size", str(batch_size), *extra], folder)
    if result["exit"] not in (0, 1):   # 1: a few of the 10,000 cases fail, as in any real golden set
        raise RuntimeError(f"the golden-set run in {folder} exited {result['exit']}")
    return result


def first_paint_s(index: Path) -> float:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page()
            page.goto(index.resolve().as_uri(), wait_until="commit")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:   # the page's CSP forbids wait_for_function's eval
                paint = page.evaluate("() => performance.getEntriesByType('paint').map(e => e.startTime)")
                if paint:
                    return min(paint) / 1000.0
                time.sleep(0.05)
            raise RuntimeError(f"{index}: no paint within 120 s")
        finally:
            browser.close()


def decode_costs(images: list[Path]) -> dict[str, float]:
    from concurrent.futures import ThreadPoolExecutor

    import torch

    import audit
    from audit.images import load_image

    pre = audit.load_model("shapes_vgg").loaded.preprocessing["squash"]

    def work(path: Path):
        return pre.to_tensor(load_image(path))[0]

    out = {}
    t = time.perf_counter()
    for path in images:
        work(path)
    out["decode_serial_ms_per_image"] = (time.perf_counter() - t) * 1000 / len(images)
    with ThreadPoolExecutor(2) as pool:
        t = time.perf_counter()
        list(pool.map(work, images))
        out["decode_threads_ms_per_image"] = (time.perf_counter() - t) * 1000 / len(images)

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            return work(images[i])

    t = time.perf_counter()
    for _ in torch.utils.data.DataLoader(Images(), batch_size=16, num_workers=2):
        pass
    out["decode_dataloader_ms_per_image"] = (time.perf_counter() - t) * 1000 / len(images)
    return out


def pytest_floor(folder: Path, items: int) -> dict:
    """pytest's own cost for ``items`` items that do nothing, in a fresh process, the same plugins loaded:
    what any pytest-driven run of that many items pays before a model is loaded or an image decoded."""
    folder.mkdir()
    (folder / "test_floor.py").write_text(f"import pytest\n\n\n@pytest.mark.parametrize('i', range({items}))\n"
                                          "def test_nothing(i):\n    pass\n")
    return _bench_json([sys.executable, "-c", RUN_PYTEST, "test_floor.py", "-q", "-p", "no:cacheprovider"], folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big, small = Path(tmp) / "big", Path(tmp) / "small"
        big.mkdir()
        small.mkdir()
        make_suite(big, args.n)
        make_suite(small, args.small)
        as_on_a_users_machine(small / "golden.yaml")
        bare = _bench_json([sys.executable, "-c", BARE, str(args.batch_size), "2000"], REPO)
        run_small = run_suite(small, args.batch_size, "--audit-report", "report")
        run_big = run_suite(big, args.batch_size, "--audit-report", "report")
        bare_run = run_suite(big, args.batch_size)
        lean_run = run_suite(big, args.batch_size, "-p", "no:logging")
        floor = pytest_floor(Path(tmp) / "floor", 2 * args.n + 1)
        floor_small = pytest_floor(Path(tmp) / "floor_small", 2 * args.small + 1)
        ideal = bare["load"] + args.n * bare["forward"]
        print(f"cases={args.n}")
        print(f"suite_s={run_big['seconds']:.1f}")
        print(f"ideal_s={ideal:.1f}")
        print(f"dataset_suite_ratio={run_big['seconds'] / ideal:.2f}")
        print(f"dataset_suite_ratio_no_report={bare_run['seconds'] / ideal:.2f}")
        print(f"dataset_suite_ratio_no_report_no_logging={lean_run['seconds'] / ideal:.2f}")
        print(f"pytest_floor_s={floor['seconds']:.1f}")
        print(f"dataset_suite_ratio_over_pytest_floor={run_big['seconds'] / (ideal + floor['seconds']):.2f}")
        print(f"per_item_overhead_ms={(bare_run['seconds'] - ideal) * 1000 / (2 * args.n + 1):.2f}")
        print(f"rss_mb_{args.n}_no_report={bare_run['maxrss_kb'] / 1024:.0f}")
        print(f"rss_mb_{args.n}={run_big['maxrss_kb'] / 1024:.0f}")
        print(f"rss_mb_{args.small}={run_small['maxrss_kb'] / 1024:.0f}")
        print(f"rss_ratio_{args.n}_vs_{args.small}={run_big['maxrss_kb'] / run_small['maxrss_kb']:.2f}")
        print(f"rss_growth_kb_per_case={(run_big['maxrss_kb'] - run_small['maxrss_kb']) / (args.n - args.small):.1f}")
        print(f"pytest_floor_rss_ratio={floor['maxrss_kb'] / floor_small['maxrss_kb']:.2f}")
        print(f"pytest_floor_rss_growth_kb_per_case="
              f"{(floor['maxrss_kb'] - floor_small['maxrss_kb']) / (args.n - args.small):.1f}")
        print(f"forward_ms_per_image={bare['forward'] * 1000:.2f}")
        print(f"report_first_paint_s={first_paint_s(big / 'report' / 'index.html'):.2f}")
        images = sorted((big / "set" / "images").glob("*.png"))[:1000]
        for name, value in decode_costs(images).items():
            print(f"{name}={value:.2f}")


if __name__ == "__main__":
    main()
