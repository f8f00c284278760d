"""Layer layouts: NCHW / NHWC / tokens mapped to (B, C, h, w) before any CAM method or feature grid, and
every layer that is no usable grid refused by name in one line (issues 14 and 17.3, 17.4, 17.6, 17.7)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from audit.layouts import Layout, LayerLayoutError, layout_for

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "specs" / "shapes" / "images"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Plain(nn.Module):
    """A model of no known family: layouts come from the shapes alone."""


def test_channels_first_and_channels_last_are_told_apart_by_the_square_grid():
    assert layout_for(Plain(), "x", (2, 512, 14, 14)) == Layout("nchw", (14, 14), 512)
    assert layout_for(Plain(), "x", (2, 7, 7, 768)) == Layout("nhwc", (7, 7), 768)


def test_a_shape_both_orders_could_read_is_refused_not_guessed():
    with pytest.raises(LayerLayoutError, match="ambiguous"):
        layout_for(Plain(), "block", (1, 7, 7, 7))


def test_windowed_attention_tensors_are_not_a_grid():
    with pytest.raises(LayerLayoutError, match="not a square spatial grid"):
        layout_for(Plain(), "attn", (1, 16, 49, 128))


def test_tokens_drop_the_class_token_and_registers_by_the_one_count_that_leaves_a_square():
    assert layout_for(Plain(), "t", (2, 197, 768), input_size=224) == Layout("tokens", (14, 14), 768, 1)
    assert layout_for(Plain(), "t", (2, 196, 768), input_size=224) == Layout("tokens", (14, 14), 768, 0)
    assert layout_for(Plain(), "t", (2, 201, 768), input_size=224) == Layout("tokens", (14, 14), 768, 5)


def test_timm_style_num_prefix_tokens_decides_over_the_shapes():
    model = Plain()
    model.num_prefix_tokens = 5
    assert layout_for(model, "t", (1, 201, 64), input_size=224).prefix_tokens == 5
    with pytest.raises(LayerLayoutError, match="after 5 prefix token"):
        layout_for(model, "t", (1, 197, 64), input_size=224)


def test_token_mapping_puts_token_1_at_the_top_left_cell_and_goes_row_major():
    tokens = torch.arange(1 + 4 * 3, dtype=torch.float32).reshape(1, 13, 1).repeat(1, 1, 3)
    tokens[..., 1] *= 10
    grid = Layout("tokens", (2, 2), 3, 1).to_nchw(tokens[:, :5])
    assert grid.shape == (1, 3, 2, 2)
    assert grid[0, 0].tolist() == [[1, 2], [3, 4]] and grid[0, 1].tolist() == [[10, 20], [30, 40]]


def test_channels_last_mapping_equals_a_permute():
    x = torch.randn(2, 5, 5, 8)
    assert torch.equal(Layout("nhwc", (5, 5), 8).to_nchw(x), x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("shape, reason", [
    ((1, 512, 1, 1), "1x1 map"),
    ((1, 4096), "vector per image"),
    ((1, 2, 3, 4, 5), "5 dimensions"),
])
def test_vectors_tiny_maps_and_other_ranks_are_refused_with_the_shape(shape, reason):
    with pytest.raises(LayerLayoutError) as info:
        layout_for(Plain(), "classifier.0", shape)
    message = str(info.value)
    assert reason in message and "'classifier.0'" in message and str(shape) in message and "\n" not in message


# ---------------------------------------------------------------------------------- through the engine
def _engine(module: nn.Module, size: int):
    from audit.engine import Engine
    from audit.images import Preprocessing
    from audit.models import Categories, LoadedModel

    module.eval()
    return Engine(LoadedModel(module=module, arch=type(module).__name__, weights=None, checkpoint=None,
                              categories=Categories([f"c{i}" for i in range(10)]),
                              preprocessing={"squash": Preprocessing("squash", size)}, fingerprint="t",
                              device="cpu", source="test"))


@pytest.fixture(scope="module")
def small_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return _engine(model, 64)


@pytest.fixture(scope="module")
def noise64():
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))


def test_vit_default_is_the_last_blocks_first_norm_on_an_8x8_grid(small_vit, noise64):
    assert small_vit.default_cam_layer == "encoder.layers.encoder_layer_1.ln_1"
    (e,) = small_vit.explain([noise64], feature_layers=["encoder.layers.encoder_layer_0", "conv_proj"])
    assert e.cams_lowres[e.target].shape == (8, 8) and not e.cam_empty[e.target]
    assert e.cam_layout.startswith("tokens (1 prefix token dropped, 64 -> 8x8")
    assert e.features["encoder.layers.encoder_layer_0"].shape == (32, 8, 8)
    assert e.features["conv_proj"].shape == (32, 8, 8)


def test_vit_feature_grid_is_the_token_sequence_laid_out_row_major(small_vit, noise64):
    seen = {}
    layer = small_vit.module.get_submodule("encoder.layers.encoder_layer_0")
    handle = layer.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.detach().clone()))
    try:
        (e,) = small_vit.explain([noise64], feature_layers=["encoder.layers.encoder_layer_0"])
    finally:
        handle.remove()
    tokens = seen["out"][0]  # (65, 32)
    grid = e.features["encoder.layers.encoder_layer_0"]
    np.testing.assert_array_equal(grid[:, 0, 0], tokens[1].numpy())
    np.testing.assert_array_equal(grid[:, 0, 1], tokens[2].numpy())
    np.testing.assert_array_equal(grid[:, 1, 0], tokens[9].numpy())


def test_a_layer_only_the_class_token_leaves_is_refused_for_gradient_cams(small_vit, noise64):
    with pytest.raises(LayerLayoutError) as info:
        small_vit.explain([noise64], cam_layer="encoder.ln")
    message = str(info.value)
    assert "'encoder.ln'" in message and "patch tokens get no gradient" in message
    assert "'encoder.layers.encoder_layer_1.ln_1' (8x8, the default)" in message
    (e,) = small_vit.explain([noise64], cam_layer="encoder.ln", cam_method="scorecam")  # no gradient: fine
    assert e.cams_lowres[e.target].shape == (8, 8)


def test_unmappable_layers_name_the_shape_and_layers_that_work(small_vit):
    with pytest.raises(LayerLayoutError) as info:
        small_vit.resolve_layer("heads.head")
    message = str(info.value)
    assert message.startswith("layer 'heads.head' cannot be explained: its output (1, 10) is a vector per image")
    assert "layers that can: 'encoder.layers.encoder_layer_1.ln_1' (8x8, the default)" in message


def test_swin_stage_is_read_channels_last_and_feature_grids_are_channel_maps(noise64):
    torch.manual_seed(0)
    engine = _engine(torchvision.models.swin_t(num_classes=10), 64)
    assert engine.default_cam_layer == "norm"
    assert engine.layout_of("features.1").kind == "nhwc"
    (e,) = engine.explain([noise64], feature_layers=["features.1", "features.7"])
    assert e.features["features.1"].shape == (96, 16, 16)       # (1, 16, 16, 96) as 96 maps of 16x16
    assert e.features["features.7"].shape == (768, 2, 2)
    assert e.cams_lowres[e.target].shape == (2, 2)


def test_a_1x1_cam_layer_is_refused_by_name():
    torch.manual_seed(0)
    engine = _engine(torchvision.models.resnet18(num_classes=10), 64)
    with pytest.raises(LayerLayoutError, match=r"layer 'avgpool' cannot be explained: its output \(1, 512, 1, 1\) "
                                               r"is a 1x1 map"):
        engine.resolve_layer("avgpool")


def test_a_layer_the_forward_never_runs_is_refused():
    torch.manual_seed(0)
    model = torchvision.models.googlenet(num_classes=10, aux_logits=True, init_weights=False)
    engine = _engine(model, 64)
    with pytest.raises(LayerLayoutError, match="'aux1' cannot be explained: .*never appears"):
        engine.resolve_layer("aux1")


# ------------------------------------------------------------------------------------ through the plugin
@pytest.fixture
def scenes(pytester: pytest.Pytester) -> list[tuple[str, dict]]:
    (pytester.path / "images").mkdir()
    found = sorted(json.loads((SHAPES / "boxes.json").read_text()).items())
    for name, _ in found[:2]:
        shutil.copy(SHAPES / name, pytester.path / "images" / name)
    return found[:2]


def case(name: str, meta: dict, **extra) -> dict:
    return {"id": Path(name).stem, "image": f"images/{name}", "expect": {"top1": meta["label"]}, **extra}


def write_spec(pytester: pytest.Pytester, name: str, cases: list[dict], model: dict | None = None) -> None:
    spec = {"model": model or {"arch": "shapes_vgg"}, "cases": cases}
    (pytester.path / name).write_text(yaml.safe_dump(spec, sort_keys=False))


def test_feature_layer_that_is_no_grid_is_a_spec_error_at_its_line_and_other_cases_run(pytester, scenes):
    write_spec(pytester, "feat.yaml", [case(*scenes[0], features=["classifier"]), case(*scenes[1])])
    result = pytester.runpytest("--audit-report", "reports")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "Traceback" not in out
    result.stdout.fnmatch_lines(["*feat.yaml:*features[[]0[]]: layer 'classifier' cannot be explained: its output*"
                                 "vector per image*layers that can:*"])


def test_cam_layer_that_is_a_1x1_map_is_an_error_at_the_model_line(pytester, scenes):
    write_spec(pytester, "cam.yaml", [case(*scenes[0])], model={"arch": "shapes_vgg", "cam_layer": "avgpool"})
    result = pytester.runpytest()
    out = result.stdout.str()
    assert "Traceback" not in out
    result.stdout.fnmatch_lines(["*cam.yaml:*model: layer 'avgpool' cannot be explained: its output "
                                 "(1, 64, 1, 1) is a 1x1 map*"])


@pytest.mark.slow
def test_vit_spec_with_token_feature_layers_writes_a_report_with_real_grids(pytester, scenes):
    name, meta = scenes[0]
    write_spec(pytester, "vit.yaml", [{"id": "one", "image": f"images/{name}",
                                       "features": ["conv_proj", "encoder.layers.encoder_layer_11"]}],
               model={"arch": "vit_b_16", "weights": None, "seed": 0})
    result = pytester.runpytest("--audit-report", "reports", "-p", "no:cacheprovider")
    assert "Traceback" not in result.stdout.str()
    data = json.loads((pytester.path / "reports" / "results.json").read_text())
    shapes = {f["layer"]: f["shape"] for f in data["cases"][0]["features"]}
    assert shapes == {"conv_proj": [768, 14, 14], "encoder.layers.encoder_layer_11": [768, 14, 14]}
