"""The ``neighbors`` stage: one k-nearest-neighbour graph per feature set.

The graph is computed once and shared by t-SNE, UMAP and the neighbourhood metrics in
:mod:`evalkit.score`. Two backends sit behind :func:`knn_graph`:

- ``"exact"``: on CPU, a k-d tree for data of at most :data:`KDTREE_MAX_FEATURES` features
  (2-D embeddings); otherwise blocked distances (:mod:`evalkit.kernels`), memory
  O(block x n_samples): a float32 matmul plus a numba kernel on CPU
  (:class:`~evalkit.kernels.Float32Ranking`), float64 and ``torch.topk`` on a GPU.
- ``"annoy"``: approximate, random projection trees (Annoy, as openTSNE ships it); the
  ``"auto"`` choice above the exact limit.
- ``"pynndescent"``: approximate nearest-neighbour descent.

Ties: every exact backend returns the same neighbours, ordered by (distance, index): among
samples at exactly the same distance the lower index comes first, with distances computed
exactly as :func:`evalkit.kernels.exact_sq_distances` defines them (so the k neighbours
are well defined on integer data and duplicates). The sample itself is always excluded by
index, so duplicates cannot displace it. Annoy's and pynndescent's rows are re-sorted the same way.

torch, scipy, numba and pynndescent are imported inside the functions so ``import evalkit``
stays light.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from evalkit.device import resolve_device
from evalkit.errors import InputError
from evalkit.kernels import (
    CosineRanking,
    Float32Ranking,
    Ranking,
    as_float_matrix,
    check_n_neighbors,
    distance_dtype,
    exact_sq_distances,
    numba_kernels,
    one_blas_thread,
    pick_block_size,
    positions_in_top,
    sort_neighbours,
)

__all__ = [
    "KNNGraph",
    "knn_graph",
    "knn_graphs",
    "EXACT_MAX_SAMPLES",
    "EXACT_MAX_SAMPLES_CUDA",
    "KDTREE_MAX_FEATURES",
    "METHODS",
    "InputError",
]

#: ``method="auto"`` is exact up to this many samples on CPU, Annoy beyond (pynndescent until
#: the speed issue: at 70,000 x 256 and k = 90 its graph took 146 s, compile included).
#: Measured on this project's 2-core Xeon (busy: about one core free), 256 features, k=10,
#: 10-cluster Gaussian mixture, pynndescent warm (n_jobs=-1):
#:   n       exact    pynndescent   pynndescent recall@10
#:   5,000   0.4 s    0.7 s         0.87
#:   10,000  1.3 s    1.2 s         0.76
#:   20,000  4.3 s    1.9 s         0.63
#:   40,000  17.7 s   4.7 s         0.49
#:   70,000  47 s     -
#: Warm, exact stops being cheaper near 10,000. But pynndescent's first call in a process
#: compiles 45-75 s of numba code (most of it is not cached), which exact never pays, and
#: exact is exact. Annoy (which replaced pynndescent) was no better at 256 features: 70,000
#: points, k = 90, in one busy run: exact 40.9 s, Annoy 145.5 s with recall@90 0.69
#: (``knn_graph(X, n_neighbors=90, method=...)`` on ``benchmarks/bench.py``'s data). Exact
#: grows as N^2, Annoy about as N log N: Annoy takes over at 100,000 (about 80 s exact here).
EXACT_MAX_SAMPLES = 100_000
#: On CUDA the exact search is a few seconds even at this size.
EXACT_MAX_SAMPLES_CUDA = 200_000
#: On CPU, exact neighbours of data with at most this many features (2-D embeddings) come
#: from a k-d tree (scipy's cKDTree): well under a second at 70,000 points.
KDTREE_MAX_FEATURES = 8
#: Backends :func:`knn_graph` accepts.
METHODS = ("auto", "exact", "annoy", "pynndescent")


@dataclass(frozen=True)
class KNNGraph:
    """k nearest neighbours of every sample, self excluded.

    Attributes
    ----------
    indices : ndarray of shape (n_samples, n_neighbors), int64
        ``indices[i]`` are the neighbours of sample i, nearest first. Sample i itself is
        never among them, even when other samples coincide with it.
    distances : ndarray of shape (n_samples, n_neighbors), float32
        Euclidean distances matching ``indices``, ascending along each row.
    exact : bool
        True when the neighbours are the exact ones (up to ties at equal distance).
    method : str
        ``"exact"``, ``"annoy"`` or ``"pynndescent"``.
    """

    indices: np.ndarray
    distances: np.ndarray
    exact: bool
    method: str

    @property
    def n_neighbors(self) -> int:
        return int(self.indices.shape[1])

    def head(self, n_neighbors: int) -> "KNNGraph":
        """The graph restricted to the first ``n_neighbors`` neighbours of each sample."""
        if n_neighbors > self.n_neighbors:
            raise InputError(
                f"the neighbour graph has {self.n_neighbors} neighbours per sample; "
                f"expected at least n_neighbors={n_neighbors}"
            )
        if n_neighbors == self.n_neighbors:
            return self
        return KNNGraph(
            self.indices[:, :n_neighbors], self.distances[:, :n_neighbors], self.exact, self.method
        )



def knn_graph(
    X,
    *,
    n_neighbors: int,
    method: str = "auto",
    device=None,
    random_state: int = 0,
    block_size: int | None = None,
) -> KNNGraph:
    """k-nearest-neighbour graph of the rows of ``X`` (euclidean), self excluded.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
    n_neighbors : int
        Neighbours per sample, 1 <= n_neighbors < n_samples.
    method : {"auto", "exact", "annoy", "pynndescent"}
        ``"auto"`` is exact on CUDA up to :data:`EXACT_MAX_SAMPLES_CUDA` samples and
        elsewhere up to :data:`EXACT_MAX_SAMPLES`, Annoy beyond.
    device : None, str or torch.device
        Where the exact search runs; see :func:`evalkit.device.resolve_device`.
    random_state : int
        Seed of Annoy and pynndescent.
    block_size : int, optional
        Rows per block of the exact search; by default chosen so one block of distances
        takes about 256 MB.

    Returns
    -------
    KNNGraph

    Notes
    -----
    Among samples at exactly the same distance (duplicates, integer data) the lower index
    comes first, on every exact backend and device. The sample itself is removed by index,
    never by distance, so duplicates cannot displace it. If Annoy or pynndescent cannot fill
    every row (tiny inputs), the exact graph is returned instead (``method == "exact"``).
    On MPS, which has no float64, the exact search ranks in float32.
    """
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    n_neighbors = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    if method not in METHODS:
        from evalkit.errors import unknown

        err = unknown("neighbour method", str(method), METHODS)
        raise InputError(str(err))
    pick_block_size(n_samples, block_size)  # validates block_size
    dev = resolve_device(device)
    if method == "auto":
        method = "exact" if n_samples <= _exact_max_samples(dev) else "annoy"
    if method == "annoy":
        graph = _annoy_graph(X, n_neighbors, random_state)
        if graph is not None:
            return graph
    if method == "pynndescent":
        graph = _pynndescent_graph(X, n_neighbors, random_state)
        if graph is not None:
            return graph
    return _exact_graph(X, n_neighbors, dev, block_size)[0]


def _exact_max_samples(dev) -> int:
    """Up to how many samples ``"auto"`` searches exactly on this device (Annoy beyond)."""
    return EXACT_MAX_SAMPLES_CUDA if dev.type == "cuda" else EXACT_MAX_SAMPLES


def _kdtree(dev, n_features: int) -> bool:
    """Whether the exact search is the k-d tree's (CPU, few features)."""
    return dev.type == "cpu" and n_features <= KDTREE_MAX_FEATURES


def prepare_search(n_samples: int, n_features: int, device=None) -> None:
    """Import now, in this thread, what :func:`knn_graphs` (method ``"auto"``) imports for data
    of this shape on this device, and load numba's kernels where it uses them: so another
    thread may import meanwhile (two threads importing one package at once can see it half
    made). Nothing is searched."""
    import importlib

    dev = resolve_device(device)
    if n_samples > _exact_max_samples(dev):
        try:
            importlib.import_module("openTSNE.dependencies.annoy")
        except ImportError:  # knn_graph then falls back on the exact search
            pass
    if _kdtree(dev, n_features):
        importlib.import_module("scipy.spatial")
    elif dev.type == "cpu":  # the blocks' BLAS limit while work runs beside them (knn_graphs)
        importlib.import_module("threadpoolctl")
    if dev.type == "cpu" and numba_kernels(n_samples, n_features) is not None:
        # numba's first call of a kernel imports its runtime (its threading layer, the
        # implementations it registers, scipy.linalg among them): a tiny parallel one now
        positions_in_top(np.zeros((1, 1), dtype=np.int64), np.zeros((1, 1), dtype=np.int64))


def _one_blas_thread_while(beside):
    """:func:`evalkit.kernels.one_blas_thread` within, while the future ``beside`` runs
    (nothing otherwise)."""
    if beside is None or beside.done():
        return contextlib.nullcontext()
    return one_blas_thread()


# --------------------------------------------------------------------------- backends

#: The k-d tree asks for more candidates while equal distances straddle the k-th neighbour;
#: rows still undecided at this many go to the blocked search.
_KDTREE_MAX_CANDIDATES = 1024


def knn_graphs(X, *, n_neighbors: int, cosine_neighbors: int, device=None, random_state: int = 0,
               block_size: int | None = None, beside=None):
    """:func:`knn_graph` of ``X``, and the exact ``cosine_neighbors`` nearest neighbours by
    cosine similarity (the euclidean graph of the L2-normalised rows,
    :func:`evalkit.kernels.unit_rows`, as ``knn_graph`` of those rows gives it) from the same
    pass where that pass is the exact float32 search on CPU: one matmul for both
    (:class:`evalkit.kernels.CosineRanking`).

    ``beside``: a :class:`concurrent.futures.Future` of work that keeps a core busy in another
    thread (the methods' imports). While it runs, the exact pass's blocks run BLAS on one
    thread: OpenBLAS's threads wait for each other, spinning, when one of them shares a core
    with that work (10,000 x 256 report, 4 alternating pairs: the graph 2.4-2.9 s against
    2.6-3.4 s, the report 0.2-1.7 s sooner).

    Returns ``(graph, cosine_graph)``; ``cosine_graph`` is None where the pass cannot give it
    (another backend or device, rows of norm 0, a bound too loose to pay, ``cosine_neighbors``
    0): the caller searches the normalised rows itself.
    """
    X = as_float_matrix(X, "X")
    n_samples = X.shape[0]
    n_neighbors = check_n_neighbors(n_neighbors, n_samples - 1, what="n_samples - 1")
    dev = resolve_device(device)
    if isinstance(cosine_neighbors, bool) or not isinstance(cosine_neighbors, (int, np.integer)) or cosine_neighbors < 0:
        raise InputError(f"cosine_neighbors must be an integer >= 0; got {cosine_neighbors!r}")
    kc = int(cosine_neighbors)
    if not (0 < kc < n_samples and n_samples <= _exact_max_samples(dev) and Float32Ranking.usable(X, dev)
            and not _kdtree(dev, X.shape[1])):
        return knn_graph(X, n_neighbors=n_neighbors, device=dev, random_state=random_state,
                         block_size=block_size), None
    pick_block_size(n_samples, block_size)  # validates block_size
    return _exact_graph(X, n_neighbors, dev, block_size, cosine_neighbors=kc, beside=beside)


def _exact_graph(X: np.ndarray, n_neighbors: int, dev, block_size, cosine_neighbors: int = 0, beside=None):
    """``(graph, cosine graph or None)``: the exact graph and, when asked and the float32 pass
    can give them, the exact cosine neighbours from the same blocks (``beside``: as for
    :func:`knn_graphs`)."""
    if _kdtree(dev, X.shape[1]):
        return _kdtree_graph(X, n_neighbors, block_size), None
    n_samples = X.shape[0]
    cosine = None
    if Float32Ranking.usable(X, dev):
        # float32 picks candidates, float64 exact distances decide: the float64 neighbours
        ranking = Float32Ranking(X)
        block = pick_block_size(n_samples, block_size, bytes_per_entry=4)
        cosine = CosineRanking.make(ranking) if cosine_neighbors else None
    else:
        ranking = Ranking(X, dev, distance_dtype(dev))
        block = pick_block_size(n_samples, block_size)
    indices = np.empty((n_samples, n_neighbors), dtype=np.int64)
    cos_idx = np.empty((n_samples, cosine_neighbors), dtype=np.int64) if cosine is not None else None
    with ranking.no_grad():
        for start in range(0, n_samples, block):
            stop = min(start + block, n_samples)
            rows = np.arange(start, stop)
            with _one_blas_thread_while(beside):
                R = ranking.block(start, stop)
            indices[start:stop] = ranking.topk(R, rows, n_neighbors)
            if cosine is not None:
                cos_idx[start:stop] = cosine.topk(R, rows, cosine_neighbors)  # R is overwritten
            del R
    indices, distances = sort_neighbours(ranking.points, indices)
    graph = KNNGraph(indices, distances, True, "exact")
    return graph, (None if cosine is None else KNNGraph(*sort_neighbours(cosine.points, cos_idx), True, "exact"))


def _kdtree_graph(X: np.ndarray, n_neighbors: int, block_size=None) -> KNNGraph:
    """Exact neighbours of low-dimensional data (2-D embeddings) with a k-d tree.

    On CPU this takes well under a second for 70,000 points, where the blocked search
    takes minutes (it is O(N^2) however few the dimensions). The tree's order of equal
    distances is arbitrary, so each row asks for candidates until the farthest one is
    clearly beyond the k-th neighbour; the candidates are then ranked by (dd, index).
    """
    from scipy.spatial import cKDTree

    P = np.ascontiguousarray(X, dtype=np.float64)
    n_samples = P.shape[0]
    k = n_neighbors
    tree = cKDTree(P)
    indices = np.empty((n_samples, k), dtype=np.int64)
    todo = np.arange(n_samples)
    m = k + 2
    while todo.size:
        m = min(m, n_samples)
        if m > max(_KDTREE_MAX_CANDIDATES, k + 2):
            _blocked_rows(P, todo, k, indices, block_size)
            break
        chunk = max(1, 2**22 // m)
        undecided = []
        for start in range(0, todo.size, chunk):
            rows = todo[start:start + chunk]
            dist, idx = tree.query(P[rows], k=m, workers=-1)
            dist, idx = dist.reshape(len(rows), m), idx.reshape(len(rows), m).astype(np.int64)
            other = idx != rows[:, None]
            kth = dist[np.arange(len(rows)), np.argmax(np.cumsum(other, axis=1) >= k, axis=1)]
            done = (dist[:, -1] > kth * (1 + 1e-9)) | (m == n_samples)
            if done.any():
                r = rows[done]
                cand = idx[done]
                dd = exact_sq_distances(P, np.repeat(r, m), cand.reshape(-1)).reshape(len(r), m)
                dd[~other[done]] = np.inf
                order = np.lexsort((cand, dd), axis=1)[:, :k]
                indices[r] = np.take_along_axis(cand, order, axis=1)
            undecided.append(rows[~done])
        todo = np.concatenate(undecided)
        m *= 4
    indices, distances = sort_neighbours(P, indices)
    return KNNGraph(indices, distances, True, "exact")


def _blocked_rows(P: np.ndarray, rows: np.ndarray, k: int, out: np.ndarray, block_size) -> None:
    """Exact neighbours of some rows by the blocked float64 search, into ``out[rows]``."""
    from evalkit.device import CPU

    ranking = Ranking(P, CPU(), np.float64)
    block = pick_block_size(P.shape[0], block_size)
    with ranking.no_grad():
        for start in range(0, rows.size, block):
            sub = rows[start:start + block]
            out[sub] = ranking.topk(ranking.block_rows(sub), sub, k)


def _drop_self(idx: np.ndarray, dist: np.ndarray, n_neighbors: int):
    """Remove each row's own index from (n, k + 1) neighbours; a row whose self was pushed
    out by duplicates (all at distance 0) drops its last entry instead."""
    n_samples = idx.shape[0]
    is_self = idx == np.arange(n_samples)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    keep = ~drop
    return idx[keep].reshape(n_samples, n_neighbors), dist[keep].reshape(n_samples, n_neighbors)


def _annoy_graph(X: np.ndarray, n_neighbors: int, random_state: int) -> KNNGraph | None:
    """Approximate graph from Annoy (random projection trees, 50 of them, as openTSNE builds its
    t-SNE neighbours with the copy it ships), on every core, seeded. At 70,000 x 256 and k = 90
    it takes a fraction of pynndescent's time, which also compiles 45-75 s of numba code per
    process. Each point asks for k + 1 neighbours and its own index is removed by index (with
    duplicates, Annoy may list a copy before the point itself)."""
    import os

    from joblib import Parallel, delayed
    from openTSNE.dependencies.annoy import AnnoyIndex

    n_samples, k = X.shape[0], n_neighbors + 1
    if k >= n_samples:
        return None
    try:
        jobs = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        jobs = max(1, os.cpu_count() or 1)
    data = np.ascontiguousarray(X, dtype=np.float32)
    index = AnnoyIndex(data.shape[1], "euclidean")
    index.set_seed(int(np.random.RandomState(random_state).randint(np.iinfo(np.int32).max)))
    for i in range(n_samples):
        index.add_item(i, data[i])
    index.build(50, n_jobs=jobs)
    idx = np.full((n_samples, k), -1, dtype=np.int64)
    dist = np.zeros((n_samples, k))

    def query(rows):
        for i in rows:
            found, d = index.get_nns_by_item(int(i), k, include_distances=True)
            idx[i, :len(found)], dist[i, :len(found)] = found, d

    Parallel(n_jobs=jobs, require="sharedmem")(delayed(query)(rows) for rows in np.array_split(np.arange(n_samples),
                                                                                                jobs * 8))
    if (idx < 0).any():
        return None
    indices, _ = _drop_self(idx, dist, n_neighbors)
    indices, distances = sort_neighbours(np.ascontiguousarray(X, dtype=np.float64), indices)
    return KNNGraph(indices, distances, False, "annoy")


def _pynndescent_graph(X: np.ndarray, n_neighbors: int, random_state: int) -> KNNGraph | None:
    """Approximate graph; None when pynndescent could not fill every row (tiny inputs)."""
    from pynndescent import NNDescent

    n_samples = X.shape[0]
    index = NNDescent(
        np.ascontiguousarray(X, dtype=np.float32),
        n_neighbors=n_neighbors + 1,
        random_state=random_state,
        n_jobs=-1,
    )
    idx, dist = index.neighbor_graph
    idx = np.asarray(idx, dtype=np.int64)
    if idx.shape != (n_samples, n_neighbors + 1) or (idx < 0).any():
        return None
    indices, _ = _drop_self(idx, np.asarray(dist), n_neighbors)
    indices, distances = sort_neighbours(np.ascontiguousarray(X, dtype=np.float64), indices)
    return KNNGraph(indices, distances, False, "pynndescent")
