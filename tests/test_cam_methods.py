"""Each CAM method against pytorch-grad-cam (all six) and torchcam (where it has the method and agrees).

Random-init, seeded models at small inputs (fast): a VGG, a ResNet, a ConvNeXt (NCHW at ``features``),
a Swin (NHWC, mapped) and a ViT (tokens, class token dropped). The peers get the same layer and the
layout as a ``reshape_transform``; maps are compared at the layer's resolution after ReLU and
max-normalisation, within 1e-4. torchcam 0.5.0 is left out for gradcam++ (its alpha is computed on a
copy and never divided, so its weights are sum(g^2 ReLU(g))) and scorecam (it min-max scales before an
align_corners=False upsampling; pytorch-grad-cam scales after an align_corners=True one).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from audit import cams
from audit.engine import Engine
from audit.images import Preprocessing
from audit.models import Categories, LoadedModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

GRADIENT_METHODS = ["gradcam", "gradcam++", "xgradcam", "hirescam", "layercam"]
PGC = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "hirescam": "HiResCAM",
       "layercam": "LayerCAM", "scorecam": "ScoreCAM"}
TORCHCAM = {"gradcam": "GradCAM", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}


def _tokens_to_grid(tensor: torch.Tensor) -> torch.Tensor:
    grid = tensor[:, 1:, :]
    side = int(grid.shape[1] ** 0.5)
    return grid.reshape(grid.shape[0], side, side, grid.shape[2]).permute(0, 3, 1, 2)


def _channels_last(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.permute(0, 3, 1, 2)


def _small_vit() -> torch.nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-inits the head: no gradient
    return model


# name -> (builder, input side, CAM layer, reshape for the peers)
MODELS = {
    "vgg11": (lambda: torchvision.models.vgg11(num_classes=10), 64, "features.19", None),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), 64, "layer4", None),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(num_classes=10), 64, "features", None),
    # norm, not features.7: a per-position LayerNorm follows features.7, so sum_c(g * A) is exactly zero
    # there (scale invariance) and HiResCAM / LayerCAM read rounding noise in both libraries
    "swin_t": (lambda: torchvision.models.swin_t(num_classes=10), 64, "norm", _channels_last),
    "vit": (_small_vit, 64, "encoder.layers.encoder_layer_1.ln_1", _tokens_to_grid),
}


SLOW_SCORECAM = {"convnext_tiny", "swin_t"}
# Score-CAM costs one masked forward per channel, in both libraries: an earlier layer with 64-128
# channels keeps the comparison to seconds (the definition does not depend on the depth)
SCORECAM_LAYER = {"vgg11": "features.4", "resnet18": "layer1", "convnext_tiny": "features.1",
                  "swin_t": "features.1", "vit": "encoder.layers.encoder_layer_1.ln_1"}


def engine_for(module: torch.nn.Module, size: int) -> Engine:
    module.eval()
    categories = Categories([f"class {i}" for i in range(10)])
    loaded = LoadedModel(module=module, arch=type(module).__name__, weights=None, checkpoint=None,
                         categories=categories, preprocessing={"squash": Preprocessing("squash", size)},
                         fingerprint="test", device="cpu", source="test")
    return Engine(loaded)


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    torch.manual_seed(0)
    torch.set_num_threads(2)
    build, size, layer, reshape = MODELS[request.param]
    module = build()
    engine = engine_for(module, size)
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(2)]
    prep = engine.loaded.preprocessing["squash"]
    x = torch.stack([prep.to_tensor(im)[0] for im in images])
    return request.param, engine, images, x, layer, reshape


def _normalised(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return cam / cam.max() if cam.max() > 0 else cam


def pgc_lowres(method: str, model, layer_name: str, x: torch.Tensor, target: int, reshape) -> np.ndarray:
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    layer = model.get_submodule(layer_name)
    targets = [ClassifierOutputTarget(target)]
    with getattr(pytorch_grad_cam, PGC[method])(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        outputs = cam.activations_and_grads(x)
        grads = None
        if cam.uses_gradients:
            model.zero_grad()
            sum(t(o) for t, o in zip(targets, outputs)).backward()
            grads = cam.activations_and_grads.gradients[0].cpu().numpy()
        acts = cam.activations_and_grads.activations[0].cpu().numpy()
        raw = cam.get_cam_image(x, layer, targets, acts, grads, eigen_smooth=False)
    model.zero_grad(set_to_none=True)
    return _normalised(raw[0])


def torchcam_lowres(method: str, model, layer_name: str, x: torch.Tensor, target: int, reshape) -> np.ndarray:
    import torchcam.methods

    extractor_cls = getattr(torchcam.methods, TORCHCAM[method])
    with extractor_cls(model, target_layer=layer_name, input_shape=tuple(x.shape[1:]),
                       reshape_transform=reshape) as extractor:
        scores = model(x)
        (maps,) = extractor(class_idx=target, scores=scores, normalized=False)
    model.zero_grad(set_to_none=True)
    return _normalised(maps[0].detach().numpy())


@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_equal_pytorch_grad_cam(setup, method):
    name, engine, images, x, layer, reshape = setup
    compared = 0
    for i in range(len(images)):
        (e,) = engine.explain(images[i:i + 1], cam_layer=layer, cam_method=method)
        second = e.top_k[1].index
        (e,) = engine.explain(images[i:i + 1], cam_layer=layer, cam_method=method, targets=[second])
        assert e.cam_method == method and e.cam_layer == layer and set(e.cams_lowres) == {second, e.top_k[0].index}
        for cls, ours in e.cams_lowres.items():
            theirs = pgc_lowres(method, engine.module, layer, x[i:i + 1], cls, reshape)
            assert ours.shape == theirs.shape
            np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{name} {method} class {cls}")
            compared += ours.max() > 0
    assert compared, f"{name}: only empty maps were compared, which proves nothing"


@pytest.mark.parametrize("method", sorted(TORCHCAM))
def test_gradient_methods_equal_torchcam(setup, method):
    name, engine, images, x, layer, reshape = setup
    (e,) = engine.explain(images[:1], cam_layer=layer, cam_method=method)  # the top-1's map
    ours = e.cams_lowres[e.target]
    theirs = torchcam_lowres(method, engine.module, layer, x[:1], e.target, reshape)
    assert ours.max() > 0
    np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{name} {method}")


@pytest.mark.parametrize("setup", [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW_SCORECAM else [])
                                   for name in MODELS], indirect=True)
def test_scorecam_equals_pytorch_grad_cam(setup):
    name, engine, images, x, _, reshape = setup
    layer = SCORECAM_LAYER[name]
    (e,) = engine.explain(images[:1], cam_layer=layer, cam_method="scorecam")
    ours = e.cams_lowres[e.target]
    theirs = pgc_lowres("scorecam", engine.module, layer, x[:1], e.target, reshape)
    assert ours.max() > 0
    np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=f"{name} scorecam")


def test_a_channel_sum_that_cancels_to_rounding_noise_is_a_zero_map_not_the_noise():
    """Swin's features.7 feeds a per-position LayerNorm (scale invariant), so sum_c g_c A_c is exactly 0
    there: HiResCAM's float32 result is rounding noise, which must read as an empty map, not as heat."""
    torch.manual_seed(0)
    engine = engine_for(torchvision.models.swin_t(num_classes=10), 64)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    (noisy,) = engine.explain([image], cam_layer="features.7", cam_method="hirescam")
    assert noisy.cam_empty[noisy.target] and noisy.cams_lowres[noisy.target].max() == 0
    (fine,) = engine.explain([image], cam_layer="norm", cam_method="hirescam")
    assert not fine.cam_empty[fine.target]
