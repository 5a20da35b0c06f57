"""The report page: ``index.html`` of a run folder, and a result's view in Jupyter.

Data first, rendering second: :func:`build_context` turns a :class:`~evalkit.results.Result`
into plain dataclasses of display-ready values, and the jinja2 templates in
``reports/templates`` (package ``evalkit.templates``, autoescaped) only lay them out. Score and
method titles, their order and which direction is better come from the registries
(:mod:`evalkit.registry`). Writing the folder is :mod:`evalkit.runfolder`'s job.
"""
from __future__ import annotations

import base64
import hashlib
import math
import shlex
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from evalkit.progress import inner_loop, step
from evalkit.registry import FEATURES, methods as _methods, metrics as _metrics
from evalkit.results import ID_KEYS, INFO_KEYS, Result, plural

__all__ = ["render_html", "render_notebook", "build_context"]

# Row keys that describe a row rather than score it: shown, never marked "best".
NOT_SCORES = INFO_KEYS | {"seed", "n_neighbors"}
NOT_APPLICABLE = "\u2013"  # – : metric not computed for this method


def _method_order() -> tuple:
    return _methods().names()


def _method_title(name: str) -> str:
    if name == FEATURES:
        return "raw features"
    return _methods().get(name).title if name in _methods() else name


def _metric_order() -> tuple:
    return _metrics().names()


def _metric_title(name: str) -> str:
    return _metrics().get(name).title if name in _metrics() else name.replace("_", " ")


def _metric_short(name: str) -> str:
    return _metrics().get(name).short if name in _metrics() else name.replace("_", " ")


def _lower_is_better(name: str) -> bool:
    return name in _metrics() and not _metrics().get(name).higher_is_better


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class Cell:
    """One displayed value: ``text`` to show, ``value`` to sort by (None sorts last)."""

    text: str
    value: float | str | None = None
    title: str = ""
    best: bool = False
    style: str = ""  # inline CSS for heat-map cells (colours computed here, not in templates)
    undefined: bool = False


@dataclass(frozen=True)
class Score:
    """A labelled value printed beside a picture or a row header."""

    key: str
    label: str
    cell: Cell


@dataclass(frozen=True)
class LegendEntry:
    index: int
    name: str
    color: str
    count: int


@dataclass(frozen=True)
class MethodColumn:
    name: str
    title: str
    params: tuple  # of (name, text)


@dataclass(frozen=True)
class Panel:
    method: str
    image: str  # data: URI of the first seed's picture
    alt: str
    seeds: tuple
    scores: tuple  # of Score


@dataclass(frozen=True)
class GridRow:
    model: str
    layer: str
    dim: int | None
    feature_scores: tuple  # of Score
    panels: tuple  # of Panel or None, one per MethodColumn


@dataclass(frozen=True)
class BestCell:
    """The winner of one metric within one method."""

    feature_sets: str  # "model/layer", several joined by ", " on a tie
    text: str  # the formatted best value
    title: str


@dataclass(frozen=True)
class BestRow:
    """One metric of the summary: the best feature set for each method."""

    metric: str
    label: str
    cells: tuple  # of BestCell or None, one per summary method


@dataclass(frozen=True)
class CheckRow:
    name: str
    selector: str
    metric: str
    condition: str
    value: Cell
    status: str
    severity: str
    message: str


@dataclass(frozen=True)
class CheckSummary:
    total: int
    passed: int
    failed: int
    warned: int
    errored: int
    failing: tuple  # names of failed or errored checks
    warning: tuple  # names of warned checks
    skipped: int = 0  # not evaluated (a max_drop without --baseline, an undefined value)
    skipping: tuple = ()  # their names


@dataclass(frozen=True)
class Column:
    key: str
    label: str
    numeric: bool
    title: str = ""


@dataclass(frozen=True)
class Table:
    """A plain table: headers, then rows of cells (the first column may be a row label)."""

    columns: tuple  # of Column
    rows: tuple  # of tuple of Cell
    caption: str = ""


@dataclass(frozen=True)
class Chart:
    """One picture of curves (the R_NX chart of one method)."""

    method: str
    title: str
    image: str  # data: URI
    alt: str


@dataclass(frozen=True)
class ProvenanceItem:
    key: str
    text: str
    pairs: tuple = ()  # of (key, text) for dict values
    mono: bool = False


@dataclass(frozen=True)
class ReportContext:
    """Everything the template shows, already formatted and in display order."""

    name: str
    date: str
    dataset: str
    n_samples: int
    n_classes: int
    n_feature_sets: int
    n_embeddings: int
    legend: tuple
    legend_note: str
    summary_methods: tuple  # of MethodColumn
    best: tuple  # of BestRow
    check_summary: CheckSummary | None
    checks: tuple  # of CheckRow
    methods: tuple  # of MethodColumn
    grid: tuple  # of GridRow
    seeds_note: str
    scores: Table
    cka: Table | None
    per_class: Table | None
    per_class_open: bool
    stability: Table | None
    rnx_charts: tuple  # of Chart, one per method
    metric_notes: tuple  # of (label, text)
    notes: tuple  # of str
    provenance: tuple  # of ProvenanceItem
    config_yaml: str
    css: str
    js: str
    csp: str
    compact: bool = False  # summary, checks and pictures only (the Jupyter view)
    explorer: Any = None  # evalkit.explorer.ExplorerAssets: interactive panels, or None


def build_context(result: Result, *, compact: bool = False) -> ReportContext:
    """Turn a run into display-ready data for the template (no HTML here)."""
    labels = np.asarray(result.labels)
    n_classes = len(result.label_names)
    from evalkit import plots

    colors = plots.class_colors(n_classes)
    counts = np.bincount(labels, minlength=n_classes) if labels.size else np.zeros(n_classes, int)
    legend = tuple(LegendEntry(i, str(name), colors[i], int(counts[i]))
                   for i, name in enumerate(result.label_names))
    legend_note = ("colours repeat: more classes than distinct colours"
                   if n_classes > 60 else "")

    rows = [dict(r) for r in result.rows]
    metrics = _metric_keys(rows)
    reasons = {str(k): str(v) for k, v in (result.undefined_reasons or {}).items()}
    best = _best_values(rows, metrics)
    feature_keys = _feature_keys(result)
    methods = _method_columns(result, rows)
    summary_methods = _summary_methods(rows, methods)
    config = _parse_yaml(result.config_yaml)
    explorer = None
    if not compact:  # the Jupyter view keeps the light PNG grid; the saved report is explorable
        from evalkit.explorer import explorer_assets

        explorer = explorer_assets(result, colors=colors)

    return ReportContext(
        name=str(result.name),
        date=_format_date(_first(result.provenance, ("started", "start_time", "started_at",
                                                     "date"))),
        dataset=_dataset_text(result.provenance, config),
        n_samples=int(labels.shape[0]),
        n_classes=n_classes,
        n_feature_sets=len(feature_keys),
        n_embeddings=len(result.embeddings),
        legend=legend,
        legend_note=legend_note,
        summary_methods=summary_methods,
        best=_best_rows(rows, metrics, best, summary_methods),
        check_summary=_check_summary(result.checks),
        checks=tuple(_check_row(c) for c in result.checks),
        methods=methods,
        grid=_grid(result, rows, feature_keys, methods, colors, best, reasons),
        seeds_note=_seeds_note(result),
        scores=_score_table(rows, metrics, best, reasons),
        cka=_cka_table(result.cka),
        per_class=_per_class_table(result.per_class_knn, result.label_names, result.per_class_knn_interval),
        per_class_open=n_classes <= 30,
        stability=_stability_table(result.stability),
        rnx_charts=() if compact else _rnx_charts(result, methods),
        metric_notes=_metric_notes(metrics, _n_neighbors(result, config), result.knn_k, _rnx_max_k(result)),
        notes=tuple(str(n) for n in result.notes or ()),
        provenance=_provenance_items(result.provenance),
        config_yaml=str(result.config_yaml),
        css=_static("report.css"),
        js=_static("report.js"),
        csp=_content_security_policy(_static("report.js"), *(explorer.scripts if explorer else ()),
                                     allow_eval=bool(explorer and explorer.needs_eval)),
        compact=compact,
        explorer=explorer,
    )


def render_html(result: Result, *, compact: bool = False) -> str:
    """The report page as one self-contained HTML string (no network references)."""
    return _environment().get_template("report.html").render(ctx=build_context(result, compact=compact))


def render_notebook(result: Result) -> str:
    """A result's view in Jupyter: one line of facts, then the summary, the checks and the
    grid of pictures in an isolated frame (the page's styles cannot leak into the notebook)."""
    import html

    page = render_html(result, compact=True)
    n_sets = len(result.feature_sets)
    failed = sum(c.status in ("fail", "error") for c in result.checks)
    n_checks = len(result.checks)
    skipped = sum(c.status == "skip" for c in result.checks)
    verdict = ("no checks" if not n_checks else
               f"{failed} of {plural(n_checks, 'check')} failed" if failed else
               f"none failed, {skipped} of {plural(n_checks, 'check')} skipped" if skipped else
               "the check passed" if n_checks == 1 else f"all {n_checks} checks passed")
    # the compact page is about 650 px of header, summary and checks, then ~450 px per grid row
    height = 650 + 450 * n_sets + 45 * n_checks
    return (f'<div class="evalkit-result"><p><strong>evalkit</strong> {html.escape(str(result.name))}: '
            f'{plural(len(result.labels), "sample")}, {plural(len(result.label_names), "class", "classes")}, '
            f'{plural(n_sets, "feature set")}; '
            f'{verdict}. <code>result.save(DIR)</code> writes the full report.</p>'
            f'<iframe srcdoc="{html.escape(page, quote=True)}" title="evalkit result {html.escape(str(result.name))}" '
            f'style="width:100%;height:{min(height, 5000)}px;border:1px solid #ddd" '
            f'sandbox="allow-scripts"></iframe></div>')


# --------------------------------------------------------------------------- templates


def _templates():
    from importlib.resources import files

    # A source tree's own templates first: an editable install elsewhere (another worktree)
    # would otherwise map `evalkit.templates` to that tree's files.
    source = Path(__file__).resolve().parent.parent / "reports" / "templates"
    if (source / "report.html").is_file():
        return source
    try:
        return files("evalkit.templates")
    except ModuleNotFoundError:  # running from a source tree that was never installed
        return source


def _static(name: str) -> str:
    return _templates().joinpath(name).read_text(encoding="utf-8")


def _environment():
    import jinja2

    root = _templates()

    def load(name: str):
        source = root.joinpath(name).read_text(encoding="utf-8")
        return source, None, lambda: True

    env = jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    return env


def _content_security_policy(*scripts: str, allow_eval: bool = False) -> str:
    """Nothing may load from anywhere; only our own inline scripts (by hash) may run.

    ``allow_eval`` adds 'unsafe-eval' for the explorer's regl, which compiles its WebGL draw
    commands with ``Function``; only the hashed scripts can reach it.
    """
    sources = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode("utf-8")).digest()).decode("ascii")
        + "'" for s in scripts)
    if allow_eval:
        sources += " 'unsafe-eval'"
    return ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
            f"script-src {sources}; base-uri 'none'; form-action 'none'")


# --------------------------------------------------------------------------- formatting


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, not a number, NaN or infinite."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.1f}"
    if abs(value) < 0.001:
        return f"{value:.1e}"
    return f"{value:.3f}"


def _fmt_spread(std: float, mean_text: str) -> str:
    """A standard deviation with as many decimals as its mean, so the two line up."""
    decimals = len(mean_text.split(".", 1)[1]) if "." in mean_text and "e" not in mean_text else 3
    return f"{std:.{decimals}f}"


def _metric_cell(row: Mapping | None, metric: str, reasons: Mapping[str, str],
                 best: bool = False, interval: bool = False) -> Cell:
    """A metric of a row, with its spread when the row has ``<metric>_std``, and its 95%
    interval (``<metric>_lo``, ``<metric>_hi``) in the text when ``interval``, else in the title."""
    if row is None or metric not in row:
        return Cell(NOT_APPLICABLE, None, "not computed for this method")
    raw = row[metric]
    if isinstance(raw, str):
        return Cell(raw, raw.lower())
    value = _finite(raw)
    if value is None:
        return Cell("n/a", None, reasons.get(metric, "undefined for this data"), undefined=True)
    text = _fmt(value)
    std = _finite(row.get(f"{metric}_std"))
    title = ""
    if std is not None:
        text = f"{text} \u00b1 {_fmt_spread(std, text)}"
        title = "mean \u00b1 standard deviation across seeds"
    lo, hi = _finite(row.get(f"{metric}_lo")), _finite(row.get(f"{metric}_hi"))
    if lo is not None and hi is not None:
        bounds = f"[{_fmt_bound(lo)}, {_fmt_bound(hi)}]"
        title = (title + "; " if title else "") + f"95% interval over the samples {bounds}"
        if interval:
            text = f"{text} {bounds}"
    if best:
        title = (title + "; " if title else "") + "best in its method"
    return Cell(text, value, title, best=best)


def _fmt_bound(value: float) -> str:
    """An interval end with two decimals (three near 0 or 1, where two would round to the end)."""
    text = f"{value:.2f}"
    return f"{value:.3f}" if text in ("0.00", "1.00") and value not in (0.0, 1.0) else text


def _metric_keys(rows: list[dict]) -> tuple:
    seen: list[str] = []
    for row in rows:
        for key in row:
            if key not in ID_KEYS and key not in seen:
                seen.append(key)
    spreads = {k for k in seen if (k.endswith("_std") and k[:-4] in seen)
               or (k.endswith(("_lo", "_hi")) and k[:-3] in seen)}
    keys = [k for k in seen if k not in spreads]
    ordered = [k for k in _metric_order() if k in keys]
    return tuple(ordered + [k for k in keys if k not in ordered])


def _best_values(rows: list[dict], metrics: Iterable[str]) -> dict:
    """(method, metric) -> best finite value among that method's rows."""
    best: dict = {}
    for metric in metrics:
        if metric in NOT_SCORES:
            continue
        sign = -1.0 if _lower_is_better(metric) else 1.0
        for row in rows:
            value = _finite(row.get(metric))
            if value is None:
                continue
            key = (row.get("method"), metric)
            if key not in best or sign * value > sign * best[key]:
                best[key] = value
    return best


def _is_best(best: Mapping, row: Mapping, metric: str) -> bool:
    value = _finite(row.get(metric))
    target = best.get((row.get("method"), metric))
    return value is not None and target is not None and value == target


def _method_columns(result: Result, rows: list[dict]) -> tuple:
    present: list[str] = []
    for name in [e.method for e in result.embeddings] + [r.get("method") for r in rows]:
        if name and name != "features" and name not in present:
            present.append(str(name))
    order = _method_order()
    ordered = [m for m in order if m in present] + [m for m in present if m not in order]
    params = dict(result.method_params or {})
    for emb in result.embeddings:  # fall back on what the embeddings recorded
        if emb.method not in params and emb.params:
            params[emb.method] = dict(emb.params)
    return tuple(MethodColumn(m, _method_title(m),
                              tuple((str(k), _param_text(v))
                                    for k, v in (params.get(m) or {}).items()))
                 for m in ordered)


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_param_text(v) for v in value)
    return str(value)


def _feature_keys(result: Result) -> list:
    """(model, layer) pairs in config order: feature sets first, then any only in rows."""
    keys: list = []
    sources = ([(f.model, f.layer) for f in result.feature_sets]
               + [(e.model, e.layer) for e in result.embeddings]
               + [(r.get("model"), r.get("layer")) for r in result.rows])
    for key in sources:
        if key not in keys:
            keys.append(key)
    return keys


def _grid(result, rows, feature_keys, methods, colors, best, reasons) -> tuple:
    from evalkit import plots

    row_index = {(r.get("model"), r.get("layer"), r.get("method")): r for r in rows}
    dims = {(f.model, f.layer): (int(f.features.shape[1]) if np.ndim(f.features) == 2 else None)
            for f in result.feature_sets}
    first: dict = {}
    seeds: dict = {}
    for emb in result.embeddings:
        first.setdefault(emb.key, emb)
        seeds.setdefault(emb.key, []).append(int(emb.seed))
    labels = np.asarray(result.labels)
    n = labels.shape[0]
    grid = []
    with inner_loop(len(first), "report images", unit="image"):
        for model, layer in feature_keys:
            panels = []
            for column in methods:
                emb = first.get(f"{model}/{layer}/{column.name}")
                if emb is None:
                    panels.append(None)
                    continue
                alt = (f"{column.title} of {model}/{layer}: {n} points coloured by class "
                       f"({len(result.label_names)} classes), seed {emb.seed}")
                panels.append(Panel(column.name, plots.scatter_png(emb.coords, labels, colors), alt,
                                    tuple(seeds[emb.key]),
                                    _cell_scores(row_index.get((model, layer, column.name)), reasons, best)))
                step(1)
            grid.append(GridRow(str(model), str(layer), dims.get((model, layer)),
                                _cell_scores(row_index.get((model, layer, "features")), reasons, best),
                                tuple(panels)))
    return tuple(grid)


def _cell_scores(row, reasons, best) -> tuple:
    """The scores shown under a panel (or beside a feature set) for one metrics row; () for none."""
    if row is None:
        return ()
    return tuple(Score(m, _metric_short(m), _metric_cell(row, m, reasons, _is_best(best, row, m)))
                 for m in _metric_keys([row]) if m not in NOT_SCORES)


def _seeds_note(result: Result) -> str:
    per_key: dict = {}
    for emb in result.embeddings:
        per_key.setdefault(emb.key, []).append(emb.seed)
    most = max((len(s) for s in per_key.values()), default=0)
    if most <= 1:
        return ""
    some = next(s for s in per_key.values() if len(s) == most)
    return (f"Pictures show seed {some[0]}; scores are mean \u00b1 standard deviation over "
            f"{most} seeds ({', '.join(str(s) for s in some)}).")


def _summary_methods(rows: list[dict], methods: tuple) -> tuple:
    out = []
    if any(r.get("method") == "features" for r in rows):
        out.append(MethodColumn(FEATURES, _method_title(FEATURES), ()))
    return tuple(out) + tuple(methods)


def _best_rows(rows: list[dict], metrics: tuple, best: Mapping, summary_methods: tuple) -> tuple:
    out = []
    for metric in metrics:
        cells = []
        for column in summary_methods:
            top = best.get((column.name, metric))
            if top is None:
                cells.append(None)
                continue
            group = [r for r in rows if r.get("method") == column.name
                     and _finite(r.get(metric)) is not None]
            names = ", ".join(f"{r.get('model')}/{r.get('layer')}" for r in group
                              if _finite(r.get(metric)) == top)
            cells.append(BestCell(names, _fmt(top), f"best of {len(group)} feature sets"))
        if any(c is not None for c in cells):
            out.append(BestRow(metric, _metric_title(metric),
                               tuple(cells)))
    return tuple(out)


def _check_summary(checks) -> CheckSummary | None:
    if not checks:
        return None
    status = [c.status for c in checks]
    return CheckSummary(
        total=len(checks), passed=status.count("pass"), failed=status.count("fail"),
        warned=status.count("warn"), errored=status.count("error"),
        failing=tuple(c.name for c in checks if c.status in ("fail", "error")),
        warning=tuple(c.name for c in checks if c.status == "warn"),
        skipped=status.count("skip"), skipping=tuple(dict.fromkeys(c.name for c in checks if c.status == "skip")))


def _check_row(check) -> CheckRow:
    selector = "/".join(str(p) if p not in (None, "") else "*"
                        for p in (check.model, check.layer, check.method))
    value = _finite(check.value)
    cell = Cell(_fmt(value), value) if value is not None else Cell("n/a", None, "undefined",
                                                                     undefined=True)
    return CheckRow(str(check.name), selector, str(check.metric), str(check.condition), cell,
                    str(check.status), str(check.severity), str(check.message or ""))


def _score_table(rows: list[dict], metrics: tuple, best: Mapping, reasons) -> Table:
    columns = [Column("model", "model", False), Column("layer", "layer", False),
               Column("method", "method", False)]
    columns += [Column(m, _metric_title(m),
                       any(_finite(r.get(m)) is not None for r in rows)
                       or not any(isinstance(r.get(m), str) for r in rows),
                       "lower is better" if _lower_is_better(m) else "higher is better")
                for m in metrics]
    table_rows = []
    for row in rows:
        cells = [Cell(str(row.get(k, "")), str(row.get(k, "")).lower()) for k in ID_KEYS]
        cells += [_metric_cell(row, m, reasons, _is_best(best, row, m), interval=True) for m in metrics]
        table_rows.append(tuple(cells))
    return Table(tuple(columns), tuple(table_rows))


def _heat_cell(value: Any, vmin: float = 0.0, vmax: float = 1.0, bounds: Any = None) -> Cell:
    from evalkit import plots

    number = _finite(value)
    background, color = plots.heat_color(number, vmin, vmax)
    text = _fmt(number) if number is not None else "n/a"
    title = ""
    if number is not None and bounds is not None and len(bounds) == 2:
        lo, hi = _finite(bounds[0]), _finite(bounds[1])
        if lo is not None and hi is not None:
            title = f"95% interval over the class's samples [{_fmt_bound(lo)}, {_fmt_bound(hi)}]"
    return Cell(text, number, title=title, style=f"background:{background};color:{color}",
                undefined=number is None)


def _cka_table(cka: Any) -> Table | None:
    if cka is None or not cka.keys:
        return None
    keys = [str(k) for k in cka.keys]
    matrix = cka.matrix or []
    columns = (Column("", "", False),) + tuple(Column(k, k, True) for k in keys)
    rows = []
    for i, key in enumerate(keys):
        values = list(matrix[i]) if i < len(matrix) else []
        rows.append((Cell(key, key),) + tuple(
            _heat_cell(values[j] if j < len(values) else None) for j in range(len(keys))))
    how = ("debiased (unbiased HSIC, Song et al. 2012)" if getattr(cka, "estimator", "biased") == "debiased"
           else "biased HSIC (Kornblith et al. 2019)")
    batch = getattr(cka, "batch_size", None)
    if batch:
        how += f", minibatch CKA over batches of {batch:,} samples (Nguyen et al. 2021)"
    return Table(columns, tuple(rows),
                 f"Linear CKA between feature sets (model/layer), {how}; colour from 0 (light) to 1 (dark)")


def _per_class_table(per_class: Any, label_names, intervals: Any = None) -> Table | None:
    if not per_class:
        return None
    keys = [str(k) for k in per_class]
    values = [list(v) for v in per_class.values()]
    intervals = intervals or {}
    bounds = [list(intervals.get(k) or ()) for k in per_class]
    columns = (Column("class", "class", False),) + tuple(Column(k, k, True) for k in keys)
    finite = [[_finite(x) for x in v] for v in values]
    present = [x for v in finite for x in v if x is not None]
    # Start the colour scale at the worst class (rounded down to 0.1): weak classes stand out.
    vmin = min(math.floor(min(present) * 10) / 10, 0.9) if present else 0.0
    rows = []
    for c, name in enumerate(label_names):
        rows.append((Cell(str(name), str(name)),) + tuple(
            _heat_cell(v[c] if c < len(v) else None, vmin, bounds=b[c] if c < len(b) else None)
            for v, b in zip(finite, bounds)))
    means = [float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v)
             else None for v in finite]
    rows.append((Cell("mean over classes", ""),) + tuple(_heat_cell(m, vmin) for m in means))
    return Table(columns, tuple(rows),
                 f"Per-class kNN accuracy (rows: classes, columns: feature sets); "
                 f"colour from {_fmt(vmin)} (light) to 1 (dark)"
                 + ("; hover a cell for its 95% Wilson interval over the class's samples"
                    if any(any(x is not None for x in b) for b in bounds) else ""))


def _stability_table(stability: Any) -> Table | None:
    if not stability:
        return None
    # "model/layer/method" -> one row per feature set, one column per method.
    table: dict = {}
    methods: list = []
    for key, value in stability.items():
        feature_set, _, method = str(key).rpartition("/")
        table.setdefault(feature_set, {})[method] = _finite(value)
        if method not in methods:
            methods.append(method)
    order = _method_order()
    methods = [m for m in order if m in methods] + [m for m in methods if m not in order]
    columns = (Column("feature set", "feature set", False),) + tuple(
        Column(m, _method_title(m), True, "Procrustes disparity; lower is more stable")
        for m in methods)
    rows = []
    for feature_set, per_method in table.items():
        cells = [Cell(feature_set, feature_set)]
        for m in methods:
            number = per_method.get(m)
            if m not in per_method:
                cells.append(Cell(NOT_APPLICABLE, None, "not computed"))
            elif number is None:
                cells.append(Cell("n/a", None, "undefined", undefined=True))
            else:
                cells.append(Cell(_fmt(number), number))
        rows.append(tuple(cells))
    return Table(columns, tuple(rows), "Procrustes disparity across seeds (lower is more stable)")


def _rnx_charts(result: Result, methods: tuple) -> tuple:
    """One chart per method: R_NX(K) of each feature set, in config order."""
    from evalkit import plots

    curves = dict(result.rnx_curves or {})
    out = []
    for column in methods:
        lines = [(key.rpartition("/")[0], c.k, c.r) for key, c in curves.items()
                 if key.rpartition("/")[2] == column.name and len(c.k)]
        if not lines:
            continue
        alt = (f"R_NX(K) of the {column.title} embeddings against K on a log scale, one line per feature set: "
               + "; ".join(f"{label} from {r[0]:.2f} at K = 1 to {r[-1]:.2f} at K = {int(k[-1]):,}"
                           for label, k, r in lines))
        out.append(Chart(column.name, column.title, plots.curves_png(lines, title=column.title), alt))
    return tuple(out)


def _n_neighbors(result: Result, config: Mapping) -> Any:
    if result.n_neighbors is not None:
        return result.n_neighbors
    metrics = config.get("metrics") if isinstance(config, Mapping) else None
    return metrics.get("n_neighbors") if isinstance(metrics, Mapping) else None


def _rnx_max_k(result: Result) -> int | None:
    ks = [int(c.k[-1]) for c in (result.rnx_curves or {}).values() if len(c.k)]
    return max(ks) if ks else None


def _metric_notes(metrics: tuple, k: Any, knn_k: Any = None, rnx_k: Any = None) -> tuple:
    """(title, explanation) of each score shown, from its registry entry."""
    kk = f"k = {k}" if k is not None else "k"
    knn = f"k = {knn_k}" if knn_k is not None else kk
    out = []
    for m in metrics:
        if m in _metrics() and _metrics().get(m).description:
            text = (_metrics().get(m).description.replace("{knn_k}", knn).replace("{k}", kk)
                    .replace("{rnx_k}", f"{rnx_k:,}" if rnx_k is not None else "metrics.rnx_max_k"))
            out.append((_metric_title(m), text))
    return tuple(out)


def _provenance_items(provenance: Mapping) -> tuple:
    items = []
    for key, value in (provenance or {}).items():
        key = str(key)
        if isinstance(value, Mapping):
            items.append(ProvenanceItem(key, "", tuple((str(k), _prov_text(k, v))
                                                       for k, v in value.items())))
        else:
            mono = any(w in key.lower() for w in ("command", "argv", "cmd", "path"))
            items.append(ProvenanceItem(key, _prov_text(key, value), mono=mono))
    return tuple(items)


def _prov_text(key: Any, value: Any) -> str:
    key = str(key).lower()
    if isinstance(value, (list, tuple)):
        if any(w in key for w in ("command", "argv", "cmd")):
            return shlex.join(str(v) for v in value)
        return ", ".join(_prov_text("", v) for v in value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "n/a"
        if key.endswith("_s") or "seconds" in key or "duration" in key:
            return _duration(value)
        return f"{value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {_prov_text(k, v)}" for k, v in value.items())
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours} h {minutes:02d} min {secs:02d} s" if hours
            else f"{minutes} min {secs:02d} s")


def _first(mapping: Mapping, keys: Iterable[str]) -> Any:
    for key in keys:
        if mapping and mapping.get(key) not in (None, ""):
            return mapping[key]
    return None


def _format_date(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        moment = value
    else:
        try:
            moment = datetime.fromisoformat(str(value))
        except ValueError:
            return str(value)
    text = moment.strftime("%Y-%m-%d %H:%M")
    offset = moment.strftime("%z")
    if offset in ("+0000", "-0000"):
        return text + " UTC"
    return f"{text} {offset[:3]}:{offset[3:]}" if offset else text


def _parse_yaml(text: str) -> Mapping:
    try:
        import yaml

        data = yaml.safe_load(text or "")
    except Exception:  # a report must render even from an odd config text
        return {}
    return data if isinstance(data, Mapping) else {}


def _dataset_text(provenance: Mapping, config: Mapping) -> str:
    given = _first(provenance, ("dataset",))
    if given is not None:
        return str(given)
    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        return ""
    parts = [str(data.get("kind", ""))]
    for key in ("path", "split"):
        if data.get(key):
            parts.append(f"{key}={data[key]}")
    return " ".join(p for p in parts if p)
