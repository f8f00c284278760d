"""The model-audit command, driven as a user drives it: a subprocess, exit codes, stdout/stderr.

User mistakes end with exit code 2 and one ``model-audit: error:`` line, never a traceback; every
--help shows an example. Models here are offline: random-init torchvision models, a random
squeezenet state_dict as "downloaded" weights, the zoo when its weights are present.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from audit import report
from audit.cli import expected_prefix, parse_model

REPO = Path(__file__).resolve().parents[1]
HOPPER = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
ZOO_READY = (REPO / "audit" / "zoo" / "weights" / "shapes_vgg.pt").is_file() and \
    (REPO / "audit" / "zoo" / "weights" / "shapes_vgg_shortcut.pt").is_file()


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "MODEL_AUDIT_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "audit.cli", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, the last stderr line is the message (argparse adds a usage line above)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model-audit: error: ") or last.startswith("model-audit ")
    for fragment in fragments:
        assert fragment in last, last
    return last


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    """Three drawn scenes, a spec naming them with focus boxes, and a second squeezenet checkpoint."""
    import torch
    import torchvision

    from audit.zoo.scenes import make_scene

    folder = tmp_path_factory.mktemp("scenes")
    (folder / "images").mkdir()
    lines = ["model: {arch: squeezenet1_1, weights: null, seed: 0}", "cases:"]
    for seed in range(3):
        scene = make_scene(seed)
        name = f"{scene.name}-{seed}"
        scene.image.save(folder / "images" / f"{name}.png")
        lines += [f"  - id: {name}", f"    image: images/{name}.png",
                  f"    focus: {{region: {{box: {list(scene.box)}}}}}"]
    (folder / "spec.yaml").write_text("\n".join(lines) + "\n")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        torch.save(torchvision.models.squeezenet1_1().state_dict(), folder / "other.pt")
    return folder


# ------------------------------------------------------------------------------------------- help

@pytest.mark.parametrize("command", [[], ["explain"], ["snapshot"], ["weights"], ["run"], ["compare"]])
def test_every_help_shows_an_example(command):
    result = cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout
    assert "model-audit " + (command[0] if command else "") in result.stdout.split("example", 1)[1]


def test_no_command_prints_help_and_exits_2():
    result = cli()
    assert result.returncode == 2 and "COMMAND" in result.stderr


# ------------------------------------------------------------------------------------- bad input

def test_unknown_subcommand_is_argparses_clear_error():
    last = assert_user_error(cli("explian", "x.jpg"), "invalid choice: 'explian'")
    assert "explain" in last


def test_bad_option_value_is_argparses_clear_error():
    assert_user_error(cli("explain", str(HOPPER), "--top-k", "0"), "--top-k", "must be >= 1")


def test_missing_image_is_one_line_before_any_model_loads():
    assert_user_error(cli("explain", "no/such.jpg", "--model", "vgg16", "--weights", "none"),
                      "no/such.jpg: file not found")


def test_unknown_model_suggests_close_names():
    assert_user_error(cli("explain", str(HOPPER), "--model", "vgg61"), "unknown model 'vgg61'", "'vgg16'")


def test_unknown_layer_suggests_close_names(scenes):
    assert_user_error(cli("explain", str(scenes / "images" / "ring-0.png"), "--model", "squeezenet1_1",
                          "--weights", "none", "--layers", "features.99"),
                      "unknown layer 'features.99'", "'features.9'")


def test_default_model_offline_says_which_file_to_provide(tmp_path):
    assert_user_error(cli("explain", str(HOPPER), env={"TORCH_HOME": str(tmp_path)}),
                      "weights vgg16 IMAGENET1K_V1 are not available offline",
                      str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth"),
                      "model-audit weights vgg16 --weights DEFAULT --from FILE")


# ---------------------------------------------------------------------------------------- explain

def test_explain_prints_the_top5_table_and_writes_the_pictures(tmp_path):
    out = tmp_path / "out"
    result = cli("explain", str(HOPPER), "--model", "vgg16", "--weights", "none", "--out", str(out),
                 "--layers", "features.4", "features.21")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split() == ["index", "label", "probability"])
    rows = [line.split() for line in lines[header + 1:header + 6]]
    assert len(rows) == 5 and all(r[0].isdigit() and 0 <= float(r[-1]) <= 1 for r in rows)
    assert not lines[header + 6].split() or lines[header + 6].strip().startswith("wrote")
    sizes = {p.name: Image.open(p).size for p in out.iterdir()}
    grid4 = report.feature_grid(np.zeros((64, 112, 112), np.float32), 64).shape
    grid21 = report.feature_grid(np.zeros((72, 28, 28), np.float32), 72).shape
    assert sizes == {"grace_hopper-heatmap.png": (512, 600), "grace_hopper-overlay.png": (512, 600),
                     "grace_hopper-features.4.png": (grid4[1], grid4[0]),
                     "grace_hopper-features.21.png": (grid21[1], grid21[0])}
    for p in out.iterdir():
        Image.open(p).load()   # decodes


def test_explain_json_lists_every_image(scenes):
    images = [str(scenes / "images" / "ring-0.png"), str(scenes / "images" / "triangle-1.png")]
    result = cli("explain", *images, "--model", "squeezenet1_1", "--weights", "none", "--json", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [d["image"] for d in data] == images
    for d in data:
        assert len(d["top_k"]) == 3 and set(d["top_k"][0]) == {"index", "label", "prob"}
        assert d["top_k"][0]["prob"] >= d["top_k"][1]["prob"]
        assert d["cam_layer"] and d["files"] == {}


# --------------------------------------------------------------------------------------- snapshot

def test_snapshot_writes_a_spec_that_loads(scenes, tmp_path):
    from audit.spec import load_spec

    images = [str(scenes / "images" / "ring-0.png"), str(scenes / "images" / "ring-2.png")]
    result = cli("snapshot", *images, "--model", "squeezenet1_1", "--weights", "none", "--relative-to",
                 str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# generated by model-audit snapshot on ")
    assert "review before committing" in result.stdout.splitlines()[0]
    spec_path = tmp_path / "snap.yaml"
    spec_path.write_text(result.stdout)
    spec = load_spec(spec_path)
    assert spec.case_errors == ()
    assert (spec.model.arch, spec.model.weights, spec.model.seed) == ("squeezenet1_1", None, 0)
    assert [c.id for c in spec.cases] == ["ring-0", "ring-2"]
    assert [c.image for c in spec.cases] == [Path(i).resolve() for i in images]
    raw = yaml.safe_load(result.stdout)["cases"][0]
    assert len(raw["expect"]["any_in_top_k"]) == 3 and raw["expect"]["top1"] == raw["expect"]["any_in_top_k"][0]
    if "focus" in raw:
        x0, y0, x1, y1 = raw["focus"]["region"]["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and 0 <= raw["focus"]["min_energy"] <= 1


# ---------------------------------------------------------------------------------------- weights

def test_weights_says_where_the_file_is_expected(tmp_path):
    result = cli("weights", "squeezenet1_1", env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 1
    assert str(tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth") in result.stdout
    assert "present       no" in result.stdout and "sha256 prefix b8a52dc0" in result.stdout


def test_weights_from_refuses_a_file_with_the_wrong_hash(scenes, tmp_path):
    assert_user_error(cli("weights", "squeezenet1_1", "--from", str(scenes / "other.pt"),
                          env={"TORCH_HOME": str(tmp_path)}), "expects b8a52dc0", "--no-check")
    assert not (tmp_path / "hub").exists()


def test_weights_from_no_check_installs_and_the_model_loads_offline(scenes, tmp_path, monkeypatch):
    result = cli("weights", "squeezenet1_1", "--weights", "IMAGENET1K_V1", "--from", str(scenes / "other.pt"),
                 "--no-check", env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    target = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    assert target.read_bytes() == (scenes / "other.pt").read_bytes()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    import torch
    import torchvision

    import audit
    from audit.models import fingerprint
    engine = audit.load_model("squeezenet1_1", weights="IMAGENET1K_V1")
    expected = torchvision.models.squeezenet1_1()
    expected.load_state_dict(torch.load(scenes / "other.pt", weights_only=True))
    assert engine.loaded.fingerprint == fingerprint(expected)


def test_weights_from_a_wrapped_dataparallel_file_installs_the_bare_state_dict(scenes, tmp_path, monkeypatch):
    """A training script's ``{"state_dict": ...}`` of a DataParallel model fits (the loader's own reading);
    torchvision reads a bare state_dict from its cache, so that is what is installed."""
    import torch
    import torchvision

    import audit
    from audit.models import fingerprint
    bare = torch.load(scenes / "other.pt", weights_only=True)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"epoch": torch.tensor(3), "state_dict": {f"module.{k}": v for k, v in bare.items()}}, wrapped)
    result = cli("weights", "squeezenet1_1", "--from", str(wrapped), "--no-check", env={"TORCH_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "its bare state_dict" in result.stdout
    target = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    assert sorted(torch.load(target, weights_only=True)) == sorted(bare)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("MODEL_AUDIT_OFFLINE", "1")
    expected = torchvision.models.squeezenet1_1()
    expected.load_state_dict(bare)
    assert audit.load_model("squeezenet1_1", weights="IMAGENET1K_V1").loaded.fingerprint == fingerprint(expected)


def test_weights_from_refuses_a_file_of_another_architecture(scenes, tmp_path):
    assert_user_error(cli("weights", "alexnet", "--from", str(scenes / "other.pt"), "--no-check",
                          env={"TORCH_HOME": str(tmp_path)}), "does not fit alexnet", "missing keys")


def test_weights_unknown_enum_lists_valid_names():
    assert_user_error(cli("weights", "squeezenet1_1", "--weights", "IMAGENET1K_V2"),
                      "unknown weights 'IMAGENET1K_V2'", "IMAGENET1K_V1")


def test_expected_prefix_reads_torchvision_file_names():
    assert expected_prefix("vgg16-397923af.pth") == "397923af"
    assert expected_prefix("resnet50-11ad3fa6.pth") == "11ad3fa6"
    assert expected_prefix("custom.pth") is None


# ---------------------------------------------------------------------------------------- compare

def test_model_syntax():
    assert (parse_model("shapes_vgg").arch, parse_model("shapes_vgg").weights) == ("shapes_vgg", "DEFAULT")
    assert parse_model("vgg16:IMAGENET1K_V1").weights == "IMAGENET1K_V1"
    assert parse_model("vgg16:none").weights is None
    from audit.errors import AuditError
    with pytest.raises(AuditError, match="ARCH@CHECKPOINT_PATH"):
        parse_model("vgg16:")
    with pytest.raises(AuditError, match="file not found"):
        parse_model("vgg16@missing.pt")


def _compare_and_check(result: subprocess.CompletedProcess, out: Path, ids: set[str]) -> list[dict]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    data = json.loads((out / "compare.json").read_text())
    cases = data["cases"]
    assert {c["case_id"] for c in cases} == ids
    assert [c["rank"] for c in cases] == list(range(1, len(cases) + 1))
    keys = [(not c["flip"], c["heatmap_correlation"]) for c in cases]
    assert keys == sorted(keys)
    table = [line.split() for line in result.stdout.splitlines() if line[:4].strip().isdigit()]
    assert [row[1] for row in table] == [c["case_id"] for c in cases]
    html = (out / "index.html").read_text()
    for c in cases:
        assert f'data-case-id="{c["case_id"]}"' in html
        for rel in c["assets"].values():
            Image.open(out / rel).load()
    return cases


def test_compare_ranks_divergent_cases_and_writes_a_report(scenes, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", str(scenes / "spec.yaml"), "--a", "squeezenet1_1:none",
                 "--b", f"squeezenet1_1@{scenes / 'other.pt'}", "--out", str(out))
    cases = _compare_and_check(result, out, {"ring-0", "triangle-1", "ring-2"})
    assert all(c["energy_a"] is not None and 0 <= c["energy_a"] <= 1 for c in cases)
    assert not list(out.glob(".tmp-*"))


def test_compare_of_a_model_with_itself_finds_no_divergence(scenes, tmp_path):
    out = tmp_path / "same"
    result = cli("compare", str(scenes / "spec.yaml"), "--a", "squeezenet1_1:none", "--b", "squeezenet1_1:none",
                 "--out", str(out))
    cases = _compare_and_check(result, out, {"ring-0", "triangle-1", "ring-2"})
    assert not any(c["flip"] for c in cases)
    assert all(c["heatmap_correlation"] == pytest.approx(1.0) for c in cases)


@pytest.mark.skipif(not ZOO_READY, reason="zoo weights not trained yet (audit/zoo/weights)")
def test_compare_shortcut_model_flags_the_focus_shift(tmp_path):
    specs = [p for p in (REPO / "examples" / "shortcut").glob("*.yaml")]
    if not specs:
        pytest.skip("examples/shortcut has no spec yet")
    out = tmp_path / "zoo"
    result = cli("compare", *map(str, specs), "--a", "shapes_vgg", "--b", "shapes_vgg_shortcut", "--out", str(out))
    assert result.returncode == 0, result.stderr
    cases = json.loads((out / "compare.json").read_text())["cases"]
    with_energy = [c for c in cases if c["energy_a"] is not None]
    assert with_energy and sum(c["energy_a"] > c["energy_b"] for c in with_energy) > len(with_energy) / 2


# -------------------------------------------------------------------------------------------- run

def test_run_passes_pytest_arguments_after_the_double_dash(tmp_path):
    (tmp_path / "test_demo.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert False\n")
    failing = cli("run", "test_demo.py", "--no-report", "--", "-q", "-p", "no:cacheprovider", cwd=tmp_path)
    assert failing.returncode == 1, failing.stdout + failing.stderr
    passing = cli("run", "test_demo.py", "--no-report", "--", "-q", "-k", "ok", "-p", "no:cacheprovider",
                  cwd=tmp_path)
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "1 passed, 1 deselected" in passing.stdout


def test_run_adds_the_report_folder_unless_given(monkeypatch):
    import pytest as real_pytest

    from audit.cli import main
    calls = []
    monkeypatch.setattr(real_pytest, "main", lambda args: calls.append(args) or 3)
    assert main(["run", "specs/", "--", "-k", "circle"]) == 3
    assert main(["run", "specs/", "--", "--audit-report=out/"]) == 3
    assert main(["run", "a.yaml", "b.yaml", "--report", "r/"]) == 3
    assert calls == [["specs/", "--audit-report", "reports/", "-k", "circle"], ["specs/", "--audit-report=out/"],
                     ["a.yaml", "b.yaml", "--audit-report", "r/"]]


# ------------------------------------------------------------------- compare through the session

def test_compare_reads_a_dataset_spec_through_its_case_source(tmp_path):
    """A COCO golden set: one compared case per image, its annotated box as the region (the energies),
    the spec's own model against the shortcut twin."""
    from audit.zoo.make_dataset import write_dataset
    from audit.zoo.scenes import SEED_RANGES

    if not ZOO_READY:
        pytest.skip("zoo weights not built")
    write_dataset(tmp_path / "set", 6, "coco", first_seed=SEED_RANGES["tests"][0] + 760_000, marker=True)
    (tmp_path / "golden.yaml").write_text(
        "model: {arch: shapes_vgg}\n"
        "dataset:\n  coco: set/annotations/instances.json\n  images: set/images\n  annotation: bbox\n"
        "defaults:\n  expect: {top1_is_label: true}\n  focus: {region: annotation, min_energy: 0.4}\n")
    out = tmp_path / "cmp"
    result = cli("compare", str(tmp_path / "golden.yaml"), "--b", "shapes_vgg_shortcut", "--out", str(out), "-q")
    images = {p.stem for p in (tmp_path / "set" / "images").iterdir()}
    cases = _compare_and_check(result, out, {c for c in images})
    assert all(c["region"] and c["energy_a"] is not None and c["energy_b"] is not None for c in cases)
    assert {c["model_a"] for c in cases} == {"spec golden.yaml: shapes_vgg"}


def test_compare_skips_a_case_whose_image_is_broken_and_compares_the_others(scenes, tmp_path):
    spec = yaml.safe_load((scenes / "spec.yaml").read_text())
    (tmp_path / "broken.png").write_bytes(b"not a png")
    spec["cases"].append({"id": "broken", "image": str(tmp_path / "broken.png")})
    for case in spec["cases"]:
        case["image"] = str((scenes / case["image"]).resolve()) if not Path(case["image"]).is_absolute() \
            else case["image"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    out = tmp_path / "cmp"
    result = cli("compare", str(tmp_path / "spec.yaml"), "--a", "squeezenet1_1:none", "--b", "squeezenet1_1:none",
                 "--out", str(out), "-q")
    _compare_and_check(result, out, {"ring-0", "triangle-1", "ring-2"})
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "case broken" in skipped[0], result.stderr   # one line, not one per side


def test_compare_names_the_side_whose_model_does_not_load(scenes):
    assert_user_error(cli("compare", str(scenes / "spec.yaml"), "--b", "squeezenet1_1:none", "--b-cam-layer",
                          "features.99"), "--b squeezenet1_1:none", "features.99")
