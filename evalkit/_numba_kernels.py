"""numba kernels behind :mod:`evalkit.kernels` (CPU).

Module-level functions with ``cache=True``, so each is compiled once per machine, not once
per process. Only :func:`evalkit.kernels.numba_kernels` imports this module, on first use:
``import evalkit`` never loads numba.

Every kernel decides order by the exact squared distance of :func:`sq_dist` (columns summed
in order, no fused multiply-add: numba does not contract without ``fastmath``), and equal
distances by the lower index; see :mod:`evalkit.kernels`.
"""
from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True)
def sq_dist(X, i, l):
    """sum_c (X[i, c] - X[l, c])^2, columns in order: the one definition of distance."""
    s = 0.0
    for c in range(X.shape[1]):
        diff = X[i, c] - X[l, c]
        s += diff * diff
    return s


@numba.njit(parallel=True, cache=True)
def pair_sq_distances(X, a, b, out):
    """out[p] = sq_dist(X, a[p], b[p])."""
    for p in numba.prange(a.shape[0]):
        out[p] = sq_dist(X, a[p], b[p])


@numba.njit(parallel=True, cache=True)
def row_topk_exact(R, rows, X, err, idx):
    """idx[r] = the k = idx.shape[1] nearest neighbours of sample rows[r], ordered by
    (sq_dist, index).

    R[r, l] approximates sq_dist(X, rows[r], l) minus a per-row constant within err[rows[r]]
    (float32 or float64; self is +inf). The k-th smallest value v of a row admits as
    candidates the entries with R <= v + 2 err (every true neighbour is among them); those
    are ranked by their exact distance, ties to the lower index (candidates are visited in
    index order and an equal value never moves ahead).
    """
    n_rows, n = R.shape
    k = idx.shape[1]
    for r in numba.prange(n_rows):
        i = rows[r]
        row = R[r]
        vb = np.full(k, np.inf, dtype=R.dtype)
        worst = vb[k - 1]
        for l in range(n):
            v = row[l]
            if v < worst:
                p = k - 1
                while p > 0 and vb[p - 1] > v:
                    vb[p] = vb[p - 1]
                    p -= 1
                vb[p] = v
                worst = vb[k - 1]
        # v + 2 err rounded to R's precision (to nearest: every value of that precision
        # up to the exact bound is still <= limit), so the candidate pass compares natively
        lim = np.empty(1, dtype=R.dtype)
        lim[0] = np.float64(worst) + 2.0 * err[i]
        limit = lim[0]
        best_v = np.full(k, np.inf)
        best_i = np.full(k, -1, dtype=np.int64)
        for l in range(n):
            if row[l] <= limit:
                v = sq_dist(X, i, l)
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


@numba.njit(parallel=True, cache=True)
def cosine_rows(R, rows, w, kappa, inv):
    """In place, R[r, l] = (R[r, l] - w[l] - kappa[rows[r]]) * inv[l], in R's precision
    (float32; +inf stays +inf): the euclidean block turned into the cosine ranking of
    :class:`evalkit.kernels.CosineRanking`."""
    n_rows, n = R.shape
    for r in numba.prange(n_rows):
        row = R[r]
        kr = kappa[rows[r]]
        for l in range(n):
            row[l] = (row[l] - w[l] - kr) * inv[l]


@numba.njit(parallel=True, cache=True)
def class_dist_sums(R, pos, rows, sq, ycol, out):
    """out[r, c] = sum over l != i with ycol[l] == c of sqrt(max(R[pos[r], l] + sq[i], 0)),
    i = rows[r]: per-class sums of the euclidean distances of a float64 block
    (R = |c_l|^2 - 2 c_i.c_l, as :func:`evalkit.kernels.squared_distance_block` before its
    row term); columns with ycol < 0 are left out. ``out`` is overwritten."""
    n = R.shape[1]
    for r in numba.prange(pos.shape[0]):
        row = R[pos[r]]
        i = rows[r]
        s = sq[i]
        o = out[r]
        o[:] = 0.0
        for l in range(n):
            c = ycol[l]
            if c >= 0 and l != i:
                v = row[l] + s
                if v > 0.0:
                    o[c] += np.sqrt(v)


@numba.njit(parallel=True, cache=True)
def count_ranks(R, pos, rows, nbr, X, err, out, n_chunks):
    """out[r, m] = #{l != i : (sq_dist(i, l), l) < (sq_dist(i, j), j)}, i = rows[r],
    j = nbr[r, m].

    R (float64) as for :func:`row_topk_exact`, row r of the counts reading R[pos[r]] (a subset
    of a block's rows without copying them). Entries below t - 2 err (t = R[r, j]) are
    certainly closer, entries above t + 2 err certainly farther; the few in between are
    decided by their exact distance (or, where err = 0 and the values are exact, by index
    alone). Per row, one pass keeps the entries up to the largest
    threshold (branch-free compaction), then one counting pass per threshold over those.
    Rows are shared out in ``n_chunks`` chunks (a few per thread), each with its own buffers.
    """
    n_rows, n = rows.shape[0], R.shape[1]
    k = nbr.shape[1]
    for ch in numba.prange(n_chunks):
        # buffers once per chunk of rows: a fresh (n,) array per row costs page faults
        vals = np.empty(n)
        ids = np.empty(n, dtype=np.int64)
        t = np.empty(k)
        for r in range((ch * n_rows) // n_chunks, ((ch + 1) * n_rows) // n_chunks):
            _count_row(R[pos[r]], rows[r], nbr[r], X, 2.0 * err[rows[r]], t, vals, ids, out[r])


@numba.njit(cache=True)
def _count_row(row, i, nbr_r, X, e2, t, vals, ids, out_r):
    """:func:`count_ranks` of one row, with caller-provided buffers."""
    k = nbr_r.shape[0]
    for m in range(k):
        t[m] = row[nbr_r[m]]
    kept = _compact(row, t.max() + e2, vals, ids)
    for m in range(k):
        lo = t[m] - e2
        hi = t[m] + e2
        below = 0
        upto = 0
        for q in range(kept):
            v = vals[q]
            below += 1 if v < lo else 0
            upto += 1 if v <= hi else 0
        if upto - below > 1 and e2 == 0.0:  # exact values: ties go by index alone
            j = nbr_r[m]
            for q in range(kept):
                if vals[q] == t[m] and ids[q] < j:
                    below += 1
        elif upto - below > 1:  # more than j itself in the band
            j = nbr_r[m]
            dj = sq_dist(X, i, j)
            for q in range(kept):
                v = vals[q]
                if v >= lo and v <= hi:
                    l = ids[q]
                    if l != j:
                        dl = sq_dist(X, i, l)
                        if dl < dj or (dl == dj and l < j):
                            below += 1
        out_r[m] = below


@numba.njit(parallel=True, cache=True)
def lowdim_count_ranks(PT, nbr, out, n_chunks):
    """:func:`count_ranks` for few dimensions, with exact distances computed on the fly from
    PT = X.T (n_dims, n_samples), column by column so the loops vectorise (same additions
    in the same order as :func:`sq_dist`, so the values are identical). Rows go in
    ``n_chunks`` chunks, each with its own buffers (see :func:`count_ranks`)."""
    n = PT.shape[1]
    k = nbr.shape[1]
    for ch in numba.prange(n_chunks):
        t = np.empty(k)
        buf = np.empty(n)
        vals = np.empty(n)
        ids = np.empty(n, dtype=np.int64)
        for i in range((ch * n) // n_chunks, ((ch + 1) * n) // n_chunks):
            _lowdim_row(PT, i, buf)
            for m in range(k):
                t[m] = buf[nbr[i, m]]
            kept = _compact(buf, t.max(), vals, ids)
            for m in range(k):
                out[i, m] = _count_before(vals, ids, kept, t[m], nbr[i, m])


@numba.njit(cache=True)
def _lowdim_row(PT, i, buf):
    """buf[l] = sq_dist of samples i and l from PT = X.T (columns in order, as :func:`sq_dist`,
    so the values are identical), buf[i] = inf (self excluded by index)."""
    d, n = PT.shape
    pc = PT[0]
    x = pc[i]
    for l in range(n):
        diff = x - pc[l]
        buf[l] = diff * diff
    for c in range(1, d):
        pc = PT[c]
        x = pc[i]
        for l in range(n):
            diff = x - pc[l]
            buf[l] += diff * diff
    buf[i] = np.inf


@numba.njit(cache=True)
def _compact(row, top, vals, ids):
    """The entries of ``row`` up to ``top`` and their indices, in order, into vals and ids
    (branch-free); returns how many."""
    kept = 0
    for l in range(row.shape[0]):
        v = row[l]
        vals[kept] = v
        ids[kept] = l
        kept += 1 if v <= top else 0
    return kept


@numba.njit(cache=True)
def _count_before(vals, ids, kept, t, j):
    """#{q < kept : (vals[q], ids[q]) < (t, j)}: how many samples come before j, at distance t."""
    acc = 0
    for q in range(kept):
        v = vals[q]
        acc += 1 if (v < t or (v == t and ids[q] < j)) else 0
    return acc


@numba.njit(cache=True)
def _bound_sample(n, k):
    """(s, q): :func:`_select_bound` takes the q-th smallest of s evenly strided entries."""
    s = min(n, 1024)
    return s, int(s * (1.25 * k / n)) + 8


@numba.njit(cache=True)
def _select_bound(row, k):
    """A value t with probably a little more than k entries of ``row`` <= t (at least k, or
    +inf): the matching quantile of an evenly strided sample of 1024 entries, with a margin.
    Only speed depends on it (a full selection over n entries costs ~10x a pass); callers
    stay exact whatever it returns."""
    n = row.shape[0]
    s, q = _bound_sample(n, k)
    if q >= s:
        return np.inf
    sample = np.empty(s)
    for j in range(s):
        sample[j] = row[(j * n) // s]
    return np.partition(sample, q)[q]


@numba.njit(cache=True)
def _collect(row, bound, cand):
    """Indices l (in order) with row[l] <= bound into cand; returns their count."""
    c = 0
    for l in range(row.shape[0]):
        if row[l] <= bound:
            cand[c] = l
            c += 1
    return c


@numba.njit(cache=True)
def _insertion_sort(sv, order, a, z):
    """Sort sv[a:z] in place, ties kept in order, carrying order[a:z] along."""
    for t in range(a + 1, z):
        v = sv[t]
        if sv[t - 1] <= v:
            continue
        cur = order[t]
        u = t
        while u > a and sv[u - 1] > v:
            order[u] = order[u - 1]
            sv[u] = sv[u - 1]
            u -= 1
        order[u] = cur
        sv[u] = v


@numba.njit(cache=True)
def _stable_order(cv):
    """argsort(cv, kind="mergesort") (ties keep their order), by buckets: O(c) for the smooth
    value spreads of candidate distances, where numba's sorts cost ~0.1 ms per 1,000 values.
    Where a skewed spread crowds a bucket, each bucket is sorted on its own (mergesort for the
    crowded ones)."""
    c = cv.shape[0]
    lo = np.inf
    hi = -np.inf
    for q in range(c):
        v = cv[q]
        lo = v if v < lo else lo
        hi = v if v > hi else hi
    if c < 64 or not (np.isfinite(lo) and np.isfinite(hi)) or hi == lo:
        return np.argsort(cv, kind="mergesort")
    nb = c
    scale = (nb - 1) / (hi - lo)
    key = np.empty(c, dtype=np.int32)  # (c < 2^31: candidates of one row)
    start = np.zeros(nb + 1, dtype=np.int32)
    for q in range(c):
        b = int((cv[q] - lo) * scale)
        b = 0 if b < 0 else (nb - 1 if b > nb - 1 else b)
        key[q] = b
        start[b + 1] += 1
    crowded = 0
    for b in range(nb):
        crowded = max(crowded, start[b + 1])
        start[b + 1] += start[b]
    fill = start[:nb].copy()
    order = np.empty(c, dtype=np.int64)
    sv = np.empty(c)  # the values in the same order: the sorts below read them in place
    for q in range(c):  # in order: stable within each bucket
        f = fill[key[q]]
        order[f] = q
        sv[f] = cv[q]
        fill[key[q]] = f + 1
    if crowded <= 128:
        # one insertion pass over the whole array: an entry never moves past the start of
        # its bucket (the buckets are in value order), and a bucket holds ~1 value
        _insertion_sort(sv, order, 0, c)
        return order
    for b in range(nb):
        a, z = start[b], start[b + 1]
        if z - a > 48:
            order[a:z] = order[a:z][np.argsort(sv[a:z], kind="mergesort")]
        else:
            _insertion_sort(sv, order, a, z)
    return order


@numba.njit(parallel=True, cache=True)
def row_topk_sorted(R, pos, rows, X, err, idx, n_chunks):
    """:func:`row_topk_exact` for large k (R_NX up to K = 1000 and beyond): selection instead
    of an insertion buffer, so the cost is one or two passes over the row plus O(c log c),
    c ~ k candidates. Row r of the result reads R[pos[r]] (sampled rows of a block, not copied).

    The k-th smallest value v admits the candidates R <= v + 2 err, which are sorted by R
    (index order among equal values); two neighbours in that order whose R differ by more
    than 2 err are certainly in the right order, so only runs of candidates chained by gaps
    <= 2 err are re-sorted by (sq_dist, index).
    """
    n_rows, n = rows.shape[0], R.shape[1]
    k = idx.shape[1]
    for ch in numba.prange(n_chunks):
        cand = np.empty(n, dtype=np.int64)  # once per chunk of rows (see count_ranks)
        for r in range((ch * n_rows) // n_chunks, ((ch + 1) * n_rows) // n_chunks):
            _topk_row(R[pos[r]], rows[r], X, err[rows[r]], cand, idx[r])


@numba.njit(cache=True)
def _topk_row(row, i, X, err_i, cand, idx_r):
    """:func:`row_topk_sorted` of one row, with a caller-provided buffer."""
    k = idx_r.shape[0]
    bound = _select_bound(row, k)
    c = _collect(row, bound, cand)
    if c < k:
        bound = np.inf
        c = _collect(row, bound, cand)
    cv = np.empty(c)
    for q in range(c):
        cv[q] = np.float64(row[cand[q]])
    kth = np.partition(cv.copy(), k - 1)[k - 1]
    lim = np.empty(1, dtype=row.dtype)
    lim[0] = kth + 2.0 * err_i
    limit = lim[0]
    if np.float64(limit) > bound:  # the band reaches past the first pass: collect again
        c = _collect(row, limit, cand)
    else:
        kept = 0
        for q in range(c):
            if row[cand[q]] <= limit:
                cand[kept] = cand[q]
                kept += 1
        c = kept
    cv = np.empty(c)
    for q in range(c):
        cv[q] = np.float64(row[cand[q]])
    order = _stable_order(cv)
    sc = cand[:c][order]
    sv = cv[order]
    e2 = 2.0 * err_i
    s = 0
    while s < k:
        t = s
        while t + 1 < c and sv[t + 1] - sv[t] <= e2:
            t += 1
        if t > s:  # a run whose order R cannot certify: exact distances decide
            members = np.sort(sc[s:t + 1])
            dd = np.empty(t + 1 - s)
            for q in range(t + 1 - s):
                dd[q] = sq_dist(X, i, members[q])
            sc[s:t + 1] = members[np.argsort(dd, kind="mergesort")]
        s = t + 1
    for m in range(k):
        idx_r[m] = sc[m]


@numba.njit(parallel=True, cache=True)
def lowdim_coranks(PT, rows, nbr, out, closer, n_chunks):
    """For i = rows[r] and its neighbours nbr[r, p] of rank p + 1 in the other space
    (K = nbr.shape[1] of them, in order): out[r, p] = max(p + 1, rank of nbr[r, p] in this
    space), or K + 1 when that rank exceeds K. Ranks by (sq_dist, index), distances exact
    and on the fly from PT = P.T (n_dims, n_samples), as :func:`lowdim_count_ranks`.

    So #{p : out[r, p] <= K'} = |U_K'(i) ∩ V_K'(i)| for every K' <= K: the co-ranking
    counts behind Q_NX and R_NX.

    Also, for the first kc = closer.shape[1] neighbours (kc = 0: none), what
    :func:`lowdim_count_ranks` gives: closer[r, m] = #{l != i : (sq_dist(i, l), l) <
    (sq_dist(i, j), j)}, j = nbr[r, m], read from the ranks above (one more pass over the
    row only for a j beyond the K nearest). With nbr the K nearest in the original space,
    these are the counts behind continuity, at no extra pass over the data. Rows go in
    ``n_chunks`` chunks, each with its own buffers (see :func:`count_ranks`).
    """
    d, n = PT.shape
    n_rows = rows.shape[0]
    for ch in numba.prange(n_chunks):
        buf = np.empty(n)
        cand = np.empty(n, dtype=np.int64)
        pos = np.zeros(n, dtype=np.int64)  # zero between rows: each row resets what it set
        vals = np.empty(n)
        ids = np.empty(n, dtype=np.int64)
        for r in range((ch * n_rows) // n_chunks, ((ch + 1) * n_rows) // n_chunks):
            _coranks_row(PT, rows[r], nbr[r], out[r], closer[r], buf, cand, pos, vals, ids)


@numba.njit(cache=True)
def _coranks_row(PT, i, nbr_r, out_r, closer_r, buf, cand, pos, vals, ids):
    """:func:`lowdim_coranks` of one row, with caller-provided buffers (``pos`` all zero)."""
    K = nbr_r.shape[0]
    kc = closer_r.shape[0]
    if PT.shape[0] == 2:
        c = _plane_candidates(PT, i, K, buf, cand)
    else:
        _lowdim_row(PT, i, buf)
        c = _collect(buf, _select_bound(buf, K), cand)
    if c < K:
        c = _collect(buf, np.inf, cand)
    cv = np.empty(c)
    for q in range(c):
        cv[q] = buf[cand[q]]
    # (distance, index) order: the candidates are in index order and mergesort is stable.
    # Every sample closer than the K-th is a candidate, so the first K are the K nearest.
    order = _stable_order(cv)
    for q in range(K):
        pos[cand[order[q]]] = q + 1
    for p in range(K):
        rz = pos[nbr_r[p]]
        if rz == 0:
            rz = K + 1
        out_r[p] = rz if rz > p + 1 else p + 1
    top = -1.0  # the farthest of the neighbours beyond the K nearest (none: -1)
    for m in range(kc):
        j = nbr_r[m]
        if pos[j] > 0:  # among the K nearest: pos - 1 samples come before it
            closer_r[m] = pos[j] - 1
        elif buf[j] > top:
            top = buf[j]
    if top >= 0.0:
        # the others are counted as lowdim_count_ranks does: one pass keeps the entries up to
        # the largest of their distances, then one count per neighbour over those
        kept = _compact(buf, top, vals, ids)
        for m in range(kc):
            j = nbr_r[m]
            if pos[j] == 0:
                closer_r[m] = _count_before(vals, ids, kept, buf[j], j)
    for q in range(K):
        pos[cand[order[q]]] = 0


@numba.njit(cache=True)
def _plane_candidates(PT, i, K, buf, cand):
    """For a 2-D PT: what :func:`_lowdim_row`, :func:`_select_bound` and :func:`_collect`
    give together, in one pass over the samples instead of three: buf[l] = sq_dist of i and l
    (the same values: both squares rounded, then their sum), buf[i] = inf, and the indices l
    with buf[l] <= the bound of :func:`_select_bound` in cand (in order, branch-free);
    returns their count (fewer than K: the caller collects again with no bound)."""
    n = PT.shape[1]
    a = PT[0]
    b = PT[1]
    x = a[i]
    y = b[i]
    s, q = _bound_sample(n, K)
    bound = np.inf
    if q < s:  # the bound from the same strided sample, its distances computed directly
        sample = np.empty(s)
        for j in range(s):
            l = (j * n) // s
            d0 = x - a[l]
            d1 = y - b[l]
            sample[j] = np.inf if l == i else d0 * d0 + d1 * d1
        bound = np.partition(sample, q)[q]
    c = _plane_pass(a, b, x, y, 0, i, bound, buf, cand, 0)
    buf[i] = np.inf
    return _plane_pass(a, b, x, y, i + 1, n, bound, buf, cand, c)


@numba.njit(cache=True)
def _plane_pass(a, b, x, y, lo, hi, bound, buf, cand, c):
    """:func:`_plane_candidates`'s pass over samples lo..hi, adding to the c candidates so far."""
    for l in range(lo, hi):
        d0 = x - a[l]
        d1 = y - b[l]
        v = d0 * d0 + d1 * d1
        buf[l] = v
        cand[c] = l
        c += 1 if v <= bound else 0
    return c


@numba.njit(parallel=True, cache=True)
def positions_in_top(top, nbr, out):
    """out[r, m] = p where top[r, p] == nbr[r, m], or -1 when nbr[r, m] is not in top[r].

    With top[r] a sample's nearest neighbours in (sq_dist, index) order (itself excluded),
    p is the number of samples closer than nbr[r, m]: what :func:`count_ranks` counts, found
    without a pass over the row.
    """
    K = top.shape[1]
    k = nbr.shape[1]
    for r in numba.prange(top.shape[0]):
        for m in range(k):
            j = nbr[r, m]
            found = -1
            for p in range(K):
                if top[r, p] == j:
                    found = p
                    break
            out[r, m] = found


@numba.njit(parallel=True, cache=True)
def lowdim_class_sums(PT, y, out, n_chunks):
    """out[i, c] = sum of the euclidean distances from sample i to the members of class c,
    for few dimensions: distances computed on the fly from PT = X.T (n_dims, n_samples) as
    :func:`_lowdim_row` does, no (block x n_samples) arrays (the silhouette of a 2-D
    embedding). ``out`` (n_samples, n_classes) float64 is overwritten; self adds 0."""
    n = PT.shape[1]
    for ch in numba.prange(n_chunks):
        buf = np.empty(n)
        for i in range((ch * n) // n_chunks, ((ch + 1) * n) // n_chunks):
            _lowdim_row(PT, i, buf)
            buf[i] = 0.0
            row = out[i]
            row[:] = 0.0
            for l in range(n):
                row[y[l]] += np.sqrt(buf[l])


#: The arithmetic of t-SNE's forces (attraction and exact repulsion): reassociated sums (so the
#: loop over a row's neighbours or over all points runs in SIMD lanes) and contracted
#: multiply-adds. Their order decides nothing; the ordering kernels above keep numba's strict
#: arithmetic. With ``error_model="numpy"``: numba's default checks each division for zero, a
#: branch that keeps the loop out of SIMD lanes; every denominator here is at least 1.
_FORCE_MATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(nogil=True, fastmath=_FORCE_MATH, error_model="numpy", cache=True)
def tsne_attraction_rows(indices, indptr, P, Y, ref, grad, start, stop):
    """t-SNE's attractive forces of rows start..stop (2-D, one degree of freedom), added to
    ``grad``: grad[i] += sum_k P[k] q_ik (Y[i] - ref[j_k]), q_ik = 1 / (1 + |Y[i] - ref[j_k]|^2),
    over the nonzeros k of row i of the CSR matrix (indices, indptr, P): what openTSNE's
    ``estimate_positive_gradient_nn`` adds. Each row's sums are kept in SIMD registers
    (:data:`_FORCE_MATH`): 10,000 points, 1.4 million nonzeros, 4.0 ms against 7.1 ms in
    numba's strict order, the same forces to about 1e-15 of their size."""
    for i in range(start, stop):
        y0 = Y[i, 0]
        y1 = Y[i, 1]
        g0 = 0.0
        g1 = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            d0 = y0 - ref[j, 0]
            d1 = y1 - ref[j, 1]
            pq = P[k] / (1.0 + (d0 * d0 + d1 * d1))
            g0 += pq * d0
            g1 += pq * d1
        grad[i, 0] += g0
        grad[i, 1] += g1


@numba.njit(nogil=True, parallel=True, cache=True)
def tsne_attraction(indices, indptr, P, Y, ref, grad, n_chunks):
    """:func:`tsne_attraction_rows` of every row, in ``n_chunks`` contiguous chunks of rows."""
    n = grad.shape[0]
    for ch in numba.prange(n_chunks):
        tsne_attraction_rows(indices, indptr, P, Y, ref, grad, (ch * n) // n_chunks, ((ch + 1) * n) // n_chunks)


@numba.njit(nogil=True, fastmath=_FORCE_MATH, error_model="numpy", cache=True)
def _repulsion_row(a, b, y0, y1):
    """Sums over every point j of q = 1 / (1 + (y0 - a[j])^2 + (y1 - b[j])^2): q, q^2 (y0 - a[j])
    and q^2 (y1 - b[j]), in the precision of ``a`` and ``b`` (:data:`_FORCE_MATH`)."""
    one = a.dtype.type(1.0)
    z = a.dtype.type(0.0)
    f0 = a.dtype.type(0.0)
    f1 = a.dtype.type(0.0)
    for j in range(a.shape[0]):
        d0 = y0 - a[j]
        d1 = y1 - b[j]
        q = one / (one + d0 * d0 + d1 * d1)
        q2 = q * q
        z += q
        f0 += q2 * d0
        f1 += q2 * d1
    return f0, f1, z


@numba.njit(nogil=True, cache=True)
def tsne_repulsion_rows(a, b, F, zsum, start, stop):
    """t-SNE's exact repulsion of rows start..stop (2-D, one degree of freedom), unnormalised:
    F[i] = sum_j q_ij^2 (Y[i] - Y[j]) and zsum[i] = sum_j q_ij, q_ij = 1 / (1 + |Y[i] - Y[j]|^2),
    over every j including i itself (whose term is q = 1 with no force), for the embedding
    whose columns are ``a`` and ``b`` (float32: twice the SIMD lanes; each row's sums are
    within about 1e-6 of float64's)."""
    for i in range(start, stop):
        f0, f1, z = _repulsion_row(a, b, a[i], b[i])
        F[i, 0] = f0
        F[i, 1] = f1
        zsum[i] = z


@numba.njit(nogil=True, parallel=True, cache=True)
def tsne_repulsion(a, b, F, zsum, n_chunks):
    """:func:`tsne_repulsion_rows` of every row, in ``n_chunks`` contiguous chunks of rows."""
    n = F.shape[0]
    for ch in numba.prange(n_chunks):
        tsne_repulsion_rows(a, b, F, zsum, (ch * n) // n_chunks, ((ch + 1) * n) // n_chunks)
