"""Threshold checks on metrics.json rows, baseline comparison and JUnit XML.

Conditions follow Evidently's names: ``gt gte lt lte eq`` and ``approx`` (relative and
absolute tolerance), plus ``max_drop`` against a baseline run. ``on: lower`` / ``on: upper``
tests an end of the score's 95% interval (row keys ``<metric>_lo`` / ``<metric>_hi``)
instead of its value, so a gate fails only when the drop is beyond sampling noise. A ``where``
selector matches rows by model, layer and method with glob patterns. A check of severity ``warn`` never fails
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


def select_names(names: Iterable[str], pattern: str) -> list:
    """The names a ``where`` value selects: the one it equals, else those its glob pattern matches.

    An exact name wins over reading the value as a glob, so ``cnn[v2]`` selects the model
    called ``cnn[v2]`` (as a glob it would match ``cnnv`` and ``cnn2`` only).
    """
    names = list(dict.fromkeys(str(n) for n in names))
    if pattern in names:
        return [pattern]
    return [n for n in names if fnmatchcase(n, pattern)]


def _conditions(check) -> list:
    """``[(label, test(value, baseline) -> (ok, detail))]`` for one check.

    ``baseline`` is the baseline's value (a float), or a string saying why there is none.
    """
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
            if b is None:  # no --baseline at all: the condition cannot run
                return None, "no baseline; pass --baseline DIR"
            if isinstance(b, str):  # a baseline that cannot judge this row never passes it
                return False, b
            return (b - v) <= m + 1e-12, f"baseline {b:.4f}, drop {b - v:+.4f}"

        out.append((f"drop <= {check.max_drop:g} vs baseline", drop))
    return out


_ON_SUFFIX = {"value": "", "lower": "_lo", "upper": "_hi"}
_ON_TEXT = {"value": "", "lower": "lower 95% bound ", "upper": "upper 95% bound "}


def _baseline_value(baseline: Optional[dict], row: dict, metric: str):
    """The baseline's value of ``metric`` for ``row``'s feature set; a reason string when it has none."""
    if baseline is None:
        return None
    where = f"{row.get('model')}/{row.get('layer')}/{row.get('method')}"
    base = baseline.get(_key(row))
    if base is None:
        return f"the baseline run has no row {where}"
    if not _defined(base.get(metric)):
        return f"{metric} is not defined in the baseline run's row {where}"
    return float(base[metric])


def evaluate_checks(rows: Iterable[dict], checks: Iterable, *, baseline_rows: Optional[Iterable[dict]] = None) -> list:
    """Evaluate every check on every row its ``where`` selects.

    Parameters
    ----------
    rows : metrics.json rows (dicts with model, layer, method and metric keys)
    checks : :class:`evalkit.config.CheckConfig` objects
    baseline_rows : rows of an earlier run, for ``max_drop``; a selected row missing from it,
        or undefined in it, fails ``max_drop`` (a given baseline never silently passes a gate)

    Returns
    -------
    list of :class:`CheckResult`, one per (check, matching row). A row where the metric is not
    computed (no key: trustworthiness of raw features) or not defined (null) is skipped with a
    ``skip`` result that says so; rows not computed are reported once per check.

    Raises
    ------
    EvalkitError
        A check whose ``where`` matches no row, or only rows where its metric is not computed.
    """
    rows = list(rows)
    baseline = None if baseline_rows is None else {_key(r): r for r in baseline_rows}
    results = []
    for i, check in enumerate(checks):
        w = check.where
        models = set(select_names((r.get("model") for r in rows), w.model))
        layers = set(select_names((r.get("layer") for r in rows if str(r.get("model")) in models), w.layer))
        methods = set(select_names((r.get("method") for r in rows), w.method))
        matched = [r for r in rows if str(r.get("model")) in models and str(r.get("layer")) in layers
                   and str(r.get("method")) in methods]
        conds = _conditions(check)
        on = getattr(check, "on", "value")
        key = check.metric + _ON_SUFFIX[on]  # the row key tested: the value or an interval end
        label = _ON_TEXT[on] + " and ".join(c[0] for c in conds)
        name = check.name or f"{check.metric} {label}"
        bad = "fail" if check.severity == "fail" else "warn"
        if not matched:
            raise EvalkitError(f"checks[{i}].where: no metrics row matches model={w.model!r} layer={w.layer!r} "
                               f"method={w.method!r}; fix the check's where (rows have models "
                               f"{', '.join(sorted({str(r.get('model')) for r in rows})) or 'none'})")
        absent = [r for r in matched if check.metric not in r]
        if len(absent) == len(matched):
            raise EvalkitError(f"checks[{i}].metric: {check.metric!r} is not computed for any row the check "
                               f"selects (methods {', '.join(sorted(methods))}); set checks[{i}].where.method")
        if absent:
            skipped = sorted({str(r.get("method")) for r in absent})
            results.append(CheckResult(name, check.metric, w.model, w.layer, ",".join(skipped), label, None, "skip",
                                       check.severity, f"{len(absent)} row{'s' if len(absent) > 1 else ''} skipped: "
                                       f"{check.metric} is not computed for method {', '.join(skipped)}"))
        if on != "value" and all(key not in r for r in matched if check.metric in r):
            raise EvalkitError(f"checks[{i}].on: no row the check selects has the {on} bound of {check.metric!r} "
                               f"({key}); a metrics.json from an evalkit without intervals? run `evalkit report` "
                               f"again, or use on: value")
        for r in matched:
            if check.metric not in r:
                continue
            v = r.get(key)
            if key not in r:
                status, msg = "skip", f"skipped: this row has no {key} (no interval for it)"
            elif not _defined(v):
                status, msg = "skip", f"skipped: {key} is not defined for this row (null in metrics.json)"
            else:
                status, notes = "pass", []
                base = _baseline_value(baseline, r, key)
                for text, test in conds:
                    ok, detail = test(float(v), base)
                    if ok is None:  # max_drop without a baseline
                        notes.append(f"{text}: skipped ({detail})")
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


def check_junit_path(path: str | Path) -> None:
    """Raise the error :func:`write_junit` would, before a run: a folder, a file in the way, no write access."""
    import os

    path = Path(path)
    if path.is_dir():
        raise EvalkitError(f"--junit {path}: is a folder; expected a file name such as checks.xml")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise EvalkitError(f"--junit {path}: cannot write the file (no write permission); choose another path")
        return
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise EvalkitError(f"--junit {path}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EvalkitError(f"--junit {path}: cannot write in {parent} (not writable); choose another path")


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
    for i, row in enumerate(rows):
        for key, value in row.items():
            if isinstance(value, int) and not isinstance(value, bool) and not -1e308 < value < 1e308:
                shown = str(value)
                shown = shown if len(shown) <= 12 else f"{shown[:8]}... ({len(shown)} digits)"
                raise EvalkitError(f"{path}: rows[{i}].{key}: {shown} is too large for a number evalkit reads; "
                                   f"fix the value or write the file again with `evalkit report`")
    return rows
