"""Every torchvision classification model loads from a state_dict checkpoint (issue 17 items 1-2).

Each model is built once with random init and 7 classes (so the class count has to be read from the
checkpoint, as a fine-tuned model's would), saved with ``torch.save(model.state_dict())``, loaded
through ``audit.models.load(arch, checkpoint=...)`` and compared by fingerprint, then freed. RegNet's
builder cannot run on the meta device and MNASNet needs the saved ``_metadata``: both used to fail here.
The largest models are marked slow (they still run in CI).
"""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import torchvision

from audit.models import fingerprint, load

CLASSES = 7

#: models whose build + save + load takes over ~2 s on one core here
SLOW = {
    "regnet_y_128gf", "vit_h_14", "convnext_large", "swin_v2_b", "swin_v2_s", "swin_b", "convnext_base",
    "swin_s", "vit_l_16", "vit_l_32", "convnext_small", "regnet_x_32gf", "inception_v3", "swin_v2_t",
    "regnet_y_32gf", "regnet_y_16gf", "regnet_x_16gf", "vgg19_bn", "vgg19", "vgg16_bn", "vgg16", "vgg13_bn",
    "vgg13", "vgg11_bn", "vgg11", "convnext_tiny", "swin_t", "wide_resnet101_2", "wide_resnet50_2",
    "resnext101_64x4d", "resnext101_32x8d", "googlenet", "vit_b_16", "vit_b_32", "maxvit_t",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_b7", "efficientnet_b6", "resnet152",
}

ARCHS = torchvision.models.list_models(module=torchvision.models)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")


def test_the_list_covers_regnet_and_mnasnet():
    regnets = [a for a in ARCHS if a.startswith("regnet_")]
    assert len(regnets) == 15 and len([a for a in ARCHS if a.startswith("mnasnet")]) == 4
    assert SLOW <= set(ARCHS), sorted(SLOW - set(ARCHS))


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS])
def test_random_init_state_dict_of_every_torchvision_classifier_loads_as_a_checkpoint(arch, tmp_path):
    torch.set_num_threads(1)
    path = tmp_path / f"{arch}.pt"
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore")  # googlenet / inception's notice about their future init
        model = torchvision.models.get_model(arch, weights=None, num_classes=CLASSES)
    torch.save(model.state_dict(), path)
    expected = fingerprint(model)
    del model
    gc.collect()
    try:
        loaded = load(arch, checkpoint=path)
        assert loaded.fingerprint == expected
        assert len(loaded.categories) == CLASSES
        assert loaded.source == f"checkpoint {path} (state_dict) into {arch}"
    finally:
        path.unlink()
        loaded = None
        gc.collect()
