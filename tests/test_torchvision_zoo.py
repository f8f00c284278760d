"""Every torchvision classifier: its default CAM layer gives the documented map, and no layer name gives a traceback.

Random init (seeded), 224x224, the documented table of README.md "Architectures and default CAM layers"
held here as data (family prefix -> layer, map size). Big models are marked slow; all run in CI.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from audit.engine import Engine
from audit.errors import AuditError
from audit.images import Preprocessing
from audit.models import Categories, LoadedModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# (architecture pattern, default layer, map side at 224, layout), first match wins; mirrors the README table
DOCUMENTED = [
    (r"alexnet", "features.11", 13, "nchw"),
    (r"vgg11", "features.19", 14, "nchw"), (r"vgg11_bn", "features.27", 14, "nchw"),
    (r"vgg13", "features.23", 14, "nchw"), (r"vgg13_bn", "features.33", 14, "nchw"),
    (r"vgg16", "features.29", 14, "nchw"), (r"vgg16_bn", "features.42", 14, "nchw"),
    (r"vgg19", "features.35", 14, "nchw"), (r"vgg19_bn", "features.51", 14, "nchw"),
    (r"(wide_)?resnet\d+(_2)?|resnext.*", "layer4", 7, "nchw"),
    (r"densenet.*|efficientnet.*|mobilenet.*|convnext.*", "features", 7, "nchw"),
    (r"squeezenet.*", "features", 13, "nchw"),
    (r"googlenet", "inception5b", 7, "nchw"),
    (r"inception_v3", "Mixed_7c", 5, "nchw"),
    (r"mnasnet.*", "layers", 7, "nchw"),
    (r"regnet.*", "trunk_output", 7, "nchw"),
    (r"shufflenet.*", "conv5", 7, "nchw"),
    (r"maxvit_t", "blocks.3", 7, "nchw"),
    (r"swin.*", "norm", 7, "nhwc"),
    (r"vit_b_16", "encoder.layers.encoder_layer_11.ln_1", 14, "tokens"),
    (r"vit_b_32", "encoder.layers.encoder_layer_11.ln_1", 7, "tokens"),
    (r"vit_l_16", "encoder.layers.encoder_layer_23.ln_1", 14, "tokens"),
    (r"vit_l_32", "encoder.layers.encoder_layer_23.ln_1", 7, "tokens"),
    (r"vit_h_14", "encoder.layers.encoder_layer_31.ln_1", 16, "tokens"),
]
# more than ~60M parameters or several seconds to build and run here: slow (they still run in CI)
SLOW = re.compile(r"alexnet|vgg.*|convnext_(base|large|small)|efficientnet_(b[1-7]|v2_[sm])|densenet1[62].*|densenet201|inception_v3|googlenet|maxvit_t|efficientnet_v2_l|regnet_(x_32gf|y_(16|32|128)gf)|"
                  r"resnet152|resnext101.*|wide_resnet.*|swin_[bs]|swin_v2_[bs]|vit_[lh].*|vit_b_32")

ALL = torchvision.models.list_models(module=torchvision.models)


def documented(arch: str) -> tuple[str, int, str]:
    for pattern, layer, side, kind in DOCUMENTED:
        if re.fullmatch(pattern, arch):
            return layer, side, kind
    raise AssertionError(f"{arch} is missing from the documented table")


def engine_at_224(arch: str) -> Engine:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = torchvision.models.get_model(arch, weights=None).eval()
    loaded = LoadedModel(module=module, arch=arch, weights=None, checkpoint=None,
                         categories=Categories([f"class {i}" for i in range(1000)]),
                         preprocessing={"squash": Preprocessing("squash", 224)}, fingerprint="test",
                         device="cpu", source=f"torchvision {arch} random init")
    return Engine(loaded)


def test_every_classifier_has_a_documented_default():
    assert len(ALL) >= 80
    for arch in ALL:
        documented(arch)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=[pytest.mark.slow] if SLOW.fullmatch(a) else [])
                                  for a in ALL])
def test_default_layer_gives_the_documented_map_and_no_layer_name_gives_a_traceback(arch):
    torch.set_num_threads(2)
    engine = engine_at_224(arch)
    layer, side, kind = documented(arch)
    assert engine.default_cam_layer == layer
    layout = engine.layout_of(layer)
    assert (layout.kind, layout.grid) == (kind, (side, side))
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8))
    (e,) = engine.explain([image], top_k=3)
    assert e.cam_layer == layer and e.cams_lowres[e.target].shape == (side, side)
    refused = 0
    for name in engine.layer_names():
        try:
            engine.resolve_layer(name)
        except AuditError as exc:  # any other exception is a traceback for the user: fails here
            message = str(exc)
            assert "\n" not in message and repr(name) in message and "cannot be explained" in message
            refused += 1
    assert refused < len(engine.layer_names())
