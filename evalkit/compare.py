"""Compare archived run folders: what changed between two runs, and how scores moved across many.

Data only; the pages are :mod:`evalkit.compare_report`'s job. :func:`load_run` reads a run
folder (refusing, in one line, a folder that is not one), :func:`compare_runs` puts two runs
side by side (score deltas with their seed spread, Procrustes-aligned embeddings of the shared
samples, config and provenance differences) and :func:`build_history` lines up the scores of
many runs in order. Nothing here recomputes a score: everything comes from the run folders.
"""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from evalkit.errors import EvalkitError, unknown
from evalkit.results import ID_KEYS, INFO_KEYS

__all__ = ["RunFolder", "load_run", "ScoreDelta", "SampleMatch", "AlignedEmbedding", "Difference",
           "Comparison", "compare_runs", "comparison_payload", "History", "build_history",
           "history_csv", "default_compare_dir", "default_history_dir", "NOISE_FACTOR", "TOLERANCE"]

#: A change counts as beyond the noise when ``|delta| > NOISE_FACTOR * sqrt(std_a² + std_b²)``
#: (about a 95 % two-sided test for the difference of two seed means).
NOISE_FACTOR = 2.0
#: A change of at most this much is no change: float noise of a recomputed score (PCA's
#: continuity moves by 1e-7 between two runs of the same features).
TOLERANCE = 1e-6
#: Share of the shared samples marked as "moved most" in an aligned pair (at least 1, at most 100).
MOVED_SHARE = 0.05
#: Provenance keys that differ on every run (times, durations): left out of the difference list.
_VOLATILE = frozenset({"started", "finished", "duration_s", "start_time", "started_at", "date", "host"})
_NOT_SCORES = INFO_KEYS | {"seed", "n_neighbors"}
_EXPECTED = "expected a run folder written by `evalkit report` (metrics.json, index.html, embeddings.npz)"


# --------------------------------------------------------------------------- run folders


@dataclass(frozen=True)
class RunFolder:
    """What a run folder holds, as read from disk.

    Attributes
    ----------
    path : Path
    name : str
        The config's ``name`` when config.yaml has one, else the folder's name.
    rows : tuple of dict
        metrics.json rows, unchanged.
    embeddings : mapping of str to ndarray of shape (n_samples, 2)
        First-seed embeddings by ``MODEL/LAYER/METHOD``; empty without embeddings.npz.
    ids : ndarray of shape (n_samples,) or None
        Sample ids (``ids`` in embeddings.npz, else ``indices``); None when neither is there.
    id_key : str
        ``"ids"``, ``"indices"`` or ``""``.
    notes : tuple of str
        What is missing from an older run folder (and so left out of a comparison).
    """

    path: Path
    name: str
    rows: tuple
    provenance: Mapping = field(default_factory=dict)
    config_yaml: Optional[str] = None
    embeddings: Mapping = field(default_factory=dict)
    labels: Optional[np.ndarray] = None
    ids: Optional[np.ndarray] = None
    id_key: str = ""
    label_names: tuple = ()
    notes: tuple = ()

    def row_index(self) -> dict:
        return {tuple(str(r.get(k)) for k in ID_KEYS): r for r in self.rows}

    def feature_sets(self) -> list:
        """(model, layer) pairs in the order of the rows."""
        return list(dict.fromkeys((str(r["model"]), str(r["layer"])) for r in self.rows))


def load_run(path, *, what: str = "run folder") -> RunFolder:
    """Read the run folder ``path``.

    A folder written by an older evalkit works when its metrics.json rows name model, layer and
    method: without ``extras``, config.yaml or embeddings.npz the comparison leaves those parts
    out and says so in :attr:`RunFolder.notes`.

    Raises
    ------
    EvalkitError
        One line naming the folder and what was expected: not a folder, no or unreadable
        metrics.json, rows without model/layer/method (written by a too old evalkit).
    """
    from evalkit.check import read_rows

    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise EvalkitError(f"{what} {path}: is a file; {_EXPECTED}")
    if not folder.is_dir():
        raise EvalkitError(f"{what} {path}: not found; {_EXPECTED}")
    if not (folder / "metrics.json").is_file():
        kind = " (it is an `evalkit compare` folder)" if (folder / "comparison.json").is_file() else ""
        raise EvalkitError(f"{what} {path}: not a run folder{kind}: no metrics.json; {_EXPECTED}")
    rows = read_rows(folder, what=what)
    for i, row in enumerate(rows):
        missing = [k for k in ID_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise EvalkitError(f"{what} {path}: metrics.json rows[{i}] has no {', '.join(missing)}: written by an "
                               f"evalkit too old to compare; write it again with `evalkit report`")
    if not rows:
        raise EvalkitError(f"{what} {path}: metrics.json has no rows; {_EXPECTED}")
    data = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    provenance = data.get("provenance") if isinstance(data.get("provenance"), Mapping) else {}
    notes = []
    if "extras" not in data:
        notes.append("written by an older evalkit (no extras in metrics.json)")
    config_yaml = None
    if (folder / "config.yaml").is_file():
        config_yaml = (folder / "config.yaml").read_text(encoding="utf-8")
    else:
        notes.append("no config.yaml: its configuration is not compared")
    name = _config_name(config_yaml) or folder.resolve().name
    arrays = _read_npz(folder / "embeddings.npz", what, path)
    if arrays is None:
        notes.append("no embeddings.npz: its embeddings are not compared")
        arrays = {}
    embeddings = {}
    for r in rows:
        key = f"{r['model']}/{r['layer']}/{r['method']}"
        if key in arrays and np.ndim(arrays[key]) == 2 and np.shape(arrays[key])[1] == 2:
            embeddings[key] = np.asarray(arrays[key], dtype=np.float64)
    id_key = "ids" if "ids" in arrays else ("indices" if "indices" in arrays else "")
    ids = np.asarray(arrays[id_key]) if id_key else None
    labels = np.asarray(arrays["labels"]) if "labels" in arrays else None
    label_names = tuple(str(n) for n in arrays["label_names"]) if "label_names" in arrays else ()
    if arrays and ids is None:
        notes.append("embeddings.npz has no sample indices: samples are matched by position")
    return RunFolder(folder, name, tuple(rows), dict(provenance), config_yaml, embeddings, labels, ids, id_key,
                     label_names, tuple(notes))


def _read_npz(path: Path, what: str, given) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # a truncated or foreign file: say which, not a traceback
        raise EvalkitError(f"{what} {given}: embeddings.npz cannot be read ({exc.__class__.__name__}: {exc}); "
                           f"{_EXPECTED}") from None


def _config_name(text: Optional[str]) -> str:
    config = _parse_yaml(text)
    name = config.get("name")
    return str(name) if isinstance(name, (str, int, float)) and str(name) else ""


def _parse_yaml(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        import yaml

        data = yaml.safe_load(text)
    except Exception:  # an odd config text must not stop a comparison
        return {}
    return data if isinstance(data, dict) else {}


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("._")
    return cleaned or "run"


def default_compare_dir(run_a, run_b) -> Path:
    """``reports/out/compare-A-vs-B``, A and B the run folders' names."""
    return Path("reports/out") / f"compare-{_safe_name(Path(run_a).resolve().name)}-vs-" \
                                 f"{_safe_name(Path(run_b).resolve().name)}"


def default_history_dir(runs: Sequence) -> Path:
    """``reports/out/history-FIRST-to-LAST`` from the first and last run folders' names."""
    first, last = (_safe_name(Path(runs[i]).resolve().name) for i in (0, -1))
    return Path("reports/out") / (f"history-{first}" if len(runs) == 1 else f"history-{first}-to-{last}")


# --------------------------------------------------------------------------- comparison data


@dataclass(frozen=True)
class ScoreDelta:
    """One score of one row (model, layer, method) in both runs.

    ``delta`` is B - A; ``change`` is the delta signed so that positive is better (the
    registry's ``higher_is_better``; None when the direction is unknown). ``noise`` is the
    combined seed spread ``sqrt(std_a² + std_b²)`` when either run has one, and
    ``beyond_noise`` whether ``|delta|`` exceeds :data:`NOISE_FACTOR` times it (and
    :data:`TOLERANCE`).
    """

    model: str
    layer: str
    method: str
    metric: str
    a: Optional[float]
    b: Optional[float]
    a_std: Optional[float] = None
    b_std: Optional[float] = None
    higher_is_better: Optional[bool] = True

    @property
    def delta(self) -> Optional[float]:
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def change(self) -> Optional[float]:
        d = self.delta
        if d is None or self.higher_is_better is None:
            return None
        return d if self.higher_is_better else -d

    @property
    def verdict(self) -> Optional[str]:
        """``worse``, ``better`` or ``same`` (within :data:`TOLERANCE`); None when unknown."""
        c = self.change
        if c is None:
            return None if self.delta is None or abs(self.delta) > TOLERANCE else "same"
        return "worse" if c < -TOLERANCE else "better" if c > TOLERANCE else "same"

    @property
    def noise(self) -> Optional[float]:
        spreads = [s for s in (self.a_std, self.b_std) if s is not None]
        return math.sqrt(sum(s * s for s in spreads)) if spreads else None

    @property
    def beyond_noise(self) -> Optional[bool]:
        d, n = self.delta, self.noise
        return None if d is None or n is None else abs(d) > max(NOISE_FACTOR * n, TOLERANCE)

    def as_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "method": self.method, "metric": self.metric,
                "a": self.a, "b": self.b, "delta": self.delta, "change": self.change, "verdict": self.verdict,
                "higher_is_better": self.higher_is_better, "a_std": self.a_std, "b_std": self.b_std,
                "noise": self.noise, "beyond_noise": self.beyond_noise}


@dataclass(frozen=True)
class SampleMatch:
    """How the samples of two runs were matched (by ``key``: ids, indices or position)."""

    key: str
    n_a: int
    n_b: int
    n_shared: int
    labels_differ: int = 0  # shared samples whose class differs between the runs

    @property
    def only_a(self) -> int:
        return self.n_a - self.n_shared

    @property
    def only_b(self) -> int:
        return self.n_b - self.n_shared

    def as_dict(self) -> dict:
        return {"matched_by": self.key, "n_a": self.n_a, "n_b": self.n_b, "shared": self.n_shared,
                "only_in_a": self.only_a, "only_in_b": self.only_b, "labels_differ": self.labels_differ}


@dataclass(frozen=True)
class AlignedEmbedding:
    """One embedding of both runs on their shared samples, B rotated onto A.

    ``a`` and ``b`` are standardised (centred, unit Frobenius norm), B rotated or reflected onto
    A (see :func:`align_embeddings`); ``disparity`` is 0 for the same picture up to rotation,
    reflection and scale and at most 1. ``moved`` are positions (into ``a``, ``b``, ``labels``
    and ``ids``) of the samples that moved most, largest first.
    """

    model: str
    layer: str
    method: str
    a: np.ndarray
    b: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    disparity: Optional[float]
    moved: np.ndarray
    displacement: np.ndarray
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}/{self.method}"

    def as_dict(self) -> dict:
        return {"model": self.model, "layer": self.layer, "method": self.method, "n_shared": int(len(self.ids)),
                "disparity": self.disparity, "note": self.note or None,
                "moved_most": [{"id": _plain(self.ids[i]), "distance": float(self.displacement[i])}
                               for i in self.moved]}


@dataclass(frozen=True)
class Difference:
    """One config or provenance key whose value differs (``None``: absent from that run)."""

    key: str
    a: Any
    b: Any

    def as_dict(self) -> dict:
        return {"key": self.key, "a": self.a, "b": self.b}


@dataclass(frozen=True)
class Comparison:
    """Everything ``evalkit compare`` shows and writes to comparison.json."""

    run_a: RunFolder
    run_b: RunFolder
    deltas: tuple  # of ScoreDelta, worst change first
    only_a: tuple  # of "model/layer/method" rows only RUN_A has
    only_b: tuple
    samples: Optional[SampleMatch]
    aligned: tuple  # of AlignedEmbedding, largest disparity first
    config_diff: tuple  # of Difference
    provenance_diff: tuple
    checks: tuple = ()  # CheckResult of RUN_B's checks with RUN_A as the baseline
    checks_source: str = ""
    notes: tuple = ()

    @property
    def exit_code(self) -> int:
        from evalkit.check import exit_code

        return exit_code(self.checks)


def compare_runs(run_a: RunFolder, run_b: RunFolder, *, checks: Iterable = (), checks_source: str = "",
                 align: bool = True) -> Comparison:
    """Compare two run folders (see :func:`load_run`).

    ``checks`` (:class:`evalkit.config.CheckConfig`) are evaluated on RUN_B's rows with RUN_A's
    as the baseline, as ``evalkit check RUN_B --baseline RUN_A`` does.

    Raises
    ------
    EvalkitError
        When the runs share no feature set (model/layer), or a check selects no row of RUN_B.
    """
    from evalkit.check import evaluate_checks

    shared_sets = [fs for fs in run_a.feature_sets() if fs in set(run_b.feature_sets())]
    if not shared_sets:
        raise EvalkitError(
            f"{run_a.path} and {run_b.path} share no feature set (model/layer): A has "
            f"{_list_sets(run_a)}, B has {_list_sets(run_b)}; expected two runs of at least one same model and layer")
    index_a, index_b = run_a.row_index(), run_b.row_index()
    deltas = []
    for key, row_a in index_a.items():
        row_b = index_b.get(key)
        if row_b is not None:
            deltas.extend(_row_deltas(key, row_a, row_b))
    deltas.sort(key=_delta_order)
    only_a = tuple("/".join(k) for k in index_a if k not in index_b)
    only_b = tuple("/".join(k) for k in index_b if k not in index_a)

    samples, aligned, notes = None, [], [f"A ({run_a.path}): {n}" for n in run_a.notes]
    notes += [f"B ({run_b.path}): {n}" for n in run_b.notes]
    if align and run_a.embeddings and run_b.embeddings:
        samples, pos_a, pos_b = match_samples(run_a, run_b)
        if samples.labels_differ:
            notes.append(f"{samples.labels_differ} shared samples have a different class in B; pictures use A's")
        if samples.n_shared < 3:
            notes.append(f"only {samples.n_shared} shared samples: embeddings not aligned")
        else:
            for key in index_a:
                name = "/".join(key)
                if key[2] != "features" and name in run_a.embeddings and name in run_b.embeddings:
                    aligned.append(align_embeddings(run_a.embeddings[name][pos_a], run_b.embeddings[name][pos_b],
                                                    labels=_labels(run_a, pos_a), ids=_ids(run_a, pos_a),
                                                    model=key[0], layer=key[1], method=key[2]))
    aligned.sort(key=lambda e: -(e.disparity if e.disparity is not None else -1.0))
    results = evaluate_checks(run_b.rows, checks, baseline_rows=run_a.rows) if checks else []
    return Comparison(run_a, run_b, tuple(deltas), only_a, only_b, samples, tuple(aligned),
                      tuple(_differences(_parse_yaml(run_a.config_yaml), _parse_yaml(run_b.config_yaml))),
                      tuple(_differences(run_a.provenance, run_b.provenance, skip=_VOLATILE)),
                      tuple(results), checks_source, tuple(notes))


def _list_sets(run: RunFolder, limit: int = 6) -> str:
    sets = [f"{m}/{l}" for m, l in run.feature_sets()]
    return ", ".join(sets[:limit]) + (f", ... ({len(sets)} in all)" if len(sets) > limit else "")


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _is_spread(key: str, row: Mapping) -> bool:
    """``<score>_std``, ``<score>_lo``, ``<score>_hi``: the spread of a score, not a score."""
    return any(key.endswith(end) and key[:-len(end)] in row for end in ("_std", "_lo", "_hi"))


def _score_keys(row: Mapping) -> list:
    return [k for k in row if k not in ID_KEYS and k not in _NOT_SCORES and not _is_spread(k, row)]


def _row_deltas(key: tuple, row_a: Mapping, row_b: Mapping) -> list:
    from evalkit.registry import metrics

    registry = metrics()
    out = []
    for metric in _score_keys(row_a):
        if metric not in row_b:
            continue
        a, b = row_a[metric], row_b[metric]
        if isinstance(a, str) or isinstance(b, str):
            continue
        direction = registry.get(metric).higher_is_better if metric in registry else None
        out.append(ScoreDelta(*key, metric, _number(a), _number(b), _number(row_a.get(f"{metric}_std")),
                              _number(row_b.get(f"{metric}_std")), direction))
    return out


def _delta_order(d: ScoreDelta):
    """Worst change first; unknown directions by their delta after them; undefined last."""
    if d.change is not None:
        return (0, d.change)
    if d.delta is not None:
        return (1, -abs(d.delta))
    return (2, 0.0)


def match_samples(run_a: RunFolder, run_b: RunFolder) -> tuple:
    """``(SampleMatch, positions_in_a, positions_in_b)`` of the samples both runs embedded.

    Matched by ``ids`` when both runs have them, else by ``indices``, else (an older folder) by
    position when both have the same number of samples.
    """
    n_a = _n_samples(run_a)
    n_b = _n_samples(run_b)
    if run_a.ids is not None and run_b.ids is not None and run_a.id_key == run_b.id_key:
        ids_a, ids_b = np.asarray(run_a.ids), np.asarray(run_b.ids)
        if ids_a.dtype.kind != ids_b.dtype.kind and "U" in (ids_a.dtype.kind, ids_b.dtype.kind):
            ids_a, ids_b = ids_a.astype(str), ids_b.astype(str)
        _, pos_a, pos_b = np.intersect1d(ids_a, ids_b, assume_unique=False, return_indices=True)
        order = np.argsort(pos_a, kind="stable")  # keep A's sample order
        pos_a, pos_b, key = pos_a[order], pos_b[order], run_a.id_key
    elif n_a == n_b:
        pos_a = pos_b = np.arange(n_a)
        key = "position"
    else:
        pos_a = pos_b = np.arange(0)
        key = "position"
    differ = 0
    if run_a.labels is not None and run_b.labels is not None and len(pos_a):
        la, lb = _names_of(run_a, pos_a), _names_of(run_b, pos_b)
        differ = int(np.sum(la != lb))
    return SampleMatch(key, n_a, n_b, int(len(pos_a)), differ), pos_a, pos_b


def _n_samples(run: RunFolder) -> int:
    if run.ids is not None:
        return int(len(run.ids))
    return int(next(iter(run.embeddings.values())).shape[0]) if run.embeddings else 0


def _names_of(run: RunFolder, pos: np.ndarray) -> np.ndarray:
    labels = np.asarray(run.labels)[pos]
    if run.label_names and labels.size and labels.max() < len(run.label_names):
        return np.asarray(run.label_names, dtype=object)[labels]
    return labels.astype(object)


def _labels(run: RunFolder, pos: np.ndarray) -> np.ndarray:
    return np.asarray(run.labels)[pos] if run.labels is not None else np.zeros(len(pos), dtype=np.int64)


def _ids(run: RunFolder, pos: np.ndarray) -> np.ndarray:
    return np.asarray(run.ids)[pos] if run.ids is not None else pos


def align_embeddings(a: np.ndarray, b: np.ndarray, *, labels=None, ids=None, model: str = "", layer: str = "",
                     method: str = "", moved_share: float = MOVED_SHARE) -> AlignedEmbedding:
    """Procrustes-align ``b`` onto ``a`` (both (n_samples, 2), row i the same sample).

    Both are standardised (centred, unit Frobenius norm) and ``b`` gets the rotation or
    reflection that best fits it onto ``a``. ``disparity`` is :func:`scipy.spatial.procrustes`'s
    (which also fits the scale): 0 for the same picture up to rotation, reflection and scale,
    near 1 for unrelated ones. The optimal scale is left out of the returned ``b`` on purpose:
    it shrinks an unrelated picture towards a point, where the page must show its layout.
    Rows that are not finite in either are left out. The samples that moved most are those
    farther apart than 1e-6 after alignment, at most ``moved_share`` of them (1 to 100).
    """
    from scipy.linalg import orthogonal_procrustes
    from scipy.spatial import procrustes

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two arrays of the same shape (n_samples, 2); got {a.shape} and {b.shape}")
    labels = np.zeros(len(a), dtype=np.int64) if labels is None else np.asarray(labels)
    ids = np.arange(len(a)) if ids is None else np.asarray(ids)
    keep = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    a, b, labels, ids = a[keep], b[keep], labels[keep], ids[keep]
    note = f"{int((~keep).sum())} samples with non-finite coordinates left out" if not keep.all() else ""
    try:
        _, _, disparity = procrustes(a, b)
    except ValueError as exc:  # fewer than 2 distinct points, or all points equal
        return AlignedEmbedding(model, layer, method, a, b, labels, ids, None, np.zeros(0, dtype=np.int64),
                                np.zeros(len(a)), f"not aligned: {exc}")
    std_a, std_b = (x - x.mean(axis=0) for x in (a, b))
    std_a, std_b = std_a / np.linalg.norm(std_a), std_b / np.linalg.norm(std_b)
    rotation, _ = orthogonal_procrustes(std_b, std_a)
    std_b = std_b @ rotation
    displacement = np.linalg.norm(std_a - std_b, axis=1)
    k = min(len(a), 100, max(1, int(round(moved_share * len(a)))))
    moved = np.argsort(-displacement, kind="stable")[:k]
    moved = moved[displacement[moved] > 1e-6]
    return AlignedEmbedding(model, layer, method, std_a, std_b, labels, ids, float(disparity), moved,
                            displacement, note)


def _flatten(value: Any, prefix: str = "") -> dict:
    """Nested mappings and lists as ``{"a.b[name].c": scalar}``; lists of named entries by name."""
    if isinstance(value, Mapping):
        out: dict = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        names = [v.get("name") for v in value]
        by_name = all(isinstance(n, str) for n in names) and len(set(names)) == len(names)
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{names[i] if by_name else i}]"))
        return out
    return {prefix: value}


def _differences(a: Mapping, b: Mapping, *, skip: Iterable[str] = ()) -> list:
    """The keys whose values differ; an entry (``models[cnn]``) only one side has is one line."""
    skip = set(skip)

    def kept(key: str) -> bool:  # with skip (provenance): durations (``extract_s``) differ on every run
        return not skip or (key.split(".")[0] not in skip and not key.endswith("_s"))

    flat_a = {k: v for k, v in _flatten(dict(a or {})).items() if kept(k)}
    flat_b = {k: v for k, v in _flatten(dict(b or {})).items() if kept(k)}
    out, done = [], set()
    for key in list(dict.fromkeys([*flat_a, *flat_b])):
        if key in done or flat_a.get(key, _ABSENT) == flat_b.get(key, _ABSENT):
            continue
        entry = key.split("].", 1)[0] + "]" if "[" in key else None
        if entry and (not any(k.startswith(entry) for k in flat_a) or not any(k.startswith(entry) for k in flat_b)):
            present = "a" if any(k.startswith(entry) for k in flat_a) else "b"
            done.update(k for k in (*flat_a, *flat_b) if k.startswith(entry))
            out.append(Difference(entry, "present" if present == "a" else None, "present" if present == "b" else None))
            continue
        out.append(Difference(key, _plain(flat_a.get(key)), _plain(flat_b.get(key))))
    return out


_ABSENT = object()


def _plain(value: Any) -> Any:
    """A JSON-ready version of ``value`` (numpy scalars become Python ones)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def comparison_payload(cmp: Comparison) -> dict:
    """The content of comparison.json (strict JSON: NaN becomes null)."""
    from evalkit.runfolder import _jsonable

    def run(r: RunFolder) -> dict:
        return {"path": str(r.path), "name": r.name, "started": r.provenance.get("started"), "notes": list(r.notes)}

    return _jsonable({
        "run_a": run(cmp.run_a),
        "run_b": run(cmp.run_b),
        "samples": cmp.samples.as_dict() if cmp.samples else None,
        "scores": [d.as_dict() for d in cmp.deltas],
        "only_in_a": list(cmp.only_a),
        "only_in_b": list(cmp.only_b),
        "embeddings": [e.as_dict() for e in cmp.aligned],
        "config_differences": [d.as_dict() for d in cmp.config_diff],
        "provenance_differences": [d.as_dict() for d in cmp.provenance_diff],
        "checks": {"source": cmp.checks_source or None, "baseline": str(cmp.run_a.path),
                   "results": [c.as_dict() for c in cmp.checks]},
        "exit_code": cmp.exit_code,
        "notes": list(cmp.notes),
    })


# --------------------------------------------------------------------------- history data


@dataclass(frozen=True)
class History:
    """The chosen scores of every row of every run, in the runs' order.

    ``table`` has one dict per (run, metrics row): ``run`` (1, 2, ...), ``run_name``, then the
    row's model, layer and method and its values of ``columns``, exactly as metrics.json has
    them (None where a run's row lacks the key).
    """

    runs: tuple  # of RunFolder
    metrics: tuple  # the scores charted
    columns: tuple  # the value columns: the scores, their _std, and info keys when no --metric
    table: tuple


def build_history(runs: Sequence[RunFolder], *, metrics: Sequence[str] = ()) -> History:
    """Line up ``metrics`` (default: every score any run has) of every run in order.

    Raises
    ------
    EvalkitError
        A metric that no run has (the message lists those there are).
    """
    keys: list = []
    for run in runs:
        for row in run.rows:
            keys.extend(k for k in row if k not in ID_KEYS and k not in keys)
    scores = [k for k in keys if k not in _NOT_SCORES and not k.endswith("_std")
              and not any(k.endswith(end) and k[:-len(end)] in keys for end in ("_lo", "_hi"))]
    for name in metrics:
        if name not in scores:
            raise unknown("--metric", name, scores)
    if metrics:
        chosen = list(dict.fromkeys(metrics))
        columns = [c for m in chosen for c in (m, f"{m}_std") if c in keys]
    else:
        from evalkit.registry import metrics as registry

        order = [m for m in registry().names() if m in scores]
        chosen = order + [m for m in scores if m not in order]
        columns = keys
    table = []
    for i, run in enumerate(runs):
        for row in run.rows:
            entry = {"run": i + 1, "run_name": run.name, "run_path": str(run.path)}
            entry.update({k: row[k] for k in ID_KEYS})
            entry.update({c: row.get(c) for c in columns})
            table.append(entry)
    return History(tuple(runs), tuple(chosen), tuple(columns), tuple(table))


def history_csv(history: History) -> str:
    """The history as CSV: ``run, run_name, run_path, model, layer, method`` then the value columns.

    Numbers are written with Python's shortest round-trip form, so reading a cell back gives
    exactly the float of metrics.json; an absent or undefined value is an empty cell.
    """
    buffer = io.StringIO()
    names = ["run", "run_name", "run_path", *ID_KEYS, *history.columns]
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    for entry in history.table:
        writer.writerow(["" if entry.get(n) is None else _cell(entry.get(n)) for n in names])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def checks_for(run_b: RunFolder, config=None) -> tuple:
    """``(checks, source)``: the checks of ``config`` (a path), else of RUN_B's config.yaml.

    No config.yaml in RUN_B (an older folder) and no ``config`` gives no checks.
    """
    from evalkit.config import load_config

    path = Path(config) if config else run_b.path / "config.yaml"
    if config is None and not path.is_file():
        return (), ""
    return tuple(load_config(path).checks), str(path)
