"""Blocked distance and rank kernels shared by :mod:`evalkit.neighbors` and :mod:`evalkit.score`.

Memory stays O(block x n_samples): rows are processed a block at a time, never an
n_samples x n_samples matrix.

One definition of distance, one tie rule
----------------------------------------
The distance of samples i and l is ``dd(i, l) = sum_c (x_ic - x_lc)^2`` in float64, columns
added in order, on the data as given (:func:`exact_sq_distances`; exact for integer-valued
data of moderate size, unchanged by appended zero columns, independent of blocks and
devices). Samples are ordered by ``(dd(i, l), l)``: among equal distances the lower index
comes first. Both the neighbours of every exact backend and the ranks of the metrics
follow from this order, so the rank of j among the distances from i is
``1 + #{l != i : dd(i, l) < dd(i, j) or (dd(i, l) == dd(i, j) and l < j)}`` and the k
nearest neighbours of i are exactly the samples of rank <= k.

Speed comes from the expanded form ``||x_l||^2 - 2 x_i.x_l`` (one matmul per block, on
centred data), which rounds equal distances apart. :class:`Ranking` attaches to every row a
bound ``err[i]`` on how far that value can be from ``dd(i, l)`` minus a per-row constant:
two entries whose expanded values differ by more than ``2 err`` are ordered by them; the
few closer than that are decided by ``dd`` itself.

torch and numba are imported inside the functions (numba's kernels, module-level with
``cache=True``, live in :mod:`evalkit._numba_kernels`), so importing this module is light.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import threading

import numpy as np

from evalkit.errors import InputError

__all__ = [
    "as_float_matrix",
    "check_n_neighbors",
    "pick_block_size",
    "distance_dtype",
    "to_centered_tensor",
    "squared_distance_block",
    "exact_sq_distances",
    "sort_neighbours",
    "Ranking",
    "Float32Ranking",
    "CosineRanking",
    "unit_rows",
    "lowdim_rank_counts",
    "lowdim_class_sums",
    "corank_max",
    "positions_in_top",
    "numba_kernels",
    "numba_threadsafe",
    "one_blas_thread",
]

# Bytes one (block x n_samples) float64 work array may take; a few of them live at once.
_BLOCK_BYTES = 256 * 2**20
_MAX_BLOCK = 8192
_U64 = 2.0**-53
_U32 = 2.0**-24
# Above this many neighbours, :meth:`Ranking.topk` selects (O(n) per row) instead of keeping
# an insertion buffer (O(k) per insertion, about k ln(n / k) insertions per row).
_INSERTION_MAX_K = 32


# --------------------------------------------------------------------------- validation


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


# --------------------------------------------------------------------------- distance blocks


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
    diagonal set to exactly 0 by index. For sums (the silhouette), not for order.
    """
    import torch

    D = torch.addmm(sq[None, :], T[start:stop], T.T, beta=1.0, alpha=-2.0)
    D += sq[start:stop, None]
    D.clamp_(min=0)
    rows = torch.arange(stop - start, device=D.device)
    D[rows, rows + start] = 0
    return D


def exact_sq_distances(X: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``dd(a[p], b[p])`` for every pair p: sum over columns, in order, of squared float64
    differences of the rows of ``X`` (float64, C-contiguous). Bitwise the same values as the
    numba kernels compute."""
    a = np.ascontiguousarray(a, dtype=np.int64)
    b = np.ascontiguousarray(b, dtype=np.int64)
    out = np.empty(a.shape[0], dtype=np.float64)
    nk = numba_kernels(*X.shape)
    if nk is not None:
        nk.pair_sq_distances(X, a, b, out)
        return out
    chunk = max(1, 2**22 // max(1, X.shape[1]))
    for start in range(0, a.shape[0], chunk):
        stop = min(start + chunk, a.shape[0])
        diff = X[a[start:stop]] - X[b[start:stop]]
        s = np.zeros(stop - start)
        for c in range(X.shape[1]):  # columns in order, as sq_dist
            s += diff[:, c] * diff[:, c]
        out[start:stop] = s
    return out


def sort_neighbours(X: np.ndarray, indices: np.ndarray):
    """Rows of ``indices`` ordered by (dd, index), with their euclidean distances (float32).

    The distances are recomputed exactly (the expanded form loses ~1e-8 to cancellation:
    duplicates came out at 6e-8 instead of 0).
    """
    n_samples, k = indices.shape
    indices = np.sort(indices, axis=1)
    dd = exact_sq_distances(X, np.repeat(np.arange(n_samples), k), indices.reshape(-1)).reshape(n_samples, k)
    order = np.argsort(dd, axis=1, kind="stable")
    indices = np.take_along_axis(indices, order, axis=1)
    return indices, np.sqrt(np.take_along_axis(dd, order, axis=1)).astype(np.float32)


class Ranking:
    """Blocks of ``r(i, l) = ||x_l||^2 - 2 x_i.x_l`` (centred data) with a certified bound.

    ``err[i]`` bounds ``|r(i, l) - (dd(i, l) - ||x_i||^2)|`` for every l: the rounding of the
    expanded form (worst case for any summation order, gamma_D = D u / (1 - D u) for a
    length-D dot product, plus the inputs and squared norms rounded to the working
    precision: 2 u M^2 + 2 (gamma_D + 3.01 u) |x_i| M, M = max_l |x_l|), of the centring
    (8 u64 M^2) and of ``dd`` itself (4 (D + 3) u64 M^2), doubled for safety. Integer data
    small enough for every product and sum to be exact is centred by an integer and gets
    ``err = 0``.

    On CPU with numba the blocks are numpy arrays (numpy's BLAS: as fast as torch's here,
    10,000 x 256 against 3,000 rows: 0.12 s vs 0.13 s in float32, 0.16 s vs 0.20 s in float64),
    so a CPU run never imports torch for them; elsewhere (a GPU, or no numba) torch tensors.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
    dev : torch.device or :class:`evalkit.device.CPU`
    dtype : torch or numpy dtype
        float64, or float32 (:class:`Float32Ranking`, or MPS).
    """

    def __init__(self, X: np.ndarray, dev, dtype):
        self.points = np.ascontiguousarray(X, dtype=np.float64)  # dd is computed on these
        d = X.shape[1]
        single = "32" in str(dtype)
        u = _U32 if single else _U64
        mean = self.points.mean(axis=0)
        integral = bool(np.all(self.points == np.round(self.points)))
        self.centre = np.round(mean) if integral else mean
        centred = self.points - self.centre
        self.sq64 = np.einsum("ij,ij->i", centred, centred)
        top_entry = float(np.abs(centred).max())
        if integral and 3.0 * d * top_entry * top_entry < 0.5 / u:
            # Integers whose products and sums all stay below 2^p (p = 53 or 24): every
            # operation of the expanded form is exact, in any order. err = 0: equal
            # distances are equal values, decided by index alone.
            self.err = np.zeros(len(self.points))
        else:
            norms = np.sqrt(self.sq64)
            top = float(norms.max())
            gamma = d * u / (1 - d * u)
            expanded = 2 * u * top * top + 2 * (gamma + 3.01 * u) * norms * top
            centring = 8 * _U64 * top * top
            direct = 4 * (d + 3) * _U64 * top * top
            self.err = 2.0 * (expanded + centring + direct) + 1e-300
        self.dev = dev
        self.use_numba = dev.type == "cpu" and numba_kernels(*self.points.shape) is not None
        if self.use_numba:  # numpy blocks: R = (-2 c_i) . c_l + |c_l|^2 (times -2 is exact)
            kind = np.float32 if single else np.float64
            self.T = centred.astype(kind)
            self._minus_2T = self.T * kind(-2.0)
            self.sq = self.sq64.astype(kind)
        else:
            import torch

            kind = torch.float32 if single else torch.float64
            self.T = torch.as_tensor(centred).to(device=dev, dtype=kind)
            self.sq = torch.as_tensor(self.sq64).to(device=dev, dtype=kind)
        self._err_t = None

    def no_grad(self):
        """``torch.no_grad()`` for torch blocks; nothing (no torch) for numpy blocks."""
        if self.use_numba:
            return contextlib.nullcontext()
        import torch

        return torch.no_grad()

    @property
    def n_samples(self) -> int:
        return self.points.shape[0]

    def block(self, start: int, stop: int):
        """(stop - start, n_samples) array or tensor of r for rows start:stop, self set to +inf
        by index."""
        return self.block_rows(np.arange(start, stop))

    def block_rows(self, rows: np.ndarray):
        """(len(rows), n_samples) array or tensor of r for the given rows, self set to +inf by
        index."""
        contiguous = len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (np.diff(rows) == 1).all()
        if self.use_numba:
            A = self._minus_2T[int(rows[0]):int(rows[-1]) + 1] if contiguous else self._minus_2T[rows]
            R = A @ self.T.T
            R += self.sq[None, :]
            R[np.arange(len(rows)), rows] = np.inf
            return R
        import torch

        rows_t = torch.as_tensor(rows, dtype=torch.int64, device=self.dev)
        if contiguous:
            A = self.T[int(rows[0]):int(rows[-1]) + 1]
        else:
            A = self.T[rows_t]
        R = torch.addmm(self.sq[None, :], A, self.T.T, beta=1.0, alpha=-2.0)
        R[torch.arange(len(rows), device=self.dev), rows_t] = float("inf")
        return R

    def _err(self):
        import torch

        if self._err_t is None:
            self._err_t = torch.as_tensor(self.err).to(self.dev)
        return self._err_t

    def topk(self, R, rows: np.ndarray, k: int, pos: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), k) int64: the k nearest neighbours of each row by (dd, index); row r
        reads ``R[pos[r]]`` (``pos`` None: ``R[r]``)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if self.use_numba:
            return _numba_topk(R, rows, k, self.points, self.err, pos)
        return _topk_torch(_take_rows(R, pos), rows, k, self.points, self._err())

    def rank_counts(self, R, rows: np.ndarray, nbr: np.ndarray, pos: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), m) int64: ``#{l != i : (dd(i, l), l) < (dd(i, j), j)}`` for i = rows[r],
        j = nbr[r, m]; the rank of j is one more. ``R`` must be float64; row r of the counts
        reads ``R[pos[r]]`` (``pos`` None: ``R[r]``)."""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        nbr = np.ascontiguousarray(nbr, dtype=np.int64)
        if self.use_numba:
            out = np.empty(nbr.shape, dtype=np.int64)
            pos = np.arange(len(rows)) if pos is None else np.ascontiguousarray(pos, dtype=np.int64)
            numba_kernels().count_ranks(R, pos, rows, nbr, self.points, self.err, out, _chunks(len(rows)))
            return out
        return _rank_counts_torch(_take_rows(R, pos), rows, nbr, self.points, self._err())


class Float32Ranking(Ranking):
    """:class:`Ranking` in float32 on CPU, for the neighbour search.

    Why: on CPU the float64 matmul is nearly the whole cost of the exact kNN search and
    takes about 2x the float32 one (measured at 70,000 x 256 on 2 busy cores: 156 s vs 73 s
    for a full pass). The float32 values only pick candidates (those within ``2 err`` of the
    k-th smallest); the numba kernel ranks the candidates by ``dd``, so the neighbours are
    exactly those of float64 or any other backend.

    (The rank counting of :mod:`evalkit.score` stays in float64: there every threshold has
    a band of uncertain entries to resolve, and a float32 band cost more than the matmul
    saved.)
    """

    #: above this many features the worst-case bound gets too loose to be worth it
    MAX_FEATURES = 100_000

    def __init__(self, X: np.ndarray):
        from evalkit.device import CPU

        super().__init__(X, CPU(), np.float32)

    @classmethod
    def usable(cls, X: np.ndarray, dev) -> bool:
        return dev.type == "cpu" and X.shape[1] <= cls.MAX_FEATURES and numba_kernels(*X.shape) is not None


class CosineRanking:
    """The cosine neighbours of the rows of ``X`` from the blocks of its euclidean
    :class:`Float32Ranking`: one matmul serves both searches.

    Cosine neighbours are the euclidean neighbours of the L2-normalised rows ``Xn``
    (:func:`unit_rows`), ordered by ``dd'(i, l) = sq_dist(Xn, i, l)`` and index, as
    :func:`evalkit.neighbors.knn_graph` of ``Xn`` orders them. With x = c + m (c the centred
    rows the euclidean block r(i, l) = |c_l|^2 - 2 c_i.c_l is computed from, m the centre),
    x_i.x_l = c_i.c_l + m.c_i + m.c_l + m.m, so

        rho(i, l) = (r(i, l) - w_l - kappa_i) / |x_l| = -2 x_i.x_l / |x_l| = |x_i| (dd'(i, l) - 2)

    with w_l = |c_l|^2 + 2 m.c_l and kappa_i = 2 m.c_i + 2 m.m: one float32 pass over the block
    (in place, after the euclidean neighbours are read from it). Within a row the factor
    |x_i| > 0 keeps the order of dd', so rho picks candidates as r does for the euclidean
    search, with its own per-row bound ``err`` (:meth:`_bound`), and ``dd'`` decides.

    :meth:`make` returns None where this does not pay or is not defined: a row of norm 0, or a
    bound so loose (rows of very different norms, a centre far larger than the spread) that
    the exact distances would decide most of a row; the caller then searches ``Xn`` itself.
    """

    #: the largest bound, as a share of the range of dd' (0 to 4), for which this is used
    MAX_RELATIVE_BAND = 1e-3

    def __init__(self, ranking: "Float32Ranking", Xn: np.ndarray, norms: np.ndarray):
        self.points = Xn
        centre = ranking.centre
        mm = float(centre @ centre)
        a = ranking.points @ centre - mm  # m.c_l = m.x_l - m.m (no centred copy; rounding in the slack)
        self.w = (ranking.sq64 + 2.0 * a).astype(np.float32)
        self.kappa = (2.0 * a + 2.0 * mm).astype(np.float32)
        self.inv = (1.0 / norms).astype(np.float32)
        self.err = self._bound(ranking, a, mm, norms)

    @classmethod
    def make(cls, ranking: "Float32Ranking") -> "CosineRanking | None":
        if numba_kernels() is None:
            return None
        Xn, norms = unit_rows(ranking.points)
        if not (norms > 0).all() or not np.isfinite(norms).all():
            return None
        cos = cls(ranking, Xn, norms)
        if not (np.isfinite(cos.err).all() and (cos.err / norms).max() <= 4 * cls.MAX_RELATIVE_BAND):
            return None
        return cos

    @staticmethod
    def _bound(ranking, a: np.ndarray, mm: float, norms: np.ndarray) -> np.ndarray:
        """Per row i, a bound on |rho computed - |x_i| (dd'(i, l) - 2)| over every l, doubled.

        The block r is within ``2 ranking.err[i]`` of its exact value (the ranking's bound
        also covers the float64 distance and the centring). The float32 pass adds at most
        8 u (|r| + |w_l| + |kappa_i|) / |x_l| (two subtractions, a product, the rounding of
        w, kappa and 1 / |x_l|), bounded with the largest |c_l|^2 / |x_l|, |m.c_l| / |x_l|,
        |c_l| / |x_l| and 1 / |x_l| over l. Every float64 rounding (w, kappa, the norms,
        Xn and dd' itself) is covered by a slack of 256 (D + 10) u64 in units of the largest
        squared norm, far above them and far below the float32 terms.
        """
        d = ranking.points.shape[1]
        c = np.sqrt(ranking.sq64)  # |c_l|
        inv = 1.0 / norms
        m0 = inv.max()
        m_sq = (ranking.sq64 * inv).max()
        m_a = (np.abs(a) * inv).max()
        m_c = (c * inv).max()
        e = ranking.err
        top_x = float(norms.max())
        cen = float(np.sqrt(mm))
        float32 = 2.0 * e * m0 + 8.0 * _U32 * (2.0 * m_sq + 2.0 * m_a + 2.0 * c * m_c
                                               + (2.0 * e + 2.0 * np.abs(a) + 2.0 * mm) * m0)
        scale = (top_x + cen + float(c.max())) ** 2
        slack = 256.0 * (d + 10) * _U64 * (scale * m0 + norms)
        return 2.0 * (float32 + slack) + 1e-300

    def topk(self, R, rows: np.ndarray, k: int) -> np.ndarray:
        """(len(rows), k) int64: the k nearest cosine neighbours of each row, from the
        euclidean block ``R`` (float32 ndarray), which is overwritten with rho. (Computing
        rho on the fly inside the selection instead measured no faster at 30,000 x 256.)"""
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        return _numba_topk(self.rho(R, rows), rows, k, self.points, self.err)

    def rho(self, block: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The euclidean block (float32 ndarray) turned into rho, in place."""
        numba_kernels().cosine_rows(block, np.ascontiguousarray(rows, dtype=np.int64), self.w, self.kappa, self.inv)
        return block


def unit_rows(X: np.ndarray):
    """``(Xn, norms)``: the rows of ``X`` divided by their euclidean norms (float64; rows of
    norm 0 stay 0), and those norms. Each row is first divided by its largest entry, so rows
    at tiny scales (1e-20) do not underflow the norm."""
    Xn = np.array(X, dtype=np.float64)
    peak = np.abs(Xn).max(axis=1, keepdims=True) if Xn.shape[1] else np.zeros((len(Xn), 1))
    Xn /= np.where(peak > 0, peak, 1.0)
    scaled = np.linalg.norm(Xn, axis=1, keepdims=True)
    Xn /= np.maximum(scaled, 1e-300)
    return Xn, (scaled * peak).reshape(-1)


def _numba_topk(R: np.ndarray, rows: np.ndarray, k: int, points: np.ndarray, err: np.ndarray,
                pos: np.ndarray | None = None) -> np.ndarray:
    out = np.empty((len(rows), k), dtype=np.int64)
    if k <= _INSERTION_MAX_K:
        numba_kernels().row_topk_exact(R if pos is None else R[pos], rows, points, err, out)
    else:
        pos = np.arange(len(rows)) if pos is None else np.ascontiguousarray(pos, dtype=np.int64)
        numba_kernels().row_topk_sorted(R, pos, rows, points, err, out, _chunks(len(rows)))
    return out


def _columns(P: np.ndarray) -> np.ndarray:
    """P.T as a C-contiguous float64 (n_dims, n_samples) array: what the low-dimensional
    kernels read, one coordinate at a time, so their loops vectorise."""
    return np.ascontiguousarray(np.asarray(P, dtype=np.float64).T)


def lowdim_rank_counts(P: np.ndarray, nbr: np.ndarray) -> np.ndarray | None:
    """:meth:`Ranking.rank_counts` for all rows of a space of few dimensions (2-D embeddings),
    distances computed on the fly on CPU, no (block x n_samples) arrays; None without numba."""
    nk = numba_kernels(*P.shape)
    if nk is None:
        return None
    PT = _columns(P)
    out = np.empty(nbr.shape, dtype=np.int64)
    nk.lowdim_count_ranks(PT, np.ascontiguousarray(nbr, dtype=np.int64), out, _chunks(PT.shape[1]))
    return out


def lowdim_class_sums(P: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray | None:
    """(n_samples, n_classes) float64: each sample's summed euclidean distance to each class's
    members, for a space of few dimensions on CPU (the silhouette of an embedding), distances
    computed on the fly (0.13 s for 10,000 points in 2-D, against 0.5 s through distance
    blocks); None without numba."""
    nk = numba_kernels(*P.shape)
    if nk is None:
        return None
    PT = _columns(P)
    out = np.empty((PT.shape[1], n_classes), dtype=np.float64)
    nk.lowdim_class_sums(PT, np.ascontiguousarray(y, dtype=np.int64), out, _chunks(PT.shape[1]))
    return out


def corank_max(P: np.ndarray, rows: np.ndarray, nbr: np.ndarray, dev, *, closer_k: int = 0):
    """Co-ranking counts of a space of few dimensions against neighbours from another space.

    ``nbr[r]`` are the K nearest neighbours of sample ``rows[r]`` in the other space, nearest
    first (so ``nbr[r, p]`` has rank p + 1 there). Returns (len(rows), K) int64:
    ``max(p + 1, rank of nbr[r, p] in P)``, or K + 1 when that rank exceeds K. Then
    ``#{p : out[r, p] <= K'}`` = |U_K'(i) ∩ V_K'(i)| for every K' <= K. Ranks by
    (dd, index), with ``dd`` computed exactly (columns in order), so ties follow the module's
    rule. Memory O(len(rows) x n_samples).

    With ``closer_k``, returns ``(out, closer)``: closer[r, m] = #{l != i : (dd(i, l), l) <
    (dd(i, j), j)} for j = nbr[r, m], m < closer_k (:meth:`Ranking.rank_counts` in P, read
    from the same ranks), or ``(out, None)`` where only the torch path runs.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    nbr = np.ascontiguousarray(nbr, dtype=np.int64)
    P = np.asarray(P, dtype=np.float64)
    nk = numba_kernels(*P.shape)
    if dev.type == "cpu" and nk is not None:
        out = np.empty(nbr.shape, dtype=np.int64)
        closer = np.empty((len(rows), min(closer_k, nbr.shape[1])), dtype=np.int64)
        nk.lowdim_coranks(_columns(P), rows, nbr, out, closer, _chunks(len(rows)))
        return (out, closer) if closer_k else out
    out = _corank_max_torch(P, rows, nbr, dev)
    return (out, None) if closer_k else out


def positions_in_top(top: np.ndarray, nbr: np.ndarray) -> np.ndarray | None:
    """(rows, m) int64: the position of nbr[r, m] in top[r] (the count of samples closer than
    it, when top[r] lists the nearest neighbours in (dd, index) order), -1 where it is not
    there; None without numba."""
    nk = numba_kernels()
    if nk is None:
        return None
    out = np.empty(nbr.shape, dtype=np.int64)
    nk.positions_in_top(np.ascontiguousarray(top, dtype=np.int64), np.ascontiguousarray(nbr, dtype=np.int64), out)
    return out


# --------------------------------------------------------------------------- torch paths


def _take_rows(R, pos):
    """``R[pos]`` of a torch block (``R`` itself for ``pos`` None)."""
    if pos is None:
        return R
    import torch

    return R[torch.as_tensor(pos, device=R.device)]
# What a GPU runs (and a CPU without numba): same decisions as the numba kernels.


def _first_k_by_exact(X, rows, r_idx, l_idx, n_rows: int, k: int) -> np.ndarray:
    """From candidate pairs (r, l) (at least k per row), the k best of each row by (dd, l)."""
    dd = exact_sq_distances(X, rows[r_idx], l_idx)
    order = np.lexsort((l_idx, dd, r_idx))
    l_sorted = l_idx[order]
    counts = np.bincount(r_idx, minlength=n_rows)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return l_sorted[starts[:, None] + np.arange(k)]


def _topk_torch(R, rows: np.ndarray, k: int, X: np.ndarray, err_t) -> np.ndarray:
    import torch

    rows_t = torch.as_tensor(rows, device=R.device)
    kth = torch.topk(R, k, dim=1, largest=False, sorted=True).values[:, -1]
    bound = kth.to(torch.float64) + 2 * err_t[rows_t]
    r_idx, l_idx = (R.to(torch.float64) <= bound[:, None]).nonzero(as_tuple=True)
    return _first_k_by_exact(X, rows, r_idx.cpu().numpy(), l_idx.cpu().numpy(), len(rows), k)


def _rank_counts_torch(R, rows: np.ndarray, nbr: np.ndarray, X: np.ndarray, err_t) -> np.ndarray:
    import torch

    nbr_t = torch.as_tensor(nbr, device=R.device)
    t = R.gather(1, nbr_t)
    e2 = (2 * err_t[torch.as_tensor(rows, device=R.device)])[:, None]
    lo, hi = t - e2, t + e2
    below = _count_below_torch(R, lo)
    upto = _count_below_torch(R, torch.nextafter(hi, torch.full_like(hi, float("inf"))))  # R <= hi
    ambiguous = (upto - below > 1).cpu().numpy()  # more than j itself in the band
    below = below.cpu().numpy()
    for m in np.flatnonzero(ambiguous.any(axis=0)):
        sel = np.flatnonzero(ambiguous[:, m])
        sel_t = torch.as_tensor(sel, device=R.device)
        sub = R[sel_t]
        band = (sub >= lo[sel_t, m][:, None]) & (sub <= hi[sel_t, m][:, None])
        band[torch.arange(len(sel), device=R.device), nbr_t[sel_t, m]] = False
        r_idx, l_idx = (x.cpu().numpy() for x in band.nonzero(as_tuple=True))
        i = rows[sel[r_idx]]
        j = nbr[sel[r_idx], m]
        dl = exact_sq_distances(X, i, l_idx)
        dj = exact_sq_distances(X, i, j)
        closer = (dl < dj) | ((dl == dj) & (l_idx < j))
        below[sel, m] += np.bincount(r_idx[closer], minlength=len(sel))
    return below


def _corank_max_torch(P: np.ndarray, rows: np.ndarray, nbr: np.ndarray, dev) -> np.ndarray:
    import torch

    T = torch.as_tensor(P, dtype=torch.float64, device=dev)
    rows_t = torch.as_tensor(rows, device=dev)
    D = torch.zeros((len(rows), T.shape[0]), dtype=torch.float64, device=dev)
    for c in range(T.shape[1]):  # the same additions in the same order as sq_dist
        diff = T[rows_t, c][:, None] - T[None, :, c]
        D += diff * diff
    D[torch.arange(len(rows), device=dev), rows_t] = float("inf")
    K = nbr.shape[1]
    top = torch.sort(D, dim=1, stable=True).indices[:, :K]  # (dd, index) order
    del D
    rank = torch.full((len(rows), T.shape[0]), K + 1, dtype=torch.int64, device=dev)
    rank.scatter_(1, top, torch.arange(1, K + 1, device=dev).expand(len(rows), K).contiguous())
    rz = rank.gather(1, torch.as_tensor(nbr, device=dev))
    rx = torch.arange(1, K + 1, device=dev)[None, :]
    return torch.maximum(rz, rx).cpu().numpy()


def _count_below_torch(D, thresholds):
    """(rows, k) int64: #{l : D[r, l] < thresholds[r, m]}: one searchsorted of each row
    against its k sorted thresholds, a per-row bincount, then a cumulative sum."""
    import torch

    rows, k = thresholds.shape
    sorted_t, order = torch.sort(thresholds, dim=1)
    # pos[r, l] = #{m : sorted_t[r, m] <= D[r, l]}; D[r, l] < sorted_t[r, m] iff pos <= m.
    pos = torch.searchsorted(sorted_t.contiguous(), D, right=True)
    pos += torch.arange(rows, device=D.device)[:, None] * (k + 1)
    hist = torch.bincount(pos.view(-1), minlength=rows * (k + 1)).view(rows, k + 1)
    below_sorted = hist[:, :k].cumsum(dim=1)
    below = torch.empty_like(below_sorted)
    below.scatter_(1, order, below_sorted)
    return below


# --------------------------------------------------------------------------- BLAS threads


_BLAS = {"users": 0, "limits": None}
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def one_blas_thread():
    """Within: BLAS (numpy's and scipy's OpenBLAS) on one thread, for jobs that run side by side
    and so already fill the cores. Its idle threads spin: beside t-SNE and UMAP they took 2.5 s
    of CPU time from the demo report's 40. Threads may nest it: the first in sets the limit,
    the last out restores the previous one. Enter it from the thread that starts the jobs:
    OpenBLAS (0.3.31) ignored a limit set from a thread once other threads had called it."""
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS["users"] == 0:
            _BLAS["limits"] = threadpool_limits(limits=1, user_api="blas")
        _BLAS["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS["users"] -= 1
            if _BLAS["users"] == 0:
                _BLAS["limits"].restore_original_limits()
                _BLAS["limits"] = None


# --------------------------------------------------------------------------- numba


def _chunks(n_rows: int) -> int:
    """How many chunks a kernel shares its rows out in: a few per numba thread (so uneven rows
    balance), each allocating its (n_samples,) buffers once instead of once per row (a fresh
    array of 70,000 entries per row cost page faults: 20% of the co-ranking kernel)."""
    import numba

    return max(1, min(n_rows, 4 * numba.get_num_threads()))

_NUMBA_KERNELS = None
_NUMBA_TRIED = False
#: Below this many entries (samples x features), while numba is not loaded yet and torch is,
#: the torch paths run on CPU too. Importing numba and loading evalkit's cached kernels takes
#: 0.5-0.8 s, more than the torch paths take on such data (300 x 16: 0.07 s; but 899 x 128:
#: 1.5 s against 0.2 s with numba, so larger data load it). With neither loaded, numba is the
#: cheaper of the two (importing torch takes 1.3 s), so it is used whatever the size.
NUMBA_MIN_ENTRIES = 15_000


def numba_kernels(n_samples: int | None = None, n_features: int = 1):
    """The module :mod:`evalkit._numba_kernels` (imported, and so compiled or loaded from
    numba's cache, on first use), or None when numba cannot be used or, given the data's
    shape, when it is not loaded yet and the data are too small to be worth loading it
    (:data:`NUMBA_MIN_ENTRIES`); callers then fall back to torch."""
    global _NUMBA_KERNELS, _NUMBA_TRIED
    if (not _NUMBA_TRIED and n_samples is not None and "torch" in sys.modules
            and n_samples * max(1, n_features) < NUMBA_MIN_ENTRIES):
        return None
    if not _NUMBA_TRIED:
        _NUMBA_TRIED = True
        try:
            from evalkit import _numba_kernels

            _NUMBA_KERNELS = _numba_kernels
        except Exception:  # numba missing or broken
            _NUMBA_KERNELS = None
    return _NUMBA_KERNELS


def numba_usable() -> bool:
    """Whether :func:`numba_kernels` gives (or would give) the kernels, without importing
    numba to find out: what it found once it was called, else whether numba is installed."""
    import importlib.util

    if _NUMBA_TRIED:
        return _NUMBA_KERNELS is not None
    return importlib.util.find_spec("numba") is not None


def numba_threadsafe() -> bool:
    """Whether numba's parallel kernels (evalkit's and umap-learn's) may run in two threads at
    once: true for its OpenMP and TBB threading layers; its fallback layer, workqueue, aborts
    the process on concurrent use. Callers that would run such work side by side run it one
    job after another when this is false. True while numba is not imported (call it after
    importing what the jobs use: then nothing of numba's can run twice at once)."""
    numba = sys.modules.get("numba")
    if numba is None:
        return True
    layer = str(numba.config.THREADING_LAYER).lower()
    if layer == "workqueue":
        return False
    if layer in ("omp", "tbb"):
        return True
    for pool in ("omppool", "tbbpool"):  # "default", "safe", "threadsafe": the first that loads
        try:
            importlib.import_module(f"numba.np.ufunc.{pool}")
            return True
        except Exception:  # not built, or its runtime library is missing
            continue
    return False
