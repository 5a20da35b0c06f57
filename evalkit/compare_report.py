"""The pages of ``evalkit compare`` and ``evalkit history``, and the folders they write.

Data first, as in :mod:`evalkit.report`: :func:`comparison_context` and :func:`history_context`
turn a :class:`~evalkit.compare.Comparison` or :class:`~evalkit.compare.History` into plain,
display-ready dataclasses; the templates ``compare.html`` and ``history.html`` (sharing
``report.css``, plus ``compare.css``) only lay them out, autoescaped. The folders are written
atomically by :func:`evalkit.runfolder.write_folder`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from evalkit.compare import NOISE_FACTOR, Comparison, History, RunFolder, comparison_payload, history_csv
from evalkit.report import (Cell, CheckSummary, LegendEntry, _check_row, _check_summary,
                            _content_security_policy, _environment, _fmt, _fmt_spread, _format_date,
                            _method_title, _metric_title, _static)

__all__ = ["comparison_context", "render_comparison", "write_comparison", "history_context",
           "render_history", "write_history", "COMPARE_FILES", "HISTORY_FILES"]

COMPARE_FILES = ("index.html", "comparison.json")
HISTORY_FILES = ("index.html", "history.csv")
#: How many of the worst changes the summary lists and the table marks.
N_WORST = 5


@dataclass(frozen=True)
class RunHead:
    label: str  # "A" or "B"
    name: str
    path: str
    date: str
    dataset: str
    n_samples: str
    notes: tuple


@dataclass(frozen=True)
class DeltaRow:
    feature_set: str  # model/layer
    method: str
    metric: str  # title
    direction: str  # "higher is better" | "lower is better" | "direction unknown"
    a: Cell
    b: Cell
    delta: Cell
    noise: str  # "beyond noise (±0.004)", "within noise", "no seed spread", "not seeded"
    beyond: Optional[bool]
    worst: bool


@dataclass(frozen=True)
class PairPanel:
    title: str  # model/layer · method
    disparity: Cell
    image_a: str
    image_b: str
    alt_a: str
    alt_b: str
    caption: str


@dataclass(frozen=True)
class DiffRow:
    key: str
    a: str
    b: str


@dataclass(frozen=True)
class ComparisonContext:
    title: str
    runs: tuple  # of RunHead
    n_scores: int
    n_worse: int
    n_better: int
    n_beyond: int
    has_spread: bool
    worst: tuple  # of DeltaRow
    deltas: tuple  # of DeltaRow
    only_a: tuple
    only_b: tuple
    samples: str
    legend: tuple  # of LegendEntry
    pairs: tuple  # of PairPanel
    pairs_note: str
    config_diff: tuple  # of DiffRow
    config_note: str
    provenance_diff: tuple
    check_summary: Optional[CheckSummary]
    checks: tuple  # of CheckRow
    checks_source: str
    exit_code: int
    notes: tuple
    css: str
    js: str
    csp: str


def comparison_context(cmp: Comparison) -> ComparisonContext:
    """Display-ready data of a comparison (no HTML here)."""
    from evalkit import plots

    defined = [abs(d.change) for d in cmp.deltas if d.change is not None]
    scale = max(defined) if defined else 0.0
    worst_keys = {id(d) for d in [d for d in cmp.deltas if d.verdict == "worse"][:N_WORST]}
    rows = tuple(_delta_row(d, scale, id(d) in worst_keys) for d in cmp.deltas)
    n_classes = len(cmp.run_a.label_names) or int(max((int(e.labels.max()) + 1 for e in cmp.aligned
                                                        if len(e.labels)), default=1))
    colors = plots.class_colors(n_classes)
    legend = tuple(LegendEntry(i, name, colors[i], 0) for i, name in enumerate(cmp.run_a.label_names))
    names = _run_names(cmp.run_a, cmp.run_b)
    pairs = []
    for e in cmp.aligned:
        title = f"{e.model}/{e.layer} \u00b7 {_method_title(e.method)}"
        if e.disparity is None:
            image_a = image_b = ""
        else:
            image_a, image_b = plots.aligned_pair_png(e.a, e.b, e.labels.astype(np.int64) % max(n_classes, 1),
                                                      colors, e.moved)
        shown = ", ".join(str(_id) for _id in e.ids[e.moved[:8]])
        if len(e.moved):
            caption = (f"Ringed: the {len(e.moved)} of {len(e.ids):,} shared samples that moved most "
                       f"(ids {shown}{', ...' if len(e.moved) > 8 else ''}); in B a line joins each to where it "
                       f"is in A." + (f" {e.note}." if e.note else ""))
        elif e.disparity is not None:
            caption = f"No sample moved: the same picture up to rotation, reflection and scale. {e.note}".strip()
        else:
            caption = e.note
        disparity = (Cell(_fmt(e.disparity) if e.disparity >= 1e-9 else "\u2248 0", e.disparity,
                          "Procrustes disparity: 0 = the same picture up to rotation, reflection and scale; "
                          "1 = unrelated") if e.disparity is not None
                     else Cell("n/a", None, e.note, undefined=True))
        pairs.append(PairPanel(title, disparity, image_a, image_b, f"{title} in run A ({cmp.run_a.name}), aligned",
                               f"{title} in run B ({cmp.run_b.name}), rotated and scaled onto A", caption))
    samples = ""
    if cmp.samples is not None:
        s = cmp.samples
        samples = (f"{s.n_shared:,} shared samples matched by {s.key} ({s.only_a:,} only in A, "
                   f"{s.only_b:,} only in B)" + (f"; {s.labels_differ:,} of them have a different class in B"
                                                 if s.labels_differ else ""))
    config_note = ""
    if cmp.run_a.config_yaml is None or cmp.run_b.config_yaml is None:
        config_note = "A run folder has no config.yaml; only what both record is compared."
    ctx_js = _static("report.js")
    return ComparisonContext(
        title=f"{names[0]} vs {names[1]}",
        runs=(_run_head("A", cmp.run_a), _run_head("B", cmp.run_b)),
        n_scores=len(rows),
        n_worse=sum(d.verdict == "worse" for d in cmp.deltas),
        n_better=sum(d.verdict == "better" for d in cmp.deltas),
        n_beyond=sum(bool(d.beyond_noise) for d in cmp.deltas),
        has_spread=any(d.noise is not None for d in cmp.deltas),
        worst=tuple(r for r in rows if r.worst),
        deltas=rows,
        only_a=cmp.only_a,
        only_b=cmp.only_b,
        samples=samples,
        legend=legend,
        pairs=tuple(pairs),
        pairs_note=("" if pairs else "No embedding is in both run folders (or their samples could not be matched)."),
        config_diff=tuple(_diff_row(d) for d in cmp.config_diff),
        config_note=config_note,
        provenance_diff=tuple(_diff_row(d) for d in cmp.provenance_diff),
        check_summary=_check_summary(cmp.checks),
        checks=tuple(_check_row(c) for c in cmp.checks),
        checks_source=cmp.checks_source,
        exit_code=cmp.exit_code,
        notes=cmp.notes,
        css=_static("report.css") + "\n" + _static("compare.css"),
        js=ctx_js,
        csp=_content_security_policy(ctx_js),
    )


def _run_names(run_a: RunFolder, run_b: RunFolder) -> tuple:
    """The runs' config names, or their folder names when the config names are the same."""
    if run_a.name != run_b.name:
        return run_a.name, run_b.name
    a, b = run_a.path.resolve(), run_b.path.resolve()
    return (a.name, b.name) if a.name != b.name else (str(run_a.path), str(run_b.path))


def _run_head(label: str, run: RunFolder) -> RunHead:
    p = run.provenance
    n = p.get("n_samples")
    if n is None and run.ids is not None:
        n = len(run.ids)
    return RunHead(label, run.name, str(run.path), _format_date(p.get("started")), str(p.get("dataset") or ""),
                   f"{n:,}" if isinstance(n, int) else "", tuple(run.notes))


def _value_cell(value: Optional[float], std: Optional[float]) -> Cell:
    if value is None:
        return Cell("n/a", None, "undefined in this run", undefined=True)
    text = _fmt(value)
    if std is not None:
        return Cell(f"{text} \u00b1 {_fmt_spread(std, text)}", value, "mean \u00b1 standard deviation across seeds")
    return Cell(text, value)


def _delta_row(d, scale: float, worst: bool) -> DeltaRow:
    direction = {True: "higher is better", False: "lower is better", None: "direction unknown"}[d.higher_is_better]
    if d.delta is None:
        delta = Cell("n/a", None, "undefined in one of the runs", undefined=True)
    else:
        style = _delta_style(d.change if d.verdict != "same" else 0.0, scale, d.beyond_noise)
        delta = Cell(f"{d.delta:+.4f}" if d.delta else "0", d.delta, direction, style=style, best=worst)
    if d.noise is not None:
        noise = (f"{'beyond' if d.beyond_noise else 'within'} noise "
                 f"(\u00b1{NOISE_FACTOR:g}\u00b7{_fmt(d.noise)})") if d.delta is not None else ""
    elif d.method == "features":
        noise = "no seed involved"
    else:
        noise = "no seed spread"
    return DeltaRow(f"{d.model}/{d.layer}", _method_title(d.method), _metric_title(d.metric), direction,
                    _value_cell(d.a, d.a_std), _value_cell(d.b, d.b_std), delta, noise, d.beyond_noise, worst)


def _delta_style(change: Optional[float], scale: float, beyond: Optional[bool]) -> str:
    """Red for worse, green for better, stronger for larger changes; plain within the noise."""
    if change is None or change == 0 or scale <= 0 or beyond is False:
        return ""
    t = min(abs(change) / scale, 1.0) ** 0.5
    end = (232, 80, 72) if change < 0 else (46, 160, 67)
    rgb = tuple(round(255 + (e - 255) * (0.15 + 0.55 * t)) for e in end)
    return "background:#%02x%02x%02x" % rgb


def _text(value: Any) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) if all(not isinstance(v, (list, dict)) for v in value) \
            else json.dumps(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _diff_row(d) -> DiffRow:
    return DiffRow(d.key, _text(d.a), _text(d.b))


def render_comparison(cmp: Comparison) -> str:
    """The comparison page as one self-contained HTML string."""
    return _environment().get_template("compare.html").render(ctx=comparison_context(cmp))


def write_comparison(out_dir, cmp: Comparison) -> Path:
    """Write ``index.html`` and ``comparison.json`` into ``out_dir``, atomically."""
    from evalkit.runfolder import write_folder

    files = {"index.html": render_comparison(cmp).encode("utf-8"),
             "comparison.json": (json.dumps(comparison_payload(cmp), indent=2, allow_nan=False) + "\n").encode()}
    return write_folder(out_dir, files, what="comparison folder")


# --------------------------------------------------------------------------- history


@dataclass(frozen=True)
class HistoryRun:
    index: int
    name: str
    path: str
    date: str


@dataclass(frozen=True)
class HistoryChart:
    metric: str
    title: str
    direction: str
    image: str
    alt: str
    runs: tuple  # column headers: run names
    rows: tuple  # of (label, tuple of Cell, best-run name)


@dataclass(frozen=True)
class HistoryContext:
    title: str
    runs: tuple  # of HistoryRun
    legend: tuple  # of (label, colour)
    charts: tuple  # of HistoryChart
    csv_name: str
    css: str
    js: str
    csp: str


def history_context(history: History) -> HistoryContext:
    from evalkit import plots
    from evalkit.registry import metrics as registry

    runs = history.runs
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # the same config run again and again: tell them by folder
        names = [r.path.resolve().name for r in runs]
    labels = [f"{i + 1}. {name}" for i, name in enumerate(names)]
    sets = list(dict.fromkeys((e["model"], e["layer"]) for e in history.table))
    colours = dict(zip(sets, plots.class_colors(len(sets))))
    values: dict = {}  # the runs' own rows: a score a row lacks is not charted for it
    for i, run in enumerate(runs):
        for row in run.rows:
            values[(row["model"], row["layer"], row["method"], i)] = row
    methods = list(dict.fromkeys(e["method"] for e in history.table))
    methods = (["features"] if "features" in methods else []) + [m for m in methods if m != "features"]
    charts = []
    for metric in history.metrics:
        higher = registry().get(metric).higher_is_better if metric in registry() else True
        panels, table_rows = [], []
        for method in methods:
            lines = []
            for model, layer in sets:
                rows = [values.get((model, layer, method, i), {}) for i in range(len(runs))]
                if not any(metric in r for r in rows):
                    continue
                series = [_number(r.get(metric)) for r in rows]
                lines.append((f"{model}/{layer}", colours[(model, layer)], series))
                finite = [i for i, v in enumerate(series) if v is not None]
                best = (max if higher else min)(finite, key=lambda i: series[i]) if finite else None
                cells = tuple(Cell("n/a" if v is None else _fmt(v), v, best=(i == best and len(runs) > 1),
                                   title="best run of this row" if i == best else "", undefined=v is None)
                              for i, v in enumerate(series))
                table_rows.append((f"{model}/{layer} \u00b7 {_method_title(method)}", cells,
                                   labels[best] if best is not None else "n/a"))
            if lines:
                panels.append((_method_title(method), lines))
        if not panels:
            continue
        title = _metric_title(metric)
        charts.append(HistoryChart(metric, title, "higher is better" if higher else "lower is better",
                                   plots.history_png(labels, panels, higher_is_better=higher),
                                   f"{title} across {len(runs)} runs, one line per feature set, one panel per method; "
                                   f"stars mark each line's best run", tuple(labels), tuple(table_rows)))
    js = _static("report.js")
    return HistoryContext(
        title=f"{len(runs)} runs" if len(runs) != 1 else "1 run",
        runs=tuple(HistoryRun(i + 1, r.name, str(r.path), _format_date(r.provenance.get("started")))
                   for i, r in enumerate(runs)),
        legend=tuple((f"{m}/{l}", colours[(m, l)]) for m, l in sets),
        charts=tuple(charts), csv_name=HISTORY_FILES[1],
        css=_static("report.css") + "\n" + _static("compare.css"), js=js, csp=_content_security_policy(js))


def _number(value) -> Optional[float]:
    from evalkit.compare import _number as number

    return number(value)


def render_history(history: History) -> str:
    return _environment().get_template("history.html").render(ctx=history_context(history))


def write_history(out_dir, history: History) -> Path:
    """Write ``index.html`` and ``history.csv`` into ``out_dir``, atomically."""
    from evalkit.runfolder import write_folder

    files = {"index.html": render_history(history).encode("utf-8"),
             "history.csv": history_csv(history).encode("utf-8")}
    return write_folder(out_dir, files, what="history folder")
