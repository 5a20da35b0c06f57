"""Plain data passed between the stages, and the :class:`Result` the API returns.

Every stage returns one of these frozen dataclasses; the only behaviour here is how a result
presents itself (``save``, ``passed``, the Jupyter view), which delegates to
:mod:`evalkit.runfolder` and :mod:`evalkit.report`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

ID_KEYS = ("model", "layer", "method")


@dataclass(frozen=True)
class FeatureSet:
    """Features of one model at one layer.

    Attributes
    ----------
    model, layer : str
        Names as the config (or the API call) spells them.
    features : ndarray of shape (n_samples, n_features), float32
    """

    model: str
    layer: str
    features: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}"


@dataclass(frozen=True)
class Embedding:
    """One 2-D embedding of one feature set by one method and seed."""

    model: str
    layer: str
    method: str
    seed: int
    coords: np.ndarray  # (n_samples, 2) float32
    params: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}/{self.method}"


@dataclass(frozen=True)
class ScoreRow(Mapping):
    """The scores of one space of one feature set: one row of metrics.json.

    A read-only mapping over the flat row (``model``, ``layer``, ``method``, then one key per
    score, ``<score>_std`` with several seeds, ``<score>_lo`` and ``<score>_hi`` for a score
    with an interval, and descriptive keys such as ``n_features``), so ``dict(row)`` is
    exactly what metrics.json holds.

    Attributes
    ----------
    model, layer, method : str
        ``method`` is an embedding method or ``"features"`` for the raw features.
    scores : mapping of str to float or None
        Mean over seeds; None where the score is undefined for these data.
    stds : mapping of str to float or None
        Standard deviation over seeds (only with several seeds).
    bounds : mapping of str to (float, float)
        95% interval over the samples (``kNN accuracy``: Wilson score interval), for the
        scores that have one and are defined.
    info : mapping of str to int
        Descriptive values shown beside the scores (``n_features``), never ranked.
    """

    model: str
    layer: str
    method: str
    scores: Mapping[str, Optional[float]] = field(default_factory=dict)
    stds: Mapping[str, Optional[float]] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)
    bounds: Mapping[str, tuple] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, row: Mapping) -> "ScoreRow":
        """A row from its flat form (metrics.json), the inverse of ``dict(row)``."""
        rest = {k: v for k, v in row.items() if k not in ID_KEYS}
        info = {k: v for k, v in rest.items() if k in INFO_KEYS}
        stds = {k[:-4]: v for k, v in rest.items() if k.endswith("_std")}
        bounds = {k[:-3]: (v, rest[k[:-3] + "_hi"]) for k, v in rest.items()
                  if k.endswith("_lo") and k[:-3] in rest and k[:-3] + "_hi" in rest}
        bound_keys = {f"{name}{end}" for name in bounds for end in ("_lo", "_hi")}
        scores = {k: v for k, v in rest.items()
                  if k not in info and not k.endswith("_std") and k not in bound_keys}
        return cls(str(row.get("model")), str(row.get("layer")), str(row.get("method")), scores, stds, info, bounds)

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}/{self.method}"

    def _flat(self) -> dict:
        flat = {"model": self.model, "layer": self.layer, "method": self.method}
        flat.update(self.info)
        for name, value in self.scores.items():
            flat[name] = value
            if name in self.stds:
                flat[f"{name}_std"] = self.stds[name]
            if name in self.bounds:
                flat[f"{name}_lo"], flat[f"{name}_hi"] = self.bounds[name]
        return flat

    def __getitem__(self, key):
        return self._flat()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._flat())

    def __len__(self) -> int:
        return len(self._flat())


#: Row keys that describe a row rather than score it.
INFO_KEYS = frozenset({"n_features", "n_samples", "dim", "seeds", "n_seeds"})


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one threshold check against one metrics row."""

    name: str
    metric: str
    model: str
    layer: str
    method: str
    condition: str  # human-readable, e.g. ">= 0.9"
    value: float | None
    status: str  # "pass" | "fail" | "warn" | "error" | "skip"
    severity: str  # "fail" | "warn"
    message: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Curve:
    """R_NX(K) of one embedding method of one feature set at log-spaced K (mean over seeds).

    Attributes
    ----------
    k : ndarray of shape (n_points,), int64
        Neighbourhood sizes, 1 to the largest K computed.
    r : ndarray of shape (n_points,), float64
        R_NX at those K (0 = no better than random, 1 = every K-neighbourhood kept).
    """

    k: np.ndarray
    r: np.ndarray


@dataclass(frozen=True)
class CKA:
    """Linear CKA between every pair of feature sets (``keys`` are ``model/layer``).

    ``estimator`` is ``"debiased"`` (unbiased HSIC, Song et al. 2012) or ``"biased"``
    (Kornblith et al. 2019); ``batch_size`` is set for minibatch CKA (Nguyen et al. 2021).
    """

    keys: tuple
    matrix: tuple  # of tuples of float (nan where a representation is constant)
    estimator: str = "biased"
    batch_size: Optional[int] = None


@dataclass(frozen=True)
class Result:
    """Everything one evaluation produced; what the report and metrics.json are made from.

    Returned by :func:`evalkit.evaluate` (nothing written) and by ``evalkit report``.
    ``result.save(DIR)`` writes the run folder; in Jupyter the result shows its summary, the
    grid of pictures and the checks; ``result.passed`` says whether every check passed.

    Attributes
    ----------
    name : str
    labels : ndarray of shape (n_samples,), int64
    label_names : tuple of str
        ``label_names[labels[i]]`` is the class name of sample i.
    indices : ndarray of shape (n_samples,), int64
        Positions of the samples in the dataset split.
    feature_sets : tuple of FeatureSet
        In the order given (models, then layers).
    embeddings : tuple of Embedding
        Every method x seed for every feature set.
    rows : tuple of ScoreRow
        One per feature set and space (``features`` and each method).
    checks : tuple of CheckResult
    provenance : dict
        Date, duration, device, versions, seeds, data.
    config_yaml : str
        The fully resolved settings as YAML (loadable by ``evalkit report``).
    per_class_knn : mapping of str to tuple of float or None
        ``model/layer`` -> kNN accuracy of each class on the raw features.
    per_class_knn_interval : mapping of str to tuple of (float, float) or None
        ``model/layer`` -> 95% Wilson interval of each class's kNN accuracy (over its samples).
    cka : CKA or None
    method_params : mapping of str to mapping
        The hyperparameters each method used (shown in the report).
    stability : mapping of str to float or None
        ``model/layer/method`` -> mean Procrustes disparity across seeds (several seeds only).
    rnx_curves : mapping of str to Curve
        ``model/layer/method`` -> R_NX(K) of that embedding (mean over seeds).
    notes : tuple of str
        What the reader should know (lowered defaults, subsampling, rescaling...).
    undefined_reasons : mapping of str to str
        Score -> why it is undefined for these data.
    n_neighbors, knn_k : int or None
        The k of the neighbourhood scores and of kNN accuracy.
    sample_ids : ndarray of str or None
        Per-sample identifiers when the data carry them (image paths, ids in features files).
    thumbnails : ndarray of uint8 or None
        (n_samples, h, w[, 3]) small images for the report's hover.
    knn_predictions : mapping of str to ndarray of int64
        ``model/layer`` -> each sample's leave-one-out kNN prediction on the raw features
        (the report colours points right/wrong and compares feature sets with them).
    point_scores : mapping of str to mapping
        ``model/layer/method`` -> ``{"trustworthiness": (n_samples,), "continuity": (n_samples,)}``:
        each point's share of the score (their mean is the score).
    """

    name: str
    labels: np.ndarray
    label_names: tuple
    indices: np.ndarray
    feature_sets: tuple
    embeddings: tuple
    rows: tuple
    checks: tuple
    provenance: dict
    config_yaml: str
    per_class_knn: Mapping = field(default_factory=dict)
    per_class_knn_interval: Mapping = field(default_factory=dict)
    cka: Optional[CKA] = None
    method_params: Mapping = field(default_factory=dict)
    stability: Mapping = field(default_factory=dict)
    rnx_curves: Mapping = field(default_factory=dict)
    notes: tuple = ()
    undefined_reasons: Mapping = field(default_factory=dict)
    n_neighbors: Optional[int] = None
    knn_k: Optional[int] = None
    sample_ids: Optional[np.ndarray] = None
    thumbnails: Optional[np.ndarray] = None
    knn_predictions: Mapping = field(default_factory=dict)
    point_scores: Mapping = field(default_factory=dict)

    def __post_init__(self):
        rows = tuple(r if isinstance(r, ScoreRow) else ScoreRow.from_dict(r) for r in self.rows)
        object.__setattr__(self, "rows", rows)

    # --- reading -----------------------------------------------------------------------

    @property
    def passed(self) -> bool:
        """True when no check of severity ``fail`` failed (warnings allowed)."""
        return not any(c.status in ("fail", "error") and c.severity == "fail" for c in self.checks)

    def row(self, model: str, layer: str, method: str = "features") -> ScoreRow:
        """The row of one feature set and space; KeyError names the ones there are."""
        for r in self.rows:
            if (r.model, r.layer, r.method) == (model, layer, method):
                return r
        have = ", ".join(r.key for r in self.rows)
        raise KeyError(f"no row {model}/{layer}/{method}; rows: {have}")

    def score(self, metric: str, *, model: str, layer: str, method: str = "features") -> Optional[float]:
        """One score, e.g. ``result.score("knn_accuracy", model="cnn", layer="penultimate")``.

        None when the score is undefined for these data; KeyError when this row has no such
        score (a misspelt name, or a score not computed for ``method``).
        """
        row = self.row(model, layer, method)
        if metric not in row.scores:
            raise KeyError(f"no score {metric!r} for {row.key}; scores there: {', '.join(row.scores)}")
        return row.scores[metric]

    def embedding(self, model: str, layer: str, method: str, seed: Optional[int] = None) -> np.ndarray:
        """Coordinates (n_samples, 2) of one embedding (the first seed unless ``seed`` is given)."""
        for e in self.embeddings:
            if (e.model, e.layer, e.method) == (model, layer, method) and (seed is None or e.seed == seed):
                return e.coords
        raise KeyError(f"no embedding {model}/{layer}/{method}" + (f" with seed {seed}" if seed is not None else ""))

    def table(self) -> list:
        """The rows as plain dicts (``pandas.DataFrame(result.table())`` gives a data frame)."""
        return [dict(r) for r in self.rows]

    # --- writing and showing ---------------------------------------------------------------

    def save(self, out_dir, *, overwrite: bool = True):
        """Write the run folder (``index.html``, ``metrics.json``, ``embeddings.npz``,
        ``config.yaml``) atomically, as ``evalkit report`` does; returns its path.

        An existing folder is replaced only when it is an earlier run folder (and
        ``overwrite`` is true); anything else there is refused, never deleted. Files you added
        to an earlier run folder (``notes.md``, ``figs/``) are kept.
        """
        from evalkit.runfolder import check_out_dir, write_run

        out = check_out_dir(out_dir, overwrite=overwrite, what="out_dir")
        return write_run(out, self)

    def html(self) -> str:
        """The report page as one self-contained HTML string."""
        from evalkit.report import render_html

        return render_html(self)

    def _repr_html_(self) -> str:
        from evalkit.report import render_notebook

        return render_notebook(self)

    def __repr__(self) -> str:
        failed = sum(c.status in ("fail", "error") for c in self.checks)
        passed = sum(c.status == "pass" for c in self.checks)
        checks = f", checks: {passed} passed, {failed} failed" if self.checks else ""
        return (f"<evalkit.Result {self.name!r}: {plural(len(self.labels), 'sample')}, "
                f"{plural(len(self.label_names), 'class', 'classes')}, {plural(len(self.feature_sets), 'feature set')}, "
                f"{plural(len(self.embeddings), 'embedding')}{checks}>")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 sample``, ``2 samples`` (``many`` for irregular plurals)."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


#: The name earlier versions used.
RunResult = Result
