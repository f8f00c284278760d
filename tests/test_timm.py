"""``arch: timm/<name>``: timm models built by timm, weights from a checkpoint or timm's cache, offline.

Nothing downloads: MODEL_AUDIT_OFFLINE=1, an empty TORCH_HOME and Hugging Face cache, and torch's and
huggingface_hub's downloaders replaced by ones that fail the test. "Cached" timm weights are a random
state_dict written where timm would find its download. The preprocessing oracle is timm's own eval
transform (``timm.data.create_transform`` of the model's resolved data config).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

timm = pytest.importorskip("timm")  # the optional extra; the dev extra installs it, so CI runs these

from audit.errors import ModelError, UnknownNameError, WeightsUnavailable  # noqa: E402
from audit.images import load_image  # noqa: E402
from audit.models import fingerprint, load  # noqa: E402

HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to download {args} {kwargs}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def test_random_init_is_timms_model_seeded_without_touching_the_callers_rng():
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    first = load("timm/resnet18", seed=0)
    assert torch.equal(torch.rand(2), expected)
    assert type(first.module) is type(timm.create_model("resnet18", pretrained=False))
    assert load("timm/resnet18", seed=0).fingerprint == first.fingerprint
    assert first.source == "timm resnet18 random init (seed 0)" and first.weights is None
    assert len(first.categories) == 1000 and first.categories.name(0) == "tench"


def test_weights_preprocessing_equals_timms_own_eval_transform():
    loaded = load("timm/resnet18", seed=0)
    model = timm.create_model("resnet18", pretrained=False)
    config = timm.data.resolve_data_config({}, model=model)
    assert config["crop_pct"] == 0.95 and config["interpolation"] == "bicubic"
    expected = timm.data.create_transform(**config)(load_image(HOPPER))
    tensor, geometry = loaded.preprocessing["weights"].to_tensor(load_image(HOPPER))
    assert loaded.preprocessing["weights"].resize == 235  # floor(224 / 0.95)
    assert torch.equal(tensor, expected)
    assert geometry.crops
    vit = load("timm/vit_tiny_patch16_224", seed=0).preprocessing["weights"]
    assert (vit.mean, vit.std, vit.size) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 224)


def test_checkpoint_loads_with_the_class_count_it_holds(tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=7)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = load("timm/resnet18", checkpoint=path)
    assert loaded.fingerprint == fingerprint(source)
    assert loaded.categories.names == [f"class {i}" for i in range(7)]
    assert loaded.source == f"checkpoint {path} (state_dict) into timm/resnet18"
    with pytest.raises(ModelError, match=r"does not fit timm/convnext_atto: \d+ missing keys"):
        load("timm/convnext_atto", checkpoint=path)


def test_cached_pretrained_weights_load_offline_from_where_timm_keeps_them(tmp_path):
    cfg = timm.models.get_pretrained_cfg("resnet18")
    state = timm.create_model("resnet18", pretrained=False).state_dict()
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / Path(cfg.url).name)
    loaded = load("timm/resnet18", weights="DEFAULT")
    assert loaded.weights == "a1_in1k" and fingerprint(loaded.module) == fingerprint(
        load("timm/resnet18", checkpoint=folder / Path(cfg.url).name).module)
    assert loaded.source == f"timm resnet18.a1_in1k pretrained ({folder / Path(cfg.url).name})"


def test_missing_pretrained_weights_offline_say_where_they_were_looked_for():
    with pytest.raises(WeightsUnavailable) as info:
        load("timm/resnet18", weights="a1_in1k")
    message = str(info.value)
    assert message.startswith("timm weights resnet18.a1_in1k are not available offline: they are not in "
                              "the Hugging Face cache")
    assert message.endswith("or pass checkpoint: <path>")


def test_unknown_timm_names_suggest_close_ones():
    with pytest.raises(UnknownNameError, match="did you mean: 'timm/resnet18'"):
        load("timm/resnt18")
    with pytest.raises(UnknownNameError, match="unknown weights 'a9_in1k'.*timm resnet18 has weights a1_in1k"):
        load("timm/resnet18", weights="a9_in1k")
    with pytest.raises(ModelError, match="already names the weights 'a1_in1k'"):
        load("timm/resnet18.a1_in1k", weights="tv_in1k")


def test_timm_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModelError, match=r"needs the timm package: pip install 'model-audit\[timm\]'"):
        load("timm/resnet18", seed=0)


def test_spec_with_a_timm_arch_and_checkpoint_runs_end_to_end_offline(pytester, tmp_path):
    source = timm.create_model("resnet18", pretrained=False, num_classes=4)
    torch.save(source.state_dict(), pytester.path / "r18.pt")
    (pytester.path / "hopper.jpg").write_bytes(HOPPER.read_bytes())
    spec = {"model": {"arch": "timm/resnet18", "checkpoint": "r18.pt", "preprocess": "weights"},
            "cases": [{"id": "hopper", "image": "hopper.jpg", "top_k": 4,
                       "expect": {"in_top_k": [0, 1, 2, 3]},
                       "focus": {"region": {"box_rel": [0, 0, 1, 1]}, "min_energy": 0.0}}]}
    (pytester.path / "timm.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", str(pytester.path / "report"))
    result.assert_outcomes(passed=2)
    assert "Traceback" not in result.stdout.str()
    [case] = json.loads((pytester.path / "report" / "results.json").read_text())["cases"]
    assert sorted(r["index"] for r in case["top_k"]) == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_traced_timm_model_keeps_timms_preprocessing_and_explains_like_its_state_dict(tmp_path):
    from audit.engine import Engine

    source = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    torch.save(source.state_dict(), tmp_path / "r18.pt")
    torch.jit.trace(source, torch.zeros(1, 3, 224, 224)).save(str(tmp_path / "r18_traced.pt"))
    traced = load("timm/resnet18", checkpoint=tmp_path / "r18_traced.pt")
    eager = load("timm/resnet18", checkpoint=tmp_path / "r18.pt")
    assert traced.preprocessing == eager.preprocessing and traced.preprocessing["weights"].resize == 235
    got = Engine(traced).explain([HOPPER], preprocess="weights")[0]
    want = Engine(eager).explain([HOPPER], preprocess="weights")[0]
    assert got.cam_layer == want.cam_layer == "layer4"
    assert [r.index for r in got.top_k] == [r.index for r in want.top_k]
    np.testing.assert_allclose(got.cams_lowres[got.target], want.cams_lowres[want.target], atol=1e-6)
