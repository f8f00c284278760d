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

Under pytest-xdist the workers observe and check; every report carries the case data in its
``user_properties`` and only the controller writes the HTML report (pytest-html's pattern).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from audit.errors import AuditError
from audit.spec import CaseSpec, Spec, is_spec_file, load_spec

SESSION_KEY = pytest.StashKey["Any"]()
RESULTS_KEY = pytest.StashKey["Any"]()


# -- options --------------------------------------------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("model-audit", "model-audit: YAML specs that audit image classifiers")

    def option(name: str, ini_type: str | None, help: str, **kwargs: Any) -> None:
        ini = name.replace("--", "").replace("-", "_")
        group.addoption(name, dest=ini, help=f"{help} (ini: {ini})", **kwargs)
        parser.addini(ini, help=help, type=ini_type, default=kwargs.get("default"))

    option("--audit-device", "string", "device for the models: cpu, cuda, cuda:1 (default cpu)", default=None)
    option("--audit-batch-size", "string", "images per forward pass (default 16)", default=None)
    option("--audit-strict", "bool", "setting for CI gates: cases that cannot run (weights unavailable, "
           "no baseline) are errors instead of skips", action="store_true", default=None)
    option("--audit-report", "string", "write the HTML report and results.json into this folder",
           default=None)
    group.addoption("--audit-report-self-contained", action="store_true", default=False,
                    help="write the report as one HTML file with the images inlined")
    group.addoption("--audit-colormap", default="jet", choices=["jet", "turbo", "viridis"],
                    help="colormap of heatmaps and overlays in the report (default jet, as the classic notebook)")
    group.addoption("--audit-update-baselines", action="store_true", default=False,
                    help="record baselines (predictions and heatmaps) instead of comparing against them")


def _setting(config: pytest.Config, name: str) -> Any:
    value = config.getoption(name)
    return value if value is not None else config.getini(name)


def pytest_configure(config: pytest.Config) -> None:
    from audit.results import ResultCollector
    from audit.session import AuditSession

    config.addinivalue_line("markers", "audit(kind): a model-audit check item (prediction, focus, baseline)")
    device = _setting(config, "audit_device") or "cpu"
    batch = _setting(config, "audit_batch_size") or 16
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
    config.stash[SESSION_KEY] = AuditSession(device=device, batch_size=batch, lookahead=lookahead,
                                             update_baselines=config.getoption("audit_update_baselines"))
    report_dir = _setting(config, "audit_report")
    collector = ResultCollector(
        report_dir=Path(report_dir) if report_dir else None,
        self_contained=config.getoption("audit_report_self_contained"),
        colormap=config.getoption("audit_colormap"),
        run_id=worker.get("audit_run_id") if worker else None,
        is_worker=worker is not None, device=device)
    if report_dir and worker is None:
        try:
            collector.start()
        except AuditError as exc:
            raise pytest.UsageError(str(exc)) from None
    elif report_dir:
        from audit.report import warm_up

        warm_up(page=False)   # this worker draws pictures; the controller writes the page
    config.stash[RESULTS_KEY] = collector
    if worker is None:
        config.pluginmanager.register(collector, "model-audit-results")  # its pytest_runtest_logreport
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(collector), "model-audit-xdist")


class _XdistHooks:
    """Hooks that exist only with pytest-xdist: hand the report's run id to workers, gather their stats."""

    def __init__(self, collector: Any):
        self.collector = collector

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["audit_run_id"] = self.collector.run_id
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

    return CaseScheduling(config, log)


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
    if file_path.suffix in (".yaml", ".yml") and is_spec_file(file_path):
        return SpecFile.from_parent(parent, path=file_path)
    return None


class SpecFile(pytest.File):
    """One spec file: a collector of cases (tavern's shape: the hook only matches names)."""

    def collect(self) -> Iterator[pytest.Item | pytest.Collector]:
        try:
            spec = load_spec(_display_path(self.path))
        except AuditError as exc:
            yield BrokenSpecItem.from_parent(self, name="spec", error=exc)
            return
        for case in spec.cases:
            yield CaseNode.from_parent(self, name=case.id, spec=spec, case=case)


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
        for mark in case.marks:  # already holds the spec-level marks
            self.add_marker(mark)

    def collect(self) -> Iterator[pytest.Item]:
        from audit.session import CaseRef, has_baselines

        ref = CaseRef(self.nodeid, self.spec, self.case)
        kinds = []
        if self.case.error is not None or (self.case.expect is None and self.case.focus is None):
            kinds.append("prediction")
        if self.case.expect is not None:
            kinds.append("prediction")
        if self.case.focus is not None:
            kinds.append("focus")
        if self.case.error is None and has_baselines(self.spec, self.config.getoption("audit_update_baselines")):
            kinds.append("baseline")
        for kind in dict.fromkeys(kinds):
            yield CheckItem.from_parent(self, name=kind, ref=ref, kind=kind)


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
        self.add_marker(pytest.mark.audit(kind))

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
        unusable = getattr(self.observation.prepared, "baseline_error", None) if self.kind == "baseline" else None
        if unusable is not None:   # a tampered baseline: an error of this item, the case's other checks run
            pytest.fail(str(unusable), pytrace=False)

    def runtest(self) -> None:
        from audit.session import NoBaseline

        problem = None
        try:
            result = _audit(self.config).check(self.kind, self.observation)
        except NoBaseline as exc:
            problem = exc
        if problem is not None:
            if _setting(self.config, "audit_strict"):
                pytest.fail(f"{problem} [--audit-strict]", pytrace=False)
            pytest.skip(f"model-audit: {problem}")
        _results(self.config).note_check(self, result)
        if not result.passed:
            raise CheckFailed(result)

    def teardown(self) -> None:
        self.observation = None
        _audit(self.config).done(self.ref.nodeid)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        if isinstance(excinfo.value, CheckFailed):
            case = self.ref.case
            line = case.line_of("expect" if self.kind == "prediction" else self.kind)
            return f"{self.ref.spec.path}:{line}: {case.id} [{self.kind}] failed\n{excinfo.value.result.message}"
        if isinstance(excinfo.value, AuditError):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.ref.spec.path, self.ref.case.location.line - 1, f"{self.ref.case.id}::{self.kind}"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Tell the audit session which cases run, in which order: the batching plan."""
    plan = [(item.ref, 1) for item in session.items if isinstance(item, CheckItem)]
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


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):
        return
    for line in _results(config).summary_lines():
        terminalreporter.write_line(line)
