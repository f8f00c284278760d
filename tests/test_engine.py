"""The one-pass engine: shapes, independent Grad-CAM oracles, batching, and leaving the model untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import audit
from audit.engine import Engine, default_cam_layer, gradcam
from audit.errors import UnknownNameError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def vgg() -> Engine:
    torch.set_num_threads(2)
    return audit.load_model("vgg16", weights=None, seed=0)


@pytest.fixture(scope="module")
def pictures(grace_hopper_path) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    noise = Image.fromarray(rng.integers(0, 255, (200, 300, 3), dtype=np.uint8))
    stripes = np.zeros((240, 180, 3), np.uint8)
    stripes[:, ::12] = (250, 40, 10)
    stripes[60:140, 40:120] = (10, 200, 90)
    return [Image.open(grace_hopper_path).convert("RGB"), noise, Image.fromarray(stripes)]


@pytest.fixture(scope="module")
def explained(vgg, pictures):
    return vgg.explain(pictures, top_k=5, feature_layers=["features.4", "features.21"], targets=[5, 5, 5],
                       batch_size=3)


def _batch(vgg: Engine, pictures) -> torch.Tensor:
    prep = vgg.loaded.preprocessing["squash"]
    return torch.stack([prep.to_tensor(p)[0] for p in pictures])


def _normalised(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return cam / cam.max() if cam.max() > 0 else cam


def test_vgg16_shapes_match_the_classic_notebook(vgg, explained):
    first = explained[0]
    assert vgg.default_cam_layer == "features.29"
    assert first.features["features.4"].shape == (64, 112, 112)
    assert first.features["features.21"].shape == (512, 28, 28)
    assert all(m.shape == (14, 14) for m in first.cams_lowres.values())
    assert first.cam.shape == (first.image_size[1], first.image_size[0])
    assert first.cam.dtype == np.float32 and 0 <= first.cam.min() and first.cam.max() <= 1
    assert len(first.top_k) == 5 and first.top_k[0].prob >= first.top_k[-1].prob
    assert abs(sum(first.probs) - 1) < 1e-4


def test_cam_of_first_target_and_of_top1_are_both_computed(explained):
    for e in explained:
        assert e.target == 5
        assert set(e.cams) == {5, e.top_k[0].index}


def test_lowres_cam_equals_captum_layer_gradcam(vgg, pictures, explained):
    from captum.attr import LayerGradCam

    model = vgg.module
    x = _batch(vgg, pictures)
    oracle = LayerGradCam(model, model.features[29])
    for e_index, e in enumerate(explained):
        for cls in e.cams_lowres:
            ours = e.cams_lowres[cls]
            theirs = oracle.attribute(x[e_index:e_index + 1], target=cls, relu_attributions=True)
            np.testing.assert_allclose(ours, _normalised(theirs[0, 0].detach().numpy()), atol=1e-4)


def test_lowres_cam_equals_pytorch_grad_cam(vgg, pictures, explained):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = vgg.module
    x = _batch(vgg, pictures)
    for e_index, e in enumerate(explained):
        for cls in e.cams_lowres:
            with GradCAM(model=model, target_layers=[model.features[29]]) as cam:
                cam(input_tensor=x[e_index:e_index + 1], targets=[ClassifierOutputTarget(cls)])
                acts = cam.activations_and_grads.activations[0].numpy()
                grads = cam.activations_and_grads.gradients[0].numpy()
                raw = cam.get_cam_image(x, model.features[29], None, acts, grads, eigen_smooth=False)
            np.testing.assert_allclose(e.cams_lowres[cls], _normalised(raw[0]), atol=1e-4)


def test_a_batch_gives_the_same_results_as_one_image_at_a_time(vgg, pictures, explained):
    single = [vgg.explain([p], top_k=5, feature_layers=["features.4", "features.21"], targets=[5])[0]
              for p in pictures]
    for a, b in zip(explained, single):
        assert [r.index for r in a.top_k] == [r.index for r in b.top_k]
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-3, rtol=1e-4)
        for cls in a.cams_lowres:
            np.testing.assert_allclose(a.cams_lowres[cls], b.cams_lowres[cls], atol=1e-4)
        np.testing.assert_allclose(a.features["features.21"], b.features["features.21"], atol=1e-4)


def test_one_forward_per_batch_however_many_targets(vgg, pictures):
    calls = []
    handle = vgg.module.register_forward_hook(lambda *a: calls.append(1))
    try:
        vgg.explain(pictures, targets=[[1, 2, 3], 4, None], feature_layers=["features.4"], batch_size=8)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_no_weight_gradients_and_model_state_restored_after_success(vgg, pictures):
    model = vgg.module
    model.zero_grad(set_to_none=True)  # the oracles above ran full backward passes
    model.train()
    model.classifier[0].weight.requires_grad_(False)
    before = _state(model)
    vgg.explain(pictures[:1], feature_layers=["features.4"])
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    model.classifier[0].weight.requires_grad_(True)
    model.eval()


def test_model_state_restored_and_hooks_removed_after_an_exception_mid_forward(vgg, pictures):
    model = vgg.module

    def boom(*args):
        raise RuntimeError("boom in features.10")

    before = _state(model)
    handle = model.features[10].register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            vgg.explain(pictures[:1], feature_layers=["features.4", "features.21"])
    finally:
        handle.remove()
    assert _state(model) == before
    assert not any(m._forward_hooks for m in model.modules())


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            sum(len(m._forward_hooks) for m in model.modules()))


def test_cam_on_a_conv_followed_by_an_inplace_relu_matches_captum(vgg, pictures):
    from captum.attr import LayerGradCam

    e = vgg.explain(pictures[:1], cam_layer="features.28", feature_layers=["features.28"])[0]
    x = _batch(vgg, pictures[:1])
    theirs = LayerGradCam(vgg.module, vgg.module.features[28]).attribute(x, target=e.target,
                                                                         relu_attributions=True)
    np.testing.assert_allclose(e.cams_lowres[e.target], _normalised(theirs[0, 0].detach().numpy()), atol=1e-4)
    # the stored feature map is the conv output, not the ReLU'd tensor the in-place op left behind
    assert e.features["features.28"].min() < 0


def test_unknown_layer_lists_the_closest_valid_names(vgg, pictures):
    with pytest.raises(UnknownNameError) as info:
        vgg.explain(pictures[:1], cam_layer="feature.29")
    assert "features.29" in str(info.value)
    assert "unknown layer 'feature.29'" in str(info.value)


def test_all_zero_cam_is_flagged_empty_never_nan():
    activation = torch.rand(2, 4, 3, 3)
    grad = torch.zeros(2, 4, 3, 3)
    grad[1] = 1.0
    cam, empty = gradcam(activation, grad)
    assert empty.tolist() == [True, False]
    assert torch.isfinite(cam).all() and cam[0].abs().sum() == 0 and cam[1].max() == 1


def test_default_cam_layer_for_a_non_vgg_model_is_the_last_spatial_block():
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    assert default_cam_layer(resnet, torch.zeros(1, 3, 64, 64)) == "layer4"


def test_public_api_on_grace_hopper(vgg, grace_hopper_path):
    (e,) = vgg.explain([grace_hopper_path], top_k=5)
    assert e.source == str(grace_hopper_path)
    assert e.image_size == Image.open(grace_hopper_path).size
    assert [r.label for r in e.top_k] == [vgg.categories.name(r.index) for r in e.top_k]
    assert len(vgg.categories) == 1000


def test_densenet_cam_uses_the_layer_output_before_the_inplace_relu_that_follows_it():
    """DenseNet's forward applies F.relu(inplace=True) to ``features``' output. The definition of Grad-CAM
    uses that output A itself; a peer that keeps a view of A sees it ReLU'd in place (issue 17 found
    pytorch-grad-cam and torchcam both off here). Oracle: DenseNet's forward written out by hand, with A as the leaf."""
    import torch.nn.functional as F
    import torchvision

    from audit.images import Preprocessing
    from audit.models import Categories, LoadedModel

    torch.manual_seed(0)
    model = torchvision.models.densenet121(num_classes=10).eval()
    engine = Engine(LoadedModel(model, "densenet121", None, None, Categories([f"c{i}" for i in range(10)]),
                                {"squash": Preprocessing("squash", 96)}, "t", "cpu", "test"))
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    (e,) = engine.explain([image])
    assert e.cam_layer == "features"
    x = engine.loaded.preprocessing["squash"].to_tensor(image)[0][None]
    with torch.no_grad():
        a = model.features(x)
    assert (a < 0).any()  # the in-place ReLU would change A: the case this pins
    leaf = a.clone().requires_grad_(True)
    logits = model.classifier(torch.flatten(F.adaptive_avg_pool2d(F.relu(leaf), 1), 1))
    (grad,) = torch.autograd.grad(logits[0, e.target], leaf)
    expected = _normalised(((grad.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))[0].numpy())
    np.testing.assert_allclose(e.cams_lowres[e.target], expected, atol=1e-5)


def test_several_targets_come_from_one_forward_and_equal_one_target_at_a_time(vgg, pictures, monkeypatch):
    import audit.engine as engine_module

    together = vgg.explain(pictures, targets=[[1, 2, 3], 4, None])
    for batched in (False, True):
        monkeypatch.setattr(engine_module, "BATCHED_GRADS", batched)
        again = vgg.explain(pictures, targets=[[1, 2, 3], 4, None])
        for a, b in zip(together, again):
            for cls in a.cams_lowres:
                np.testing.assert_allclose(a.cams_lowres[cls], b.cams_lowres[cls], atol=1e-5)
    for cls in (1, 2, 3):
        (alone,) = vgg.explain(pictures[:1], targets=[cls])
        np.testing.assert_allclose(together[0].cams_lowres[cls], alone.cams_lowres[cls], atol=1e-4)


def test_explanation_records_the_cam_method_and_an_unknown_method_lists_the_known_ones(vgg, pictures, explained):
    assert explained[0].cam_method == "gradcam" and explained[0].cam_layout == "NCHW 14x14, 512 channels"
    with pytest.raises(UnknownNameError) as info:
        vgg.explain(pictures[:1], cam_method="gradcam+")
    assert "unknown CAM method 'gradcam+'" in str(info.value) and "gradcam++" in str(info.value)
