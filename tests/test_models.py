"""Model loading, weights, checkpoints, labels and fingerprints (audit/models.py).

Nothing here downloads: every test runs with an empty temporary TORCH_HOME, MODEL_AUDIT_OFFLINE=1 and
torch's downloader replaced by one that fails the test. Weights "from torchvision" are random
state_dicts written under the file name torchvision expects; torchvision checks the sha256 prefix of
that name only while downloading, so its real loading path reads them.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import types
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import SqueezeNet1_1_Weights

from audit import models
from audit.errors import ModelError, UnknownNameError, WeightsUnavailable
from audit.images import Preprocessing
from audit.models import Categories, fingerprint, load

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_network(tmp_path, monkeypatch):
    """An empty hub cache, offline mode, and a downloader that fails the test if anything calls it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"a test tried to download {url}")
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _hub_file(tmp_path: Path, weights) -> Path:
    folder = tmp_path / "torch_home" / "hub" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / Path(weights.url).name


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


class _Opaque:
    """A custom class: pickling it makes a checkpoint that weights_only must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


# ------------------------------------------------------------------------------- torchvision, random
def test_vgg16_with_the_same_seed_has_the_same_fingerprint_and_another_seed_differs():
    first = load("vgg16", seed=0)
    assert load("vgg16", seed=0).fingerprint == first.fingerprint
    assert load("squeezenet1_1", seed=0).fingerprint != load("squeezenet1_1", seed=1).fingerprint
    assert first.weights is None and first.source == "torchvision vgg16 random init (seed 0)"
    assert first.categories.name(0) == "tench" and len(first.categories) == 1000
    assert not first.module.training and first.device == "cpu"


def test_seeded_load_leaves_the_callers_random_stream_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    load("squeezenet1_1", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_random_init_with_other_class_count_gets_numbered_names():
    loaded = load("squeezenet1_1", seed=0, num_classes=3)
    assert loaded.categories.names == ["class 0", "class 1", "class 2"]


def test_preprocessing_of_a_torchvision_model_follows_its_weights():
    loaded = load("squeezenet1_1", seed=0)
    assert loaded.preprocessing["weights"] == Preprocessing.from_weights(SqueezeNet1_1_Weights.DEFAULT)
    assert loaded.preprocessing["squash"] == Preprocessing("squash", 224)


def test_unknown_architecture_suggests_close_names():
    with pytest.raises(UnknownNameError) as info:
        load("vgg61")
    assert str(info.value).startswith("unknown model 'vgg61'; did you mean:")
    assert "vgg16" in info.value.suggestions and len(info.value.suggestions) == 3


# --------------------------------------------------------------------------- torchvision, weights
def test_named_weights_load_through_torchvision_from_the_hub_cache(tmp_path):
    weights = SqueezeNet1_1_Weights.IMAGENET1K_V1
    reference = torchvision.models.squeezenet1_1()
    torch.save(reference.state_dict(), _hub_file(tmp_path, weights))
    loaded = load("squeezenet1_1", weights="IMAGENET1K_V1")
    assert loaded.fingerprint == fingerprint(reference)
    assert loaded.weights == "IMAGENET1K_V1" and loaded.source == "torchvision squeezenet1_1 IMAGENET1K_V1"
    assert loaded.categories.names == weights.meta["categories"]
    assert loaded.preprocessing["weights"] == Preprocessing.from_weights(weights)


def test_default_weights_name_resolves_to_the_enum_member(tmp_path):
    torch.save(torchvision.models.squeezenet1_1().state_dict(),
               _hub_file(tmp_path, SqueezeNet1_1_Weights.DEFAULT))
    loaded = load("squeezenet1_1", weights="DEFAULT")
    assert loaded.weights == "IMAGENET1K_V1"
    assert loaded.source == "torchvision squeezenet1_1 IMAGENET1K_V1 (DEFAULT)"


def test_missing_weights_offline_say_which_file_and_how_to_provide_it(tmp_path):
    expected = _hub_file(tmp_path, torchvision.models.VGG16_Weights.IMAGENET1K_V1)
    with pytest.raises(WeightsUnavailable) as info:
        load("vgg16", weights="IMAGENET1K_V1")
    assert str(info.value) == (
        f"weights vgg16 IMAGENET1K_V1 are not available offline: expected {expected}; copy the file "
        "there, set TORCH_HOME to a folder holding hub/checkpoints/vgg16-397923af.pth, or pass "
        "checkpoint: <path>")
    assert "\n" not in str(info.value)


def test_failed_download_becomes_weights_unavailable(tmp_path, monkeypatch):
    monkeypatch.delenv("MODEL_AUDIT_OFFLINE")

    def no_route(url, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_route)
    with pytest.raises(WeightsUnavailable, match=r"not available offline: expected .*squeezenet1_1-b8a52dc0"
                                                 r"\.pth.*\(download failed: .*name resolution>?\)$"):
        load("squeezenet1_1", weights="IMAGENET1K_V1")
    assert socket.getdefaulttimeout() is None  # the short download timeout was put back


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(UnknownNameError) as info:
        load("squeezenet1_1", weights="IMAGENET1K_V2")
    assert info.value.kind == "weights" and "IMAGENET1K_V1" in info.value.suggestions
    assert "squeezenet1_1 has weights IMAGENET1K_V1, DEFAULT" in str(info.value)


def test_pickled_object_in_the_hub_cache_is_refused(tmp_path):
    torch.save({"features.0.weight": _Opaque()}, _hub_file(tmp_path, SqueezeNet1_1_Weights.IMAGENET1K_V1))
    # torchvision reads hub files with weights_only=False; the loader forces it on
    with pytest.raises(ModelError, match=r"^cached weights .*squeezenet1_1-b8a52dc0.pth contains arbitrary "
                                         r"Python objects \(test_models._Opaque\) and is refused for safety"):
        load("squeezenet1_1", weights="IMAGENET1K_V1")
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_cached_weights_of_the_wrong_shape_name_the_file(tmp_path):
    cached = _hub_file(tmp_path, SqueezeNet1_1_Weights.IMAGENET1K_V1)
    torch.save(torchvision.models.squeezenet1_1(num_classes=3).state_dict(), cached)
    with pytest.raises(ModelError, match=rf"cached weights {cached} cannot be used for squeezenet1_1"):
        load("squeezenet1_1", weights="IMAGENET1K_V1")


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def squeeze_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    return torchvision.models.squeezenet1_1(num_classes=10).state_dict()


def test_plain_state_dict_checkpoint_loads_and_infers_the_class_count(tmp_path, squeeze_state):
    path = tmp_path / "plain.pt"
    torch.save(squeeze_state, path)
    loaded = load("squeezenet1_1", checkpoint=path)
    assert loaded.fingerprint == fingerprint(_module_with(squeeze_state))
    assert len(loaded.categories) == 10 and loaded.categories.name(9) == "class 9"
    assert loaded.source == f"checkpoint {path} (state_dict) into squeezenet1_1"
    assert loaded.checkpoint == str(path) and loaded.weights is None


def _module_with(state) -> nn.Module:
    module = torchvision.models.squeezenet1_1(num_classes=10)
    module.load_state_dict(state)
    return module


@pytest.mark.parametrize("wrap", ["state_dict", "model_state_dict", "model"])
def test_wrapped_state_dict_checkpoint_loads(tmp_path, squeeze_state, wrap):
    path = tmp_path / "wrapped.pt"
    torch.save({wrap: squeeze_state, "epoch": 3, "optimizer": {"lr": 0.1}}, path)
    assert load("squeezenet1_1", checkpoint=path).fingerprint == fingerprint(_module_with(squeeze_state))


def test_data_parallel_module_prefix_is_stripped(tmp_path, squeeze_state):
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in squeeze_state.items()}}, path)
    assert load("squeezenet1_1", checkpoint=path).fingerprint == fingerprint(_module_with(squeeze_state))


def test_regnet_checkpoint_loads_though_its_builder_cannot_run_on_the_meta_device(tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.regnet_y_400mf(num_classes=12)
    path = tmp_path / "regnet.pt"
    torch.save(source.state_dict(), path)
    with torch.device("meta"), pytest.raises(NotImplementedError):  # why the meta skeleton is not enough
        torchvision.models.regnet_y_400mf()
    loaded = load("regnet_y_400mf", checkpoint=path)
    assert loaded.fingerprint == fingerprint(source) and len(loaded.categories) == 12


@pytest.mark.parametrize("save", ["as saved", "as a plain dict", "from DataParallel"])
def test_mnasnet_checkpoint_keeps_or_regains_its_module_versions(tmp_path, save):
    torch.manual_seed(4)
    source = torchvision.models.mnasnet0_5(num_classes=6)
    state = source.state_dict()
    if save == "as a plain dict":          # a copy drops _metadata, where MNASNet keeps its version
        state = dict(state)
    elif save == "from DataParallel":
        state = torch.nn.DataParallel(source).state_dict()
        assert state._metadata["module"]["version"] == 2
    path = tmp_path / "mnasnet.pt"
    torch.save({"state_dict": state}, path)
    loaded = load("mnasnet0_5", checkpoint=path)
    assert loaded.fingerprint == fingerprint(source) and len(loaded.categories) == 6


def test_mnasnet_checkpoint_of_an_unknown_version_is_one_message(tmp_path):
    state = torchvision.models.mnasnet0_5().state_dict()
    state._metadata[""]["version"] = 7
    path = tmp_path / "mnasnet.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"^checkpoint .*mnasnet.pt does not fit mnasnet0_5: "):
        load("mnasnet0_5", checkpoint=path)


def test_truncated_checkpoint_message_is_one_short_line(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(ModelError) as info:
        load("squeezenet1_1", checkpoint=path)
    assert str(info.value) == (f"checkpoint {path}: corrupt or not a PyTorch file (PytorchStreamReader failed "
                               "reading zip archive: failed finding central directory.)")


def test_googlenet_checkpoint_saved_without_aux_heads_loads(tmp_path):
    path = tmp_path / "googlenet.pt"
    torch.save(torchvision.models.googlenet(num_classes=7, aux_logits=False, init_weights=False).state_dict(),
               path)
    loaded = load("googlenet", checkpoint=path)
    assert len(loaded.categories) == 7 and loaded.module.aux1 is None


def test_checkpoint_of_another_architecture_gets_one_message(tmp_path):
    path = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ModelError) as info:
        load("mobilenet_v3_small", checkpoint=path)
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} does not fit mobilenet_v3_small: ")
    assert "missing keys (features.0.0.weight, " in message and "unexpected keys (conv1.weight, " in message
    assert "\n" not in message


def test_shape_mismatch_is_listed(tmp_path, squeeze_state):
    path = tmp_path / "ten.pt"
    torch.save(squeeze_state, path)
    with pytest.raises(ModelError, match=r"2 shape mismatches \(classifier.1.weight: checkpoint "
                                         r"\(10, 512, 1, 1\), model \(4, 512, 1, 1\), classifier.1.bias: "
                                         r"checkpoint \(10,\), model \(4,\)\)$"):
        load("squeezenet1_1", checkpoint=path, num_classes=4)


def test_checkpoint_with_python_objects_is_refused_for_safety(tmp_path):
    path = tmp_path / "whole_model.pt"
    torch.save({"model": _Opaque()}, path)
    with pytest.raises(ModelError, match=r"contains arbitrary Python objects \(test_models._Opaque\) and is "
                                         r"refused for safety.*"
                                         r"torch.save\(model.state_dict\(\), path\)"):
        load("squeezenet1_1", checkpoint=path)


@pytest.mark.parametrize("content, reason", [(None, "file not found"), (b"", "file is empty"),
                                             (b"garbage bytes", "corrupt or not a PyTorch file"),
                                             (b"hello\n", "corrupt or not a PyTorch file"),
                                             (b"\x89PNG\r\n\x1a\n" + bytes(range(64)),
                                              "corrupt or not a PyTorch file")])
def test_missing_or_corrupt_checkpoint_names_the_path(tmp_path, content, reason):
    path = tmp_path / "ckpt.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=reason) as info:
        load("squeezenet1_1", checkpoint=path)
    assert str(path) in str(info.value)


def test_checkpoint_without_tensors_says_what_it_found(tmp_path):
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(ModelError, match=r"holds no state_dict of tensors \(found: epoch, lr\)"):
        load("squeezenet1_1", checkpoint=path)


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_checkpoint_loads_without_a_known_architecture(tmp_path):
    path = tmp_path / "scripted.pt"
    module = _tiny()
    torch.jit.trace(module, torch.zeros(1, 3, 8, 8)).save(str(path))
    loaded = load("my_net", checkpoint=path)
    assert isinstance(loaded.module.script, torch.jit.ScriptModule)  # behind its hookable mirror
    assert loaded.fingerprint == fingerprint(module)
    assert loaded.source == f"checkpoint {path} (TorchScript)"
    assert loaded.categories.names == [f"class {i}" for i in range(5)]
    assert loaded.module(torch.zeros(1, 3, 8, 8)).shape == (1, 5)


def test_weights_and_checkpoint_together_are_refused(tmp_path):
    with pytest.raises(ModelError, match="either weights .* or a checkpoint"):
        load("squeezenet1_1", weights="DEFAULT", checkpoint=tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------- zoo
@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A one-entry zoo with a tiny network, so the zoo branch is tested without the shipped weights."""
    torch.manual_seed(3)
    trained = _tiny()
    weights = tmp_path / "tiny.pt"
    torch.save(trained.state_dict(), weights)
    entry = types.SimpleNamespace(name="tiny", categories=tuple("abcde"), weights_path=weights,
                                  input_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), build=_tiny)
    monkeypatch.setitem(sys.modules, "audit.zoo", types.SimpleNamespace(ZOO={"tiny": entry}))
    return trained, entry


def test_zoo_model_loads_its_shipped_weights_and_squash_preprocessing(fake_zoo):
    trained, entry = fake_zoo
    loaded = load("tiny")
    assert loaded.fingerprint == fingerprint(trained)
    assert loaded.categories.names == list("abcde")
    squash = Preprocessing("squash", 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert loaded.preprocessing == {"squash": squash, "weights": squash}
    assert loaded.source == f"zoo tiny ({entry.weights_path})"


def test_zoo_model_with_missing_weights_file_is_unavailable(fake_zoo):
    fake_zoo[1].weights_path.unlink()
    with pytest.raises(WeightsUnavailable, match="weights of zoo model tiny are missing: expected"):
        load("tiny")


def test_unknown_name_suggestions_include_zoo_names(fake_zoo):
    with pytest.raises(UnknownNameError) as info:
        load("tinny")
    assert "tiny" in info.value.suggestions


# ----------------------------------------------------------------------------------- devices
def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"device 'cuda' requested but CUDA is not available here"):
        load("squeezenet1_1", device="cuda")


def test_nonsense_device_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        load("squeezenet1_1", device="gpu0")


# ------------------------------------------------------------------------------------- fingerprint
def test_fingerprint_changes_when_one_weight_changes():
    module = _tiny()
    before = fingerprint(module)
    assert fingerprint(module) == before
    with torch.no_grad():
        module[4].bias[0] += 1e-6
    assert fingerprint(module) != before


# ----------------------------------------------------------------------------------------- labels
def _labels(tmp_path, data, name="labels.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_imagenet_class_index_format_uses_the_second_element(tmp_path):
    cats = Categories.from_file(_labels(tmp_path, {"0": ["n01440764", "tench"], "1": ["n01443537", "goldfish"]}))
    assert cats.names == ["tench", "goldfish"]
    assert cats.resolve("n01443537") == 1


def test_index_to_name_with_synonyms_answers_to_each_synonym(tmp_path):
    cats = Categories.from_file(_labels(tmp_path, {"1": "goldfish, Carassius auratus", "0": "tench, Tinca tinca"}))
    assert cats.names == ["tench, Tinca tinca", "goldfish, Carassius auratus"]
    assert cats.resolve("Tinca tinca") == 0
    assert cats.resolve("  CARASSIUS   auratus ") == 1
    assert cats.resolve("tench, tinca tinca") == 0


def test_json_list_and_text_file_formats(tmp_path):
    assert Categories.from_file(_labels(tmp_path, ["cat", "dog"])).names == ["cat", "dog"]
    assert Categories.from_file(_labels(tmp_path, "cat\ndog\n\n", "labels.txt")).names == ["cat", "dog"]


def test_integer_and_digit_labels_are_indices_and_range_checked():
    cats = Categories(["cat", "dog", "bird"])
    assert cats.resolve(2) == 2 and cats.resolve(" 1 ") == 1
    with pytest.raises(UnknownNameError, match=r"unknown label 3 \(valid indices are 0..2\)"):
        cats.resolve(3)
    with pytest.raises(UnknownNameError, match="valid indices are 0..2"):
        cats.resolve(-1)


def test_unknown_label_suggests_the_three_closest_names():
    cats = Categories(torchvision.models.VGG16_Weights.DEFAULT.meta["categories"])
    with pytest.raises(UnknownNameError) as info:
        cats.resolve("golden retreiver")
    assert info.value.kind == "label" and len(info.value.suggestions) == 3
    assert info.value.suggestions[0] == "golden retriever"


def test_duplicate_synonym_resolves_to_the_first_index(tmp_path):
    # the classic imagenet_class_index.json has "crane" twice (the bird at 134, the machine at 517)
    cats = Categories.from_file(_labels(tmp_path, {"0": ["n02012849", "crane"], "1": "heron",
                                                   "2": ["n03126707", "crane"]}))
    assert cats.resolve("crane") == 0 and cats.resolve("Crane") == 0
    assert cats.resolve("n03126707") == 2


@pytest.mark.parametrize("content, reason", [
    ("{not json", "not valid JSON"),
    ('{"0": "a", "2": "c"}', r"indices must run 0..1 without gaps \(missing \[1\]\)"),
    ('{"zero": "a"}', "key 'zero' is not a class index"),
    ('[1, 2]', "entry 0 is 1"),
    ('"cat"', "expected a JSON list of names"),
    ('[]', "no labels in it"),
])
def test_bad_labels_file_names_path_and_reason(tmp_path, content, reason):
    path = _labels(tmp_path, content)
    with pytest.raises(ModelError, match=reason) as info:
        Categories.from_file(path)
    assert str(info.value).startswith(f"labels file {path}: ")


def test_labels_override_must_match_the_number_of_outputs(tmp_path):
    path = _labels(tmp_path, ["a", "b", "c"])
    assert load("squeezenet1_1", seed=0, num_classes=3, labels=path).categories.names == ["a", "b", "c"]
    with pytest.raises(ModelError, match=r"has 3 names but squeezenet1_1 has 1000 outputs"):
        load("squeezenet1_1", seed=0, labels=path)


def test_missing_labels_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="labels file .*nope.json: file not found"):
        Categories.from_file(tmp_path / "nope.json")


def test_offline_switch_is_exported():
    assert models.OFFLINE_ENV == "MODEL_AUDIT_OFFLINE"
