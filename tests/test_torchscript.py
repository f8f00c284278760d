"""TorchScript checkpoints are explained like the model they were made from (issue 16).

A loaded archive refuses forward hooks; :mod:`audit.torchscript` mirrors it so layers take hooks. The
oracle is the eager model the archive was made from: the same state_dict loaded as a checkpoint gives
the same top-k, Grad-CAM and feature maps, exactly, for traced and scripted resnet18, through the
engine, the plugin and the CLI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import yaml

from audit.engine import Engine
from audit.errors import ModelError
from audit.models import fingerprint, load
from audit.torchscript import ScriptedModel

REPO = Path(__file__).resolve().parents[1]
HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """A random-init resnet18 as a state_dict, a traced archive and a scripted archive."""
    folder = tmp_path_factory.mktemp("torchscript")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval()
    paths = {"state_dict": folder / "resnet18.pt", "traced": folder / "traced.pt", "scripted": folder / "scripted.pt"}
    torch.save(model.state_dict(), paths["state_dict"])
    torch.jit.trace(model, torch.zeros(1, 3, 224, 224)).save(str(paths["traced"]))
    torch.jit.script(model).save(str(paths["scripted"]))
    return paths


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_archive_layers_take_hooks_and_see_what_the_eager_model_sees(archives, kind):
    eager = load("resnet18", checkpoint=archives["state_dict"]).module
    mirror = load("resnet18", checkpoint=archives[kind]).module
    assert isinstance(mirror, ScriptedModel)
    assert {n for n, _ in mirror.named_modules()} == {n for n, _ in eager.named_modules()}
    assert fingerprint(mirror) == fingerprint(eager)
    seen: dict[str, list[torch.Tensor]] = {"eager": [], "mirror": []}
    for who, model in (("eager", eager), ("mirror", mirror)):
        for name in ("layer2", "layer4.1.conv2", "fc"):
            model.get_submodule(name).register_forward_hook(lambda m, i, o, who=who: seen[who].append(o))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(mirror(x), eager(x))
    assert len(seen["mirror"]) == 3
    for a, b in zip(seen["mirror"], seen["eager"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_engine_explains_an_archive_exactly_as_its_state_dict(archives, kind):
    ours = Engine(load("resnet18", checkpoint=archives[kind]))
    oracle = Engine(load("resnet18", checkpoint=archives["state_dict"]))
    assert ours.default_cam_layer == oracle.default_cam_layer == "layer4"
    for layer in (None, "layer3.1.conv2"):
        got = ours.explain([HOPPER], cam_layer=layer, feature_layers=["layer1"], targets=[[3]])[0]
        want = oracle.explain([HOPPER], cam_layer=layer, feature_layers=["layer1"], targets=[[3]])[0]
        assert [r.index for r in got.top_k] == [r.index for r in want.top_k]
        assert set(got.cams) == set(want.cams)
        for c in got.cams:
            np.testing.assert_array_equal(got.cams_lowres[c], want.cams_lowres[c])
        np.testing.assert_array_equal(got.features["layer1"], want.features["layer1"])


def test_archive_with_data_dependent_control_flow_is_one_clear_line(tmp_path):
    class Gate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x)
            if bool(y.mean() > 0):
                y = y * 2
            return self.fc(y.mean(dim=(2, 3)))

    path = tmp_path / "gate.pt"
    torch.jit.script(Gate()).save(str(path))
    with pytest.raises(ModelError) as info:
        load("gate", checkpoint=path)
    message = str(info.value)
    assert message == (f"checkpoint {path} (TorchScript): no layer inside it can be explained: its forward "
                       "uses prim::If, which model-audit cannot step through to hook a layer; save it with "
                       "torch.jit.trace(model, example) instead, or save model.state_dict() and name the "
                       "architecture")


def test_unknown_layer_of_an_archive_lists_the_layers_it_has(archives):
    from audit.errors import UnknownNameError

    engine = Engine(load("resnet18", checkpoint=archives["traced"]))
    with pytest.raises(UnknownNameError, match="layer4.1.conv2"):
        engine.explain([HOPPER], cam_layer="layer4.1.conv22")


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_spec_with_a_torchscript_checkpoint_runs_in_the_plugin(pytester, archives, kind):
    (pytester.path / "hopper.jpg").write_bytes(HOPPER.read_bytes())
    oracle = Engine(load("resnet18", checkpoint=archives["state_dict"])).explain([HOPPER])[0]
    top1 = oracle.top_k[0].index
    spec = {"model": {"arch": "resnet18", "checkpoint": str(archives[kind])},
            "cases": [{"id": "hopper", "image": "hopper.jpg", "top_k": 10,
                       "expect": {"top1": top1, "in_top_k": [0, 9]},
                       "focus": {"region": {"box_rel": [0, 0, 1, 1]}, "min_energy": 0.99}},
                      {"id": "wrong", "image": "hopper.jpg", "expect": {"top1": (top1 + 1) % 10}}]}
    (pytester.path / "ts.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = pytester.runpytest("-p", "no:cacheprovider", "--audit-report", str(pytester.path / "report"))
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    assert "register_forward_hook" not in out and "Traceback" not in out
    cases = json.loads((pytester.path / "report" / "results.json").read_text())["cases"]
    assert {c["case_id"] for c in cases} == {"hopper", "wrong"}
    hopper = next(c for c in cases if c["case_id"] == "hopper")
    assert [r["index"] for r in hopper["top_k"]][:5] == [r.index for r in oracle.top_k]


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_cli_explains_a_torchscript_checkpoint(archives, kind, tmp_path):
    env = {**os.environ, "MODEL_AUDIT_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "audit.cli", "explain", str(HOPPER), "--checkpoint",
                             str(archives[kind]), "--json", "--out", str(tmp_path / "out")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    [entry] = json.loads(result.stdout)
    oracle = Engine(load("resnet18", checkpoint=archives["state_dict"])).explain([HOPPER])[0]
    assert [r["index"] for r in entry["top_k"]] == [r.index for r in oracle.top_k]
    assert entry["cam_layer"] == "layer4"
    assert Path(entry["files"]["overlay"]).is_file()


def test_cli_names_an_archive_it_cannot_explain_in_one_line(tmp_path):
    class Gate(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)) if bool(x.mean() > 0) else x.amax(dim=(2, 3))

    path = tmp_path / "gate.pt"
    torch.jit.script(Gate()).save(str(path))
    env = {**os.environ, "MODEL_AUDIT_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "audit.cli", "explain", str(HOPPER), "--checkpoint", str(path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"model-audit: error: checkpoint {path} (TorchScript): no layer inside it can be explained")


def _archive(tmp_path: Path, module: torch.nn.Module, example: torch.Tensor, name: str) -> Path:
    path = tmp_path / name
    torch.jit.trace(module, example).save(str(path))
    return path


class _TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        y = self.conv(x)
        return self.fc(y.mean(dim=(2, 3))), y


class _OneChannel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_archive_returning_a_tuple_is_one_line_naming_what_it_returns(tmp_path):
    path = _archive(tmp_path, _TwoOutputs(), torch.zeros(1, 3, 32, 32), "tuple.pt")
    with pytest.raises(ModelError) as info:
        Engine(load("net", checkpoint=path)).explain([HOPPER], cam_layer="conv")
    assert str(info.value) == (f"checkpoint {path} (TorchScript) returns a tuple of 2 (Tensor (1, 3), Tensor "
                               "(1, 4, 222, 222)), not one tensor of class scores (N, classes); save a wrapper "
                               "whose forward returns the logits only")


def test_archive_that_refuses_the_input_is_one_line_with_its_own_reason(tmp_path):
    path = _archive(tmp_path, _OneChannel(), torch.zeros(1, 1, 32, 32), "gray.pt")
    with pytest.raises(ModelError) as info:
        Engine(load("net", checkpoint=path)).explain([HOPPER], cam_layer="conv")
    message = str(info.value)
    assert message.startswith(f"checkpoint {path} (TorchScript) cannot run on an input batch of shape "
                              "(1, 3, 224, 224): ")
    assert "expected input[1, 3, 224, 224] to have 1 channels, but got 3 channels" in message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("module, example, fragment", [
    (_TwoOutputs(), torch.zeros(1, 3, 32, 32), "returns a tuple of 2"),
    (_OneChannel(), torch.zeros(1, 1, 32, 32), "cannot run on an input batch of shape"),
])
def test_plugin_reports_a_broken_archive_as_one_line_errors(pytester, tmp_path, module, example, fragment):
    path = _archive(pytester.path, module, example, "bad.pt")
    (pytester.path / "hopper.jpg").write_bytes(HOPPER.read_bytes())
    spec = {"model": {"arch": "net", "checkpoint": str(path), "cam_layer": "conv"},
            "cases": [{"id": "a", "image": "hopper.jpg", "expect": {"top1": 0}}]}
    (pytester.path / "bad.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert fragment in out and "Traceback" not in out and "torchscript.py" not in out


def test_mirrored_torch_nn_layers_are_instances_of_their_class_so_vgg_gets_its_default_layer(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        vgg = torchvision.models.vgg11(num_classes=3).eval()
    torch.save(vgg.state_dict(), tmp_path / "vgg.pt")
    torch.jit.trace(vgg, torch.zeros(1, 3, 224, 224)).save(str(tmp_path / "vgg_traced.pt"))
    mirror = load("vgg11", checkpoint=tmp_path / "vgg_traced.pt").module
    assert isinstance(mirror.features, torch.nn.Sequential) and isinstance(mirror.features[19], torch.nn.ReLU)
    assert mirror.features[0].weight.shape == (64, 3, 3, 3)      # the archive's own attributes answer
    ours = Engine(load("vgg11", checkpoint=tmp_path / "vgg_traced.pt"))
    oracle = Engine(load("vgg11", checkpoint=tmp_path / "vgg.pt"))
    assert ours.default_cam_layer == oracle.default_cam_layer == "features.19"  # the last ReLU, not a pool
    got, want = ours.explain([HOPPER])[0], oracle.explain([HOPPER])[0]
    np.testing.assert_array_equal(got.cams_lowres[got.target], want.cams_lowres[want.target])
