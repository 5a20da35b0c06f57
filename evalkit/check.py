"""Threshold checks on metrics.json rows, baseline comparison and JUnit XML.

Conditions follow Evidently's names: ``gt gte lt lte eq`` and ``approx`` (relative and
absolute tolerance), plus ``max_drop`` against a baseline run. A ``where`` selector matches
rows by model, layer and method with glob patterns. A check of severity ``warn`` never fails
the run. Exit codes: 0 all passed (warnings allowed), 1 a failing check.
"""
from __future__ import annotations

import json
import math
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Iterable, Optional

from evalkit.errors import EvalkitError
from evalkit.results import CheckResult

_SYMBOL = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<=", "eq": "=="}
_TEST = {
    "gt": lambda v, t: v > t,
    "gte": lambda v, t: v >= t,
    "lt": lambda v, t: v < t,
    "lte": lambda v, t: v <= t,
    "eq": lambda v, t: v == t,
}


def _key(row: dict) -> tuple:
    return (row.get("model"), row.get("layer"), row.get("method"))


def _defined(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _conditions(check) -> list:
    """``[(label, test(value, baseline_value) -> (ok, detail))]`` for one check."""
    out = []
    for op in ("gt", "gte", "lt", "lte", "eq"):
        t = getattr(check, op)
        if t is not None:
            out.append((f"{_SYMBOL[op]} {t:g}", lambda v, b, op=op, t=t: (_TEST[op](v, t), "")))
    if check.approx is not None:
        a = check.approx

        def approx(v, b, a=a):
            tol = max(a.relative * abs(a.value), a.absolute)
            return abs(v - a.value) <= tol, f"|{v:.6g} - {a.value:g}| tolerance {tol:.3g}"

        out.append((f"approx {a.value:g} (rel {a.relative:g}, abs {a.absolute:g})", approx))
    if check.max_drop is not None:
        def drop(v, b, m=check.max_drop):
            if b is None:
                return None, "no baseline value"
            return (b - v) <= m + 1e-12, f"baseline {b:.4f}, drop {b - v:+.4f}"

        out.append((f"drop <= {check.max_drop:g} vs baseline", drop))
    return out


def evaluate_checks(rows: Iterable[dict], checks: Iterable, *, baseline_rows: Optional[Iterable[dict]] = None) -> list:
    """Evaluate every check on every row its ``where`` selects.

    Parameters
    ----------
    rows : metrics.json rows (dicts with model, layer, method and metric keys)
    checks : :class:`evalkit.config.CheckConfig` objects
    baseline_rows : rows of an earlier run, for ``max_drop``

    Returns
    -------
    list of :class:`CheckResult`, one per (check, matching row); a check that matches no row
    gives one failing result that says so.
    """
    rows = list(rows)
    baseline = {_key(r): r for r in (baseline_rows or [])}
    results = []
    for i, check in enumerate(checks):
        w = check.where
        matched = [r for r in rows if fnmatchcase(str(r.get("model")), w.model)
                   and fnmatchcase(str(r.get("layer")), w.layer) and fnmatchcase(str(r.get("method")), w.method)]
        conds = _conditions(check)
        label = " and ".join(c[0] for c in conds)
        name = check.name or f"{check.metric} {label}"
        bad = "fail" if check.severity == "fail" else "warn"
        if not matched:
            results.append(CheckResult(name, check.metric, w.model, w.layer, w.method, label, None, bad, check.severity,
                                       f"checks[{i}]: no metrics row matches model={w.model!r} layer={w.layer!r} method={w.method!r}"))
            continue
        for r in matched:
            v = r.get(check.metric)
            base = baseline.get(_key(r), {}).get(check.metric)
            base = base if _defined(base) else None
            if not _defined(v):
                status, msg = bad, f"{check.metric} is not defined for this row"
            else:
                status, notes = "pass", []
                for text, test in conds:
                    ok, detail = test(float(v), base)
                    if ok is None:  # max_drop without a baseline
                        notes.append(f"{text}: skipped ({detail}; pass --baseline DIR)")
                        if status == "pass" and len(conds) == 1:
                            status = "skip"
                        continue
                    if not ok:
                        status = bad
                    notes.append(f"{text}: {'ok' if ok else 'FAILED'}" + (f" ({detail})" if detail else ""))
                msg = "; ".join(notes)
            results.append(CheckResult(name, check.metric, str(r.get("model")), str(r.get("layer")), str(r.get("method")),
                                       label, float(v) if _defined(v) else None, status, check.severity, msg))
    return results


def exit_code(results: Iterable[CheckResult]) -> int:
    """1 when a check of severity ``fail`` failed, else 0."""
    return 1 if any(r.status == "fail" for r in results) else 0


def describe(r: CheckResult) -> str:
    """One line for the terminal."""
    value = "n/a" if r.value is None else f"{r.value:.4f}"
    return f"{r.status.upper():5} {r.name} [{r.model}/{r.layer}/{r.method}]: {r.metric} = {value}, expected {r.condition}" + (
        f" — {r.message}" if r.status != "pass" and r.message else "")


def junit_xml(results: Iterable[CheckResult], *, suite: str = "evalkit") -> str:
    """JUnit XML that CI systems read: one testcase per result, ``<failure>`` for failures."""
    import xml.etree.ElementTree as ET

    results = list(results)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(results)),
                       failures=str(sum(r.status == "fail" for r in results)),
                       skipped=str(sum(r.status == "skip" for r in results)), errors="0")
    for r in results:
        tc = ET.SubElement(ts, "testcase", classname=f"{suite}.{r.model}.{r.layer}.{r.method}".replace(" ", "_"),
                           name=f"{r.name} [{r.model}/{r.layer}/{r.method}]")
        value = "n/a" if r.value is None else f"{r.value:.6g}"
        text = f"{r.metric} = {value}, expected {r.condition}. {r.message}".strip()
        if r.status == "fail":
            ET.SubElement(tc, "failure", message=text, type="threshold").text = text
        elif r.status == "skip":
            ET.SubElement(tc, "skipped", message=text)
        elif r.status == "warn":
            ET.SubElement(tc, "system-out").text = f"WARNING: {text}"
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | Path, results) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(junit_xml(results), encoding="utf-8")
    except OSError as exc:
        raise EvalkitError(f"--junit {path}: cannot write ({exc.strerror})") from None


def read_rows(run_dir: str | Path, *, what: str = "run folder") -> list:
    """The ``rows`` of ``RUN_DIR/metrics.json``."""
    path = Path(run_dir) / "metrics.json"
    if not Path(run_dir).is_dir():
        raise EvalkitError(f"{run_dir}: {what} not found; expected a folder written by `evalkit report`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalkitError(f"{path}: not found; expected a folder written by `evalkit report`") from None
    except (OSError, ValueError) as exc:
        raise EvalkitError(f"{path}: not valid JSON ({exc})") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise EvalkitError(f"{path}: expected {{\"rows\": [...]}} with one object per model/layer/method")
    return rows
