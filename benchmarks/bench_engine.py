"""Cost of one audit explanation against a bare forward pass, and against the two oracle libraries.

VGG16 with random weights, batch 8 at 224x224, 2 CPU threads, everything measured in one run so the
ratios are comparable on a noisy machine. Prints one ``name=value`` line per figure.

    python benchmarks/bench_engine.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image

import audit

BATCH = 8


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    engine = audit.load_model("vgg16", weights=None, seed=0)
    model = engine.module
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)) for _ in range(BATCH)]
    prep = engine.loaded.preprocessing["squash"]
    batch = torch.stack([prep.to_tensor(im)[0] for im in images])
    layer = model.features[29]

    def bare() -> None:
        with torch.no_grad():
            model(batch)

    def ours() -> None:
        engine.explain(images, top_k=5, feature_layers=["features.4", "features.21"], batch_size=BATCH)

    def pytorch_grad_cam() -> None:
        from pytorch_grad_cam import GradCAM

        with GradCAM(model=model, target_layers=[layer]) as cam:
            cam(input_tensor=batch, targets=None)  # None: the top-1 class of each image

    def captum() -> None:
        from captum.attr import LayerGradCam

        with torch.no_grad():
            top1 = model(batch).argmax(dim=1)  # captum needs the class first: one more forward
        LayerGradCam(model, layer).attribute(batch, target=top1, relu_attributions=True)

    t_bare = median_seconds(bare, args.repeats)
    t_ours = median_seconds(ours, args.repeats)
    t_pgc = median_seconds(pytorch_grad_cam, args.repeats)
    t_captum = median_seconds(captum, args.repeats)
    print(f"bare_forward_ms_per_img={1000 * t_bare / BATCH:.1f}")
    print(f"audit_explain_ms_per_img={1000 * t_ours / BATCH:.1f}")
    print(f"ratio_audit_vs_bare={t_ours / t_bare:.2f}")
    print(f"ratio_pytorch_grad_cam_vs_bare={t_pgc / t_bare:.2f}")
    print(f"ratio_captum_vs_bare={t_captum / t_bare:.2f}")


if __name__ == "__main__":
    main()
