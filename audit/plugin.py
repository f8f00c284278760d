"""pytest plugin: YAML specs become test items; hooks stay thin and hand off to the session objects.

Collection rule: a ``*.yaml``/``*.yml`` file whose top level has a ``cases:`` key, under the paths
pytest collects (``pytest specs/``). Unrelated YAML (CI configs, docker-compose) is never collected.

Node ids: ``specs/shapes/basic.yaml::circle-01::prediction`` (and ``::focus``, ``::baseline``), so
``-k``, ``-m``, ``--lf``, ``-x``, ``--collect-only`` and ``--junitxml`` work as for any test.

Outcomes: a failed check is a *failure*; a problem with the input (bad spec, image, label, layer,
region, model) is an *error* at setup with a one-line message and no traceback into our code; a model
whose weights are not available offline is *skipped* with its reason (an error under
``--audit-strict``). A spec file that cannot be read at all becomes one erroring item rather than a
collection error, because a collection error makes pytest abort the whole session and one bad file
must never stop the others.

Under pytest-xdist the workers observe and check; every report carries the case data (an attribute of
the report, see ``audit.outcomes``) and only the controller writes the HTML report (pytest-html's pattern).
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from audit import defaults
from audit.errors import AuditError
from audit.outcomes import (  # noqa: F401  (hooks: records off junit, dropped once read)
    failure_text, pytest_runtest_logreport, pytest_runtest_makereport)
from audit.kinds.base import NotRecorded
from audit.spec import CaseSpec, Spec, is_spec_file, load_spec

SESSION_KEY = pytest.StashKey["Any"]()
RESULTS_KEY = pytest.StashKey["Any"]()
SHARE_KEY = pytest.StashKey["Any"]()
REGISTRY_KEY = pytest.StashKey["Any"]()


# -- options --------------------------------------------------------------------------------------------
def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from audit import hookspecs

    pluginmanager.add_hookspecs(hookspecs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("model-audit", "model-audit: YAML specs that audit image classifiers")

    def option(name: str, ini_type: str | None, help: str, **kwargs: Any) -> None:
        ini = name.replace("--", "").replace("-", "_")
        group.addoption(name, dest=ini, help=f"{help} (ini: {ini})", **kwargs)
        parser.addini(ini, help=help, type=ini_type, default=kwargs.get("default"))

    option("--audit-device", "string", "device for the models: cpu, cuda, cuda:1 (default cpu)", default=None)
    option("--audit-batch-size", "string", f"images per forward pass (default {defaults.BATCH_SIZE})", default=None)
    option("--audit-strict", "bool", "setting for CI gates: cases that cannot run (weights unavailable, "
           "no baseline) are errors instead of skips", action="store_true", default=None)
    option("--audit-report", "string", "write the HTML report and results.json into this folder",
           default=None)
    group.addoption("--audit-report-self-contained", action="store_true", default=False,
                    help="write the report as one HTML file with the images inlined")
    group.addoption("--audit-colormap", default=defaults.COLORMAP, choices=list(defaults.COLORMAPS),
                    help="colormap of heatmaps and overlays in the report (default jet, as the classic notebook)")
    group.addoption("--audit-shard", default=None, metavar="K/N",
                    help="run only shard K of N (deterministic by spec path and case id; every check of a "
                         "case in one shard); combine the shards' reports with model-audit merge")
    group.addoption("--audit-update-baselines", action="store_true", default=False,
                    help="record baselines (predictions and heatmaps) instead of comparing against them")
    group.addoption("--audit-remove-unused-baselines", action="store_true", default=False,
                    help="delete recorded baselines whose case is gone from its spec")


def _setting(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


def pytest_configure(config: pytest.Config) -> None:
    from audit.results import ResultCollector
    from audit.session import AuditSession

    from audit.registry import Registry

    config.addinivalue_line("markers", "audit(kind): a model-audit check item (the kind is its last name)")
    registry = Registry.default()
    config.hook.pytest_audit_register(registry=registry)
    config.stash[REGISTRY_KEY] = registry
    device = _setting(config, "audit_device") or "cpu"
    batch = _setting(config, "audit_batch_size") or defaults.BATCH_SIZE
    try:
        batch = int(batch)
    except ValueError:
        raise pytest.UsageError(f"--audit-batch-size must be an integer, got {batch!r}") from None
    if batch < 1:   # 0 or a negative count would silently mean 1
        raise pytest.UsageError(f"--audit-batch-size must be at least 1, got {batch}")
    worker = getattr(config, "workerinput", None)
    lookahead = "model"
    if worker is not None:  # which items this worker gets is only known for file-grouped scheduling
        lookahead = worker.get("audit_lookahead", "none")
    def make_model(model: Any, device: str) -> Any:
        return config.hook.pytest_audit_make_model(model=model, device=device)

    audit = AuditSession(device=device, batch_size=batch, lookahead=lookahead,
                         update_baselines=config.getoption("audit_update_baselines"),
                         registry=registry, strict=bool(_setting(config, "audit_strict")), make_model=make_model)
    audit.run.remove_unused_baselines = config.getoption("audit_remove_unused_baselines")
    config.stash[SESSION_KEY] = audit
    report_dir = _setting(config, "audit_report")
    collector = ResultCollector(
        report_dir=Path(report_dir) if report_dir else None,
        self_contained=config.getoption("audit_report_self_contained"),
        colormap=config.getoption("audit_colormap"),
        run_id=worker.get("audit_run_id") if worker else None,
        is_worker=worker is not None, device=device, session=audit)
    if report_dir and worker is None:
        try:
            collector.start()
        except AuditError as exc:
            raise pytest.UsageError(str(exc)) from None
    config.stash[RESULTS_KEY] = collector
    _configure_set_records(config, worker)
    if worker is None:
        config.pluginmanager.register(collector, "model-audit-results")  # its pytest_runtest_logreport
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(collector), "model-audit-xdist")


def _configure_set_records(config: pytest.Config, worker: Any) -> None:
    """What spec-scope items (gates) need: every case's outcomes, and the shard of a sharded run.

    Under xdist the controller creates a private folder for the run and every worker appends its
    cases' outcomes there (:mod:`audit.setrecords`); the controller removes it at the end.
    """
    import tempfile

    from audit.setrecords import CaseResults
    from audit.shards import parse_shard

    audit = config.stash[SESSION_KEY]
    shard_text = config.getoption("audit_shard")
    try:
        audit.shard = parse_shard(shard_text) if shard_text else None
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    share = None
    if worker is not None:
        share = worker.get("audit_share_dir")
    elif config.pluginmanager.hasplugin("xdist") and getattr(config.option, "numprocesses", None):
        share = tempfile.mkdtemp(prefix="model-audit-cases-")
        config.stash[SHARE_KEY] = share
    audit.case_results = CaseResults(share, worker.get("workerid") if worker else None)
    config.pluginmanager.register(audit.case_results, "model-audit-case-results")


def pytest_unconfigure(config: pytest.Config) -> None:
    collector = config.stash.get(RESULTS_KEY, None)
    if collector is not None:
        collector.cases.spool.close()
    share = config.stash.get(SHARE_KEY, None)
    if share:
        import shutil

        shutil.rmtree(share, ignore_errors=True)


class _XdistHooks:
    """Hooks that exist only with pytest-xdist: hand the report's run id to workers, gather their stats."""

    def __init__(self, collector: Any):
        self.collector = collector

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["audit_run_id"] = self.collector.run_id
        node.workerinput["audit_share_dir"] = node.config.stash.get(SHARE_KEY, None)
        # only loadfile hands a worker whole spec files; loadscope's scope of "spec.yaml::case::check"
        # is the case, so looking ahead there would observe cases that other workers run
        by_file = node.config.getoption("dist", "load") == "loadfile"
        node.workerinput["audit_lookahead"] = "file" if by_file else "none"

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """``--dist load`` (what ``-n`` implies), except that the checks of one case share a worker.

        Under plain load scheduling the prediction and focus checks of a case can land on two workers,
        and both then run the model on the same image (39 forward passes for 32 VGG16 cases). Other
        ``--dist`` modes are left to pytest-xdist.
        """
        if config.getoption("dist", "load") != "load":
            return None
        return _case_scheduling(config, log)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        stats = getattr(node, "workeroutput", {}).get("audit_stats")
        if stats:
            self.collector.add_stats(json.loads(stats))


def _case_scheduling(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's load scheduler, except that a chunk sent to a worker never splits a spec case.

    Built on ``LoadScheduling`` (not ``LoadScopeScheduling``, whose worker-loss path can hang the session
    or drop the crash report: pytest-xdist #1323, #1378): a killed worker's running item is reported as
    crashed, its other items go back to the queue and a replacement worker runs them, so the run ends.
    A case's checks are adjacent in the collection and every chunk ends at a case boundary, so they
    share a worker. For a collection without spec items every item is its own group and this is
    exactly ``LoadScheduling``: the plugin changes nothing about how other suites are scheduled.
    """
    from xdist.scheduler import LoadScheduling

    class CaseScheduling(LoadScheduling):
        def _send_tests(self, node: Any, num: int) -> None:
            if self.collection is not None and 0 < num < len(self.pending):
                group = _case_group(self.collection[self.pending[num - 1]])
                if group is not None:
                    while num < len(self.pending) and _case_group(self.collection[self.pending[num]]) == group:
                        num += 1
            super()._send_tests(node, num)

    scheduler = CaseScheduling(config, log)
    return scheduler


def _case_group(nodeid: str) -> str | None:
    """``spec.yaml::case`` for a spec check item (``spec.yaml::case::check``), else None."""
    if nodeid.split("::", 1)[0].endswith((".yaml", ".yml")) and nodeid.count("::") >= 2:
        return nodeid.rsplit("::", 1)[0]
    return None


def _audit(config: pytest.Config):
    return config.stash[SESSION_KEY]


def _results(config: pytest.Config):
    return config.stash[RESULTS_KEY]


# -- collection -----------------------------------------------------------------------------------------
def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.suffix in (".yaml", ".yml") and is_spec_file(file_path, parent.config.stash[REGISTRY_KEY]):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """One spec file: a collector of cases (tavern's shape: the hook only matches names)."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        try:
            spec = load_spec(_display_path(self.path), self.config.stash[REGISTRY_KEY])
        except AuditError as exc:
            yield BrokenSpecItem.from_parent(self, name="spec", error=exc)
            return
        _register_marks(self.config, spec)
        _audit(self.config).specs[str(spec.path)] = spec   # the end-of-run summaries read it, not the file
        for case in spec.cases:
            yield CaseNode.from_parent(self, name=case.id, spec=spec, case=case)
        for kind in _audit(self.config).spec_kinds_for(spec):
            yield SpecCheckItem.from_parent(self, name=kind.name, spec=spec, kind=kind)


@functools.lru_cache(maxsize=None)
def _kind_mark(kind: str) -> pytest.MarkDecorator:
    """``audit(kind)``, one object per kind (marks are immutable): 20,000 items need not hold 20,000."""
    return pytest.mark.audit(kind)


def _marker(name: str, args: dict) -> pytest.MarkDecorator:
    """The pytest marker a spec names, with its arguments (``condition`` is a plain true/false)."""
    kwargs = dict(args)
    decorator = getattr(pytest.mark, name)
    if "condition" in kwargs:
        return decorator(kwargs.pop("condition"), **kwargs)
    return decorator(**kwargs) if kwargs else decorator


def _register_marks(config: pytest.Config, spec: Spec) -> None:
    """Register the custom marks a spec uses, so ``--strict-markers`` accepts them and none warns."""
    known = {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}
    for name in dict.fromkeys(m for case in spec.cases for m in case.marks):
        if name not in known:
            config.addinivalue_line("markers", f"{name}: a mark used by the model-audit spec {spec.path}")
            known.add(name)


def _skipped_before_setup(item: pytest.Item) -> bool:
    """Whether pytest will skip ``item`` without running its setup (a spec's skip, or skipif true, or
    xfail(run=false)): such a case must not join a batch, or its image would still go through the model."""
    for mark in item.iter_markers():
        if mark.name == "skip":
            return True
        if mark.name == "skipif" and mark.args and mark.args[0] is True:
            return True
        if mark.name == "xfail" and mark.kwargs.get("run") is False and (not mark.args or mark.args[0] is True):
            return True
    return False


def _display_path(path: Path) -> Path:
    """The spec path as the user typed it: relative to the working directory when inside it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


class BrokenSpecItem(pytest.Item):
    """Stands for a spec file that cannot be loaded: it errors with the spec's message, others still run."""

    def __init__(self, *, error: AuditError, **kwargs: Any):
        super().__init__(**kwargs)
        self.error = error

    def setup(self) -> None:
        _results(self.config).note_broken(self, str(self.error))
        pytest.fail(str(self.error), pytrace=False)

    def runtest(self) -> None:  # pragma: no cover - setup always fails
        raise self.error

    def reportinfo(self):
        return self.path, getattr(self.error, "line", None), f"{self.path.name} (invalid spec)"


class CaseNode(pytest.Collector):
    """One case of a spec: yields one item per check kind the case asks for."""

    def __init__(self, *, spec: Spec, case: CaseSpec, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.case = case
        for name in case.marks:  # already holds the spec-level marks
            self.add_marker(_marker(name, case.mark_args.get(name, {})))

    def collect(self) -> Iterator[pytest.Item]:
        from audit.session import CaseRef

        ref = CaseRef(self.nodeid, self.spec, self.case)
        for kind in _audit(self.config).kinds_for(self.case):
            yield CheckItem.from_parent(self, name=kind.name, ref=ref, kind=kind.name)


class CheckFailed(AssertionError):
    """A check ran and did not hold; carries the CheckResult for the failure text."""

    def __init__(self, result: Any):
        super().__init__(result.message)
        self.result = result


class CheckItem(pytest.Item):
    """One check of one case: setup observes (batched, cached), runtest checks (pure)."""

    def __init__(self, *, ref: Any, kind: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.ref = ref
        self.kind = kind
        self.observation = None
        self.add_marker(_kind_mark(kind))

    def setup(self) -> None:
        from audit.session import ModelUnavailable

        audit, results = _audit(self.config), _results(self.config)
        problem: AuditError | None = None
        try:
            self.observation = audit.observe(self.ref.nodeid)
        except AuditError as exc:
            problem = exc
        # Outside the except block: the user sees one message, not a chain of exceptions.
        if isinstance(problem, ModelUnavailable):
            results.note_case(self, None, audit)
            if _setting(self.config, "audit_strict"):
                pytest.fail(f"{problem} [--audit-strict: cases that cannot run are errors]", pytrace=False)
            pytest.skip(f"model-audit: {problem}")
        if problem is not None:
            results.note_case(self, None, audit, error=str(problem))
            pytest.fail(str(problem), pytrace=False)
        results.note_case(self, self.observation, audit)
        missing = unusable = None
        try:
            audit.kind(self.kind).ready(self.observation.prepared.get(self.kind), self.observation)
        except NotRecorded as exc:   # nothing recorded to compare with: never a pass
            missing = exc
        except AuditError as exc:    # e.g. a tampered baseline: an error of this item, the others run
            unusable = exc
        if unusable is not None:
            pytest.fail(str(unusable), pytrace=False)
        if missing is not None:
            if _setting(self.config, "audit_strict"):
                pytest.fail(f"{missing} [--audit-strict: a missing recording is an error]", pytrace=False)
            pytest.skip(f"model-audit: {missing}")

    def runtest(self) -> None:
        result = _audit(self.config).check(self.kind, self.observation)
        _results(self.config).note_check(self, result)
        if not result.passed:
            raise CheckFailed(result)

    def teardown(self) -> None:
        self.observation = None
        if _audit(self.config).done(self.ref.nodeid):
            _results(self.config).forget(self.ref.nodeid)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CheckFailed):
            case = self.ref.case
            line = case.line_of(_audit(self.config).kind(self.kind).line_key())
            label_of = _audit(self.config).engine(self.ref.model).label
            origin = f" ({case.location})" if case.location.record else ""   # a dataset record
            return failure_text(self.ref.spec.path, line, f"{case.id}{origin}", self.kind, excinfo.value.result,
                                label_of, one_line=self.config.getoption("tbstyle", "auto") == "line")
        if isinstance(excinfo.value, AuditError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        line = self.ref.case.location.line   # None for a case read from a dataset's annotation file
        return self.ref.spec.path, line - 1 if line else None, f"{self.ref.case.id}::{self.kind}"


class SpecCheckItem(pytest.Item):
    """A check over a whole spec (a spec-scope kind: gates, sanity); it runs after the spec's cases."""

    def __init__(self, *, spec: Spec, kind: Any, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec = spec
        self.kind = kind
        self.add_marker(_kind_mark(kind.name))

    def runtest(self) -> None:
        from audit.kinds.baseline import NoBaseline
        from audit.kinds.gates import NotGated

        problem = None
        try:
            result = self.kind.check_spec(self.spec, _audit(self.config))
        except NotGated as exc:   # a sharded run (model-audit merge decides), or no case selected
            problem = exc
        except NoBaseline as exc:
            if _setting(self.config, "audit_strict"):
                pytest.fail(f"{exc} [--audit-strict]", pytrace=False)
            problem = exc
        if problem is not None:
            pytest.skip(f"model-audit: {problem}")
        _results(self.config).note_spec_check(self, result)
        if not result.passed:
            raise CheckFailed(result)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CheckFailed):
            return f"{self.spec.path}: [{self.kind.name}] failed\n{excinfo.value.result.message}"
        if isinstance(excinfo.value, AuditError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.spec.path, None, f"{self.spec.path.name}::{self.kind.name}"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    """Give every check item a record before pytest may skip it (skip marks run before our setup), so a
    skipped case is still a card of the report and a count of model-audit's summary."""
    if isinstance(item, CheckItem):
        _results(item.config).note_planned(item)
    yield


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list) -> None:
    """Spec-scope items run after every case item (they judge the cases' records); ``--audit-shard K/N``
    keeps the cases of shard K (all checks of a case together)."""
    shard = getattr(_audit(config), "shard", None)
    if shard is not None:
        keep, drop = [], []
        for item in items:
            inside = not isinstance(item, CheckItem) or shard.holds(item.ref.spec.path, item.ref.case.id)
            (keep if inside else drop).append(item)
        if drop:
            config.hook.pytest_deselected(items=drop)
            items[:] = keep
    spec_items = [item for item in items if isinstance(item, SpecCheckItem)]
    if spec_items:
        items[:] = [item for item in items if not isinstance(item, SpecCheckItem)] + spec_items


def pytest_collection_finish(session: pytest.Session) -> None:
    """Tell the audit session which cases run, in which order: the batching plan."""
    plan = [(item.ref, 1) for item in session.items
            if isinstance(item, CheckItem) and not _skipped_before_setup(item)]
    _audit(session.config).schedule(plan)


# -- results ---------------------------------------------------------------------------------------------
def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[RESULTS_KEY].started = time.time()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    audit, collector = _audit(config), _results(config)
    if collector.report_dir is not None:
        from audit.report import flush_assets

        try:
            flush_assets()  # every picture on disk before the controller writes the page
        except OSError as exc:   # a full disk: said once in the summary, and no page with holes is written
            collector.asset_error = f"{type(exc).__name__}: {exc}"
    if hasattr(config, "workeroutput"):
        config.workeroutput["audit_stats"] = json.dumps({"stats": audit.stats, "models": audit.model_info,
                                                         "asset_error": collector.asset_error})
        return
    collector.add_stats({"stats": audit.stats, "models": audit.model_info})
    collector.finish(config, session)
    if collector.report_error and session.exitstatus == pytest.ExitCode.OK:
        # the report that was asked for is not there and the old results.json still is: a CI step that
        # reads it would see the previous run's verdict, so this run must not look like a pass
        session.exitstatus = pytest.ExitCode.INTERNAL_ERROR


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    for line in _results(config).summary_lines():
        terminalreporter.write_line(line)
