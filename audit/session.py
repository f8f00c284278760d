"""One audit session: models loaded once, images observed once in batches, results gathered.

The pytest hooks in :mod:`audit.plugin` stay thin and hand everything to an :class:`AuditSession`
(syrupy's shape). The session owns the caches that make the suite fast:

* engines: one loaded model per model spec (and device) for the whole session; a model that fails to
  load fails once, and every case of it reports the same one-line reason;
* observations: the first check of a case observes it *and the next cases of the same model* in one
  batched forward pass, the perturbed variants its check kinds ask for included; every later check of
  those cases reuses the observation;
* prepared inputs: what each check kind resolved against the model (labels, regions), once per case.

It knows no check kind by name: it asks the registry's kinds what they need (``prepare``/``needs``) and
lets them judge (``check``). Kinds get plain data (numpy arrays, class indices) and never see torch.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from PIL import Image

from audit import defaults, regions
from audit.errors import AuditError, SpecError, UnknownNameError, WeightsUnavailable
from audit.kinds.base import ModelContext, RunContext
from audit.registry import Registry
from audit.spec import CaseSpec, ModelSpec, Spec


@dataclass(frozen=True, slots=True)
class CaseRef:
    """A case as the session knows it: where it comes from and the node id prefix of its items."""

    nodeid: str
    spec: Spec
    case: CaseSpec

    @property
    def model(self) -> ModelSpec:
        return self.spec.model


@dataclass(eq=False)
class Observation:
    """What the model did on one case, with what each check kind prepared for it.

    ``explanation`` is the original image's; ``variants`` the explanations of the perturbed images the
    kinds asked for (by variant name); ``subject`` the class the case is about (a kind's, else the top-1).
    """

    ref: CaseRef
    image: Image.Image
    explanation: Any                     # audit.engine.Explanation
    variants: dict[str, Any]
    prepared: dict[str, Any]
    subject: int
    seconds: float
    fingerprint: str
    preprocess: str
    label: Callable[[int], str] = field(repr=False, default=str)
    #: probabilities of the follow-up images a kind asked for once the original was explained (the steps
    #: of deletion/insertion curves), by kind name: (n_images, classes)
    followups: dict[str, Any] = field(default_factory=dict)

    @property
    def case(self) -> CaseSpec:
        return self.ref.case

    @property
    def spec(self) -> Spec:
        return self.ref.spec

    @property
    def target(self) -> int:
        """The class the report explains (kept for callers of the first version)."""
        return self.subject


class ModelUnavailable(AuditError):
    """The model of a case cannot run here (weights not available offline): its cases are skipped."""


class Run(RunContext):
    """The run's options, as the check kinds see them."""

    def __init__(self, update_baselines: bool = False, strict: bool = False):
        self.update_baselines = update_baselines
        self.strict = strict


class _CaseModel(ModelContext):
    """The ``ModelContext`` of one case: lookups against its engine, errors located in its spec."""

    def __init__(self, engine: Any, ref: CaseRef, image: Image.Image, run: Run):
        self.engine, self.ref, self.image, self.run = engine, ref, image, run
        self.base_dir = Path(ref.spec.path).parent

    def error(self, key: str, message: str) -> SpecError:
        case = self.ref.case
        return SpecError(message, self.ref.spec.path, case.line_of(key), f"{_key(case)}.{key}")

    def resolve_class(self, label: Any, key: str) -> int:
        try:
            return self.engine.resolve_class(label)
        except AuditError as exc:
            raise self.error(key, str(exc)) from None

    def label(self, index: int) -> str:
        return self.engine.label(index)

    def mask(self, region: Any, key: str) -> Any:
        """The region's mask; a region wholly outside what the model sees (the part a centre crop
        keeps) is refused: its checks would pass or fail by construction."""
        try:
            mask = region.mask(self.image.size, self.base_dir)
            seen = regions.seen_box(self.image.size, self.engine.loaded.preprocessing[self.ref.model.preprocess])
            regions.check_seen(mask, seen, region.describe(), "avoid" if key.endswith("avoid") else "region")
            return mask
        except SpecError as exc:
            raise self.error(key, exc.message) from None

    def outline(self, region: Any, key: str) -> list:
        try:
            return region.outline(self.image.size, self.base_dir)
        except SpecError as exc:
            raise self.error(key, exc.message) from None


@contextlib.contextmanager
def _long_lived_allocations() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a model load.

    Importing torch and building a model create ~400k objects that live as long as the session; CPython
    would run several full collections over them during the load. Collection is paused for the load
    and restored afterwards (a collector the user disabled stays disabled).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


#: environment variables through which a user has already chosen torch's thread count
THREAD_SETTINGS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def share_cores_between_workers(environ: Any = None) -> int | None:
    """Give each pytest-xdist worker its share of the cores for torch's intra-op threads.

    torch starts one thread per core in every process; ``-n 2`` on two cores then runs four busy
    threads that spin-wait on each other, and the run gets several times slower than serial (18 s
    against 3 s for 200 shapes cases here). Each worker takes ``cores // workers`` threads (at least
    one), unless the user set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``. Returns the count it set.
    """
    environ = os.environ if environ is None else environ
    workers = int(environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers <= 1 or any(environ.get(name) for name in THREAD_SETTINGS):
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // workers)
    torch.set_num_threads(threads)
    return threads


class AuditSession:
    """Session-wide state of the plugin; see the module docstring."""

    def __init__(self, device: str = "cpu", batch_size: int = defaults.BATCH_SIZE, cache_size: int | None = None,
                 update_baselines: bool = False, lookahead: str = "model", registry: Registry | None = None,
                 strict: bool = False, make_model: Callable[..., Any] | None = None):
        """``lookahead``: which not-yet-run cases join a batch: ``model`` (every case of the model, in
        run order: serial runs), ``file`` (the same spec file: xdist with ``--dist loadfile``), ``none``
        (xdist's default scheduling, where a worker cannot know which items it will get: observing
        cases another worker runs would be a second forward pass for those images).
        ``make_model``: the ``pytest_audit_make_model`` hook (a user's own models), or None."""
        self.registry = registry or Registry.default()
        self.run = Run(update_baselines=update_baselines, strict=strict)
        self.make_model = make_model
        self.lookahead = lookahead
        self.update_baselines = update_baselines
        self.device = device
        self.batch_size = max(1, batch_size)
        self.cache_size = cache_size or 4 * self.batch_size
        self.refs: dict[str, CaseRef] = {}
        self.specs: dict[str, Spec] = {}   # the specs collected in this process, by their path as written
        self._queue: dict[tuple, list[str]] = {}
        self._position: dict[str, int] = {}   # a case's index in its model's queue
        self._engines: dict[tuple, Any] = {}
        self._observations: "OrderedDict[str, Observation | AuditError]" = OrderedDict()
        self._remaining: dict[str, int] = {}
        self.stats = {"model_loads": 0, "forward_passes": 0, "images": 0, "variants": 0, "model_load_s": 0.0,
                      "forward_s": 0.0}
        self.model_info: dict[str, dict] = {}

    # -- collection ---------------------------------------------------------------------------------
    def kinds_for(self, case: CaseSpec) -> list[Any]:
        """The case-scope check kinds that give ``case`` an item, in item order.

        A case that cannot be read gets one item (of the first kind) that carries its error.
        """
        kinds = self.registry.kinds("case")
        if case.error is not None:
            return kinds[:1]
        return [k for k in kinds if k.applies(case, self.run)]

    def spec_kinds_for(self, spec: Spec) -> list[Any]:
        """The spec-scope check kinds that give ``spec`` an item (run after its cases)."""
        return [k for k in self.registry.kinds("spec") if k.applies_to_spec(spec, self.run)]

    def schedule(self, refs_and_checks: list[tuple[CaseRef, int]]) -> None:
        """Remember the selected cases in run order (after -k/-m/--lf) and how many checks each has."""
        self.refs.clear()
        self._queue.clear()
        self._position.clear()
        self._remaining.clear()
        for ref, n_checks in refs_and_checks:
            if ref.nodeid not in self.refs:
                self.refs[ref.nodeid] = ref
                queue = self._queue.setdefault(self.model_key(ref.model), [])
                self._position[ref.nodeid] = len(queue)
                queue.append(ref.nodeid)
            self._remaining[ref.nodeid] = self._remaining.get(ref.nodeid, 0) + n_checks

    def model_key(self, model: ModelSpec) -> tuple:
        return (model.key(), self.device)

    # -- models -------------------------------------------------------------------------------------
    def engine(self, model: ModelSpec):
        """The engine of a model spec, loaded on first use and kept for the session."""
        key = self.model_key(model)
        if key not in self._engines:
            self._engines[key] = self._load(model)
        found = self._engines[key]
        if isinstance(found, AuditError):
            raise found
        return found

    def _provided(self, model: ModelSpec) -> Any:
        """A model the user's own code builds: registered by name, or from ``pytest_audit_make_model``."""
        if model.arch in self.registry.models:
            return self.registry.models[model.arch](model, self.device)
        if self.make_model is not None and model.checkpoint is None:
            return self.make_model(model=model, device=self.device)
        return None

    def _load(self, model: ModelSpec):
        started = time.perf_counter()
        try:
            with _long_lived_allocations():
                from audit.engine import Engine   # the first load imports torch
                from audit import models

                share_cores_between_workers()
                provided = self._provided(model)
                if provided is not None:
                    loaded = models.load_provided(model.arch, provided, labels=model.labels, device=self.device)
                else:
                    loaded = models.load(model.arch, weights=model.weights, checkpoint=model.checkpoint,
                                         labels=model.labels, device=self.device, seed=model.seed)
                engine = Engine(loaded)
            if model.cam_layer:
                engine.resolve_layer(model.cam_layer)
            method = self.cam_method_of(model)
        except WeightsUnavailable as exc:
            return ModelUnavailable(str(exc))
        except AuditError as exc:
            return _located(exc, model.location.path, model.location.line, "model")
        self.stats["model_loads"] += 1
        self.stats["model_load_s"] += time.perf_counter() - started
        self.model_info[model_label(model)] = {
            "key": model_label(model), "arch": model.arch, "weights": loaded.weights,
            "checkpoint": str(model.checkpoint) if model.checkpoint else None,
            "fingerprint": loaded.fingerprint, "preprocess": model.preprocess, "device": self.device,
            "source": loaded.source, "cam_layer": model.cam_layer or engine.default_cam_layer,
            "cam_method": method}
        return engine

    def cam_method_of(self, model: ModelSpec) -> str:
        """The CAM method a model spec asks for (checked against the registry), default Grad-CAM."""
        name = model.cam_method or defaults.CAM_METHOD
        self.registry.cam_method(name)   # an unknown name raises UnknownNameError with the close names
        return name

    # -- observations -------------------------------------------------------------------------------
    def observe(self, nodeid: str) -> Observation:
        """The observation of a case; computing it also observes the next cases of the same model."""
        found = self._observations.get(nodeid)
        if found is None:
            self._observe_batch(nodeid)
            found = self._observations[nodeid]
        self._observations.move_to_end(nodeid)
        if isinstance(found, AuditError):
            raise found
        return found

    def done(self, nodeid: str) -> bool:
        """One check of a case finished: drop its observation once every selected check has run (and
        say so: True when the case is finished)."""
        left = self._remaining.get(nodeid, 0) - 1
        self._remaining[nodeid] = left
        if left <= 0:
            self._observations.pop(nodeid, None)
        return left <= 0

    def batch_of(self, nodeid: str) -> list[str]:
        """The cases observed with ``nodeid`` in one forward: it, then the next unobserved cases of the
        same model in run order, walked from it (never the whole queue: at 10,000 cases a scan per batch
        made the run quadratic). One forward explains every image of a batch the same way, so they must
        ask for the same preprocessing, CAM layer and method (two specs may name one model differently),
        and with ``lookahead="file"`` come from the same spec."""
        ref = self.refs[nodeid]
        batch = [nodeid]
        if self.lookahead == "none":
            return batch
        queue = self._queue.get(self.model_key(ref.model), [])
        settings = _explain_settings(ref.model)
        for index in range(self._position.get(nodeid, len(queue)) + 1, len(queue)):
            if len(batch) >= self.batch_size:
                break
            n = queue[index]
            other = self.refs[n]
            if n in self._observations or _explain_settings(other.model) != settings:
                continue
            if self.lookahead == "file" and other.spec.path != ref.spec.path:
                continue
            batch.append(n)
        return batch

    def _observe_batch(self, nodeid: str) -> None:
        ref = self.refs[nodeid]
        batch = self.batch_of(nodeid)
        try:
            engine = self.engine(ref.model)
        except AuditError as exc:
            for n in batch:
                self._store(n, exc)
            return
        cases: list[tuple[CaseRef, Image.Image, dict[str, Any], list]] = []
        for n in batch:
            try:
                cases.append(self._prepare(self.refs[n], engine))
            except AuditError as exc:
                self._store(n, exc)
        if not cases:
            return
        images: list[Image.Image] = []
        targets: list[list[int]] = []
        owners: list[tuple[int, str | None]] = []   # (case index, variant name or None)
        for i, (_, image, _, needs) in enumerate(cases):
            wanted = list(dict.fromkeys(t for need in needs for t in need.targets))
            images.append(image)
            targets.append(wanted)
            owners.append((i, None))
            for need in needs:
                for variant in need.variants:
                    images.append(variant.image)
                    targets.append(wanted)
                    owners.append((i, variant.name))
        layers = list(dict.fromkeys(layer for ref_, _, _, needs in cases
                                    for layer in [*(f.layer for f in ref_.case.features),
                                                  *(lay for need in needs for lay in need.layers)]))
        started = time.perf_counter()
        explanations = engine.explain(
            images, top_k=max(max(c[0].case.top_k for c in cases), defaults.TOP_K),
            cam_layer=ref.model.cam_layer, feature_layers=layers, targets=[t or None for t in targets],
            preprocess=ref.model.preprocess, batch_size=len(images), **self._method_kwargs(ref.model))
        seconds = time.perf_counter() - started
        self.stats["forward_passes"] += 1
        self.stats["images"] += len(cases)
        self.stats["variants"] += len(images) - len(cases)
        self.stats["forward_s"] += seconds
        originals: dict[int, Any] = {}
        variants: dict[int, dict[str, Any]] = {i: {} for i in range(len(cases))}
        for (i, name), explanation in zip(owners, explanations):
            if name is None:
                originals[i] = explanation
            else:
                variants[i][name] = explanation
        followups = self._followups(engine, ref.model, cases, originals)
        for i, (case_ref, image, prepared, needs) in enumerate(cases):
            e = originals[i]
            subject = next((need.subject for need in needs if need.subject is not None), e.top_k[0].index)
            self._store(case_ref.nodeid, Observation(
                case_ref, image, e, variants[i], prepared, int(subject), seconds / len(cases),
                engine.loaded.fingerprint, case_ref.model.preprocess, engine.label, followups[i]))

    def _followups(self, engine: Any, model: ModelSpec, cases: list, originals: dict[int, Any]) -> dict[int, dict]:
        """Images the kinds derive from the original's explanation (``kind.followups(prepared, image,
        explanation)``, e.g. the steps of a deletion curve ordered by the heatmap), predicted for the whole
        batch in one no-grad pass of large chunks; nothing runs when no kind asks."""
        asked: list[tuple[int, str, int, int]] = []   # (case index, kind name, start, stop) in ``pending``
        pending: list[Image.Image] = []
        for i, (case_ref, image, prepared, _) in enumerate(cases):
            for kind in self.kinds_for(case_ref.case):
                make = getattr(kind, "followups", None)
                if make is None:
                    continue
                wanted = list(make(prepared.get(kind.name), image, originals[i]) or ())
                if wanted:
                    asked.append((i, kind.name, len(pending), len(pending) + len(wanted)))
                    pending.extend(wanted)
        found: dict[int, dict] = {i: {} for i in range(len(cases))}
        if not pending:
            return found
        from audit.predict import predictor

        started = time.perf_counter()
        probs = predictor(engine.loaded, model.preprocess, batch_size=256)(pending)
        self.stats["followup_images"] = self.stats.get("followup_images", 0) + len(pending)
        self.stats["followup_s"] = self.stats.get("followup_s", 0.0) + time.perf_counter() - started
        for i, name, start, stop in asked:
            found[i][name] = probs[start:stop]
        return found

    def _method_kwargs(self, model: ModelSpec) -> dict[str, Any]:
        """``cam_method=``: the method object from this session's registry (built in or the user's)."""
        if model.cam_method is None:
            return {}
        return {"cam_method": self.registry.cam_method(model.cam_method)}

    def _store(self, nodeid: str, value: Observation | AuditError) -> None:
        self._observations[nodeid] = value
        while len(self._observations) > self.cache_size:
            self._observations.popitem(last=False)

    def _prepare(self, ref: CaseRef, engine) -> tuple[CaseRef, Image.Image, dict[str, Any], list]:
        """Decode the image and let every check kind of the case resolve its configuration against the
        model; any problem is this case's alone."""
        from audit.images import load_image

        case, path = ref.case, ref.spec.path
        if case.error is not None:
            raise case.error
        for i, request in enumerate(case.features):
            try:
                engine.resolve_layer(request.layer)
            except UnknownNameError as exc:
                raise _located(exc, path, case.line_of(f"features[{i}]"), f"{_key(case)}.features[{i}]")
        try:
            image = load_image(case.image)
        except AuditError as exc:
            raise SpecError(str(exc), path, case.line_of("image"), f"{_key(case)}.image")
        context = _CaseModel(engine, ref, image, self.run)
        prepared: dict[str, Any] = {}
        needs = []
        for kind in self.kinds_for(case):
            prepared[kind.name] = kind.prepare(case.checks.get(kind.name), case, context)
            needs.append(kind.needs(prepared[kind.name]))
        return ref, image, prepared, needs

    def region_mask(self, observation: Observation, region: Any, key: str) -> Any:
        """``region``'s mask on an observed case's image, as the check kinds get it (a region wholly outside
        what the model sees is a ``SpecError`` at the case's line): for callers outside the kinds
        (``model-audit compare``)."""
        engine = self.engine(observation.ref.model)
        return _CaseModel(engine, observation.ref, observation.image, self.run).mask(region, key)

    # -- checks -------------------------------------------------------------------------------------
    def check(self, kind_name: str, observation: Observation):
        """Run one check kind on an observation (pure: nothing here touches torch)."""
        kind = self.registry.check_kinds[kind_name]
        return kind.check(observation.prepared.get(kind_name), observation)

    def kind(self, name: str) -> Any:
        return self.registry.check_kinds[name]


def model_label(model: ModelSpec) -> str:
    """A short human name of a model spec, used as its key in the report."""
    from audit.zoo import ZOO

    if model.checkpoint:
        source = f"checkpoint {model.checkpoint.name}"
    elif model.weights:
        source = f"weights {model.weights}"
    elif model.arch in ZOO:
        source = "shipped weights"
    else:
        source = f"random init, seed {model.seed}"
    return f"{model.arch} ({source}, {model.preprocess})"


def _explain_settings(model: ModelSpec) -> tuple:
    """What one batched ``Engine.explain`` call fixes for all its images, beyond the model itself."""
    return (model.preprocess, model.cam_layer, model.cam_method)


def _key(case: CaseSpec) -> str:
    return case.location.key_path or f"cases[{case.id}]"


def _located(exc: AuditError, path: Path, line: int | None, key_path: str) -> SpecError:
    """Turn a name error found at run time into a spec error that points at the spec line."""
    if isinstance(exc, SpecError) and exc.path is not None:
        return exc
    return SpecError(str(exc), path, line, key_path)
