"""Load the model a spec names, with its labels and preprocessing, or say in one line why not.

Three sources, one result (:class:`LoadedModel`):

* a torchvision classifier by name, with weights by enum name through torchvision's own weights API
  (its ``transforms()`` and ``meta["categories"]``); weights come from ``$TORCH_HOME/hub/checkpoints``
  like torchvision does it, and when they are neither there nor downloadable the error names the file
  and how to provide it;
* a zoo model shipped with the project (:mod:`audit.zoo`), trained offline;
* a user checkpoint: a state_dict (read with ``weights_only=True``, never an arbitrary pickle) loaded
  into a named architecture, or a TorchScript file.

The state_dict fingerprint recorded here is what baselines compare to notice new weights.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pickle
import re
import socket
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence
from urllib.error import URLError
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from audit import torchscript
from audit.errors import ModelError, UnknownNameError, WeightsUnavailable, closest
from audit.images import Preprocessing

__all__ = ["Categories", "LoadedModel", "load", "fingerprint", "OFFLINE_ENV", "TIMM_PREFIX",
           # what `model-audit weights` installs with
           "zoo", "check_arch", "weights_enum", "hub_file", "torchvision_skeleton", "read_state_dict",
           "read_weights_file", "load_into"]

#: Set to 1 to never try a download: missing weights fail at once instead of after a network timeout.
OFFLINE_ENV = "MODEL_AUDIT_OFFLINE"
#: ``arch: timm/<name>`` builds ``timm.create_model(name)`` (the optional ``timm`` extra).
TIMM_PREFIX = "timm/"
_DOWNLOAD_TIMEOUT_S = 10.0
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_AUX_PREFIX = {"googlenet": "aux1.", "inception_v3": "AuxLogits."}
_SHOW = 4  # how many keys an error message lists of each kind


# ------------------------------------------------------------------------------------------ labels
class Categories:
    """The class names of a model, and every way a spec may spell one.

    ``names[i]`` is the display name of output ``i``. Each name also answers to its comma-separated
    parts ("tench, Tinca tinca" answers to "tench" and "Tinca tinca"), case-insensitively, trimmed.
    When two indices share a synonym (ImageNet has two "crane"s), the first index wins.
    """

    def __init__(self, names: Sequence[str], synonyms: Sequence[Sequence[str]] | None = None):
        self.names = [str(n) for n in names]
        if synonyms is not None and len(synonyms) != len(self.names):
            raise ValueError("synonyms need one entry (possibly empty) per name")
        self._lookup: dict[str, int] = {}
        self._spellings: list[str] = []
        for index, name in enumerate(self.names):
            extra = list(synonyms[index]) if synonyms is not None else []
            for spelling in [name, *_split(name), *extra]:
                key = _key(spelling)
                if key and key not in self._lookup:
                    self._lookup[key] = index
                    self._spellings.append(spelling.strip())

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        head = ", ".join(self.names[:3])
        return f"Categories({len(self)}: {head}{', ...' if len(self) > 3 else ''})"

    def name(self, index: int) -> str:
        """The display name of output ``index``."""
        return self.names[self._check_index(index)]

    def resolve(self, label: str | int) -> int:
        """The output index a spec's label means: an index (int or digits) or any synonym."""
        if isinstance(label, bool):
            raise UnknownNameError("label", label, [], hint=self._range_hint())
        if isinstance(label, int):
            return self._check_index(label)
        text = str(label).strip()
        if text.isdigit():
            return self._check_index(int(text))
        index = self._lookup.get(_key(text))
        if index is None:
            raise UnknownNameError("label", label, closest(text, self._spellings, 3))
        return index

    def _check_index(self, index: int) -> int:
        if not 0 <= index < len(self.names):
            raise UnknownNameError("label", index, [], hint=self._range_hint())
        return index

    def _range_hint(self) -> str:
        return f"valid indices are 0..{len(self.names) - 1}" if self.names else "the model has no classes"

    @classmethod
    def numbered(cls, count: int) -> "Categories":
        """Placeholder names "class 0" .. for a model whose labels nobody gave."""
        return cls([f"class {i}" for i in range(count)])

    @classmethod
    def from_file(cls, path: str | Path) -> "Categories":
        """Read a labels file: a JSON list of names, a JSON mapping of index to "name, synonym" or to
        ``["wnid", "name"]`` (the common ``imagenet_class_index.json``), or a text file with one name
        per line. Raises :class:`ModelError` naming the file and the problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ModelError(f"labels file {path}: file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"labels file {path}: cannot read it ({exc})") from None
        if path.suffix.lower() == ".txt":
            return cls([line.strip() for line in text.splitlines() if line.strip()])
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ModelError(f"labels file {path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        except RecursionError:   # "[[[[..." deeper than the parser's stack: not a labels file
            raise ModelError(f"labels file {path}: nested too deeply; expected a JSON list of names or a "
                             f"mapping of index to name") from None
        try:
            return cls._from_json(data)
        except ValueError as exc:
            raise ModelError(f"labels file {path}: {exc}") from None

    @classmethod
    def _from_json(cls, data: Any) -> "Categories":
        if isinstance(data, dict):
            entries = _ordered_by_index(data)
        elif isinstance(data, list):
            entries = data
        else:
            raise ValueError("expected a JSON list of names or a mapping of index to name")
        if not entries:
            raise ValueError("no labels in it")
        names: list[str] = []
        synonyms: list[list[str]] = []
        for position, entry in enumerate(entries):
            if isinstance(entry, str) and entry.strip():
                names.append(entry.strip())
                synonyms.append([])
            elif (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)
                  and entry[1].strip()):
                names.append(entry[1].strip())      # ["n01440764", "tench"]: the name is the second
                synonyms.append([entry[0]])        # the WordNet id also resolves
            else:
                raise ValueError(f"entry {position} is {entry!r}; expected a name or [\"wnid\", \"name\"]")
        return cls(names, synonyms)


def _split(name: str) -> list[str]:
    return [part.strip() for part in name.split(",") if part.strip()]


def _key(spelling: str) -> str:
    return " ".join(spelling.split()).casefold()


def _ordered_by_index(data: Mapping[str, Any]) -> list[Any]:
    try:
        by_index = {int(k): v for k, v in data.items()}
    except ValueError:
        bad = next(k for k in data if not str(k).strip().lstrip("-").isdigit())
        raise ValueError(f"key {bad!r} is not a class index") from None
    expected = set(range(len(by_index)))
    if set(by_index) != expected:
        missing = sorted(expected - set(by_index))[:_SHOW]
        raise ValueError(f"indices must run 0..{len(by_index) - 1} without gaps (missing {missing})")
    return [by_index[i] for i in range(len(by_index))]


# ------------------------------------------------------------------------------------------ result
@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to run: on its device, in eval mode, with labels, preprocessing and provenance."""

    module: nn.Module
    arch: str
    weights: str | None
    checkpoint: str | None
    categories: Categories
    preprocessing: dict[str, Preprocessing]
    fingerprint: str
    device: str
    source: str


def fingerprint(module: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes, values), so new weights are noticed."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            digest.update(f"{name}|{tensor!r}\n".encode())
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}\n".encode())
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ loading
@dataclass
class _Built:
    module: nn.Module
    weights: str | None
    outputs: int | None          # number of classes when it can be known without running the model
    categories: Categories | None
    preprocessing: dict[str, Preprocessing]
    source: str


def load(arch: str, weights: str | None = None, checkpoint: str | Path | None = None,
         labels: str | Path | None = None, device: str = "cpu", seed: int | None = None,
         num_classes: int | None = None) -> LoadedModel:
    """Load ``arch`` with named ``weights``, a ``checkpoint`` or random init (``seed``), ready to run.

    ``arch`` is a torchvision classification model name or a zoo name; with a TorchScript checkpoint
    it is only a label. Every user mistake becomes a :class:`ModelError` (or
    :class:`UnknownNameError`) with one clear message.
    """
    target = _check_device(device)
    if checkpoint is not None and weights is not None:
        raise ModelError(f"give either weights ({weights}) or a checkpoint ({checkpoint}), not both: "
                         "a checkpoint replaces every weight")
    if arch.startswith(TIMM_PREFIX):
        built = _from_timm(arch, weights, None if checkpoint is None else Path(checkpoint), seed, num_classes,
                           target)
    elif checkpoint is not None:
        built = _from_checkpoint(arch, Path(checkpoint), num_classes, target)
    elif arch in zoo():
        built = _from_zoo(arch, weights)
    else:
        built = _from_torchvision(arch, weights, seed, num_classes)
    categories = _categories(arch, built, labels)
    module = built.module.to(target).eval()
    return LoadedModel(module=module, arch=arch, weights=built.weights,
                       checkpoint=str(checkpoint) if checkpoint is not None else None,
                       categories=categories, preprocessing=built.preprocessing,
                       fingerprint=fingerprint(module), device=str(target), source=built.source)


def _check_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"device {device!r} requested but CUDA is not available here "
                             f"(torch {torch.__version__}); use device: cpu")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ModelError(f"device {device!r} requested but only {torch.cuda.device_count()} "
                             "CUDA device(s) exist")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r} requested but MPS is not available here; use device: cpu")
    elif target.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return target


def _categories(arch: str, built: _Built, labels: str | Path | None) -> Categories:
    if labels is None:
        if built.categories is not None:
            return built.categories
        return _default_categories(arch, built.outputs)
    categories = Categories.from_file(labels)
    if built.outputs is not None and len(categories) != built.outputs:
        raise ModelError(f"labels file {labels} has {len(categories)} names but {arch} has "
                         f"{built.outputs} outputs")
    return categories


def _default_categories(arch: str, outputs: int | None) -> Categories:
    """ImageNet names from torchvision's weights metadata for 1000 outputs, else "class i"."""
    if outputs == 1000:
        default = _default_weights(arch)
        if default is not None and len(default.meta.get("categories", ())) == 1000:
            return Categories(default.meta["categories"])
        default = torchvision.models.get_model_weights("resnet18").DEFAULT
        return Categories(default.meta["categories"])
    return Categories.numbered(outputs or 0)


# --- zoo
def zoo() -> Mapping[str, Any]:
    """The shipped zoo, imported only when a load needs it."""
    try:
        module = importlib.import_module("audit.zoo")
    except ModuleNotFoundError as exc:
        if exc.name in ("audit.zoo", "audit"):
            return {}
        raise
    return getattr(module, "ZOO", {})


def _from_zoo(arch: str, weights: str | None) -> _Built:
    entry = zoo()[arch]
    if weights not in (None, "DEFAULT"):
        raise UnknownNameError("weights", weights, ["DEFAULT"],
                               hint=f"zoo model {arch} ships one set of weights: leave weights out")
    path = Path(entry.weights_path)
    if not path.is_file():
        raise WeightsUnavailable(f"weights of zoo model {arch} are missing: expected {path}; "
                                 f"train them with python -m audit.zoo.train or reinstall model-audit")
    module = entry.build()
    load_into(module, read_state_dict(path, what=f"zoo weights {path}"), f"zoo weights {path}", arch)
    return _Built(module, "DEFAULT", len(entry.categories), Categories(list(entry.categories)),
                  _square(entry.input_size, entry.mean, entry.std), f"zoo {arch} ({path})")


def _square(size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Preprocessing]:
    """The preprocessing of a model trained on squashed square inputs (the zoo, a user's provided model):
    both modes resize to ``size`` x ``size``, as it was trained; there is no crop to choose."""
    squash = Preprocessing("squash", int(size), mean=tuple(mean), std=tuple(std))
    return {"squash": squash, "weights": squash}


# --- torchvision
def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    if arch not in _torchvision_names():
        raise UnknownNameError("model", arch, closest(arch, [*_torchvision_names(), *zoo()], 3))


def _default_weights(arch: str) -> Any:
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def weights_enum(arch: str, name: str) -> Any:
    """The weights enum member for ``name`` ("DEFAULT", "IMAGENET1K_V1" or "VGG16_Weights.IMAGENET1K_V1")."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError, AttributeError):
        raise ModelError(f"{arch} has no pretrained weights in torchvision") from None
    valid = [*enum.__members__]
    key = str(name).strip().rsplit(".", 1)[-1].upper()
    if key not in enum.__members__:
        raise UnknownNameError("weights", name, closest(str(name), valid, 3),
                               hint=f"{arch} has weights {', '.join(valid)}")
    return enum[key]


def _preprocessing_of(weights_enum: Any) -> dict[str, Preprocessing]:
    if weights_enum is None:
        return {"squash": Preprocessing("squash", 224),
                "weights": Preprocessing("weights", 224, resize=256)}
    cropped = Preprocessing.from_weights(weights_enum)
    squash = Preprocessing("squash", cropped.size, mean=cropped.mean, std=cropped.std,
                           interpolation=cropped.interpolation)
    return {"squash": squash, "weights": cropped}


def _from_torchvision(arch: str, weights: str | None, seed: int | None, num_classes: int | None) -> _Built:
    check_arch(arch)
    if weights is None:
        config = {} if num_classes is None else {"num_classes": num_classes}
        with _seeded(seed):
            module = torchvision.models.get_model(arch, weights=None, **config)
        how = f"seed {seed}" if seed is not None else "unseeded"
        return _Built(module, None, num_classes or 1000, None, _preprocessing_of(_default_weights(arch)),
                      f"torchvision {arch} random init ({how})")
    enum = weights_enum(arch, weights)
    categories = enum.meta.get("categories")
    if num_classes is not None and categories is not None and num_classes != len(categories):
        raise ModelError(f"weights {arch} {enum.name} have {len(categories)} classes, not "
                         f"num_classes={num_classes}; load a fine-tuned model with checkpoint: <path>")
    module = _torchvision_with_weights(arch, enum)
    requested = "" if str(weights).upper().endswith(enum.name) else f" ({weights})"
    return _Built(module, enum.name, len(categories) if categories else None,
                  Categories(categories) if categories else None, _preprocessing_of(enum),
                  f"torchvision {arch} {enum.name}{requested}")


def torchvision_skeleton(arch: str) -> nn.Module:
    """``arch`` as torchvision builds it before reading pretrained weights into it (random init; the
    googlenet and inception_v3 weights hold their auxiliary heads), so a file that fits it loads offline."""
    check_arch(arch)
    config = {"aux_logits": True, "init_weights": False} if arch in _AUX_PREFIX else {}
    with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as it was
        return torchvision.models.get_model(arch, weights=None, **config)


def hub_file(enum: Any) -> Path:
    """Where torchvision's ``load_state_dict_from_url`` keeps (or would download) these weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(enum.url).path)


def _torchvision_with_weights(arch: str, enum: Any) -> nn.Module:
    """torchvision's own loading path, made safe (weights_only) and quick to fail when offline."""
    cached = hub_file(enum)
    unavailable = (f"weights {arch} {enum.name} are not available offline: expected {cached}; copy the "
                   f"file there, set TORCH_HOME to a folder holding hub/checkpoints/{cached.name}, "
                   f"or pass checkpoint: <path>")
    present = cached.is_file()
    if not present and os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes"):
        raise WeightsUnavailable(unavailable)
    try:
        with _safe_torch_load(), _download_timeout(None if present else _DOWNLOAD_TIMEOUT_S):
            return torchvision.models.get_model(arch, weights=enum)
    except pickle.UnpicklingError as exc:
        if _is_refusal(exc):
            raise ModelError(_refused(cached, exc, f"cached weights {cached}")) from None
        raise ModelError(f"cached weights {cached} are corrupt ({_pickle_reason(exc)}); delete the file "
                         "or replace it") from None
    except (URLError, OSError, RuntimeError, EOFError, ValueError) as exc:
        if not present and not cached.is_file():
            raise WeightsUnavailable(f"{unavailable} (download failed: {_first_line(exc)})") from None
        raise ModelError(f"cached weights {cached} cannot be used for {arch} {enum.name}: "
                         f"{_first_line(exc)}; delete the file or replace it") from None


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes")


# --- timm
def _timm() -> Any:
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as exc:
        if exc.name != "timm":
            raise
        raise ModelError("arch timm/<name> needs the timm package: pip install 'model-audit[timm]'") from None


def _timm_config(arch: str, weights: str | None) -> tuple[str, Any]:
    """(the timm model name with its pretrained tag, the pretrained config): ``timm/resnet18`` with
    weights ``a1_in1k`` or ``timm/resnet18.a1_in1k`` name the same weights; no tag is timm's default."""
    timm = _timm()
    name = arch[len(TIMM_PREFIX):].strip()
    base, tag = timm.models.split_model_name_tag(name)
    if weights is not None and str(weights).upper() != "DEFAULT":
        if tag and tag != weights:
            raise ModelError(f"arch {arch} already names the weights {tag!r}; leave weights out or "
                             f"write arch: timm/{base} with weights: {weights}")
        tag = str(weights)
    if not base:
        raise UnknownNameError("model", arch, [], hint="write arch: timm/<name>, e.g. timm/resnet18")
    if not timm.is_model(base):
        known = timm.list_models()
        raise UnknownNameError("model", arch, [TIMM_PREFIX + n for n in closest(base, known, 3)])
    full = f"{base}.{tag}" if tag else base
    try:
        config = timm.models.get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag"
        config = None
    if tag and (config is None or getattr(config, "tag", tag) != tag):
        tags = [n.split(".", 1)[1] for n in timm.models.get_arch_pretrained_cfgs(base) if "." in n]
        raise UnknownNameError("weights", tag, closest(tag, tags, 3),
                               hint=f"timm {base} has weights {', '.join(tags) or 'none'}")
    return full, config


def _timm_preprocessing(full: str, config: Any) -> dict[str, Preprocessing]:
    """Both preprocessings from the model's own pretrained config: timm's eval transform is resize
    the shorter side to ``floor(size / crop_pct)`` and centre-crop ``size``, as 'weights' does."""
    if config is None:
        return _preprocessing_of(None)
    _, height, width = config.input_size
    if height != width:
        raise ModelError(f"timm {full} takes {width}x{height} inputs; model-audit feeds square inputs only")
    crop_mode = getattr(config, "crop_mode", "center") or "center"
    if crop_mode != "center":
        raise ModelError(f"timm {full} evaluates with crop_mode {crop_mode!r}; model-audit reproduces "
                         "only timm's 'center' crop")
    interpolation = config.interpolation or "bilinear"
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        raise ModelError(f"timm {full} resizes with {interpolation!r} interpolation; model-audit supports "
                         "bilinear, bicubic and nearest")
    crop_pct = float(config.crop_pct or 0.875)
    resize = max(int(height), int(math.floor(height / crop_pct)))
    mean, std = tuple(config.mean), tuple(config.std)
    return {"squash": Preprocessing("squash", int(height), mean=mean, std=std, interpolation=interpolation),
            "weights": Preprocessing("weights", int(height), resize=resize, mean=mean, std=std,
                                     interpolation=interpolation)}


def _timm_classifier_key(config: Any) -> str | None:
    classifier = getattr(config, "classifier", None) if config is not None else None
    if isinstance(classifier, (list, tuple)):
        classifier = classifier[0] if classifier else None
    return f"{classifier}.weight" if classifier else None


def _from_timm(arch: str, weights: str | None, checkpoint: Path | None, seed: int | None,
               num_classes: int | None, target: torch.device) -> _Built:
    """``timm.create_model(name, pretrained=False, num_classes=N)``: random init, a checkpoint, or
    timm's pretrained weights when they are already in its cache (a download only when online)."""
    if checkpoint is not None and weights is not None:
        raise ModelError(f"give either weights ({weights}) or a checkpoint ({checkpoint}), not both")
    timm = _timm()
    full, config = _timm_config(arch, weights)
    preprocessing = _timm_preprocessing(full, config)
    base = full.split(".", 1)[0]
    if checkpoint is not None:
        _check_file(checkpoint)
        if _is_torchscript(checkpoint):  # a scripted / traced timm model: timm's preprocessing applies
            built = _from_torchscript(arch, checkpoint, target)
            built.preprocessing = preprocessing
            return built
        what = f"checkpoint {checkpoint}"
        state = read_state_dict(checkpoint, what)
        key = _timm_classifier_key(config)
        head = state.get(key) if key else None
        classes = num_classes or (int(head.shape[0]) if head is not None and head.dim() >= 2 else None) or 1000
        with torch.random.fork_rng(devices=[]):
            module = _timm_create(timm, base, arch, pretrained=False, num_classes=classes)
        load_into(module, state, what, arch)
        return _Built(module, None, classes, None, preprocessing, f"checkpoint {checkpoint} (state_dict) into {arch}")
    if weights is None:
        with _seeded(seed):
            module = _timm_create(timm, base, arch, pretrained=False, num_classes=num_classes or 1000)
        how = f"seed {seed}" if seed is not None else "unseeded"
        return _Built(module, None, num_classes or 1000, None, preprocessing, f"timm {base} random init ({how})")
    if config is None:
        raise WeightsUnavailable(f"timm {base} has no pretrained weights; pass checkpoint: <path> or leave "
                                 "weights out for random init")
    full = f"{base}.{config.tag}" if getattr(config, "tag", None) else full
    classes = num_classes or int(getattr(config, "num_classes", 0) or 1000)
    cached = _timm_cached_file(config)
    overlay: dict[str, Any] = {}
    if cached is not None:
        overlay = {"pretrained_cfg_overlay": {"file": str(cached)}}
    elif _offline():
        raise WeightsUnavailable(f"timm weights {full} are not available offline: they are not in the Hugging "
                                 f"Face cache ({_hf_cache_dir()}) nor in {Path(torch.hub.get_dir()) / 'checkpoints'}; "
                                 "download them once where the network is reachable (timm.create_model("
                                 f"'{full}', pretrained=True)) or pass checkpoint: <path>")
    try:
        with _download_timeout(None if cached else _DOWNLOAD_TIMEOUT_S):
            module = _timm_create(timm, full, arch, pretrained=True, num_classes=classes, **overlay)
    except ModelError:
        raise
    except Exception as exc:  # timm and huggingface_hub raise their own types for a failed download
        if cached is None:
            raise WeightsUnavailable(f"timm weights {full} could not be downloaded ({_first_line(exc)}); pass "
                                     "checkpoint: <path> or set MODEL_AUDIT_OFFLINE=1 to fail at once") from None
        raise ModelError(f"cached timm weights {cached} cannot be used for {full}: {_first_line(exc)}") from None
    return _Built(module, getattr(config, "tag", None) or "DEFAULT", classes, None, preprocessing,
                  f"timm {full} pretrained ({cached or 'downloaded'})")


def _timm_create(timm: Any, name: str, arch: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ModelError(f"timm cannot build {arch} ({', '.join(f'{k}={v}' for k, v in kwargs.items())}): "
                         f"{_first_line(exc)}") from None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        return "~/.cache/huggingface/hub"


def _timm_cached_file(config: Any) -> Path | None:
    """The pretrained file already on this machine: the Hugging Face cache entry timm would download,
    or a file named like its URL under torch's hub checkpoints; None when neither is there."""
    if config is None:
        return None
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            repo, _, revision = hub_id.partition("@")
            for filename in (getattr(config, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin",
                             "open_clip_pytorch_model.bin"):
                if not filename:
                    continue
                found = try_to_load_from_cache(repo, filename, revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = getattr(config, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if candidate.is_file():
            return candidate
    return None


@contextlib.contextmanager
def _safe_torch_load() -> Iterator[None]:
    """torchvision reads hub files with ``weights_only=False``; torch's own switch forces it on.

    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` is read by every ``torch.load`` call; it is set only while
    torchvision loads and restored afterwards.
    """
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _download_timeout(seconds: float | None) -> Iterator[None]:
    """A short socket timeout while a download may happen, so no network means a quick, clear error."""
    if seconds is None:
        yield
        return
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Random init from ``seed`` without disturbing the caller's random number stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- checkpoints
def _from_checkpoint(arch: str, path: Path, num_classes: int | None, target: torch.device) -> _Built:
    _check_file(path)
    if _is_torchscript(path):
        return _from_torchscript(arch, path, target)
    what = f"checkpoint {path}"
    state = read_state_dict(path, what)
    entry = zoo().get(arch)
    if entry is not None:
        module = entry.build()
        preprocessing = _square(entry.input_size, entry.mean, entry.std)
        categories: Categories | None = Categories(list(entry.categories))
        source = f"checkpoint {path} (state_dict) into zoo {arch}"
    else:
        check_arch(arch)
        classes = num_classes or _classes_in(arch, state) or 1000
        config: dict[str, Any] = {"num_classes": classes}
        if arch in _AUX_PREFIX:  # fine-tuned googlenet / inception_v3 are often saved without aux heads
            config.update(aux_logits=any(k.startswith(_AUX_PREFIX[arch]) for k in state), init_weights=False)
        with torch.random.fork_rng(devices=[]):  # the init is overwritten; keep the caller's RNG as it was
            module = torchvision.models.get_model(arch, weights=None, **config)
        preprocessing = _preprocessing_of(_default_weights(arch))
        categories = None
        source = f"checkpoint {path} (state_dict) into {arch}"
    load_into(module, state, what, arch)
    outputs = _last_weight_rows(module.state_dict())
    if categories is not None and outputs is not None and outputs != len(categories):
        categories = None
    return _Built(module, None, outputs, categories, preprocessing, source)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ModelError(f"checkpoint {path}: file not found")
    if path.is_dir():
        raise ModelError(f"checkpoint {path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise ModelError(f"checkpoint {path}: file is empty (0 bytes)")


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with compiled code next to the tensors."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _from_torchscript(arch: str, path: Path, target: torch.device) -> _Built:
    """A TorchScript archive, mirrored by :mod:`audit.torchscript` so its layers take forward hooks."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's notice that it prefers torch.export
            script = torch.jit.load(str(path), map_location=target)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelError(f"checkpoint {path}: cannot load this TorchScript archive: {_first_line(exc)}") from None
    blocked = torchscript.blocker(script)
    if blocked is not None:
        raise ModelError(f"checkpoint {path} (TorchScript): no layer inside it can be explained: its forward "
                         f"uses {blocked}, which model-audit cannot step through to hook a layer; save it "
                         "with torch.jit.trace(model, example) instead, or save model.state_dict() and name "
                         "the architecture")
    module = torchscript.hookable(script, f"checkpoint {path} (TorchScript)")
    entry = zoo().get(arch)
    if entry is not None:
        preprocessing = _square(entry.input_size, entry.mean, entry.std)
    else:
        preprocessing = _preprocessing_of(_default_weights(arch))
    # the number of outputs is a guess from the last weight matrix; the engine checks it on the first run
    return _Built(module, None, None, _default_categories(arch, _last_weight_rows(module.state_dict())),
                  preprocessing, f"checkpoint {path} (TorchScript)")


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``path``: plain, inside a ``{"state_dict": ...}``-style wrapper, or saved from
    DataParallel (``module.`` prefixes stripped); one :class:`ModelError` line when it is none of these."""
    return read_weights_file(path, what)[0]


def read_weights_file(path: Path, what: str) -> tuple[dict[str, torch.Tensor], bool]:
    """``(state_dict, as_saved)``: ``as_saved`` is false when the file holds a wrapper or prefixed keys, so
    ``model-audit weights`` knows to install the bare state_dict torchvision reads instead of the file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if _is_refusal(exc):
            raise ModelError(_refused(path, exc, what)) from None
        raise ModelError(f"{what}: corrupt or not a PyTorch file ({_pickle_reason(exc)})") from None
    except FileNotFoundError:
        raise ModelError(f"{what}: file not found") from None
    except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{what}: corrupt or not a PyTorch file ({_first_line(exc)})") from None
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        # torch's legacy (pre-zip) reader trips over arbitrary bytes in its own ways: a text file
        # gives KeyError: 101
        raise ModelError(f"{what}: corrupt or not a PyTorch file ({type(exc).__name__}: {exc})") from None
    state = _unwrap(data)
    if state is None:
        keys = ", ".join(map(str, list(data)[:6])) if isinstance(data, dict) else type(data).__name__
        raise ModelError(f"{what} holds no state_dict of tensors (found: {keys}); save "
                         "model.state_dict() or a dict with a 'state_dict' entry")
    as_saved = state is data
    metadata = getattr(state, "_metadata", None)
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from DataParallel / DDP
        state = _with_metadata({k[len("module."):]: v for k, v in state.items()}, metadata, "module")
        as_saved = False
    return state, as_saved


def _unwrap(data: Any) -> dict[str, torch.Tensor] | None:
    """The tensor dict inside ``data``, as saved: ``model.state_dict()`` is an OrderedDict whose
    ``_metadata`` attribute holds each module's state-dict version, which some modules need to read
    it (MNASNet refuses a state_dict without one), so the dict itself is returned, never a copy."""
    if _is_tensor_dict(data):
        return data
    if isinstance(data, dict):
        for key in _WRAPPER_KEYS:
            if _is_tensor_dict(data.get(key)):
                return data[key]
    return None


def _with_metadata(state: dict[str, torch.Tensor], metadata: Any, strip: str) -> dict[str, torch.Tensor]:
    """``state`` (keys already without the ``strip.`` prefix) with the saved per-module versions, their
    module names stripped the same way, so a DataParallel checkpoint keeps them too."""
    if not isinstance(metadata, dict):
        return state
    kept: Any = collections.OrderedDict(state)
    kept._metadata = collections.OrderedDict(
        (name[len(strip) + 1:] if name.startswith(strip + ".") else ("" if name == strip else name), value)
        for name, value in metadata.items())
    return kept


def _is_tensor_dict(value: Any) -> bool:
    return (isinstance(value, dict) and bool(value)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


_REFUSED_GLOBAL = re.compile(r"unsupported global:? GLOBAL (\S+)", re.IGNORECASE)
_REFUSAL_MARKERS = ("unsupported global", "unsupported class", "unrecognized function", "not an allowed global",
                    "is blocked")


def _is_refusal(exc: BaseException) -> bool:
    """weights_only refuses objects it does not allow; other unpickling errors mean a broken file."""
    text = str(exc).lower()
    return any(marker in text for marker in _REFUSAL_MARKERS)


def _pickle_reason(exc: BaseException) -> str:
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    text = re.split(r"Re-running `?torch\.load`? with `?weights_only`? set to `?False`?", text, maxsplit=1)[0]
    return " ".join(text.split("Check the documentation", 1)[0].split()) or type(exc).__name__


def _refused(path: Path, exc: BaseException, what: str | None = None) -> str:
    found = _REFUSED_GLOBAL.search(str(exc))
    holds = f" ({found.group(1)})" if found else ""
    return (f"{what or f'weights file {path}'} contains arbitrary Python objects{holds} and is refused "
            "for safety (torch.load(weights_only=True) cannot read it); save a state_dict instead: "
            "torch.save(model.state_dict(), path)")


def _classes_in(arch: str, state: Mapping[str, torch.Tensor]) -> int | None:
    """The checkpoint's number of classes, read from the tensor that holds the arch's last layer.

    The layer's name comes from a skeleton built on the ``meta`` device (no memory, no init). Some
    builders compute on tensors while they build (RegNet's block widths call ``.tolist()``), which a
    meta tensor cannot do; for those the checkpoint's own last weight matrix is taken: a state_dict
    lists its modules in definition order, and torchvision classifiers define their head last. A
    wrong guess cannot pass silently: the strict load then names the shape mismatch.
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. inception's notice about its future default init
            skeleton = torchvision.models.get_model(arch, weights=None)
        last = _last_weight_key(skeleton.state_dict())
    except (NotImplementedError, RuntimeError):
        last = _last_weight_key(state)
    tensor = state.get(last) if last is not None else None
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() >= 2 else None


def _last_weight_key(state: Mapping[str, Any]) -> str | None:
    keys = [k for k, v in state.items()
            if k.endswith("weight") and isinstance(v, torch.Tensor) and v.dim() >= 2]
    return keys[-1] if keys else None


def _last_weight_rows(state: Mapping[str, Any]) -> int | None:
    key = _last_weight_key(state)
    return int(state[key].shape[0]) if key is not None else None


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], what: str, arch: str) -> None:
    """Load ``state`` strictly, or raise one message listing what does not fit."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = [_listed(len(missing), "missing key", missing),
                _listed(len(unexpected), "unexpected key", unexpected),
                _listed(len(shapes), "shape mismatch", shapes, plural="shape mismatches")]
    problems = [p for p in problems if p]
    if problems:
        raise ModelError(f"{what} does not fit {arch}: " + ", ".join(problems))
    if not isinstance(getattr(state, "_metadata", None), dict):
        # saved as a plain dict (a copy or a comprehension drops the versions): the keys and shapes
        # fit, so read it as written by this model's own code (MNASNet refuses a missing version)
        state = collections.OrderedDict(state)
        state._metadata = getattr(expected, "_metadata", collections.OrderedDict())  # type: ignore[attr-defined]
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # a module's own _load_from_state_dict may refuse the values (MNASNet: a version it does not know)
        raise ModelError(f"{what} does not fit {arch}: {_first_line(exc)}") from None


def _listed(count: int, noun: str, items: Sequence[str], plural: str | None = None) -> str:
    if not count:
        return ""
    more = ", ..." if count > _SHOW else ""
    word = noun if count == 1 else (plural or noun + "s")
    return f"{count} {word} ({', '.join(items[:_SHOW])}{more})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    # torch's zip reader appends a paragraph of advice to "failed finding central directory"
    return text.splitlines()[0].split(" This is an internal miniz error.", 1)[0]


# ------------------------------------------------------------------------------------------ provided
@dataclass(frozen=True, eq=False)
class ProvidedModel:
    """A model a user's own code builds (``pytest_audit_make_model`` in their ``conftest.py``).

    ``module`` is any ``nn.Module`` returning logits; ``categories`` its class names (default "class i");
    preprocessing squashes to ``input_size`` with ``mean``/``std`` unless ``preprocessing`` gives both modes.
    """

    module: nn.Module
    categories: Sequence[str] | None = None
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    preprocessing: Mapping[str, Preprocessing] | None = None
    source: str = ""


def load_provided(arch: str, provided: "ProvidedModel | nn.Module", labels: str | Path | None = None,
                  device: str = "cpu") -> LoadedModel:
    """A model from the user's own code, wrapped like any other (labels, preprocessing, fingerprint)."""
    target = _check_device(device)
    if isinstance(provided, nn.Module):
        provided = ProvidedModel(provided)
    if torchscript.is_torchscript(provided.module):  # hooks need the mirror, as for a checkpoint
        provided = dataclasses.replace(provided, module=torchscript.hookable(
            provided.module, f"the TorchScript model {arch!r} from pytest_audit_make_model"))
    if not isinstance(provided, ProvidedModel) or not isinstance(provided.module, nn.Module):
        raise ModelError(f"the model {arch!r} provided by pytest_audit_make_model is {type(provided).__name__}; "
                         "return a torch.nn.Module or audit.models.ProvidedModel")
    preprocessing = dict(provided.preprocessing or _square(provided.input_size, provided.mean, provided.std))
    outputs = _last_weight_rows(provided.module.state_dict())
    categories = Categories(list(provided.categories)) if provided.categories else None
    built = _Built(provided.module, None, len(categories) if categories else outputs, categories, preprocessing,
                   provided.source or f"provided {arch} ({type(provided.module).__name__} from conftest.py)")
    module = built.module.to(target).eval()
    return LoadedModel(module=module, arch=arch, weights=None, checkpoint=None,
                       categories=_categories(arch, built, labels), preprocessing=built.preprocessing,
                       fingerprint=fingerprint(module), device=str(target), source=built.source)

