"""The ``neighbors`` stage: one k-nearest-neighbour graph per feature set.

The graph is computed once and shared by t-SNE, UMAP and the neighbourhood metrics in
:mod:`evalkit.score`. Two backends sit behind :func:`knn_graph`:

- ``"exact"``: blocked euclidean distances in torch, memory O(block x n_samples), never
  n_samples x n_samples. On CUDA: float64 blocks and ``torch.topk``. On CPU: a float32
  matmul whose error is bounded, with the near-decisions redone in float64 by a numba
  kernel (:class:`Float32Ranking`; same neighbours as float64, faster); a k-d tree
  for data of at most :data:`KDTREE_MAX_FEATURES` features (2-D embeddings).
- ``"pynndescent"``: approximate nearest-neighbour descent.

Ties: among samples at exactly the same distance the lower index comes first (CPU); the
sample itself is always excluded by index, so duplicates cannot displace it.

torch, numba and pynndescent are imported inside the functions so ``import evalkit`` stays
light.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from evalkit.errors import EvalkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "KNNGraph",
    "knn_graph",
    "resolve_device",
    "EXACT_MAX_SAMPLES",
    "EXACT_MAX_SAMPLES_CUDA",
    "METHODS",
    "InputError",
]

#: ``method="auto"`` is exact up to this many samples on CPU, pynndescent beyond.
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
#: exact is exact; 20,000 (4 s exact) is where we switch.
EXACT_MAX_SAMPLES = 20_000
#: On CUDA the exact search is a few seconds even at this size.
EXACT_MAX_SAMPLES_CUDA = 200_000
#: On CPU, exact neighbours of data with at most this many features (2-D embeddings) come
#: from a k-d tree (scipy's cKDTree): well under a second at 70,000 points.
KDTREE_MAX_FEATURES = 8
#: Backends :func:`knn_graph` accepts.
METHODS = ("auto", "exact", "pynndescent")

# Bytes one (block x n_samples) float64 work array may take; a few of them live at once.
_BLOCK_BYTES = 256 * 2**20
_MAX_BLOCK = 8192


class InputError(EvalkitError, ValueError):
    """Invalid input to a neighbour or score function.

    A ``ValueError`` for library users, and an :class:`~evalkit.errors.EvalkitError` so the
    command line reports it as one line with exit code 2.
    """


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
        ``"exact"`` or ``"pynndescent"``.
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


def resolve_device(device=None) -> "torch.device":
    """The torch device to compute on.

    Parameters
    ----------
    device : None, str or torch.device
        ``None`` or ``"auto"`` picks CUDA, then MPS, then CPU; anything else is passed to
        ``torch.device``.

    Returns
    -------
    torch.device
    """
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"device {device!r} is not a torch device; expected auto, cpu, cuda or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was asked for but CUDA is not available; expected auto or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError(f"device {device!r} was asked for but MPS is not available; expected auto or cpu")
    return dev


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
    method : {"auto", "exact", "pynndescent"}
        ``"auto"`` is exact on CUDA up to :data:`EXACT_MAX_SAMPLES_CUDA` samples and
        elsewhere up to :data:`EXACT_MAX_SAMPLES`, pynndescent beyond.
    device : None, str or torch.device
        Where the exact search runs; see :func:`resolve_device`.
    random_state : int
        Seed of pynndescent.
    block_size : int, optional
        Rows per block of the exact search; by default chosen so one block of distances
        takes about 256 MB.

    Returns
    -------
    KNNGraph

    Notes
    -----
    Among samples at exactly the same distance (duplicates, for instance) the lower index
    comes first on CPU; on CUDA ``torch.topk`` orders them. The sample itself is removed by
    index, never by distance, so duplicates cannot displace it. If pynndescent cannot fill
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
        limit = EXACT_MAX_SAMPLES_CUDA if dev.type == "cuda" else EXACT_MAX_SAMPLES
        method = "exact" if n_samples <= limit else "pynndescent"
    if method == "pynndescent":
        graph = _pynndescent_graph(X, n_neighbors, random_state)
        if graph is not None:
            return graph
    return _exact_graph(X, n_neighbors, dev, block_size)


# --------------------------------------------------------------------------- helpers


def as_float_matrix(X, name: str) -> np.ndarray:
    """``X`` as a finite 2-D float32 or float64 numpy array (other dtypes become float64)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise InputError(f"{name} must be a 2-D array (n_samples, n_features); got shape {X.shape}")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    if X.shape[0] < 2 or X.shape[1] < 1:
        raise InputError(f"{name} needs at least 2 samples and 1 feature; got shape {X.shape}")
    if not np.isfinite(X).all():
        raise InputError(f"{name} contains NaN or infinite values")
    return X


def check_n_neighbors(n_neighbors, upper: float, *, what: str) -> int:
    """``n_neighbors`` as an int in [1, upper]."""
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)):
        raise InputError(f"n_neighbors must be an integer; got {n_neighbors!r}")
    n_neighbors = int(n_neighbors)
    if n_neighbors < 1 or n_neighbors > upper:
        raise InputError(f"n_neighbors={n_neighbors} is out of range; expected 1 <= n_neighbors <= {what} ({upper:g})")
    return n_neighbors


def pick_block_size(n_samples: int, block_size: int | None, *, bytes_per_entry: int = 8) -> int:
    """Rows per block so one (block x n_samples) array stays near ``_BLOCK_BYTES``."""
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise InputError(f"block_size must be a positive integer; got {block_size!r}")
        return int(block_size)
    rows = _BLOCK_BYTES // max(1, n_samples * bytes_per_entry)
    return int(max(1, min(rows, _MAX_BLOCK, n_samples)))


def distance_dtype(dev):
    """float64 everywhere (MPS has no float64: float32 there)."""
    import torch

    return torch.float32 if dev.type == "mps" else torch.float64


def to_centered_tensor(X: np.ndarray, dev, dtype):
    """``X`` centred (translation leaves distances unchanged; smaller norms mean less
    cancellation in ||x||^2 + ||y||^2 - 2 x.y) as a tensor, with its squared row norms."""
    import torch

    T = torch.as_tensor(X).to(device=dev, dtype=dtype)
    T = T - T.mean(dim=0, keepdim=True)
    return T, (T * T).sum(dim=1)


def squared_distance_block(T, sq, start: int, stop: int):
    """Squared euclidean distances (stop - start, n_samples) from rows start:stop to all rows.

    Uses ||x||^2 + ||y||^2 - 2 x.y (one matmul, like scikit-learn), clamped at 0, with the
    diagonal set to exactly 0 by index.
    """
    import torch

    D = torch.addmm(sq[None, :], T[start:stop], T.T, beta=1.0, alpha=-2.0)
    D += sq[start:stop, None]
    D.clamp_(min=0)
    rows = torch.arange(stop - start, device=D.device)
    D[rows, rows + start] = 0
    return D


def _exact_graph(X: np.ndarray, n_neighbors: int, dev, block_size) -> KNNGraph:
    if dev.type == "cpu" and X.shape[1] <= KDTREE_MAX_FEATURES:
        return _kdtree_graph(X, n_neighbors)
    import torch

    n_samples = X.shape[0]
    if Float32Ranking.usable(X, dev):
        ranking = Float32Ranking(X)
        indices = np.empty((n_samples, n_neighbors), dtype=np.int64)
        block = pick_block_size(n_samples, block_size, bytes_per_entry=4)
        with torch.no_grad():
            for start in range(0, n_samples, block):
                stop = min(start + block, n_samples)
                ranking.topk(ranking.block(start, stop), start, indices[start:stop])
        indices, distances = _sorted_by_true_distance(X, indices)
        return KNNGraph(indices, distances, True, "exact")
    block = pick_block_size(n_samples, block_size)
    # float64 (GPU, or CPU without numba) so that ranks agree with scikit-learn: in float32,
    # cancellation in ||x||^2 + ||y||^2 - 2 x.y reorders near-ties. On CPU with numba,
    # Float32Ranking above gets the same result from a float32 matmul plus float64 fix-ups.
    dtype = distance_dtype(dev)
    kernels = numba_kernels() if dev.type == "cpu" else None
    with torch.no_grad():
        T, sq = to_centered_tensor(X, dev, dtype)
        indices = np.empty((n_samples, n_neighbors), dtype=np.int64)
        scratch = np.empty((min(block, n_samples), n_neighbors), dtype=np.float64)
        for start in range(0, n_samples, block):
            stop = min(start + block, n_samples)
            D = ranking_block(T, sq, start, stop)
            if kernels is not None:
                # Same result as topk, ties to the lower index, about 2x faster on CPU.
                kernels["row_topk"](D.numpy(), indices[start:stop], scratch[: stop - start])
            else:
                idx = torch.topk(D, n_neighbors, dim=1, largest=False, sorted=True).indices
                indices[start:stop] = idx.cpu().numpy()
            del D
    indices, distances = _sorted_by_true_distance(X, indices)
    return KNNGraph(indices, distances, True, "exact")


def _sorted_by_true_distance(X: np.ndarray, indices: np.ndarray):
    """Distances of the chosen pairs recomputed as ||x_i - x_j|| in float64 (the expanded form
    used for ranking loses ~1e-8 to cancellation: duplicates came out at 6e-8 instead of 0),
    rows stably re-sorted by them."""
    n_samples, k = indices.shape
    distances = np.empty((n_samples, k), dtype=np.float64)
    chunk = max(1, 2**22 // max(1, k * X.shape[1]))
    for start in range(0, n_samples, chunk):
        stop = min(start + chunk, n_samples)
        diff = X[indices[start:stop]].astype(np.float64) - X[start:stop, None, :].astype(np.float64)
        distances[start:stop] = np.sqrt(np.einsum("bkd,bkd->bk", diff, diff))
    order = np.argsort(distances, axis=1, kind="stable")
    indices = np.take_along_axis(indices, order, axis=1)
    distances = np.take_along_axis(distances, order, axis=1)
    return indices, distances.astype(np.float32)


def ranking_block(T, sq, start: int, stop: int):
    """(stop - start, n_samples) distances up to a per-row constant, self set to +inf.

    ||x_l||^2 - 2 x_i.x_l: the row's own ||x_i||^2 shifts the whole row, so the order of a
    row (ranks, nearest neighbours) does not need it. The diagonal is masked by index, so
    duplicates of a sample never push the sample itself into its neighbours.
    """
    import torch

    D = torch.addmm(sq[None, :], T[start:stop], T.T, beta=1.0, alpha=-2.0)
    rows = torch.arange(stop - start, device=D.device)
    D[rows, rows + start] = float("inf")
    return D


class Float32Ranking:
    """Rows of ``||x_l||^2 - 2 x_i.x_l`` in float32, with a certified bound on their error.

    Why: on CPU the float64 matmul is nearly the whole cost of the exact kNN search and
    takes about 2x the float32 one (measured at 70,000 x 256 on 2 busy cores: 156 s vs 73 s
    for a full pass). float32 alone would reorder near-ties, so every float32 value r32
    comes with a bound ``err[i]`` on |r32 - r64| (r64 = the same quantity in float64): the
    k-th smallest float32 value v of a row admits as candidates only entries with
    r32 <= v + 2 err, and those (k plus a few) are re-ranked in float64. The neighbours are
    exactly the float64 ones.

    (The rank counting of :mod:`evalkit.score` stays in float64: there every threshold has
    a band of uncertain entries to resolve, and that cost more than the matmul saved.)

    The bound is the worst case for any summation order (gamma_D = D u / (1 - D u) for a
    length-D dot product, u = 2^-24), plus the rounding of the inputs and of the squared
    norms to float32, doubled for safety:
    err_i = 2 (2 u M^2 + 2 (gamma_D + 3.01 u) |x_i| M), M = max_l |x_l|, on centred data.
    """

    #: above this many features the worst-case bound gets too loose to be worth it
    MAX_FEATURES = 100_000

    def __init__(self, X: np.ndarray):
        import torch

        X64 = np.asarray(X, dtype=np.float64)
        X64 = np.ascontiguousarray(X64 - X64.mean(axis=0))
        self.X64 = X64
        self.sq64 = np.einsum("ij,ij->i", X64, X64)
        norms = np.sqrt(self.sq64)
        top = float(norms.max())
        u = 2.0**-24
        d = X64.shape[1]
        gamma = d * u / (1 - d * u)
        self.err = 2.0 * (2 * u * top * top + 2 * (gamma + 3.01 * u) * norms * top) + 1e-300
        self.T32 = torch.from_numpy(X64.astype(np.float32))
        self.sq32 = torch.from_numpy(self.sq64.astype(np.float32))

    @classmethod
    def usable(cls, X: np.ndarray, dev) -> bool:
        return dev.type == "cpu" and X.shape[1] <= cls.MAX_FEATURES and numba_kernels() is not None

    def block(self, start: int, stop: int):
        """(stop - start, n_samples) float32 tensor, self set to +inf by index."""
        import torch

        R = torch.addmm(self.sq32[None, :], self.T32[start:stop], self.T32.T, beta=1.0, alpha=-2.0)
        rows = torch.arange(stop - start)
        R[rows, rows + start] = float("inf")
        return R

    def topk(self, R, start: int, out: np.ndarray) -> None:
        """Exact k nearest neighbours (k = out.shape[1]) of rows start.. into ``out``."""
        numba_kernels()["row_topk_certified"](R.numpy(), start, self.X64, self.sq64, self.err, out)


def _kdtree_graph(X: np.ndarray, n_neighbors: int) -> KNNGraph:
    """Exact neighbours of low-dimensional data (2-D embeddings) with a k-d tree.

    On CPU this takes well under a second for 70,000 points, where the blocked search
    takes minutes (it is O(N^2) however few the dimensions).
    """
    from scipy.spatial import cKDTree

    P = np.asarray(X, dtype=np.float64)
    dist, idx = cKDTree(P).query(P, k=n_neighbors + 1, workers=-1)
    indices, distances = _drop_self(np.asarray(idx, dtype=np.int64), dist, n_neighbors)
    return KNNGraph(indices, distances.astype(np.float32), True, "exact")


def _drop_self(idx: np.ndarray, dist: np.ndarray, n_neighbors: int):
    """Remove each row's own index from (n, k + 1) neighbours; a row whose self was pushed
    out by duplicates (all at distance 0) drops its last entry instead. Stays sorted."""
    n_samples = idx.shape[0]
    is_self = idx == np.arange(n_samples)[:, None]
    drop = is_self.copy()
    drop[~is_self.any(axis=1), -1] = True
    keep = ~drop
    indices = idx[keep].reshape(n_samples, n_neighbors)
    distances = dist[keep].reshape(n_samples, n_neighbors)
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(indices, order, axis=1), np.take_along_axis(distances, order, axis=1)


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
    dist = np.asarray(dist, dtype=np.float32)
    if idx.shape != (n_samples, n_neighbors + 1) or (idx < 0).any():
        return None
    indices, distances = _drop_self(idx, dist, n_neighbors)
    return KNNGraph(indices, distances, False, "pynndescent")


# --------------------------------------------------------------------------- numba kernels

_NUMBA_KERNELS: dict | None = None
_NUMBA_TRIED = False


def numba_kernels() -> dict | None:
    """CPU kernels compiled with numba (a dependency of umap-learn and pynndescent), or
    None when numba cannot be used; callers then fall back to torch."""
    global _NUMBA_KERNELS, _NUMBA_TRIED
    if not _NUMBA_TRIED:
        _NUMBA_TRIED = True
        try:
            _NUMBA_KERNELS = _build_numba_kernels()
        except Exception:  # numba missing or broken
            _NUMBA_KERNELS = None
    return _NUMBA_KERNELS


def _build_numba_kernels() -> dict:
    import numba

    @numba.njit(parallel=True, cache=True)
    def row_topk(D, idx, val):
        # Smallest k of each row by insertion into a sorted buffer; most entries cost one
        # comparison with the current k-th. Equal values keep the lower index first.
        n_rows, n = D.shape
        k = idx.shape[1]
        for r in numba.prange(n_rows):
            row = D[r]
            vb = np.full(k, np.inf)
            ib = np.full(k, -1, dtype=np.int64)
            worst = np.inf
            for l in range(n):
                v = row[l]
                if v < worst:
                    p = k - 1
                    while p > 0 and vb[p - 1] > v:
                        vb[p] = vb[p - 1]
                        ib[p] = ib[p - 1]
                        p -= 1
                    vb[p] = v
                    ib[p] = l
                    worst = vb[k - 1]
            for m in range(k):
                idx[r, m] = ib[m]
                val[r, m] = vb[m]

    @numba.njit(cache=True)
    def count_row(buf, t, out_row):
        # out_row[m] = #{l : buf[l] < t[m]}: one pass keeps the entries below the largest
        # threshold (branch-free compaction, overwriting buf), then one vectorisable counting
        # pass per threshold over those.
        tmax = t.max()
        kept = 0
        for l in range(buf.shape[0]):
            v = buf[l]
            buf[kept] = v
            kept += 1 if v < tmax else 0
        for m in range(t.shape[0]):
            tm = t[m]
            if tm == tmax:
                out_row[m] = kept
                continue
            acc = 0
            for l in range(kept):
                acc += 1 if buf[l] < tm else 0
            out_row[m] = acc

    @numba.njit(parallel=True, cache=True)
    def count_below(D, thresholds, out):
        # out[r, m] = #{l : D[r, l] < thresholds[r, m]}. Per row: one pass keeps the entries
        # below the largest threshold (branch-free compaction), then one vectorisable
        # counting pass per threshold over those.
        n_rows, n = D.shape
        for r in numba.prange(n_rows):
            buf = np.empty(n, dtype=D.dtype)
            buf[:] = D[r]
            count_row(buf, thresholds[r], out[r])

    @numba.njit(parallel=True, cache=True)
    def lowdim_count_below(PT, nbr, out):
        # out[i, m] = #{l != i : d(i, l) < d(i, nbr[i, m])} for few dimensions, squared
        # distances computed on the fly from PT = P.T (n_dims, n), column by column so the
        # loops vectorise; thresholds and candidates use the same arithmetic (same order of
        # additions), so a neighbour never counts as closer than itself.
        d, n = PT.shape
        k = nbr.shape[1]
        for i in numba.prange(n):
            t = np.empty(k, dtype=PT.dtype)
            for m in range(k):
                j = nbr[i, m]
                s = 0.0
                for c in range(d):
                    diff = PT[c, i] - PT[c, j]
                    s += diff * diff
                t[m] = s
            buf = np.zeros(n, dtype=PT.dtype)
            for c in range(d):
                pc = PT[c]
                x = pc[i]
                for l in range(n):
                    diff = x - pc[l]
                    buf[l] += diff * diff
            buf[i] = np.inf  # self excluded by index
            count_row(buf, t, out[i])

    @numba.njit(parallel=True, cache=True)
    def row_topk_certified(R, start, X64, sq64, err, idx):
        # Exact k smallest r64 per row (ties to the lower index): float32 top-k gives the
        # k-th value v; every true neighbour has r32 <= v + 2 err (see Float32Ranking),
        # so those candidates are re-ranked in float64.
        n_rows, n = R.shape
        k = idx.shape[1]
        d = X64.shape[1]
        for r in numba.prange(n_rows):
            i = start + r
            row = R[r]
            vb = np.full(k, np.inf, dtype=np.float32)
            worst = np.float32(np.inf)
            for l in range(n):
                v = row[l]
                if v < worst:
                    p = k - 1
                    while p > 0 and vb[p - 1] > v:
                        vb[p] = vb[p - 1]
                        p -= 1
                    vb[p] = v
                    worst = vb[k - 1]
            # a float32 >= worst + 2 err (moved up by more than half an ulp, then rounded)
            bound = np.float64(worst) + 2.0 * err[i]
            limit = np.float32(bound + abs(bound) * 2.0**-22 + 1e-30)
            n_cand = 0
            for l in range(n):
                n_cand += 1 if row[l] <= limit else 0
            cand = np.empty(n_cand, dtype=np.int64)
            q = 0
            for l in range(n):
                if row[l] <= limit:
                    cand[q] = l
                    q += 1
            best_v = np.full(k, np.inf)
            best_i = np.full(k, -1, dtype=np.int64)
            for q in range(n_cand):
                l = cand[q]
                # r64(i, l) = ||x_l||^2 - 2 x_i.x_l in float64
                dot = 0.0
                for c in range(d):
                    dot += X64[i, c] * X64[l, c]
                v = sq64[l] - 2.0 * dot
                if v < best_v[k - 1]:
                    p = k - 1
                    while p > 0 and best_v[p - 1] > v:
                        best_v[p] = best_v[p - 1]
                        best_i[p] = best_i[p - 1]
                        p -= 1
                    best_v[p] = v
                    best_i[p] = l
            for m in range(k):
                idx[r, m] = best_i[m]

    return {
        "row_topk": row_topk,
        "count_below": count_below,
        "lowdim_count_below": lowdim_count_below,
        "row_topk_certified": row_topk_certified,
    }
