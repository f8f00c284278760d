"""Cost of each CAM method against a bare forward pass, beside pytorch-grad-cam's for the same method.

VGG16, ResNet-50 and ViT-B/16 with random weights (seeded; ViT's zero-initialised head re-drawn so its
gradients are not all zero), a small batch at 224x224, 2 CPU threads, everything measured in one run so
the ratios are comparable on a noisy machine. Ours is ``Engine.explain`` from PIL images (preprocessing
and the map on the original image included); pytorch-grad-cam gets the ready tensor. Also: several
targets per image (the top-1 plus two more) by one backward per round against one vmapped backward
(``is_grads_batched``). Prints one ``name=value`` line per figure.

    python benchmarks/bench_engine.py [--batch 4] [--repeats 2] [--no-scorecam] [--models vgg16,resnet50,vit_b_16]
                                      [--methods scorecam]

Score-CAM costs one masked forward per channel (VGG16: 512, ResNet-50: 2048, ViT-B/16: 768 per image)
in both libraries, so it runs on one image, once.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import audit
import audit.engine as engine_module
from audit import cams

PGC = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
       "layercam": "LayerCAM", "scorecam": "ScoreCAM"}


def median_seconds(fn, repeats: int, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tokens_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    grid = tensor[:, 1:, :]
    side = int(grid.shape[1] ** 0.5)
    return grid.reshape(grid.shape[0], side, side, grid.shape[2]).permute(0, 3, 1, 2)


def bench_model(arch: str, batch_size: int, repeats: int, scorecam: bool, methods: set[str] | None = None,
                extras: bool = True) -> None:
    engine = audit.load_model(arch, weights=None, seed=0)
    model = engine.module
    if arch.startswith("vit"):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
    layer_name = engine.default_cam_layer
    layer = model.get_submodule(layer_name)
    reshape = _tokens_to_grid if arch.startswith("vit") else None
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(batch_size)]
    prep = engine.loaded.preprocessing["squash"]
    batch = torch.stack([prep.to_tensor(im)[0] for im in images])

    def bare(x=batch):
        with torch.no_grad():
            model(x)

    t_bare = median_seconds(bare, repeats)
    t_bare_one = median_seconds(lambda: bare(batch[:1]), repeats)
    print(f"{arch}_cam_layer={layer_name}")
    print(f"{arch}_bare_forward_ms_per_img={1000 * t_bare / batch_size:.1f}")
    for method in cams.names():
        if method not in PGC or (method == "scorecam" and not scorecam) or (methods and method not in methods):
            continue
        one = method == "scorecam"
        imgs, x, base, reps = (images[:1], batch[:1], t_bare_one, 1) if one else (images, batch, t_bare, repeats)

        def ours(imgs=imgs, method=method):
            engine.explain(imgs, top_k=5, cam_method=method, batch_size=len(imgs))

        def theirs(x=x, method=method):
            import pytorch_grad_cam

            with getattr(pytorch_grad_cam, PGC[method])(model=model, target_layers=[layer],
                                                        reshape_transform=reshape) as cam:
                cam(input_tensor=x, targets=None)  # None: the top-1 class of each image
            model.zero_grad(set_to_none=True)

        key = method.replace("+", "p")
        t_ours = median_seconds(ours, reps, warm=not one)
        t_theirs = median_seconds(theirs, reps, warm=not one)
        print(f"{arch}_{key}_audit_vs_bare={t_ours / base:.2f}")
        print(f"{arch}_{key}_pytorch_grad_cam_vs_bare={t_theirs / base:.2f}")
    if not extras:
        return
    # several targets per image: the top-1 and two more classes, one forward
    targets = [[1, 2] for _ in images]
    timings = {}
    for batched in (False, True):
        engine_module.BATCHED_GRADS = batched
        try:
            timings[batched] = median_seconds(lambda: engine.explain(images, targets=targets, batch_size=batch_size),
                                              repeats)
        finally:
            engine_module.BATCHED_GRADS = False
    print(f"{arch}_3targets_loop_vs_bare={timings[False] / t_bare:.2f}")
    print(f"{arch}_3targets_batched_vs_bare={timings[True] / t_bare:.2f}")
    if arch == "vgg16":  # the figure README quotes since the first wave: Grad-CAM plus the classic feature grids
        t = median_seconds(lambda: engine.explain(images, top_k=5, feature_layers=["features.4", "features.21"],
                                                  batch_size=batch_size), repeats)
        print(f"ratio_audit_vs_bare={t / t_bare:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-scorecam", action="store_true", help="skip Score-CAM (minutes on a CPU)")
    parser.add_argument("--models", default="vgg16,resnet50,vit_b_16")
    parser.add_argument("--methods", default="", help="comma-separated CAM methods (default: all six); "
                        "naming any skips the several-targets and feature-grid figures")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"batch={args.batch}")
    print(f"threads={torch.get_num_threads()}")
    for arch in args.models.split(","):
        methods = set(filter(None, args.methods.split(",")))
        bench_model(arch.strip(), args.batch, args.repeats, not args.no_scorecam, methods or None, not methods)


if __name__ == "__main__":
    main()
