"""The ``score`` stage: metric functions, exact and chunked.

Every function takes plain numpy arrays and returns a python ``float`` (or an array for
per-class scores). The neighbourhood metrics and the silhouette work on blocks of rows:
a block of distances (block x n_samples) is all that is ever held, never an
n_samples x n_samples matrix, so N = 70,000 fits in well under 4 GB.

Exactness: :func:`trustworthiness`, :func:`continuity` and :func:`silhouette` agree with
scikit-learn (``sklearn.manifold.trustworthiness`` and ``sklearn.metrics.silhouette_score``)
to 1e-6 on data without distance ties.

Ties (one rule, the co-ranking convention of Lee and Verleysen): samples are ordered by
(distance, index), so the rank of j among the distances from i is
``r(i, j) = 1 + #{l != i : d(i, l) < d(i, j) or (d(i, l) == d(i, j) and l < j)}`` and the
k nearest neighbours U_k(i) are the samples of rank <= k (the lower index first among equal
distances, as :func:`evalkit.neighbors.knn_graph` returns them). Equal distances are
detected exactly, not rounded apart (see :mod:`evalkit.kernels`), so scores do not depend
on block size, appended zero columns, backend, device or code path, and
:func:`neighbourhood_scores` equals :func:`trustworthiness` / :func:`continuity` exactly.
scikit-learn breaks ties by the order of its (unstable) argsort over rounded distances: on
tied data it agrees with this rule only when that order happens to be the index order.

torch (and numba, for the counting kernels on CPU) are imported inside the functions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from evalkit.data import stratified_subsample
from evalkit.device import resolve_device
from evalkit.errors import InputError
from evalkit.kernels import (
    Ranking,
    as_float_matrix,
    check_n_neighbors,
    corank_max,
    lowdim_class_sums,
    lowdim_rank_counts,
    numba_kernels,
    pick_block_size,
    positions_in_top,
    squared_distance_block,
    to_centered_tensor,
    unit_rows,
)
from evalkit.neighbors import KNNGraph, knn_graph
from evalkit.progress import inner_loop, step

__all__ = [
    "trustworthiness",
    "continuity",
    "neighbourhood_scores",
    "RNXCurve",
    "rnx_curve",
    "rnx_grid",
    "silhouette",
    "knn_accuracy",
    "knn_predict",
    "weighted_knn_accuracy",
    "per_class_knn_accuracy",
    "wilson_interval",
    "linear_cka",
    "cka_matrix",
    "neighbourhood_hit",
    "SILHOUETTE_EXACT_MAX",
]

#: Largest n_samples for which the exact silhouette is cheap. It is O(N^2 D): at 256
#: features on this project's 2-core machine 10,000 samples take 1.8 s, 20,000 about 8 s,
#: 70,000 about 100 s. Callers may pass ``sample_size`` beyond it; :func:`silhouette`
#: itself is exact unless told to sample.
SILHOUETTE_EXACT_MAX = 20_000

# Spaces with at most this many dimensions (2-D embeddings) are ranked on CPU by a numba
# kernel that computes distances on the fly instead of materialising (block x N) arrays.
_LOWDIM_MAX = 4


# =========================================================================== neighbourhoods


def trustworthiness(X, Z, *, n_neighbors: int = 10, graph_Z: KNNGraph | None = None,
                    device=None, block_size: int | None = None) -> float:
    """How far the embedding's neighbours are from being neighbours in the original space.

    T(k) = 1 - 2 / (N k (2N - 3k - 1)) * sum_i sum_{j in U_k(i)} max(0, r(i, j) - k), where
    U_k(i) are the k nearest neighbours of i in ``Z`` and r(i, j) the rank of j among the
    distances from i in ``X`` (Venna and Kaski 2001; scikit-learn's formula). Ties: samples
    are ordered by (distance, index), r(i, j) = 1 + #{l != i : d(i, l) < d(i, j) or
    (d(i, l) == d(i, j) and l < j)}, and U_k(i) are the samples of rank <= k in ``Z``;
    equal distances are detected exactly (module docstring).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Original (high-dimensional) data.
    Z : array-like of shape (n_samples, n_components)
        Embedding of ``X``.
    n_neighbors : int
        k; must be less than ``n_samples / 2``, as in scikit-learn.
    graph_Z : KNNGraph, optional
        Neighbours in ``Z`` with at least ``n_neighbors`` columns (the first ones are used).
        Computed exactly when omitted. An approximate graph (``graph_Z.exact`` False) is used
        as given, and the score is then approximate too.
    device : None, str or torch.device
        Where distances are computed; MPS falls back to CPU (no float64 there).
    block_size : int, optional
        Rows per block of distances; by default about 256 MB per block.

    Returns
    -------
    float in [0, 1]; 1 when every embedding neighbour is also an original-space neighbour.
    """
    X = as_float_matrix(X, "X")
    Z = _same_rows(as_float_matrix(Z, "Z"), X, "Z")
    k = _check_half(n_neighbors, X.shape[0])
    dev = _score_device(device)
    graph_Z = _graph_or_exact(Z, graph_Z, k, dev, block_size, "graph_Z")
    (excess,), _, _ = _rank_excess(X, [graph_Z.indices[:, :k]], k, dev, block_size)
    return _trust_from_excess(int(excess.sum()), X.shape[0], k)


def continuity(X, Z, *, n_neighbors: int = 10, graph_X: KNNGraph | None = None,
               device=None, block_size: int | None = None) -> float:
    """How far the original neighbours are from being neighbours in the embedding.

    Trustworthiness with the two spaces swapped: equal to
    ``sklearn.manifold.trustworthiness(Z, X, n_neighbors=k)`` on data without ties. Ties
    follow the same rule as :func:`trustworthiness`: ranks in ``Z`` and neighbours in ``X``
    ordered by (distance, index).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Original (high-dimensional) data.
    Z : array-like of shape (n_samples, n_components)
        Embedding of ``X``.
    n_neighbors : int
        k; must be less than ``n_samples / 2``.
    graph_X : KNNGraph, optional
        Neighbours in ``X`` with at least ``n_neighbors`` columns. Computed exactly when
        omitted; an approximate graph makes the score approximate.
    device, block_size
        As for :func:`trustworthiness`.

    Returns
    -------
    float in [0, 1]
    """
    X = as_float_matrix(X, "X")
    Z = _same_rows(as_float_matrix(Z, "Z"), X, "Z")
    k = _check_half(n_neighbors, X.shape[0])
    dev = _score_device(device)
    graph_X = _graph_or_exact(X, graph_X, k, dev, block_size, "graph_X")
    (excess,), _, _ = _rank_excess(Z, [graph_X.indices[:, :k]], k, dev, block_size)
    return _trust_from_excess(int(excess.sum()), X.shape[0], k)


def neighbourhood_scores(X, embeddings: Mapping[str, np.ndarray], *, n_neighbors: int = 10,
                         graph_X: KNNGraph | None = None,
                         graphs_Z: Mapping[str, KNNGraph] | None = None,
                         device=None, block_size: int | None = None,
                         rnx_max_k: int | None = None, per_point: bool = False,
                         knn_out: list | None = None, rnx_rows: np.ndarray | None = None,
                         silhouette_out: dict | None = None) -> dict[str, dict]:
    """Trustworthiness and continuity (and R_NX) of several embeddings of the same data, in one pass.

    The expensive part, the distances in the original space, is computed once, block by
    block, and shared by all embeddings (and by the search for the neighbours in ``X`` when
    ``graph_X`` is omitted). The numbers equal those of :func:`trustworthiness` and
    :func:`continuity` exactly, ties included (same rule, same exact decisions).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    embeddings : mapping of str to array-like of shape (n_samples, n_components)
    n_neighbors : int
        k; must be less than ``n_samples / 2``.
    graph_X : KNNGraph, optional
        Neighbours in ``X``; found in the same pass when omitted.
    graphs_Z : mapping of str to KNNGraph, optional
        Neighbours in some or all embeddings; the missing ones are computed exactly.
    device, block_size
        As for :func:`trustworthiness`.
    rnx_max_k : int, optional
        Also compute R_NX(K) for K = 1..min(rnx_max_k, n_samples - 2) in the same pass over
        ``X`` (:func:`rnx_curve`); each entry then also has ``"rnx"`` (an :class:`RNXCurve`)
        and ``"rnx_auc"``.
    per_point : bool
        Also each point's share of both scores, ``"trustworthiness_points"`` and
        ``"continuity_points"`` (ndarray (n_samples,)): t_i = 1 - c N e_i with e_i the point's
        excess-rank sum and c the score's normaliser, so their mean is the score exactly.
    knn_out : list, optional
        Receives the exact ``n_neighbors`` nearest neighbours in ``X`` (a :class:`KNNGraph`),
        found in the same pass when ``graph_X`` is omitted.
    rnx_rows : int ndarray, optional
        Sum R_NX's co-ranking counts over these samples only, each still ranked against all
        samples: an unbiased estimate of Q_NX(K) at a fraction of the cost (see
        :func:`rnx_sample`). Trustworthiness and continuity always use every sample.
    silhouette_out : dict, optional
        ``{"labels": labels, "rows": sorted sample positions or None}``: the pass also sums
        each (sampled) row's distances to the members of each class among the (sampled)
        samples and stores :func:`silhouette` of ``X`` (of ``X[rows]``) under ``"value"``:
        the raw features' silhouette without a pass of its own.

    Returns
    -------
    dict
        ``{name: {"trustworthiness": t, "continuity": c}}`` in the order of ``embeddings``
        (plus ``"rnx"`` and ``"rnx_auc"`` with ``rnx_max_k``, the ``_points`` arrays with
        ``per_point``).
    """
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    k = _check_half(n_neighbors, n_samples)
    dev = _score_device(device)
    Zs = {str(name): _same_rows(as_float_matrix(Z, f"embedding {name!r}"), X, f"embedding {name!r}")
          for name, Z in embeddings.items()}
    if not Zs:
        return {}
    graphs_Z = dict(graphs_Z or {})
    nbr_Z = [
        _graph_or_exact(Z, graphs_Z.get(name), k, dev, block_size, f"graphs_Z[{name!r}]").indices[:, :k]
        for name, Z in Zs.items()
    ]
    rnx_k = _rnx_k(rnx_max_k, n_samples) if rnx_max_k is not None else 0
    spaces = list(Zs.values()) if rnx_k else []
    if rnx_rows is not None:
        rnx_rows = np.unique(np.asarray(rnx_rows, dtype=np.int64))
        if rnx_rows.size == 0 or rnx_rows[0] < 0 or rnx_rows[-1] >= n_samples:
            raise InputError(f"rnx_rows must be sample indices in [0, {n_samples}); got {rnx_rows.size} of them")
        if rnx_rows.size == n_samples:
            rnx_rows = None
    if graph_X is None and X.shape[1] <= _LOWDIM_MAX and not rnx_k:
        graph_X = knn_graph(X, n_neighbors=k, method="exact", device=dev, block_size=block_size)
    sil = _ClassSums.of(silhouette_out, n_samples) if silhouette_out is not None else None
    closer: list = []  # continuity's counts per embedding, when the co-ranking pass gives them
    if graph_X is not None:
        nbr_X = _check_graph(graph_X, n_samples, k, "graph_X").indices[:, :k]
        # the pass's own k nearest only serve to check that its continuity counts (every row's
        # K nearest, so not with a sample of rows) are for graph_X's neighbours
        check_own = bool(rnx_k) and rnx_rows is None
        trust_excess, own, kept = _rank_excess(X, nbr_Z, k, dev, block_size, knn=k if check_own else None,
                                               rnx_spaces=spaces, rnx_k=rnx_k, closer_out=closer,
                                               rnx_rows=rnx_rows, class_sums=sil)
        if own is None or not np.array_equal(own, nbr_X):
            closer = []  # the pass counted continuity for its own neighbours in X, not graph_X's

    else:  # the neighbours in X come from the same pass over X's distances
        trust_excess, nbr_X, kept = _rank_excess(X, nbr_Z, k, dev, block_size, knn=k, rnx_spaces=spaces,
                                                 rnx_k=rnx_k, closer_out=closer, rnx_rows=rnx_rows, class_sums=sil)
        if knn_out is not None:
            from evalkit.kernels import sort_neighbours

            knn_out.append(KNNGraph(*sort_neighbours(np.ascontiguousarray(X, dtype=np.float64), nbr_X), True,
                                    "exact"))
    if sil is not None:
        silhouette_out["value"] = sil.silhouette()
    out = {}
    for s, ((name, Z), t_excess) in enumerate(zip(Zs.items(), trust_excess)):
        if closer:  # continuity's counts came with the co-ranking pass
            c_excess = _excess(closer[s], k)
        else:
            (c_excess,), _, _ = _rank_excess(Z, [nbr_X], k, dev, block_size)
        out[name] = {
            "trustworthiness": _trust_from_excess(int(t_excess.sum()), n_samples, k),
            "continuity": _trust_from_excess(int(c_excess.sum()), n_samples, k),
        }
        if per_point:
            out[name]["trustworthiness_points"] = _points_from_excess(t_excess, k)
            out[name]["continuity_points"] = _points_from_excess(c_excess, k)
        if rnx_k:
            curve = RNXCurve(n_samples, kept[s], None if rnx_rows is None else int(rnx_rows.size))
            out[name].update(rnx=curve, rnx_auc=curve.auc)
    return out


# =========================================================================== R_NX


@dataclass(frozen=True)
class RNXCurve:
    """The co-ranking quality curves of one embedding for K = 1..max_k (Lee & Verleysen).

    Attributes
    ----------
    n_samples : int
    kept : ndarray of shape (max_k,), int64
        ``kept[K - 1] = sum_i |U_K(i) ∩ V_K(i)|``: the K-neighbourhoods of the two spaces
        summed over samples (ranks by (distance, index), as every score here).
    n_rows : int or None
        Over how many samples ``kept`` sums (a sample of the rows, each ranked against all
        ``n_samples``); None: all of them.
    """

    n_samples: int
    kept: np.ndarray
    n_rows: int | None = None

    @property
    def max_k(self) -> int:
        return int(len(self.kept))

    @property
    def ks(self) -> np.ndarray:
        """K = 1..max_k."""
        return np.arange(1, self.max_k + 1)

    @property
    def q_nx(self) -> np.ndarray:
        """Q_NX(K) = kept(K) / (K N): the share of K-neighbours kept (N: the rows summed)."""
        return self.kept / (self.ks * float(self.n_rows or self.n_samples))

    @property
    def lcmc(self) -> np.ndarray:
        """LCMC(K) = Q_NX(K) - K / (N - 1)."""
        return self.q_nx - self.ks / (self.n_samples - 1.0)

    @property
    def r_nx(self) -> np.ndarray:
        """R_NX(K) = ((N - 1) Q_NX(K) - K) / (N - 1 - K): 0 for a random embedding, 1 for a perfect one."""
        n1 = self.n_samples - 1.0
        return (n1 * self.q_nx - self.ks) / (n1 - self.ks)

    @property
    def auc(self) -> float:
        """Area under R_NX against log K: sum_K R_NX(K) / K / sum_K 1 / K over every K = 1..max_k
        (Lee & Verleysen 2015's AUC_logK, which is this with max_k = N - 2)."""
        w = 1.0 / self.ks
        return float(np.sum(self.r_nx * w) / np.sum(w))

    def grid(self, n_points: int = 40) -> tuple:
        """``(ks, r_nx)`` at about ``n_points`` log-spaced K from 1 to max_k (both ends kept)."""
        ks = rnx_grid(self.max_k, n_points)
        return ks, self.r_nx[ks - 1]


def rnx_grid(max_k: int, n_points: int = 40) -> np.ndarray:
    """About ``n_points`` distinct integers log-spaced from 1 to ``max_k`` (both included)."""
    return np.unique(np.round(np.geomspace(1, max_k, n_points)).astype(np.int64))


def rnx_curve(X, Z, *, max_k: int = 1000, device=None, block_size: int | None = None) -> RNXCurve:
    """R_NX(K) of an embedding for K = 1..min(max_k, n_samples - 2), exact.

    Q_NX(K) = (1 / (K N)) sum_i |U_K(i) ∩ V_K(i)| with U_K(i), V_K(i) the K nearest neighbours
    of i in ``X`` and in ``Z`` (ranks by (distance, index): the module's tie rule), and
    R_NX(K) = ((N - 1) Q_NX(K) - K) / (N - 1 - K) (Lee & Verleysen 2009, 2015). One blocked
    pass over ``X``: for each block of rows, the max_k nearest neighbours in ``X`` (exactly,
    in order) and their ranks in ``Z`` (up to max_k) give the co-ranking counts of every
    K <= max_k at once. Memory O(block x n_samples); time O(N^2 D) for ``X`` plus
    O(N^2 d) for ``Z``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    Z : array-like of shape (n_samples, n_components)
        Usually 2-D; its distances are computed on the fly, O(n_components) per pair.
    max_k : int
        Largest K (lowered to n_samples - 2, where R_NX stops being defined).
    device, block_size
        As for :func:`trustworthiness`.

    Returns
    -------
    RNXCurve
        ``.r_nx``, ``.q_nx``, ``.lcmc`` for K = 1..max_k, ``.auc`` (the area under R_NX
        against log K over those K), ``.grid()`` for a chart.
    """
    X = as_float_matrix(X, "X")
    Z = _same_rows(as_float_matrix(Z, "Z"), X, "Z")
    n_samples = X.shape[0]
    rnx_k = _rnx_k(max_k, n_samples)
    dev = _score_device(device)
    _, _, (kept,) = _rank_excess(X, [], 1, dev, block_size, rnx_spaces=[Z], rnx_k=rnx_k)
    return RNXCurve(n_samples, kept)


def rnx_sample(n_samples: int, max_samples: int | None, *, seed: int = 0) -> np.ndarray | None:
    """The rows R_NX sums over: None (all) up to ``max_samples``, else a seeded uniform sample
    of that many, sorted. Q_NX(K) is a mean over rows of |U_K(i) ∩ V_K(i)| / K, so the sample
    mean estimates it without bias; each sampled row is still ranked against all samples."""
    if max_samples is None or n_samples <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(n_samples, size=int(max_samples), replace=False))


def _rnx_k(max_k, n_samples: int) -> int:
    if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or max_k < 1:
        raise InputError(f"max_k must be a positive integer; got {max_k!r}")
    if n_samples < 3:
        raise InputError(f"R_NX needs at least 3 samples; got {n_samples}")
    return int(min(max_k, n_samples - 2))


# =========================================================================== silhouette


def silhouette(X, labels, *, device=None, block_size: int | None = None,
               sample_size: int | None = None, random_state: int = 0) -> float:
    """Mean silhouette coefficient (euclidean), as ``sklearn.metrics.silhouette_score``.

    For sample i of class c: a = mean distance to the other members of c (divided by
    n_c - 1), b = smallest mean distance to the members of another class, and
    s = (b - a) / max(a, b); s = 0 for members of singleton classes (and when a = b = 0).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,)
        Class of each sample (any values).
    device : None, str or torch.device
        Where distances are computed; MPS falls back to CPU.
    block_size : int, optional
        Rows per block of distances; by default about 256 MB per block.
    sample_size : int, optional
        Score a seeded, stratified sample of this many samples instead of all of them
        (see :data:`SILHOUETTE_EXACT_MAX`). None (default) is exact.
    random_state : int
        Seed of the sample.

    Returns
    -------
    float in [-1, 1], or nan when the silhouette is not defined: fewer than 2 classes, or
    as many classes as samples (scikit-learn raises in both cases).
    """
    X = as_float_matrix(X, "X")
    labels = _labels(labels, X.shape[0])
    if sample_size is not None:
        if isinstance(sample_size, bool) or not isinstance(sample_size, (int, np.integer)) or sample_size < 2:
            raise InputError(f"sample_size must be an integer >= 2; got {sample_size!r}")
        keep = stratified_subsample(labels, int(sample_size), seed=random_state)
        X, labels = X[keep], labels[keep]
    classes, y = np.unique(labels, return_inverse=True)
    n_samples, n_classes = len(y), len(classes)
    if not 1 < n_classes < n_samples:
        return float("nan")
    dev = _score_device(device)
    sizes = np.bincount(y, minlength=n_classes)
    if X.shape[1] <= _LOWDIM_MAX and dev.type == "cpu":  # a 2-D embedding: no distance blocks
        sums = lowdim_class_sums(X, y, n_classes)
        if sums is not None:
            return float(_silhouette_block(sums, y, sizes) / n_samples)
    import torch

    # Columns grouped by class so per-class sums are contiguous segment sums.
    order = np.argsort(y, kind="stable")
    X, y = X[order], y[order]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    block = pick_block_size(n_samples, block_size)
    total = 0.0
    with torch.no_grad():
        T, sq = to_centered_tensor(X, dev, torch.float64)
        y_t = torch.as_tensor(y, device=dev)
        for start in range(0, n_samples, block):
            stop = min(start + block, n_samples)
            D = squared_distance_block(T, sq, start, stop).sqrt_()
            sums = _class_sums(D, starts, y_t, n_classes, use_numpy=dev.type == "cpu")
            del D
            total += _silhouette_block(sums, y[start:stop], sizes)
    return float(total / n_samples)


def _class_sums(D, starts: np.ndarray, y_t, n_classes: int, *, use_numpy: bool) -> np.ndarray:
    """(rows, n_classes) float64 sums of the distances to each class's members; the columns
    of ``D`` are grouped by class (``starts`` = first column of each class; every class has
    at least one member)."""
    if use_numpy:  # segment sums, no one-hot matrix (which would be n_samples x n_classes)
        return np.add.reduceat(D.numpy(), starts, axis=1)
    import torch

    sums = torch.zeros((D.shape[0], n_classes), dtype=D.dtype, device=D.device)
    return sums.index_add_(1, y_t, D).cpu().numpy()


def _silhouette_block(sums: np.ndarray, y: np.ndarray, sizes: np.ndarray) -> float:
    """Sum of the silhouettes of a block, from its per-class distance sums (block, n_classes)."""
    rows = np.arange(len(y))
    own = sizes[y]
    with np.errstate(divide="ignore", invalid="ignore"):
        a = sums[rows, y] / (own - 1)
        means = sums / sizes
        means[rows, y] = np.inf
        b = means.min(axis=1)
        s = (b - a) / np.maximum(a, b)
    s[~np.isfinite(s)] = 0.0  # singleton classes (0 / 0) and a = b = 0, as scikit-learn
    return float(s.sum())


# =========================================================================== kNN accuracy


def knn_accuracy(X, labels, *, n_neighbors: int = 10, graph: KNNGraph | None = None,
                 device=None) -> float:
    """Leave-one-out k-nearest-neighbour accuracy (majority vote).

    Each sample is predicted by the majority label of its k nearest neighbours (itself
    excluded). Ties between classes go to the tied class of the nearest neighbour.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,)
    n_neighbors : int
        k, 1 <= k < n_samples.
    graph : KNNGraph, optional
        Neighbours of ``X`` with at least ``n_neighbors`` columns (the shared graph of the
        neighbors stage); computed exactly when omitted.
    device : None, str or torch.device
        Where the graph is computed when omitted.

    Returns
    -------
    float in [0, 1]
    """
    correct = _knn_correct(X, labels, n_neighbors, graph, device)
    return float(correct.mean())


def knn_predict(X, labels, *, n_neighbors: int = 10, graph: KNNGraph | None = None,
                device=None) -> np.ndarray:
    """Leave-one-out k-nearest-neighbour prediction of every sample (majority vote).

    The same vote as :func:`knn_accuracy`: the majority label of the k nearest neighbours
    (itself excluded), ties going to the tied class of the nearest neighbour, so
    ``(knn_predict(X, y) == y).mean() == knn_accuracy(X, y)``.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,)
    n_neighbors, graph, device
        As for :func:`knn_accuracy`.

    Returns
    -------
    ndarray of shape (n_samples,)
        The predicted label of each sample, with the dtype and values of ``labels``.
    """
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    labels = _labels(labels, n_samples)
    classes, y = np.unique(labels, return_inverse=True)
    y = y.reshape(-1)
    k = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    if graph is None:
        graph = knn_graph(X, n_neighbors=k, method="exact", device=device)
    idx = _check_graph(graph, n_samples, k, "graph").indices[:, :k]
    predicted = np.empty(n_samples, dtype=np.intp)
    chunk = max(1, 2**24 // (k * k))
    for start in range(0, n_samples, chunk):
        stop = min(start + chunk, n_samples)
        predicted[start:stop] = _vote(y[idx[start:stop]], None)
    return classes[predicted]


def per_class_knn_accuracy(X, labels, *, n_neighbors: int = 10, graph: KNNGraph | None = None,
                           device=None) -> np.ndarray:
    """Leave-one-out kNN accuracy (as :func:`knn_accuracy`) of each class.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,), non-negative integers
    n_neighbors, graph, device
        As for :func:`knn_accuracy`.

    Returns
    -------
    ndarray of shape (max(labels) + 1,), float64
        Entry c is the accuracy over the samples of label c; nan where no sample has label c.
    """
    labels_arr = np.asarray(labels)
    if labels_arr.ndim != 1 or labels_arr.dtype.kind not in "iub" or (labels_arr.size and labels_arr.min() < 0):
        raise InputError("labels must be a 1-D array of non-negative integers for per-class accuracy")
    correct = _knn_correct(X, labels_arr, n_neighbors, graph, device)
    n_classes = int(labels_arr.max()) + 1
    hits = np.bincount(labels_arr, weights=correct, minlength=n_classes)
    sizes = np.bincount(labels_arr, minlength=n_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sizes > 0, hits / np.maximum(sizes, 1), np.nan)


def wilson_interval(accuracy: float, n_samples: int, *, z: float = 1.959963984540054) -> tuple:
    """95% Wilson score interval of a proportion (``z`` = 1.96: 95%).

    For an accuracy p over n samples: (p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) /
    (1 + z^2 / n) (Wilson 1927). Unlike the normal (Wald) interval it stays inside [0, 1] and
    keeps a width at p = 0 or 1. It treats the n predictions as independent draws; leave-one-out
    kNN predictions share neighbours, so read it as the uncertainty from which samples were
    drawn, not from the reference set.

    Returns
    -------
    (lo, hi) : tuple of float; (nan, nan) when n_samples < 1.
    """
    if n_samples < 1 or not np.isfinite(accuracy):
        return float("nan"), float("nan")
    p, n, z2 = float(min(max(accuracy, 0.0), 1.0)), float(n_samples), z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return float(max(centre - half, 0.0)), float(min(centre + half, 1.0))


def weighted_knn_accuracy(X, labels, *, n_neighbors: int = 20, temperature: float = 0.07,
                          graph: KNNGraph | None = None, device=None) -> float:
    """Leave-one-out weighted kNN accuracy on cosine similarity (DINO's ``eval_knn``).

    Rows are L2-normalised; each of the k most similar samples (itself excluded) votes for
    its class with weight exp(s / temperature), s the cosine similarity; the class with
    the largest total wins (ties: the tied class of the most similar neighbour).

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    labels : array-like of shape (n_samples,)
    n_neighbors : int
        k (20 in DINO), 1 <= k < n_samples.
    temperature : float
        T > 0 (0.07 in DINO).
    graph : KNNGraph, optional
        Neighbours to vote with. Omitted: the exact cosine neighbours (euclidean neighbours
        of the normalised rows). Given (e.g. the shared euclidean graph of the raw
        features): its first k neighbours are used, weighted by their cosine similarity;
        these equal DINO's only when the rows of ``X`` have equal norms.
    device : None, str or torch.device
        Where the graph is computed when omitted.

    Returns
    -------
    float in [0, 1]
    """
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    y = _encode(_labels(labels, n_samples))
    k = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    if not (isinstance(temperature, (int, float, np.floating)) and np.isfinite(temperature) and temperature > 0):
        raise InputError(f"temperature must be a positive number; got {temperature!r}")
    Xn, _ = unit_rows(X)
    if graph is None:
        graph = knn_graph(Xn, n_neighbors=k, method="exact", device=device)
    idx = _check_graph(graph, n_samples, k, "graph").indices[:, :k]
    correct = np.empty(n_samples, dtype=bool)
    chunk = max(1, 2**22 // (k * max(X.shape[1], k)))
    for start in range(0, n_samples, chunk):
        stop = min(start + chunk, n_samples)
        nb = idx[start:stop]
        sim = np.einsum("bd,bkd->bk", Xn[start:stop], Xn[nb])
        w = np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature)  # shift: same argmax
        pred = _vote(y[nb], w)
        correct[start:stop] = pred == y[start:stop]
    return float(correct.mean())


def _knn_correct(X, labels, n_neighbors, graph, device) -> np.ndarray:
    """(n_samples,) bool: is the leave-one-out majority vote right."""
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    y = _encode(_labels(labels, n_samples))
    k = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    if graph is None:
        graph = knn_graph(X, n_neighbors=k, method="exact", device=device)
    idx = _check_graph(graph, n_samples, k, "graph").indices[:, :k]
    correct = np.empty(n_samples, dtype=bool)
    chunk = max(1, 2**24 // (k * k))
    for start in range(0, n_samples, chunk):
        stop = min(start + chunk, n_samples)
        correct[start:stop] = _vote(y[idx[start:stop]], None) == y[start:stop]
    return correct


def _vote(neighbour_labels: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Winning label per row of (rows, k) neighbour labels, nearest first.

    Score of neighbour position j = total weight of the positions with the same label;
    the winner is the label at the first (nearest) position with the top score, which
    breaks ties between classes toward the tied class of the nearest neighbour. Positions
    of one class sum the same masked vector, so their scores are bitwise equal.
    """
    same = neighbour_labels[:, :, None] == neighbour_labels[:, None, :]
    if weights is None:
        score = same.sum(axis=2)
    else:
        score = (same * weights[:, None, :]).sum(axis=2)
    first_best = np.argmax(score == score.max(axis=1, keepdims=True), axis=1)
    return neighbour_labels[np.arange(len(neighbour_labels)), first_best]


def neighbourhood_hit(Z, labels, *, n_neighbors: int = 10, graph: KNNGraph | None = None,
                      device=None) -> float:
    """Neighbourhood hit (Paulovich et al. 2008): the mean share of each sample's k nearest
    neighbours (itself excluded) that have its class.

    Parameters
    ----------
    Z : array-like of shape (n_samples, n_components)
        Usually a 2-D embedding.
    labels : array-like of shape (n_samples,)
    n_neighbors : int
        k, 1 <= k < n_samples.
    graph : KNNGraph, optional
        Neighbours of ``Z`` with at least ``n_neighbors`` columns; computed exactly when omitted.
    device : None, str or torch.device
        Where the graph is computed when omitted.

    Returns
    -------
    float in [0, 1]; 1 when every neighbourhood is pure.
    """
    Z = as_float_matrix(Z, "Z")
    n_samples = Z.shape[0]
    y = _encode(_labels(labels, n_samples))
    k = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    if graph is None:
        graph = knn_graph(Z, n_neighbors=k, method="exact", device=device)
    idx = _check_graph(graph, n_samples, k, "graph").indices[:, :k]
    return float((y[idx] == y[:, None]).mean())


# =========================================================================== CKA


def linear_cka(X, Y, *, debiased: bool = False, batch_size: int | None = None, random_state: int = 0) -> float:
    """Linear centred kernel alignment of two representations of the same samples.

    CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for the linear kernels K = X X^T, L = Y Y^T
    (Kornblith et al. 2019). Biased (default, Kornblith's definition): HSIC from the centred
    Gram matrices, so CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) with centred columns;
    it is inflated at small n (about 0.2 for independent data at n = 32). ``debiased``: the
    unbiased HSIC estimator of Song et al. (2012), as in Nguyen et al. (2021), near 0 for
    independent data at any n (and possibly slightly negative).

    Both are computed from feature-space products, never an n_samples x n_samples matrix:
    with centred columns, row squared norms s_x, s_y and their sums S_x, S_y,
    n (n - 3) HSIC_u = ||Y^T X||_F^2 - n / (n - 2) s_x . s_y + S_x S_y / ((n - 1) (n - 2))
    (Song et al.'s estimator with K = X X^T: the zeroed diagonal subtracts s_x . s_y, and
    centred columns make K 1 = 0). Time O(n d_x d_y), memory O(d_x d_y) in blocks of 2048
    columns.

    ``batch_size``: minibatch CKA (Nguyen et al. 2021): a seeded permutation of the samples
    in n // batch_size batches (each at least batch_size samples), HSIC averaged over batches
    before the ratio, from batch Gram matrices: O(n batch_size (d_x + d_y)) time, O(batch_size^2)
    memory. Cheaper than the full products when d_x d_y >> batch_size (d_x + d_y); it estimates
    the same quantity with more variance.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features_x)
    Y : array-like of shape (n_samples, n_features_y)
    debiased : bool
        Unbiased HSIC (needs n_samples >= 4, and batches of at least 4).
    batch_size : int, optional
        Minibatch CKA with batches of at least this many samples; None: all samples at once.
    random_state : int
        Seed of the minibatch permutation.

    Returns
    -------
    float, in [0, 1] for the biased estimator; nan when either representation is constant.
    """
    X = as_float_matrix(X, "X")
    Y = _same_rows(as_float_matrix(Y, "Y"), X, "Y")
    return float(cka_matrix([X, Y], debiased=debiased, batch_size=batch_size, random_state=random_state)[0, 1])


def cka_matrix(features, *, debiased: bool = False, batch_size: int | None = None,
               random_state: int = 0) -> np.ndarray:
    """:func:`linear_cka` between every pair of representations of the same samples.

    Each representation's own HSIC is computed once; cross terms once per pair.

    Parameters
    ----------
    features : sequence of array-like of shape (n_samples, n_features_i)
    debiased, batch_size, random_state
        As for :func:`linear_cka`.

    Returns
    -------
    ndarray of shape (len(features), len(features)), symmetric; nan where a representation
    is constant (or its own unbiased HSIC is not positive).
    """
    mats = [as_float_matrix(F, f"features[{i}]") for i, F in enumerate(features)]
    n = mats[0].shape[0] if mats else 0
    for i, F in enumerate(mats):
        _same_rows(F, mats[0], f"features[{i}]")
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 4:
            raise InputError(f"batch_size must be an integer >= 4; got {batch_size!r}")
    if debiased and n < 4:
        raise InputError(f"debiased CKA needs at least 4 samples; got {n}")
    if batch_size is None or batch_size >= n:
        hsic = _hsic_full(mats, debiased)
    else:
        hsic = _hsic_minibatch(mats, debiased, int(batch_size), random_state)
    diag = np.diag(hsic).copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.sqrt(np.where(diag > 0, diag, np.nan))
        out = hsic / (norm[:, None] * norm[None, :])
    return out


def _centred64(F: np.ndarray) -> np.ndarray:
    F = F.astype(np.float64)
    F -= F.mean(axis=0)
    return F


def _hsic_full(mats: list, debiased: bool) -> np.ndarray:
    """HSIC of every pair (scaled by n (n - 3) when debiased; by (n - 1)^2 when biased: the
    ratio of CKA does not see the scale), from feature-space products."""
    m = len(mats)
    n = mats[0].shape[0]
    hsic = np.zeros((m, m))
    row_sq = []
    for i in range(m):
        A = _centred64(mats[i])
        row_sq.append(np.einsum("ij,ij->i", A, A))
        hsic[i, i] = _cross_frobenius_sq(A, A)
        for j in range(i + 1, m):
            B = _centred64(mats[j])
            hsic[i, j] = hsic[j, i] = _cross_frobenius_sq(B, A)
            del B
        del A
    if debiased:
        s = np.array(row_sq)
        totals = s.sum(axis=1)
        hsic = hsic - n / (n - 2.0) * (s @ s.T) + np.outer(totals, totals) / ((n - 1.0) * (n - 2.0))
    return hsic


def _hsic_minibatch(mats: list, debiased: bool, batch_size: int, random_state: int) -> np.ndarray:
    """Sum over batches of each pair's HSIC (Nguyen et al. 2021), from batch Gram matrices."""
    m = len(mats)
    n = mats[0].shape[0]
    order = np.random.default_rng(random_state).permutation(n)
    total = np.zeros((m, m))
    for idx in np.array_split(order, n // batch_size):
        b = len(idx)
        grams, sums = [], []
        for F in mats:
            A = F[idx].astype(np.float64)
            A -= A.mean(axis=0)  # centred in the batch: H K H for the biased estimator
            G = A @ A.T
            if debiased:
                np.fill_diagonal(G, 0.0)
                sums.append(G.sum(axis=1))
            grams.append(G)
        for i in range(m):
            for j in range(i, m):
                tr = float(np.einsum("ij,ij->", grams[i], grams[j]))
                if debiased:  # Song et al. (2012): (tr + 1'K1 1'L1 / ((b-1)(b-2)) - 2 1'KL1 / (b-2)) / (b (b-3))
                    ki, kj = sums[i].sum(), sums[j].sum()
                    value = (tr + ki * kj / ((b - 1.0) * (b - 2.0)) - 2.0 * float(sums[i] @ sums[j]) / (b - 2.0)) \
                        / (b * (b - 3.0))
                else:
                    value = tr / (b - 1.0) ** 2
                total[i, j] = total[j, i] = total[i, j] + value
    return total


def _cross_frobenius_sq(A: np.ndarray, B: np.ndarray, block: int = 2048) -> float:
    """||A^T B||_F^2, column block by column block."""
    total = 0.0
    for i in range(0, A.shape[1], block):
        for j in range(0, B.shape[1], block):
            P = A[:, i:i + block].T @ B[:, j:j + block]
            total += float(np.einsum("ij,ij->", P, P))
    return total


# =========================================================================== rank machinery


def _rank_excess(P: np.ndarray, neighbour_sets, k: int, dev, block_size, knn: int | None = None,
                 rnx_spaces=(), rnx_k: int = 0, closer_out: list | None = None, rnx_rows=None,
                 class_sums: "_ClassSums | None" = None):
    """Sum over rows i and neighbours j of max(0, r(i, j) - k), r the rank in ``P`` (module
    docstring: ties by index, equal distances detected exactly); optionally the co-ranking
    counts of R_NX against other spaces, from the same pass.

    Parameters
    ----------
    P : ndarray of shape (n_samples, n_dims)
        The space in which ranks are taken.
    neighbour_sets : list of int ndarray of shape (n_samples, k)
        Neighbours found in another space; one excess sum per set.
    knn : int, optional
        Also return the exact ``knn`` nearest neighbours in P (found in the same pass; the
        same as :func:`evalkit.neighbors.knn_graph`).
    rnx_spaces : list of ndarray of shape (n_samples, n_dims)
        Spaces of few dimensions (embeddings) to compare with P by co-ranking.
    rnx_k : int
        Largest K of those counts (<= n_samples - 2).
    closer_out : list, optional
        With ``rnx_spaces``, receives per space the (n_samples, k) counts of
        :meth:`~evalkit.kernels.Ranking.rank_counts` in that space for the k nearest
        neighbours in P (the excess behind continuity), read from the co-ranking pass; left
        empty where that pass cannot give them (the torch path, or ``rnx_rows``).
    rnx_rows : sorted int ndarray, optional
        The rows whose co-ranking counts are summed (all when None).
    class_sums : _ClassSums, optional
        Also each of its rows' sums of distances to each class (the silhouette of ``P``),
        from the same blocks.

    With ``rnx_spaces`` the K nearest neighbours in P of every row are known in order, so the
    rank of a neighbour from ``neighbour_sets`` is its position there; only rows with a
    neighbour beyond the K-th count against the whole row. One pass over P's distances
    serves trustworthiness, continuity and R_NX of every space.

    Returns
    -------
    (list of ndarray of shape (n_samples,), ndarray of shape (n_samples, knn) or None,
     list of ndarray of shape (rnx_k,))
        The first: each row's excess sum, per neighbour set (their sum is the excess). The
        last: ``kept[K - 1] = sum_i |U_K(i) ∩ V_K(i)|`` per space of ``rnx_spaces``.
    """
    n_samples = P.shape[0]
    rnx_spaces = [np.ascontiguousarray(Z, dtype=np.float64) for Z in rnx_spaces] if rnx_k else []
    if P.shape[1] <= _LOWDIM_MAX and dev.type == "cpu" and knn is None and not rnx_spaces and class_sums is None:
        counts = [lowdim_rank_counts(P, nb) for nb in neighbour_sets]
        if all(c is not None for c in counts):
            return [_excess(c, k) for c in counts], None, []
    excess = [np.zeros(n_samples, dtype=np.int64) for _ in neighbour_sets]
    found = np.empty((n_samples, knn), dtype=np.int64) if knn else None
    hist = [np.zeros(rnx_k + 2, dtype=np.int64) for _ in rnx_spaces]
    closer = ([np.empty((n_samples, k), dtype=np.int64) for _ in rnx_spaces]
              if closer_out is not None and k <= rnx_k and rnx_rows is None else [])  # needs every row's K nearest
    block = pick_block_size(n_samples, block_size)
    ranking = Ranking(P, dev, np.float64)
    with ranking.no_grad(), inner_loop(-(-n_samples // block), "scoring pass", unit="block"):
        for start in range(0, n_samples, block):
            step(1)  # the bar moves; a recorded Ctrl-C ends the pass here
            stop = min(start + block, n_samples)
            rows = np.arange(start, stop)
            R = ranking.block(start, stop)
            if class_sums is not None:
                class_sums.add(ranking, R, start, stop)
            if rnx_rows is not None:  # the K nearest of the sampled rows only
                sub = np.arange(np.searchsorted(rnx_rows, start), np.searchsorted(rnx_rows, stop))
                co_rows = rnx_rows[sub]
                co_top = (ranking.topk(R, co_rows, rnx_k, pos=co_rows - start)
                          if rnx_spaces and co_rows.size else None)
                top = None
            else:
                co_rows = rows
                top = co_top = ranking.topk(R, rows, rnx_k) if rnx_spaces else None  # exact, nearest first
            if knn:
                found[start:stop] = top[:, :knn] if top is not None and knn <= rnx_k else ranking.topk(R, rows, knn)
            for s, nb in enumerate(neighbour_sets):
                excess[s][start:stop] = _excess(_closer_counts(ranking, R, rows, nb[start:stop], top), k)
            del R
            if co_top is None:
                continue
            for s, Z in enumerate(rnx_spaces):
                if closer:
                    co, counted = corank_max(Z, rows, top, dev, closer_k=k)
                    if counted is None:
                        closer = []
                    else:
                        closer[s][start:stop] = counted
                else:
                    co = corank_max(Z, co_rows, co_top, dev)
                hist[s] += np.bincount(co.ravel(), minlength=rnx_k + 2)
    if closer_out is not None:
        closer_out.extend(closer)
    return excess, found, [np.cumsum(h)[1:rnx_k + 1] for h in hist]


class _ClassSums:
    """Per-class sums of euclidean distances, read from the blocks of a pass over ``X``: the
    silhouette of the raw features without a pass of its own. Distances as
    :func:`silhouette` computes them (the block r(i, l) + |c_i|^2, clamped at 0, self 0),
    over the sampled rows and columns (all when ``rows`` is None)."""

    def __init__(self, labels: np.ndarray, rows: np.ndarray | None, n_samples: int):
        self.rows = np.arange(n_samples, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        classes, y = np.unique(labels[self.rows], return_inverse=True)
        self.y = y.reshape(-1).astype(np.int64)  # class of each sampled row
        self.n_classes = len(classes)
        self.ycol = np.full(n_samples, -1, dtype=np.int64)  # class of each column, -1 outside the sample
        self.ycol[self.rows] = self.y
        self.sums = np.zeros((len(self.rows), self.n_classes))

    @classmethod
    def of(cls, request: dict, n_samples: int) -> "_ClassSums":
        labels = _labels(request["labels"], n_samples)
        return cls(labels, request.get("rows"), n_samples)

    def add(self, ranking, R, start: int, stop: int) -> None:
        a, z = np.searchsorted(self.rows, [start, stop])
        if a == z:
            return
        rows = self.rows[a:z]
        if ranking.use_numba:
            numba_kernels().class_dist_sums(R, rows - start, rows, ranking.sq64, self.ycol, self.sums[a:z])
            return
        import torch

        rows_t = torch.as_tensor(rows, device=R.device)
        D = R[rows_t - start] + ranking.sq[rows_t][:, None]
        D[torch.arange(len(rows), device=R.device), rows_t] = 0
        D.clamp_(min=0).sqrt_()
        D = D[:, torch.as_tensor(self.rows, device=R.device)]
        self.sums[a:z] = _class_sums(D, None, torch.as_tensor(self.y, device=R.device), self.n_classes,
                                     use_numpy=False)

    def silhouette(self) -> float:
        n = len(self.rows)
        if not 1 < self.n_classes < n:
            return float("nan")
        sizes = np.bincount(self.y, minlength=self.n_classes)
        return float(_silhouette_block(self.sums, self.y, sizes) / n)


def _closer_counts(ranking, R, rows: np.ndarray, nbr: np.ndarray, top) -> np.ndarray:
    """:meth:`Ranking.rank_counts` of a block, read from the block's ordered nearest
    neighbours ``top`` where they reach (numba on CPU), counted on the row elsewhere."""
    found = positions_in_top(top, nbr) if top is not None and ranking.use_numba else None
    if found is None:
        return ranking.rank_counts(R, rows, nbr)
    missing = np.flatnonzero((found < 0).any(axis=1))
    if missing.size:  # (the block's rows are read in place, not gathered: that copy cost 0.6 s at 10,000)
        found[missing] = ranking.rank_counts(R, rows[missing], nbr[missing], pos=missing)
    return found


def _excess(closer: np.ndarray, k: int) -> np.ndarray:
    """Per row: sum of max(0, rank - k) with rank = closer + 1 (``closer``: (rows, k))."""
    return np.maximum(closer + 1 - k, 0).sum(axis=1).astype(np.int64)


def _points_from_excess(excess: np.ndarray, k: int) -> np.ndarray:
    """Each point's share of trustworthiness (or continuity): mean over points = the score."""
    n = excess.shape[0]
    return 1.0 - excess * (2.0 / (k * (2.0 * n - 3.0 * k - 1.0)))


# =========================================================================== validation


def _trust_from_excess(excess: int, n_samples: int, k: int) -> float:
    return float(1.0 - excess * (2.0 / (n_samples * k * (2.0 * n_samples - 3.0 * k - 1.0))))


def _check_half(n_neighbors, n_samples: int) -> int:
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
        raise InputError(f"n_neighbors must be a positive integer; got {n_neighbors!r}")
    if n_neighbors >= n_samples / 2:
        raise InputError(
            f"n_neighbors ({n_neighbors}) should be less than n_samples / 2 ({n_samples / 2:g}); "
            f"expected n_neighbors < {n_samples / 2:g} for {n_samples} samples"
        )
    return int(n_neighbors)


def _score_device(device):
    dev = resolve_device(device)
    if dev.type == "mps":  # no float64 on MPS, and the exactness contract needs it
        import torch

        return torch.device("cpu")
    return dev


def _same_rows(A: np.ndarray, X: np.ndarray, name: str) -> np.ndarray:
    if A.shape[0] != X.shape[0]:
        raise InputError(f"{name} has {A.shape[0]} samples; expected {X.shape[0]}, as X")
    return A


def _labels(labels, n_samples: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n_samples:
        raise InputError(f"labels must have shape ({n_samples},); got {labels.shape}")
    return labels


def _encode(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels, return_inverse=True)[1].reshape(-1)


def _check_graph(graph: KNNGraph, n_samples: int, k: int, name: str) -> KNNGraph:
    idx = np.asarray(graph.indices)
    if idx.ndim != 2 or idx.shape[0] != n_samples:
        raise InputError(f"{name} has shape {idx.shape}; expected ({n_samples}, >= {k})")
    if idx.shape[1] < k:
        raise InputError(f"{name} has {idx.shape[1]} neighbours per sample; expected at least n_neighbors={k}")
    head = idx[:, :k]
    if head.size and (head.min() < 0 or head.max() >= n_samples):
        raise InputError(f"{name} has neighbour indices outside [0, {n_samples})")
    if (head == np.arange(n_samples)[:, None]).any():
        raise InputError(f"{name} lists samples as their own neighbours; expected self excluded")
    return graph


def _graph_or_exact(P, graph, k, dev, block_size, name) -> KNNGraph:
    if graph is None:
        return knn_graph(P, n_neighbors=k, method="exact", device=dev, block_size=block_size)
    return _check_graph(graph, P.shape[0], k, name)


# =========================================================================== the registry
# Each score is defined once, here: the scoring loop (evalkit.scoring), config validation, the
# check vocabulary and the report's tables and notes all read these entries. ``compute``
# receives an evalkit.scoring.Space: one space (the raw features or one embedding) of one
# feature set, with its exact neighbour graphs and the settings of ``metrics:``.

from evalkit.registry import METRICS, Metric  # noqa: E402  (the functions above need no registry)

_BOTH = frozenset({"features", "embedding"})


def _silhouette_of(space):
    sample = space.settings.silhouette_max_samples
    n = space.n_samples
    if sample and n > sample:
        space.note(f"silhouette: computed on a seeded stratified sample of {sample:,} of {n:,} points "
                   f"(metrics.silhouette_max_samples); every other score uses all points")
    else:
        sample = None
    if space.n_classes >= n:
        return None
    value = space.features_silhouette()  # the raw features': from the embeddings' pass, when it runs
    if value is not None:
        return value
    return silhouette(space.coords, space.labels, device=space.device, sample_size=sample)


METRICS.register(Metric(
    "trustworthiness", "trustworthiness", "trust.", frozenset({"embedding"}),
    lambda space: space.neighbourhood("trustworthiness"), params=("n_neighbors",),
    description=("Are the {k} nearest neighbours of a point in the picture also near it in the feature "
                 "space? 1 = no false neighbours (Venna & Kaski); penalises points pulled together by "
                 "the embedding.")))
METRICS.register(Metric(
    "continuity", "continuity", "contin.", frozenset({"embedding"}),
    lambda space: space.neighbourhood("continuity"), params=("n_neighbors",),
    description=("The reverse: are the {k} nearest neighbours in the feature space kept near in the "
                 "picture? 1 = no neighbours torn apart.")))
METRICS.register(Metric(
    "rnx_auc", "R_NX area (log K)", "R_NX AUC", frozenset({"embedding"}),
    lambda space: space.neighbourhood("rnx_auc"), params=("rnx_max_k", "rnx_max_samples"),
    description=("Area under R_NX(K) against log K for K = 1 to {rnx_k} (Lee & Verleysen 2015): how much "
                 "better than a random picture the K-neighbourhoods are kept, at every scale K, small K "
                 "weighted most; 1 = every neighbourhood kept, 0 = no better than random. R_NX(K) = "
                 "((N - 1) Q_NX(K) - K) / (N - 1 - K), Q_NX(K) the share of K-neighbours kept.")))
METRICS.register(Metric(
    "silhouette", "silhouette", "silhouette", _BOTH, _silhouette_of, needs_classes=True,
    params=("silhouette_max_samples",),
    description=("Mean silhouette of the classes with euclidean distance, from -1 to 1: how much closer "
                 "a point is to its own class than to the nearest other class. Computed in the picture "
                 "for embeddings, in the feature space for raw features.")))
METRICS.register(Metric(
    "knn_accuracy", "kNN accuracy", "kNN acc.", _BOTH,
    lambda space: knn_accuracy(space.coords, space.labels, n_neighbors=space.knn_k,
                               graph=space.graph(space.knn_k)),
    needs_classes=True, needs_class_pairs=True, params=("knn_k",), interval=wilson_interval,
    description=("Leave-one-out kNN accuracy: each point is classified by a majority vote of its {knn_k} "
                 "nearest neighbours in that space (itself excluded). In brackets: the 95% Wilson score "
                 "interval over the N samples (of the mean over seeds), which checks can test with "
                 "on: lower / on: upper.")))
METRICS.register(Metric(
    "weighted_knn_accuracy", "weighted kNN accuracy", "w-kNN acc.", frozenset({"features"}),
    lambda space: weighted_knn_accuracy(space.coords, space.labels,
                                        n_neighbors=(k := min(space.settings.weighted_knn_k, space.n_samples - 1)),
                                        graph=space.cosine_graph(k), device=space.device),
    needs_classes=True, needs_class_pairs=True, params=("weighted_knn_k",),
    description=("Weighted kNN accuracy on raw features (DINO protocol): L2-normalised features, cosine "
                 "similarity, neighbour votes weighted by exp(similarity / 0.07).")))
METRICS.register(Metric(
    "neighbourhood_hit", "neighbourhood hit", "hit", frozenset({"embedding"}),
    lambda space: neighbourhood_hit(space.coords, space.labels, n_neighbors=space.k, graph=space.graph(space.k)),
    needs_classes=True, needs_class_pairs=True, params=("n_neighbors",),
    description=("Neighbourhood hit (Paulovich et al. 2008): the share of each point's {k} nearest neighbours "
                 "in the picture that have its class, averaged over points; 1 = every neighbourhood is pure.")))
