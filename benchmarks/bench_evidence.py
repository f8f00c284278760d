"""Evidence checks: what perturbations cost in an audit, and whether Grad-CAM is faithful (RISE deletion).

Prints ``name=value`` lines:

- ``deletion_share_vs_random``: on unseen shapes scenes (seeds from ``SEED_RANGES["tests"]``), the share
  whose deletion AUC of shapes_vgg's Grad-CAM is lower than that of a uniform random heatmap (target
  >= 0.95), with the mean AUCs of both;
- ``invariance_ratio``: time of an audit with 8 perturbations per image (one batched forward with
  Grad-CAM over originals and variants, the perturbations drawn included) / time of 9 bare no-grad
  forwards of the same images (target <= 1.2); ``invariance_ratio_vs_one_batched_bare_forward``: the
  same audit over ONE bare forward of all 9 x n inputs, the stricter floor (the batching itself is
  most of the win on CPU).

    python benchmarks/bench_evidence.py [--scenes 200] [--steps 16] [--images 16] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from audit import models
from audit.engine import Engine
from audit.faithfulness import CurveRequest, curves, random_heat
from audit.predict import predictor
from audit.zoo.scenes import CLASSES, MARKER_BOX, MARKER_COLOURS, SEED_RANGES, make_scene

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


INVARIANCE_SEED_OFFSET = 9000


def _invariance_spec(folder: Path, n: int) -> Path:
    """n marked scenes, each with 8 perturbations: every transform kind the spec offers."""
    lo, _ = SEED_RANGES["tests"]
    for k, colour in enumerate(MARKER_COLOURS):
        Image.new("RGB", (6, 6), colour).save(folder / f"marker-{CLASSES[k]}.png")
    cases = []
    for seed in range(lo + INVARIANCE_SEED_OFFSET, lo + INVARIANCE_SEED_OFFSET + n):
        scene = make_scene(seed, marker=True)
        scene.image.save(folder / f"s{seed}.png")
        other = CLASSES[(scene.label + 1) % len(CLASSES)]
        cases.append({"id": f"s{seed}", "image": f"s{seed}.png",
                      "focus": {"region": {"box": list(scene.box)}, "avoid": {"box": list(MARKER_BOX)}},
                      "invariance": [{"occlude": "avoid"}, {"occlude": "region", "fill": "mean",
                                                            "expect": {"min_prob_drop": 0.0}},
                                     {"paste": {"image": f"marker-{other}.png", "at": [2, 2]}},
                                     {"hflip": True}, {"jpeg": 90}, {"gaussian_blur": 1.0},
                                     {"brightness": 0.7}, {"corruption": {"name": "gaussian_noise", "severity": 1}}]})
    path = folder / "invariance.yaml"
    path.write_text(yaml.safe_dump({"model": {"arch": "shapes_vgg"}, "cases": cases}, sort_keys=False))
    return path


def invariance_ratio(n_images: int, repeats: int) -> None:
    """The audit's observation of n cases x (1 + 8 variants), decoding, perturbing, preprocessing and
    the explaining forward (Grad-CAM) included, over 9 bare no-grad passes (preprocess + forward) of the
    same n images: what a script that runs the model on 9 copies of each image pays anyway."""
    from audit.session import AuditSession, CaseRef
    from audit.spec import load_spec

    with tempfile.TemporaryDirectory() as tmp:
        spec = load_spec(_invariance_spec(Path(tmp), n_images))
        refs = [CaseRef(f"{spec.path}::{c.id}", spec, c) for c in spec.cases]
        engine_holder = AuditSession(batch_size=n_images)
        engine = engine_holder.engine(spec.model)

        def audit_once() -> None:
            session = AuditSession(batch_size=n_images)
            session._engines[session.model_key(spec.model)] = engine   # loaded once, as in a session
            session.schedule([(r, 1) for r in refs])
            for r in refs:
                session.observe(r.nodeid)
            assert session.stats["forward_passes"] == 1 and session.stats["variants"] == 8 * n_images

        images = [Image.open(c.image).convert("RGB") for c in spec.cases]
        prep = engine.loaded.preprocessing["squash"]
        module = engine.module

        def bare_once() -> None:
            with torch.no_grad():
                for _ in range(9):
                    module(torch.stack([prep.to_tensor(im)[0] for im in images]))

        def bare_batched_once() -> None:
            # the stricter floor: all 9 x n inputs in ONE bare forward (the batching the audit itself does)
            with torch.no_grad():
                module(torch.cat([torch.stack([prep.to_tensor(im)[0] for im in images])] * 9))

        audit_s = median_seconds(audit_once, repeats)
        bare_s = median_seconds(bare_once, repeats)
        batched_s = median_seconds(bare_batched_once, repeats)
    print(f"invariance_images={n_images}")
    print("invariance_perturbations_per_image=8")
    print(f"invariance_audit_s={audit_s:.3f}")
    print(f"invariance_bare_9_forwards_s={bare_s:.3f}")
    print(f"invariance_bare_one_batched_forward_s={batched_s:.3f}")
    print(f"invariance_ratio={audit_s / bare_s:.2f}")
    print(f"invariance_ratio_vs_one_batched_bare_forward={audit_s / batched_s:.2f}")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-deletion", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    invariance_ratio(args.images, args.repeats)
    if not args.skip_deletion:
        deletion_share(args.scenes, args.steps)


if __name__ == "__main__":
    main()
