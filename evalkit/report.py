"""The run folder: ``index.html``, ``metrics.json``, ``embeddings.npz`` and ``config.yaml``.

Data first, rendering second: :func:`build_context` turns a :class:`~evalkit.results.RunResult`
into plain dataclasses of display-ready values, and the jinja2 templates in
``reports/templates`` (package ``evalkit.templates``, autoescaped) only lay them out.
:func:`write_run` writes the folder atomically.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import secrets
import shlex
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.results import RunResult

__all__ = ["write_run", "render_html", "build_context", "metrics_payload", "embedding_arrays"]

# Display order and names; methods and metrics not listed here follow in order of appearance.
METHOD_ORDER = ("tsne", "umap", "pca")
METHOD_TITLES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PCA", "features": "raw features"}
METRIC_ORDER = ("trustworthiness", "continuity", "silhouette", "knn_accuracy",
                "weighted_knn_accuracy")
METRIC_TITLES = {
    "trustworthiness": "trustworthiness", "continuity": "continuity",
    "silhouette": "silhouette", "knn_accuracy": "kNN accuracy",
    "weighted_knn_accuracy": "weighted kNN accuracy",
}
METRIC_SHORT = {
    "trustworthiness": "trust.", "continuity": "contin.", "silhouette": "silhouette",
    "knn_accuracy": "kNN acc.", "weighted_knn_accuracy": "w-kNN acc.",
}
# Row keys that describe a row rather than score it: shown, never marked "best".
NOT_SCORES = frozenset({"seed", "seeds", "n_seeds", "n_samples", "n_neighbors", "dim",
                        "n_features"})
LOWER_IS_BETTER = frozenset({"seconds", "duration_s", "disparity"})
ID_KEYS = ("model", "layer", "method")
NOT_APPLICABLE = "\u2013"  # – : metric not computed for this method


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
    metric_notes: tuple  # of (label, text)
    notes: tuple  # of str
    provenance: tuple  # of ProvenanceItem
    config_yaml: str
    css: str
    js: str
    csp: str
    explorer: Any = None  # evalkit.explorer.ExplorerAssets: interactive panels, or None


def build_context(result: RunResult) -> ReportContext:
    """Turn a run into display-ready data for the template (no HTML here)."""
    extras = result.extras or {}
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
    reasons = {str(k): str(v) for k, v in (extras.get("undefined_reasons") or {}).items()}
    best = _best_values(rows, metrics)
    feature_keys = _feature_keys(result)
    methods = _method_columns(result, rows)
    summary_methods = _summary_methods(rows, methods)
    config = _parse_yaml(result.config_yaml)
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
        cka=_cka_table(extras.get("cka")),
        per_class=_per_class_table(extras.get("per_class_knn"), result.label_names),
        per_class_open=n_classes <= 30,
        stability=_stability_table(extras.get("stability")),
        metric_notes=_metric_notes(metrics, _n_neighbors(extras, config)),
        notes=tuple(str(n) for n in extras.get("notes", ()) or ()),
        provenance=_provenance_items(result.provenance),
        config_yaml=str(result.config_yaml),
        css=_static("report.css"),
        js=_static("report.js"),
        csp=_content_security_policy(_static("report.js"), *(explorer.scripts if explorer else ()),
                                     allow_eval=bool(explorer and explorer.needs_eval)),
        explorer=explorer,
    )


def render_html(result: RunResult) -> str:
    """The report page as one self-contained HTML string (no network references)."""
    return _environment().get_template("report.html").render(ctx=build_context(result))


# --------------------------------------------------------------------------- writing


def write_run(out_dir, result: RunResult) -> Path:
    """Write the run folder ``out_dir`` atomically and return its path.

    Everything is written into a hidden sibling folder first, which then replaces ``out_dir``
    (an existing folder is moved aside and deleted only after the swap). If anything fails, the
    previous folder stays exactly as it was and no temporary folder is left behind.

    Raises
    ------
    EvalkitError
        If ``out_dir`` exists and is not a folder, or its parent cannot be created or written.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise EvalkitError(f"run folder {out}: exists and is not a folder; expected a folder "
                           "(or a path that does not exist yet)")
    parent = out.parent
    blocker = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise EvalkitError(f"run folder {out}: {blocker} is a file; expected a folder there")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EvalkitError(f"cannot create the folder {parent} for the run folder {out.name}: "
                           f"{exc.strerror or exc}") from None

    # Render everything before touching the disk: a failing render leaves nothing behind.
    files = {
        "index.html": render_html(result).encode("utf-8"),
        "metrics.json": (json.dumps(metrics_payload(result), indent=2, allow_nan=False)
                         + "\n").encode("utf-8"),
        "embeddings.npz": _npz_bytes(embedding_arrays(result)),
        "config.yaml": str(result.config_yaml).encode("utf-8"),
    }

    tmp = _make_sibling(parent, f".{out.name}.tmp-")
    old: Path | None = None
    swapped = False
    try:
        for name, data in files.items():
            _write_file(tmp / name, data)
        if out.exists():
            old = parent / f".{out.name}.old-{secrets.token_hex(4)}"
            os.rename(out, old)
        os.rename(tmp, out)
        swapped = True
    finally:
        if not swapped:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and not out.exists():
                os.rename(old, out)  # put the previous run back
                old = None
        if old is not None:
            if old.is_symlink():  # out_dir was a link to a folder: drop the link, not its target
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
    return out


def metrics_payload(result: RunResult) -> dict:
    """The content of ``metrics.json``: strict-JSON-ready (NaN and infinities become None)."""
    return {
        "rows": [_jsonable(dict(r)) for r in result.rows],
        "checks": [_jsonable(c.as_dict()) for c in result.checks],
        "provenance": _jsonable(dict(result.provenance)),
        "extras": _jsonable(dict(result.extras or {})),
    }


def embedding_arrays(result: RunResult) -> dict[str, np.ndarray]:
    """The arrays of ``embeddings.npz``.

    ``MODEL/LAYER/METHOD`` -> float32 (n_samples, 2) for the first seed of each embedding,
    ``MODEL/LAYER/METHOD@seedS`` for the others, plus ``labels``, ``indices`` (int64) and
    ``label_names`` (unicode strings).
    """
    arrays: dict[str, np.ndarray] = {}
    for emb in result.embeddings:
        key = emb.key if emb.key not in arrays else f"{emb.key}@seed{emb.seed}"
        arrays[key] = np.asarray(emb.coords, dtype=np.float32)
    arrays["labels"] = np.asarray(result.labels, dtype=np.int64)
    arrays["indices"] = np.asarray(result.indices, dtype=np.int64)
    arrays["label_names"] = np.array([str(n) for n in result.label_names], dtype=str)
    return arrays


def _make_sibling(parent: Path, prefix: str) -> Path:
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # default mode, so the final folder gets the usual permissions
            return path
        except FileExistsError:
            continue
        except OSError as exc:
            raise EvalkitError(f"cannot write in {parent}: {exc.strerror or exc}; expected a "
                               "writable folder for the run") from None
    raise EvalkitError(f"cannot create a temporary folder in {parent}")


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    """Plain JSON types; NaN and infinities become None, numpy values become Python ones."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


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
                 best: bool = False) -> Cell:
    """A metric of a row, with its spread when the row has ``<metric>_std``."""
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
    if best:
        title = (title + "; " if title else "") + "best in its method"
    return Cell(text, value, title, best=best)


def _metric_keys(rows: list[dict]) -> tuple:
    seen: list[str] = []
    for row in rows:
        for key in row:
            if key not in ID_KEYS and key not in seen:
                seen.append(key)
    spreads = {k for k in seen if k.endswith("_std") and k[:-4] in seen}
    keys = [k for k in seen if k not in spreads]
    ordered = [k for k in METRIC_ORDER if k in keys]
    return tuple(ordered + [k for k in keys if k not in ordered])


def _best_values(rows: list[dict], metrics: Iterable[str]) -> dict:
    """(method, metric) -> best finite value among that method's rows."""
    best: dict = {}
    for metric in metrics:
        if metric in NOT_SCORES:
            continue
        sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
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


def _method_columns(result: RunResult, rows: list[dict]) -> tuple:
    present: list[str] = []
    for name in [e.method for e in result.embeddings] + [r.get("method") for r in rows]:
        if name and name != "features" and name not in present:
            present.append(str(name))
    ordered = [m for m in METHOD_ORDER if m in present] + [m for m in present
                                                          if m not in METHOD_ORDER]
    params = dict((result.extras or {}).get("method_params") or {})
    for emb in result.embeddings:  # fall back on what the embeddings recorded
        if emb.method not in params and emb.params:
            params[emb.method] = dict(emb.params)
    return tuple(MethodColumn(m, METHOD_TITLES.get(m, m),
                              tuple((str(k), _param_text(v))
                                    for k, v in (params.get(m) or {}).items()))
                 for m in ordered)


def _param_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_param_text(v) for v in value)
    return str(value)


def _feature_keys(result: RunResult) -> list:
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
    for model, layer in feature_keys:
        frow = row_index.get((model, layer, "features"))
        feature_scores = ()
        if frow is not None:
            feature_scores = tuple(
                Score(m, METRIC_SHORT.get(m, m.replace("_", " ")),
                      _metric_cell(frow, m, reasons, _is_best(best, frow, m)))
                for m in _metric_keys([frow]) if m not in NOT_SCORES)
        panels = []
        for column in methods:
            emb = first.get(f"{model}/{layer}/{column.name}")
            if emb is None:
                panels.append(None)
                continue
            erow = row_index.get((model, layer, column.name))
            scores = ()
            if erow is not None:
                scores = tuple(
                    Score(m, METRIC_SHORT.get(m, m.replace("_", " ")),
                          _metric_cell(erow, m, reasons, _is_best(best, erow, m)))
                    for m in _metric_keys([erow]) if m not in NOT_SCORES)
            alt = (f"{column.title} of {model}/{layer}: {n} points coloured by class "
                   f"({len(result.label_names)} classes), seed {emb.seed}")
            panels.append(Panel(column.name, plots.scatter_png(emb.coords, labels, colors),
                                alt, tuple(seeds[emb.key]), scores))
        grid.append(GridRow(str(model), str(layer), dims.get((model, layer)), feature_scores,
                            tuple(panels)))
    return tuple(grid)


def _seeds_note(result: RunResult) -> str:
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
        out.append(MethodColumn("features", METHOD_TITLES["features"], ()))
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
            out.append(BestRow(metric, METRIC_TITLES.get(metric, metric.replace("_", " ")),
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
        warning=tuple(c.name for c in checks if c.status == "warn"))


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
    columns += [Column(m, METRIC_TITLES.get(m, m.replace("_", " ")),
                       any(_finite(r.get(m)) is not None for r in rows)
                       or not any(isinstance(r.get(m), str) for r in rows),
                       "lower is better" if m in LOWER_IS_BETTER else "higher is better")
                for m in metrics]
    table_rows = []
    for row in rows:
        cells = [Cell(str(row.get(k, "")), str(row.get(k, "")).lower()) for k in ID_KEYS]
        cells += [_metric_cell(row, m, reasons, _is_best(best, row, m)) for m in metrics]
        table_rows.append(tuple(cells))
    return Table(tuple(columns), tuple(table_rows))


def _heat_cell(value: Any, vmin: float = 0.0, vmax: float = 1.0) -> Cell:
    from evalkit import plots

    number = _finite(value)
    background, color = plots.heat_color(number, vmin, vmax)
    text = _fmt(number) if number is not None else "n/a"
    return Cell(text, number, style=f"background:{background};color:{color}",
                undefined=number is None)


def _cka_table(cka: Any) -> Table | None:
    if not cka or not cka.get("keys"):
        return None
    keys = [str(k) for k in cka["keys"]]
    matrix = cka.get("matrix") or []
    columns = (Column("", "", False),) + tuple(Column(k, k, True) for k in keys)
    rows = []
    for i, key in enumerate(keys):
        values = list(matrix[i]) if i < len(matrix) else []
        rows.append((Cell(key, key),) + tuple(
            _heat_cell(values[j] if j < len(values) else None) for j in range(len(keys))))
    return Table(columns, tuple(rows),
                 "Linear CKA between feature sets (model/layer); colour from 0 (light) to 1 (dark)")


def _per_class_table(per_class: Any, label_names) -> Table | None:
    if not per_class:
        return None
    keys = [str(k) for k in per_class]
    values = [list(v) for v in per_class.values()]
    columns = (Column("class", "class", False),) + tuple(Column(k, k, True) for k in keys)
    finite = [[_finite(x) for x in v] for v in values]
    present = [x for v in finite for x in v if x is not None]
    # Start the colour scale at the worst class (rounded down to 0.1): weak classes stand out.
    vmin = min(math.floor(min(present) * 10) / 10, 0.9) if present else 0.0
    rows = []
    for c, name in enumerate(label_names):
        rows.append((Cell(str(name), str(name)),) + tuple(
            _heat_cell(v[c] if c < len(v) else None, vmin) for v in finite))
    means = [float(np.mean([x for x in v if x is not None])) if any(x is not None for x in v)
             else None for v in finite]
    rows.append((Cell("mean over classes", ""),) + tuple(_heat_cell(m, vmin) for m in means))
    return Table(columns, tuple(rows),
                 f"Per-class kNN accuracy (rows: classes, columns: feature sets); "
                 f"colour from {_fmt(vmin)} (light) to 1 (dark)")


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
    methods = [m for m in METHOD_ORDER if m in methods] + [m for m in methods
                                                          if m not in METHOD_ORDER]
    columns = (Column("feature set", "feature set", False),) + tuple(
        Column(m, METHOD_TITLES.get(m, m), True, "Procrustes disparity; lower is more stable")
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


def _n_neighbors(extras: Mapping, config: Mapping) -> Any:
    if extras.get("n_neighbors") is not None:
        return extras["n_neighbors"]
    metrics = config.get("metrics") if isinstance(config, Mapping) else None
    return metrics.get("n_neighbors") if isinstance(metrics, Mapping) else None


def _metric_notes(metrics: tuple, k: Any) -> tuple:
    kk = f"k = {k}" if k is not None else "k"
    notes = {
        "trustworthiness": (f"Are the {kk} nearest neighbours of a point in the picture also "
                            "near it in the feature space? 1 = no false neighbours "
                            "(Venna & Kaski); penalises points pulled together by the embedding."),
        "continuity": (f"The reverse: are the {kk} nearest neighbours in the feature space kept "
                       "near in the picture? 1 = no neighbours torn apart."),
        "silhouette": ("Mean silhouette of the classes with euclidean distance, from -1 to 1: "
                       "how much closer a point is to its own class than to the nearest other "
                       "class. Computed in the picture for embeddings, in the feature space "
                       "for raw features."),
        "knn_accuracy": (f"Leave-one-out kNN accuracy: each point is classified by a majority "
                         f"vote of its {kk} nearest neighbours in that space (itself "
                         "excluded)."),
        "weighted_knn_accuracy": ("Weighted kNN accuracy on raw features (DINO protocol): "
                                  "L2-normalised features, cosine similarity, neighbour votes "
                                  "weighted by exp(similarity / 0.07)."),
    }
    return tuple((METRIC_TITLES.get(m, m), notes[m]) for m in metrics if m in notes)


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
