"""``model-audit merge``: the ``results.json`` of shards combined into one report and one verdict.

CI runs a golden set as N ``--audit-shard K/N`` jobs; each writes its own report folder. This reads
them back (JSON only: no model, no torch), checks that they are shards of one run (no case twice),
copies each shard's pictures into the merged report's own asset folder, recomputes the counts and
every spec's set-level gates over all shards' case records, and writes ``results.json`` and
``index.html`` through the same atomic writer as a run. The merged verdict is what a CI gate reads:
exit 1 when any check or gate failed or errored.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from audit.errors import AuditError

_OUTCOMES = ("passed", "failed", "skipped", "error")
_ORDER = {"error": 3, "failed": 2, "skipped": 1, "passed": 0}


def load_results(folder: Path | str) -> dict:
    """One shard's ``results.json`` (a report folder or the file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / "results.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AuditError(f"{path}: no results.json (was the shard run with --audit-report {path.parent}?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AuditError(f"{path}: not a results.json written by model-audit ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cases"), list) or not isinstance(doc.get("run"), dict):
        raise AuditError(f"{path}: not a results.json written by model-audit (no run and cases)")
    doc["_path"] = path
    return doc


def merge_docs(docs: Sequence[Mapping[str, Any]],
               regate: Callable[[list[dict]], list[dict]] | None = None) -> tuple[dict, list[dict]]:
    """(run, cases) of the merged report.

    Case records are keyed by node id; one that two shards both hold means the shards overlap (run
    with different N, or the same shard twice), which would double-count every set-level number, so
    it is an error. Spec-scope records (gates) are dropped from the shards and rebuilt by ``regate``
    over the merged case records.
    """
    seen: dict[str, str] = {}
    cases: list[dict] = []
    for doc in docs:
        where = str(doc.get("_path", "results.json"))
        for case in doc["cases"]:
            nodeid = case.get("nodeid") or case.get("case_id")
            checks = case.get("checks") or []
            if case.get("scope") == "spec" or (checks and all(c.get("kind") == "gates" for c in checks)):
                continue   # a shard's gates saw part of the set: rebuilt over all shards by regate
            if nodeid in seen:
                raise AuditError(f"{where}: case {nodeid} is also in {seen[nodeid]}: the shards overlap "
                                 f"(run every shard with the same --audit-shard K/N and the same specs)")
            seen[nodeid] = where
            cases.append(dict(case))
    if regate is not None:
        cases.extend(regate(cases))
    runs = [doc["run"] for doc in docs]
    counts = {k: 0 for k in _OUTCOMES}
    for case in cases:
        for check in case.get("checks", []):
            counts[check.get("outcome", "error")] = counts.get(check.get("outcome", "error"), 0) + 1
        if not case.get("outcome"):
            outcomes = [c.get("outcome", "error") for c in case.get("checks", [])] or ["error"]
            case["outcome"] = max(outcomes, key=_ORDER.__getitem__)
    stats: dict[str, float] = {}
    for run in runs:
        for name, value in (run.get("stats") or {}).items():
            if isinstance(value, (int, float)):
                stats[name] = stats.get(name, 0) + value
    models = {json.dumps(m, sort_keys=True): m for run in runs for m in run.get("models") or []}
    started = sorted(r["started"] for r in runs if r.get("started"))
    run = {"started": started[0] if started else dt.datetime.now().isoformat(timespec="seconds"),
           "duration_s": max((r.get("duration_s") or 0 for r in runs), default=0),
           "models": list(models.values()), "versions": runs[0].get("versions", {}) if runs else {},
           "counts": counts, "args": ["model-audit", "merge", *(str(d.get("_path", "")) for d in docs)],
           "device": ",".join(dict.fromkeys(str(r.get("device", "cpu")) for r in runs)),
           "stats": stats, "shards": [{"results": str(d.get("_path", "")), "counts": d["run"].get("counts"),
                                      "duration_s": d["run"].get("duration_s")} for d in docs]}
    return run, cases


def copy_assets(case: dict, source_dir: Path, out_dir: Path, run_id: str) -> dict:
    """The case with its pictures copied from a shard's report folder into ``assets/<run_id>/``."""
    assets = case.get("assets") or {}
    if not assets:
        return case
    target = out_dir / "assets" / run_id
    mapping: dict[str, str] = {}

    def move(rel: Any) -> Any:
        if not isinstance(rel, str) or not rel.startswith("assets/"):
            return rel
        if rel not in mapping:
            src = source_dir / rel
            name = Path(rel).name
            dst = target / name
            if src.is_file() and not dst.exists():
                shutil.copyfile(src, dst)
            mapping[rel] = f"assets/{run_id}/{name}"
        return mapping[rel]

    def walk(value: Any) -> Any:
        if isinstance(value, dict):  # "sizes" is keyed by picture path
            return {move(k): walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return move(value)

    return {**case, "assets": walk(assets)}


def merge(folders: Sequence[Path | str], out_dir: Path | str, self_contained: bool = False,
          regate: Callable[[list[dict]], list[dict]] | None = None) -> tuple[Path, dict]:
    """Merge shard report folders into ``out_dir``; returns (index.html, run)."""
    from audit import report

    if not folders:
        raise AuditError("merge needs at least one shard report folder")
    out_dir = Path(out_dir)
    docs = [load_results(f) for f in folders]
    for doc in docs:
        if Path(doc["_path"]).parent.resolve() == out_dir.resolve():
            raise AuditError(f"{out_dir}: the merged report folder must not be one of the shards' folders")
    report.check_writable(out_dir)
    run_id, _ = report.new_run_dir(out_dir)
    for doc in docs:
        source = Path(doc["_path"]).parent
        doc["cases"] = [copy_assets(c, source, out_dir, run_id) for c in doc["cases"]]
    run, cases = merge_docs(docs, regate)
    index = report.write_report(out_dir, run, cases, run_id, self_contained=self_contained)
    return index, run


def regate_from_specs(cases: list[dict]) -> list[dict]:
    """Each spec's gates over the merged case records, as the record a ``spec.yaml::gates`` item writes.

    The gates' thresholds and the cases' labels come from the spec files themselves (paths as the
    records hold them: run the merge from the folder the shards ran in, as a CI job does).
    """
    from audit import gates as G
    from audit.baselines import BaselineStore
    from audit.kinds.gates import BASELINE_FILE, load_baseline, outcomes
    from audit.spec import load_spec

    by_spec: dict[str, list[dict]] = {}
    for case in cases:
        if case.get("spec"):
            by_spec.setdefault(case["spec"], []).append(case)
    out = []
    for spec_path, spec_cases in by_spec.items():
        try:
            spec = load_spec(spec_path)
        except AuditError as exc:
            raise AuditError(f"cannot recompute the gates of {spec_path}: {exc}") from None
        gates = spec.checks.get("gates")
        if gates is None:
            continue
        metrics = G.set_metrics(outcomes(spec, spec_cases))
        baseline = None
        if gates.uses_baseline:
            baseline = load_baseline(BaselineStore(spec.path).folder / BASELINE_FILE)
        result = G.evaluate_gates(metrics, gates, baseline)
        message = result.message
        if gates.uses_baseline and baseline is None:
            message += "\n(no set-level baseline recorded: the baseline gates were not evaluated)"
        nodeid = f"{spec_path}::gates"
        out.append({"nodeid": nodeid, "spec": spec_path, "line": None, "case_id": f"{Path(spec_path).name} [gates]",
                    "model": None, "image": None, "top_k": [], "checks": [
                        {"kind": "gates", "outcome": "passed" if result.passed else "failed", "message": message,
                         "metrics": [m.to_dict() for m in result.metrics], "nodeid": nodeid}],
                    "error": None, "assets": {}, "kinds": {"gates": {"metrics": metrics.to_dict()}}})
    return out


def verdict(run: Mapping[str, Any]) -> int:
    """The exit code a CI gate reads: 0 when nothing failed or errored, else 1."""
    counts = run.get("counts") or {}
    return 1 if counts.get("failed", 0) or counts.get("error", 0) else 0
