"""One audit session: models loaded once, images observed once in batches, results gathered.

The pytest hooks in :mod:`audit.plugin` stay thin and hand everything to an :class:`AuditSession`
(syrupy's shape). The session owns the three caches that make the suite fast:

* engines: one loaded model per model spec (and device) for the whole session; a model that fails to
  load fails once, and every case of it reports the same one-line reason;
* observations: the first check of a case observes it *and the next cases of the same model* in one
  batched forward pass; every later check of those cases reuses the observation;
* prepared inputs: labels, layers, regions and the decoded image of a case, resolved once.

Checks get plain data (numpy arrays, resolved class indices) and never see torch.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

from audit import checks, regions
from audit.errors import AuditError, SpecError, UnknownNameError
from audit.spec import CaseSpec, ModelSpec, Spec


@dataclass(frozen=True)
class CaseRef:
    """A case as the session knows it: where it comes from and the node id prefix of its items."""

    nodeid: str
    spec: Spec
    case: CaseSpec

    @property
    def model(self) -> ModelSpec:
        return self.spec.model


@dataclass
class Prepared:
    """A case's inputs resolved against its model: what the forward pass and the checks consume."""

    ref: CaseRef
    image: Image.Image
    target: int | None
    prediction: checks.PredictionExpectation | None
    expected_labels: set[int]
    baseline_then: Any = None         # audit.baselines.Baseline recorded earlier, or None
    baseline_error: AuditError | None = None
    focus_region: Any = None          # bool mask or None
    avoid_region: Any = None
    region_outlines: list = field(default_factory=list)
    avoid_outlines: list = field(default_factory=list)


@dataclass
class Observation:
    """What the model did on one case: the engine's explanation plus the resolved inputs."""

    prepared: Prepared
    explanation: Any  # audit.engine.Explanation
    seconds: float
    _baseline_now: Any = None

    @property
    def target(self) -> int:
        """The class the focus check and the report explain: the focus target, else the top-1."""
        t = self.prepared.target
        return t if t is not None else self.explanation.top_k[0].index


class ModelUnavailable(AuditError):
    """The model of a case cannot run here (weights not available offline): its cases are skipped."""


class NoBaseline(AuditError):
    """A case of a spec with baselines has none recorded yet: skipped (an error under --audit-strict)."""


def has_baselines(spec: Spec, updating: bool) -> bool:
    """Whether the cases of a spec get a ``::baseline`` item: when recording, or when any is recorded."""
    from audit.baselines import BaselineStore

    return updating or BaselineStore(spec.path).exists()


@contextlib.contextmanager
def _long_lived_allocations() -> Iterator[None]:
    """Keep the cyclic garbage collector out of a model load, then out of what the load left alive.

    Importing torch and building a model create ~400k objects that live as long as the session. Each
    full collection walks all of them (about 0.1 s on one core); left alone, CPython runs several
    during the import and one every few thousand allocations afterwards (and pytest calls
    ``gc.collect()`` twice at exit). So collection is paused during the load, and ``gc.freeze`` (the
    CPython docs' advice for long-lived processes) moves the survivors to a permanent generation.
    Reference counting still frees them; a full pass after this walks only the test session's objects.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
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

    def __init__(self, device: str = "cpu", batch_size: int = 16, cache_size: int | None = None,
                 update_baselines: bool = False, lookahead: str = "model"):
        """``lookahead``: which not-yet-run cases join a batch: ``model`` (every case of the model, in
        run order: serial runs), ``file`` (the same spec file: xdist with ``--dist loadfile``), ``none``
        (xdist's default scheduling, where a worker cannot know which items it will get: observing
        cases another worker runs would be a second forward pass for those images)."""
        self.lookahead = lookahead
        self.update_baselines = update_baselines
        self.device = device
        self.batch_size = max(1, batch_size)
        self.cache_size = cache_size or 4 * self.batch_size
        self.refs: dict[str, CaseRef] = {}
        self._queue: dict[tuple, list[str]] = {}
        self._engines: dict[tuple, Any] = {}
        self._observations: "OrderedDict[str, Observation | AuditError]" = OrderedDict()
        self._remaining: dict[str, int] = {}
        self.stats = {"model_loads": 0, "forward_passes": 0, "images": 0, "model_load_s": 0.0,
                      "forward_s": 0.0}
        self.model_info: dict[str, dict] = {}

    # -- collection ---------------------------------------------------------------------------------
    def schedule(self, refs_and_checks: list[tuple[CaseRef, int]]) -> None:
        """Remember the selected cases in run order (after -k/-m/--lf) and how many checks each has."""
        self.refs.clear()
        self._queue.clear()
        self._remaining.clear()
        for ref, n_checks in refs_and_checks:
            if ref.nodeid not in self.refs:
                self.refs[ref.nodeid] = ref
                self._queue.setdefault(self.model_key(ref.model), []).append(ref.nodeid)
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

    def _load(self, model: ModelSpec):
        from audit.errors import WeightsUnavailable

        started = time.perf_counter()
        try:
            with _long_lived_allocations():
                from audit.engine import Engine   # the first load imports torch
                from audit.models import load

                share_cores_between_workers()

                loaded = load(model.arch, weights=model.weights, checkpoint=model.checkpoint, labels=model.labels,
                              device=self.device, seed=model.seed)
                engine = Engine(loaded)
            if model.cam_layer:
                engine.resolve_layer(model.cam_layer)
        except WeightsUnavailable as exc:
            return ModelUnavailable(str(exc))
        except UnknownNameError as exc:
            return _located(exc, model.location.path, model.location.line, "model")
        except AuditError as exc:
            return _located(exc, model.location.path, model.location.line, "model")
        self.stats["model_loads"] += 1
        self.stats["model_load_s"] += time.perf_counter() - started
        self.model_info[model_label(model)] = {
            "key": model_label(model), "arch": model.arch, "weights": loaded.weights,
            "checkpoint": str(model.checkpoint) if model.checkpoint else None,
            "fingerprint": loaded.fingerprint, "preprocess": model.preprocess, "device": self.device,
            "source": loaded.source, "cam_layer": model.cam_layer or engine.default_cam_layer}
        return engine

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

    def done(self, nodeid: str) -> None:
        """One check of a case finished: drop its observation once every selected check has run."""
        left = self._remaining.get(nodeid, 0) - 1
        self._remaining[nodeid] = left
        if left <= 0:
            self._observations.pop(nodeid, None)

    def _observe_batch(self, nodeid: str) -> None:
        ref = self.refs[nodeid]
        queue = self._queue.get(self.model_key(ref.model), [nodeid]) if self.lookahead != "none" else [nodeid]
        if self.lookahead == "file":
            queue = [n for n in queue if self.refs[n].spec.path == ref.spec.path]
        start = queue.index(nodeid) if nodeid in queue else 0
        batch = [n for n in queue[start:] if n not in self._observations][: self.batch_size]
        if nodeid not in batch:
            batch = [nodeid] + batch[: self.batch_size - 1]
        try:
            engine = self.engine(ref.model)
        except AuditError as exc:
            for n in batch:
                self._store(n, exc)
            return
        prepared: list[Prepared] = []
        for n in batch:
            try:
                prepared.append(self._prepare(self.refs[n], engine))
            except AuditError as exc:
                self._store(n, exc)
        if not prepared:
            return
        layers = list(dict.fromkeys(f.layer for p in prepared for f in p.ref.case.features))
        started = time.perf_counter()
        explanations = engine.explain(
            [p.image for p in prepared], top_k=max(max(p.ref.case.top_k, 5) for p in prepared),
            cam_layer=ref.model.cam_layer, feature_layers=layers,
            targets=[_targets(p) for p in prepared], preprocess=ref.model.preprocess, batch_size=len(prepared))
        seconds = time.perf_counter() - started
        self.stats["forward_passes"] += 1
        self.stats["images"] += len(prepared)
        self.stats["forward_s"] += seconds
        for p, e in zip(prepared, explanations):
            self._store(p.ref.nodeid, Observation(p, e, seconds / len(prepared)))

    def _store(self, nodeid: str, value: Observation | AuditError) -> None:
        self._observations[nodeid] = value
        while len(self._observations) > self.cache_size:
            self._observations.popitem(last=False)

    def _prepare(self, ref: CaseRef, engine) -> Prepared:
        """Resolve a case's labels, layers, image and regions; any problem is this case's alone."""
        from audit.images import load_image

        case, path = ref.case, ref.spec.path
        if case.error is not None:
            raise case.error
        for i, request in enumerate(case.features):
            try:
                engine.resolve_layer(request.layer)
            except UnknownNameError as exc:
                raise _located(exc, path, case.line_of(f"features[{i}]"), f"{_key(case)}.features[{i}]")
        prediction, expected = self._prediction(ref, engine)
        target = None
        if case.focus is not None and case.focus.target is not None:
            target = self._resolve(engine, case.focus.target, ref, "focus.target")
        try:
            image = load_image(case.image)
        except AuditError as exc:
            raise SpecError(str(exc), path, case.line_of("image"), f"{_key(case)}.image")
        prepared = Prepared(ref, image, target, prediction, expected)
        if not self.update_baselines and has_baselines(ref.spec, False):
            from audit.baselines import BaselineStore

            try:
                prepared.baseline_then = BaselineStore(ref.spec.path).load(case.id, num_classes=len(engine.categories))
            except AuditError as exc:  # a corrupt baseline fails the baseline check, not the others
                prepared.baseline_error = exc
        if case.focus is not None:
            base = Path(path).parent
            size = image.size
            for attr, outlines, key in (("region", "region_outlines", "focus.region"),
                                        ("avoid", "avoid_outlines", "focus.avoid")):
                value = getattr(case.focus, attr)
                if not value:
                    continue
                try:
                    mask = regions.region_mask(list(value), size, base)
                    setattr(prepared, outlines, regions.region_outline(list(value), size, base))
                except SpecError as exc:
                    raise exc.located(path, case.line_of(key), f"{_key(case)}.{key}")
                setattr(prepared, "focus_region" if attr == "region" else "avoid_region", mask)
        return prepared

    def _prediction(self, ref: CaseRef, engine) -> tuple[checks.PredictionExpectation | None, set[int]]:
        expect = ref.case.expect
        if expect is None:
            return None, set()

        def many(name: str) -> tuple[int, ...]:
            return tuple(self._resolve(engine, label, ref, f"expect.{name}[{i}]")
                         for i, label in enumerate(getattr(expect, name)))

        top1 = self._resolve(engine, expect.top1, ref, "expect.top1") if expect.top1 is not None else None
        expectation = checks.PredictionExpectation(
            top_k=ref.case.top_k, top1=top1, in_top_k=many("in_top_k"), any_in_top_k=many("any_in_top_k"),
            not_in_top_k=many("not_in_top_k"), min_prob=expect.min_prob)
        expected = {i for i in (top1, *expectation.in_top_k, *expectation.any_in_top_k) if i is not None}
        return expectation, expected

    @staticmethod
    def _resolve(engine, label: Any, ref: CaseRef, key: str) -> int:
        try:
            return engine.resolve_class(label)
        except AuditError as exc:
            raise _located(exc, ref.spec.path, ref.case.line_of(key), f"{_key(ref.case)}.{key}")

    # -- checks -------------------------------------------------------------------------------------
    def check(self, kind: str, observation: Observation, engine=None) -> checks.CheckResult:
        """Run one check kind on an observation (pure functions; nothing here touches torch)."""
        prepared, explanation = observation.prepared, observation.explanation
        if kind == "prediction":
            return checks.check_prediction(explanation.top_k, prepared.prediction, self._name_of(prepared))
        if kind == "focus":
            focus = prepared.ref.case.focus
            target = prepared.target if prepared.target is not None else explanation.top_k[0].index
            heat = explanation.cams[target]
            expectation = checks.FocusExpectation(
                region=prepared.focus_region, region_desc=regions.describe(list(focus.region or [])),
                min_energy=focus.min_energy, pointing_game=focus.pointing_game,
                tolerance_px=focus.tolerance_px, min_iou=focus.min_iou, iou_threshold=focus.iou_threshold,
                min_rank_accuracy=focus.min_rank_accuracy, avoid=prepared.avoid_region,
                avoid_desc=regions.describe(list(focus.avoid)) if focus.avoid else "",
                max_energy_in_avoid=focus.max_energy_in_avoid,
                target_desc=f"{self._name_of(prepared)(target)!r} (#{target})")
            return checks.check_focus(heat, expectation)
        if kind == "baseline":
            return self._check_baseline(observation)
        raise ValueError(f"unknown check kind {kind!r}")

    def baseline_now(self, observation: Observation):
        """Today's baseline record of a case (built once: it hashes the image file)."""
        from audit.baselines import Baseline

        if observation._baseline_now is None:
            ref, then = observation.prepared.ref, observation.prepared.baseline_then
            engine = self.engine(ref.model)
            observation._baseline_now = Baseline.from_explanation(
                ref.case.id, observation.explanation, ref.case.image, engine.loaded.fingerprint,
                ref.model.preprocess, target=then.target if then is not None else observation.target)
        return observation._baseline_now

    def _check_baseline(self, observation: Observation) -> checks.CheckResult:
        from audit.baselines import BaselineStore, compare

        prepared = observation.prepared
        ref = prepared.ref
        if prepared.baseline_error is not None:
            raise prepared.baseline_error
        now = self.baseline_now(observation)
        if self.update_baselines:
            paths = BaselineStore(ref.spec.path).save(now)
            return checks.CheckResult("baseline", True, f"baseline recorded: {paths[0]}", ())
        if prepared.baseline_then is None:
            raise NoBaseline(f"no baseline for {ref.case.id} in {BaselineStore(ref.spec.path).folder}; "
                             f"record it with --audit-update-baselines")
        return compare(prepared.baseline_then, now, ref.case.baseline)

    def _name_of(self, prepared: Prepared):
        engine = self._engines[self.model_key(prepared.ref.model)]
        return engine.label


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


def _key(case: CaseSpec) -> str:
    return case.location.key_path or f"cases[{case.id}]"


def _located(exc: AuditError, path: Path, line: int | None, key_path: str) -> SpecError:
    """Turn a name error found at run time into a spec error that points at the spec line."""
    return SpecError(str(exc), path, line, key_path)


def heat_for_report(observation: Observation) -> np.ndarray:
    """The heatmap the report shows: the focus target's, else the top-1's."""
    return observation.explanation.cams[observation.target]


def _targets(prepared: Prepared) -> list[int] | None:
    """Classes to explain besides the top-1: the focus target and the class the baseline recorded."""
    wanted = [prepared.target] if prepared.target is not None else []
    if prepared.baseline_then is not None:
        wanted.append(int(prepared.baseline_then.target))
    return wanted or None
