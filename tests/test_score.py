"""Metric functions: known answers, agreement with scikit-learn, chunking."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness
from sklearn.metrics import silhouette_score as sk_silhouette

from conftest import assert_same_rows
from evalkit import kernels, neighbors, score
from evalkit.data import stratified_subsample
from evalkit.errors import EvalkitError
from evalkit.neighbors import KNNGraph, knn_graph
from evalkit.score import (
    continuity,
    linear_cka,
    neighbourhood_scores,
    per_class_knn_accuracy,
    silhouette,
    trustworthiness,
    weighted_knn_accuracy,
    knn_accuracy,
)

TOL = 1e-6


def _data(n, d, seed, dtype=np.float64, n_classes=4):
    """Clustered data, a noisy 2-D embedding of it and labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, n)
    centers = rng.normal(size=(n_classes, d)) * 2
    X = centers[labels] + rng.normal(size=(n, d))
    Z = X[:, :2] @ rng.normal(size=(2, 2)) + rng.normal(size=(n, 2))
    return X.astype(dtype), Z.astype(dtype), labels


@pytest.fixture
def torch_only(monkeypatch):
    """The pure-torch code paths a GPU runs (no numba kernels, no k-d tree), on CPU."""
    monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
    monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    monkeypatch.setattr(neighbors, "KDTREE_MAX_FEATURES", 0)


CASES = [  # n, d, k, dtype, block_size
    (30, 3, 1, np.float64, None),
    (60, 5, 3, np.float64, 7),
    (101, 8, 10, np.float32, 7),
    (150, 20, 5, np.float32, 32),
    (240, 50, 15, np.float64, None),
    (64, 4, 31, np.float64, 9),  # k just under n / 2
]


# ------------------------------------------------------------------ trustworthiness / continuity


@pytest.mark.parametrize("n, d, k, dtype, block", CASES)
def test_trustworthiness_and_continuity_equal_sklearn(n, d, k, dtype, block):
    X, Z, _ = _data(n, d, seed=n + k, dtype=dtype)
    t = trustworthiness(X, Z, n_neighbors=k, block_size=block)
    c = continuity(X, Z, n_neighbors=k, block_size=block)
    assert isinstance(t, float) and isinstance(c, float)
    assert abs(t - sk_trustworthiness(X, Z, n_neighbors=k)) <= TOL
    assert abs(c - sk_trustworthiness(Z, X, n_neighbors=k)) <= TOL


@pytest.mark.parametrize("n, d, k, dtype, block", CASES[1:4])
def test_torch_counting_path_equals_sklearn(torch_only, n, d, k, dtype, block):
    X, Z, _ = _data(n, d, seed=7 * n, dtype=dtype)
    assert abs(trustworthiness(X, Z, n_neighbors=k, block_size=block)
               - sk_trustworthiness(X, Z, n_neighbors=k)) <= TOL
    assert abs(continuity(X, Z, n_neighbors=k, block_size=block)
               - sk_trustworthiness(Z, X, n_neighbors=k)) <= TOL


# ------------------------------------------------------------------ ties (one rule, exactly)


def _exact_sq(P):
    """All squared distances in exact integer arithmetic (integer-valued P)."""
    P = np.asarray(P).astype(np.int64)
    return ((P[:, None, :] - P[None, :, :]) ** 2).sum(axis=2)


def _ranks(D):
    """r[i, j] = 1 + #{l != i : D[i, l] < D[i, j] or (D[i, l] == D[i, j] and l < j)}."""
    n = len(D)
    r = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(n):
            if j != i:
                closer = (D[i] < D[i, j]) | ((D[i] == D[i, j]) & (np.arange(n) < j))
                closer[i] = False
                r[i, j] = 1 + closer.sum()
    return r


def _reference_scores(X, Z, k):
    """Brute-force O(N^2) trustworthiness and continuity under the index tie rule; exact
    for integer-valued X and Z (tie-free float Z is fine too)."""
    DX = _exact_sq(X) if np.allclose(X, np.round(X)) else ((X[:, None] - X[None]) ** 2).sum(2)
    DZ = _exact_sq(Z) if np.allclose(Z, np.round(Z)) else ((Z[:, None] - Z[None]) ** 2).sum(2)
    rX, rZ = _ranks(DX), _ranks(DZ)
    n = len(X)
    norm = 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0))

    def score(r_rank, r_nbr):
        nbr = (r_nbr <= k) & ~np.eye(n, dtype=bool)  # U_k(i): the samples of rank <= k
        assert (nbr.sum(axis=1) == k).all()
        return 1.0 - np.maximum(r_rank[nbr] - k, 0).sum() * norm

    return score(rX, rZ), score(rZ, rX)


def test_tied_line_reproducer():
    # Equal distances in Z (and X): k = 1 neighbours and X ranks both tie; appending zero
    # columns (no distance changes) used to change the score (0.4 vs 0.2667).
    X = np.arange(5).reshape(-1, 1)
    Z = np.array([[0], [2], [4], [1], [3]])
    ref_t, ref_c = _reference_scores(X, Z, 1)
    assert ref_t == pytest.approx(0.2, abs=1e-12)  # 1 - 12/15
    assert abs(sk_trustworthiness(X.astype(float), Z.astype(float), n_neighbors=1) - 0.2) <= 1e-12
    for Zc in (Z, np.hstack([Z, np.zeros((5, 9))])):
        assert trustworthiness(X, Zc, n_neighbors=1) == pytest.approx(ref_t, abs=1e-12)
        assert continuity(X, Zc, n_neighbors=1) == pytest.approx(ref_c, abs=1e-12)


def test_tied_integer_reproducer():
    # Integer X (ties), tie-free Z: used to change with block_size (0.5385 vs 0.5462) and
    # neighbourhood_scores disagreed with continuity.
    X = np.random.default_rng(0).integers(0, 3, (10, 8))
    Z = np.random.default_rng(1).normal(size=(10, 2))
    ref_t, ref_c = _reference_scores(X, Z, 2)
    assert ref_t == pytest.approx(1 - 55 / 130, abs=1e-12) and ref_c == pytest.approx(1 - 56 / 130, abs=1e-12)
    both = neighbourhood_scores(X, {"z": Z}, n_neighbors=2)["z"]
    for block in (None, 1, 3, 7):
        t = trustworthiness(X, Z, n_neighbors=2, block_size=block)
        c = continuity(X, Z, n_neighbors=2, block_size=block)
        assert t == pytest.approx(ref_t, abs=1e-12) and c == pytest.approx(ref_c, abs=1e-12)
        assert both == {"trustworthiness": t, "continuity": c}


def _tied_data(n, d, seed):
    """Integer grids with duplicated rows: many equal distances in both spaces."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 3, size=(n, d))
    X[n // 2:n // 2 + 6] = X[:6]  # duplicates
    Z = rng.integers(-2, 3, size=(n, 2))
    Z[-4:] = Z[:4]
    return X.astype(np.float64), Z.astype(np.float64)


@pytest.mark.parametrize("d, k", [(3, 4), (12, 5), (40, 7)])  # k-d tree + 2-D kernel; blocked paths
@pytest.mark.parametrize("numba", [True, False])
def test_ties_follow_one_rule_everywhere(d, k, numba, monkeypatch):
    if not numba:  # the pure-torch code paths a GPU runs
        monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
        monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
        monkeypatch.setattr(neighbors, "KDTREE_MAX_FEATURES", 0)
    X, Z = _tied_data(48, d, seed=d)
    ref_t, ref_c = _reference_scores(X, Z, k)
    t, c = trustworthiness(X, Z, n_neighbors=k), continuity(X, Z, n_neighbors=k)
    assert t == pytest.approx(ref_t, abs=1e-12) and c == pytest.approx(ref_c, abs=1e-12)
    pad = np.zeros((48, 5))
    variants = [  # each must give exactly the same numbers
        dict(X=X, Z=Z, block_size=5),
        dict(X=X, Z=Z, block_size=1),
        dict(X=np.hstack([X, pad]), Z=np.hstack([Z, pad]), block_size=None),  # zero columns
        dict(X=np.hstack([pad, X]), Z=Z, block_size=16),
        dict(X=4 * X + 3, Z=0.5 * Z - 7, block_size=None),  # exact scaling and shift
        # not small integers: the expanded form is inexact (err > 0) and the band decides
        dict(X=0.5 * X + 0.25, Z=Z * 2.0**30, block_size=7),
        dict(X=X * 2.0**30, Z=0.25 * Z + 0.125, block_size=None),
        dict(X=X.astype(np.float32), Z=Z.astype(np.float32), block_size=9),
    ]
    for v in variants:
        kw = {"n_neighbors": k, "block_size": v["block_size"]}
        assert trustworthiness(v["X"], v["Z"], **kw) == t
        assert continuity(v["X"], v["Z"], **kw) == c
        assert neighbourhood_scores(v["X"], {"z": v["Z"]}, **kw)["z"] == {"trustworthiness": t, "continuity": c}
    gx = knn_graph(X, n_neighbors=k, method="exact")
    assert neighbourhood_scores(X, {"z": Z}, n_neighbors=k, graph_X=gx)["z"] == {"trustworthiness": t, "continuity": c}
    assert trustworthiness(X, X, n_neighbors=k) == 1.0 and continuity(Z, Z, n_neighbors=k) == 1.0


def test_rank_counts_numba_equals_torch_and_reference():
    import torch

    X, _ = _tied_data(40, 6, seed=3)
    rng = np.random.default_rng(0)
    nbr = np.array([rng.choice(np.delete(np.arange(40), i), 6, replace=False) for i in range(40)])
    expected = np.take_along_axis(_ranks(_exact_sq(X)), nbr, axis=1) - 1
    assert kernels.numba_kernels() is not None
    rows = np.arange(5, 22)
    for scale in (1.0, 0.5, 2.0**30):  # exact integers (err = 0); inexact expanded form (err > 0)
        ranking = kernels.Ranking(X * scale, torch.device("cpu"), torch.float64)
        assert (ranking.err == 0).all() == (scale == 1.0)
        R = ranking.block(5, 22)
        np.testing.assert_array_equal(ranking.rank_counts(R, rows, nbr[5:22]), expected[5:22])
        np.testing.assert_array_equal(
            kernels._rank_counts_torch(torch.as_tensor(R), rows, nbr[5:22], ranking.points, torch.as_tensor(ranking.err)),
            expected[5:22])
    np.testing.assert_array_equal(kernels.lowdim_rank_counts(X[:, :4], nbr),
                                  np.take_along_axis(_ranks(_exact_sq(X[:, :4])), nbr, axis=1) - 1)
    D = torch.as_tensor(rng.integers(0, 20, size=(9, 40)).astype(np.float64))  # the torch counter
    thresholds = D.gather(1, torch.as_tensor(rng.integers(0, 40, size=(9, 6))))
    assert torch.equal(kernels._count_below_torch(D, thresholds), (D[:, :, None] < thresholds[:, None, :]).sum(1))


def test_trustworthiness_known_answer():
    # Five points on a line, k=1, normalisation 2 / (N k (2N - 3k - 1)) = 1/15.
    # X ranks from each point: lower positions are all closer than the next higher one.
    # Z nearest neighbour -> its rank in X -> excess: a->c 2 (1), b->d 3 (2), c->a 2 (1),
    # d->c 1 (0), e->b 3 (2): T = 1 - 6/15. Swapped (continuity): a->b 3 (2), b->a 3 (2),
    # c->b 3 (2), d->c 1 (0), e->d 2 (1): C = 1 - 7/15.
    X = np.array([[0.0], [1.0], [3.0], [7.0], [15.0]])
    Z = np.array([[0.0], [10.0], [1.0], [3.0], [21.0]])
    assert trustworthiness(X, Z, n_neighbors=1) == pytest.approx(0.6, abs=1e-12)
    assert continuity(X, Z, n_neighbors=1) == pytest.approx(8 / 15, abs=1e-12)
    assert abs(0.6 - sk_trustworthiness(X, Z, n_neighbors=1)) <= 1e-12
    assert abs(8 / 15 - sk_trustworthiness(Z, X, n_neighbors=1)) <= 1e-12
    assert trustworthiness(X, X, n_neighbors=2) == 1.0


def test_uses_given_graph_and_its_first_columns():
    X, Z, _ = _data(80, 6, seed=1)
    gz = knn_graph(Z, n_neighbors=12, method="exact")
    gx = knn_graph(X, n_neighbors=12, method="exact")
    assert trustworthiness(X, Z, n_neighbors=5, graph_Z=gz) == trustworthiness(X, Z, n_neighbors=5)
    assert continuity(X, Z, n_neighbors=5, graph_X=gx) == continuity(X, Z, n_neighbors=5)
    # a (deliberately wrong) graph is used as given, not recomputed
    shuffled = KNNGraph(np.roll(gz.indices, 1, axis=0), gz.distances, False, "pynndescent")
    shuffled = KNNGraph(np.where(shuffled.indices == np.arange(80)[:, None], (shuffled.indices + 1) % 80,
                                 shuffled.indices), gz.distances, False, "pynndescent")
    assert trustworthiness(X, Z, n_neighbors=5, graph_Z=shuffled) < trustworthiness(X, Z, n_neighbors=5)


def test_neighbourhood_scores_equal_separate_functions():
    X, Z, _ = _data(120, 16, seed=2, dtype=np.float32)
    rng = np.random.default_rng(0)
    embeddings = {"noisy": Z, "random": rng.normal(size=(120, 2)), "pca": X[:, :2].astype(np.float64)}
    for kwargs in ({}, {"graph_X": knn_graph(X, n_neighbors=8, method="exact")}):
        got = neighbourhood_scores(X, embeddings, n_neighbors=8, block_size=7, **kwargs)
        assert list(got) == list(embeddings)
        for name, E in embeddings.items():
            assert got[name]["trustworthiness"] == pytest.approx(trustworthiness(X, E, n_neighbors=8), abs=1e-12)
            assert got[name]["continuity"] == pytest.approx(continuity(X, E, n_neighbors=8), abs=1e-12)
            assert abs(got[name]["continuity"] - sk_trustworthiness(E, X, n_neighbors=8)) <= TOL


def test_neighbourhood_scores_torch_path(torch_only):
    X, Z, _ = _data(90, 10, seed=3)
    got = neighbourhood_scores(X, {"z": Z}, n_neighbors=6, block_size=16)["z"]
    assert abs(got["trustworthiness"] - sk_trustworthiness(X, Z, n_neighbors=6)) <= TOL
    assert abs(got["continuity"] - sk_trustworthiness(Z, X, n_neighbors=6)) <= TOL


def test_neighbourhood_scores_low_dimensional_X():
    X, Z, _ = _data(70, 3, seed=4)
    got = neighbourhood_scores(X, {"z": Z}, n_neighbors=5)["z"]
    assert abs(got["trustworthiness"] - sk_trustworthiness(X, Z, n_neighbors=5)) <= TOL
    assert abs(got["continuity"] - sk_trustworthiness(Z, X, n_neighbors=5)) <= TOL


def test_n_neighbors_must_be_below_half():
    X, Z, _ = _data(20, 3, seed=0)
    for fn in (trustworthiness, continuity):
        with pytest.raises(ValueError, match=r"n_neighbors \(10\) should be less than n_samples / 2 \(10\)") as info:
            fn(X, Z, n_neighbors=10)
        assert isinstance(info.value, EvalkitError)
    with pytest.raises(ValueError, match="less than n_samples / 2"):
        neighbourhood_scores(X, {"z": Z}, n_neighbors=10)
    with pytest.raises(ValueError):  # sklearn agrees that this is invalid
        sk_trustworthiness(X, Z, n_neighbors=10)
    assert 0 <= trustworthiness(X, Z, n_neighbors=9) <= 1


def test_validation_messages():
    X, Z, labels = _data(30, 3, seed=0)
    with pytest.raises(ValueError, match="Z has 29 samples; expected 30"):
        trustworthiness(X, Z[:-1])
    with pytest.raises(ValueError, match="neighbours per sample; expected at least"):
        trustworthiness(X, Z, n_neighbors=5, graph_Z=knn_graph(Z, n_neighbors=3))
    with pytest.raises(ValueError, match="own neighbours"):
        bad = KNNGraph(np.tile(np.arange(30)[:, None], (1, 3)), np.zeros((30, 3), np.float32), True, "exact")
        continuity(X, Z, n_neighbors=3, graph_X=bad)
    with pytest.raises(ValueError, match="labels must have shape"):
        silhouette(X, labels[:-1])


def test_duplicates_and_ties_stay_in_range():
    rng = np.random.default_rng(0)
    X = rng.integers(0, 3, size=(40, 2)).astype(float)  # many duplicates and equal distances
    Z = rng.integers(0, 3, size=(40, 2)).astype(float)
    for fn in (trustworthiness, continuity):
        assert 0.0 <= fn(X, Z, n_neighbors=5) <= 1.0
    assert trustworthiness(X, X, n_neighbors=5) == 1.0  # ties are ranked lowest, never penalised


# ------------------------------------------------------------------ R_NX (co-ranking)


def _reference_rnx(X, Z):
    """R_NX(K), K = 1..N-2, from the full co-ranking matrix (Lee & Verleysen 2009): ranks from a
    stable argsort of each row of exact squared distances (self first), Q[k, l] = #{(i, j) :
    rank_X(i, j) = k, rank_Z(i, j) = l}, Q_NX(K) = sum_{k, l <= K} Q[k, l] / (K N)."""
    def ranks(P):
        D = _exact_sq(P) if np.allclose(P, np.round(P)) else ((P[:, None] - P[None]) ** 2).sum(2)
        D = D.astype(np.float64)
        np.fill_diagonal(D, -np.inf)
        return np.argsort(np.argsort(D, axis=1, kind="stable"), axis=1, kind="stable")  # self: 0

    n = len(X)
    Q = np.zeros((n, n), dtype=np.int64)
    np.add.at(Q, (ranks(X).ravel(), ranks(Z).ravel()), 1)
    Q = Q[1:, 1:]  # drop the pairs (i, i)
    K = np.arange(1, n - 1)
    q_nx = np.array([Q[:k, :k].sum() for k in K]) / (K * n)
    return ((n - 1) * q_nx - K) / (n - 1 - K)


@pytest.mark.parametrize("numba", [True, False])
def test_rnx_equals_coranking_reference(numba, monkeypatch):
    if not numba:
        monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
        monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    X, Z, _ = _data(90, 12, seed=5)
    Xt, Zt = _tied_data(60, 5, seed=7)  # integer data: many equal distances in both spaces
    for A, B in ((X, Z), (Xt, Zt), (X.astype(np.float32), Z.astype(np.float32))):
        ref = _reference_rnx(A, B)
        n = len(A)
        for block in (None, 1, 13):
            curve = score.rnx_curve(A, B, max_k=10_000, block_size=block)
            assert curve.max_k == n - 2
            np.testing.assert_allclose(curve.r_nx, ref, rtol=0, atol=1e-12)
        K = np.arange(1, n - 1)
        assert curve.auc == pytest.approx(np.sum(ref / K) / np.sum(1 / K), abs=1e-12)
        short = score.rnx_curve(A, B, max_k=20)
        np.testing.assert_array_equal(short.r_nx, curve.r_nx[:20])  # a prefix, not an approximation
        assert short.auc == pytest.approx(np.sum(ref[:20] / K[:20]) / np.sum(1 / K[:20]), abs=1e-12)


def test_rnx_large_k_paths_equal_the_reference():
    # enough samples for the sampled selection bound and the bucket sort of the candidates
    # (the small cases above take the exact fallbacks), with ties in both spaces
    rng = np.random.default_rng(11)
    X = rng.integers(0, 4, size=(400, 6)).astype(np.float64)
    Z = rng.integers(0, 25, size=(400, 2)).astype(np.float64)
    Zs = np.vstack([rng.normal(size=(200, 2)), rng.normal(size=(200, 2)) * 1e-3 + 50])  # skewed spreads
    for A, B in ((X, Z), (X + rng.normal(size=X.shape) * 0.01, Zs)):
        ref = _reference_rnx(A, B)
        for max_k in (150, 398):
            np.testing.assert_allclose(score.rnx_curve(A, B, max_k=max_k, block_size=64).r_nx, ref[:max_k],
                                       rtol=0, atol=1e-12)


def test_stable_bucket_order_equals_mergesort():
    nk = kernels.numba_kernels()
    rng = np.random.default_rng(0)
    cases = [rng.random(500), rng.integers(0, 7, 300).astype(float), np.exp(rng.normal(size=700) * 4),
             np.r_[np.zeros(100), rng.random(100) * 1e-12, 1e6], -rng.random(80), np.full(90, 3.0),
             # one bucket crowded by 100 values (one insertion pass) and by 300 (bucket by bucket)
             np.r_[rng.random(1000), 0.5 + rng.random(100) * 1e-9], np.r_[rng.random(1000), 0.5 + rng.random(300) * 1e-9]]
    for cv in cases:
        np.testing.assert_array_equal(nk._stable_order(cv), np.argsort(cv, kind="stable"))


def test_rnx_known_answers():
    X, Z, _ = _data(80, 2, seed=1)
    same = score.rnx_curve(X, X, max_k=40)
    np.testing.assert_array_equal(same.r_nx, 1.0)
    assert same.auc == 1.0
    assert score.rnx_curve(X, 3 * X + 1, max_k=40).auc == 1.0  # ranks do not change
    # an unrelated embedding keeps about K / (N - 1) of each K-neighbourhood: R_NX near 0
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 10))
    noise = score.rnx_curve(X, rng.normal(size=(400, 2)), max_k=200)
    assert abs(noise.auc) < 0.05 and np.abs(noise.r_nx[20:]).max() < 0.05
    # five points on a line, K = 1: Z keeps the neighbour of e only (d); Q_NX(1) = 1/5
    line = score.rnx_curve(np.array([[0.0], [1], [3], [7], [15]]), np.array([[0.0], [10], [1], [3], [21]]), max_k=3)
    assert line.kept[0] == 1 and line.r_nx[0] == pytest.approx((4 * 0.2 - 1) / 3)
    ks, r = line.grid()
    assert list(ks) == [1, 2, 3] and list(r) == list(line.r_nx)
    assert list(score.rnx_grid(1000, 8)) == [1, 3, 7, 19, 52, 139, 373, 1000]
    with pytest.raises(ValueError, match="max_k must be a positive integer"):
        score.rnx_curve(X, X[:, :2], max_k=0)


def test_rnx_in_the_neighbourhood_pass():
    X, Z, _ = _data(120, 16, seed=2, dtype=np.float32)
    rng = np.random.default_rng(0)
    embeddings = {"noisy": Z, "random": rng.normal(size=(120, 2))}
    plain = neighbourhood_scores(X, embeddings, n_neighbors=8)
    for kwargs in ({}, {"graph_X": knn_graph(X, n_neighbors=8, method="exact")}, {"block_size": 7}):
        got = neighbourhood_scores(X, embeddings, n_neighbors=8, rnx_max_k=50, **kwargs)
        for name, E in embeddings.items():
            assert {k: got[name][k] for k in ("trustworthiness", "continuity")} == plain[name]
            np.testing.assert_array_equal(got[name]["rnx"].kept, score.rnx_curve(X, E, max_k=50).kept)
            assert got[name]["rnx_auc"] == got[name]["rnx"].auc
    # R_NX needs the 50 nearest in X, more than n_neighbors: the found graph's first 8 are the same
    lowdim = neighbourhood_scores(X[:, :3], embeddings, n_neighbors=8, rnx_max_k=5)
    assert {k: lowdim["noisy"][k] for k in ("trustworthiness", "continuity")} == \
        neighbourhood_scores(X[:, :3], embeddings, n_neighbors=8)["noisy"]


@pytest.mark.parametrize("rnx_max_k", [6, 30, 200])  # most neighbours beyond K; some; none
def test_one_pass_gives_trustworthiness_and_continuity_with_ties(rnx_max_k):
    """With R_NX on, both scores are read from the co-ranking pass (a neighbour's rank is its
    position among the K nearest; only those beyond the K-th are counted on the row). On tied
    integer data they equal the brute-force reference, with or without the graph in X, and an
    approximate graph_X (not the exact neighbours) gets its own continuity, not the pass's."""
    X, Z = _tied_data(90, 12, seed=5)
    k = 5
    trust, cont = _reference_scores(X, Z, k)
    for kwargs in ({}, {"graph_X": knn_graph(X, n_neighbors=k, method="exact")}, {"block_size": 11}):
        got = neighbourhood_scores(X, {"z": Z}, n_neighbors=k, rnx_max_k=rnx_max_k, per_point=True, **kwargs)["z"]
        assert (got["trustworthiness"], got["continuity"]) == pytest.approx((trust, cont), abs=1e-12)
        assert got["continuity_points"].mean() == pytest.approx(cont, abs=1e-12)
    exact = knn_graph(X, n_neighbors=k, method="exact")
    shuffled = KNNGraph(exact.indices[:, ::-1].copy(), exact.distances[:, ::-1].copy(), False, "approximate")
    wider = knn_graph(X, n_neighbors=2 * k, method="exact")
    other = KNNGraph(wider.indices[:, k:].copy(), wider.distances[:, k:].copy(), False, "approximate")
    for graph in (shuffled, other):
        got = neighbourhood_scores(X, {"z": Z}, n_neighbors=k, rnx_max_k=rnx_max_k, graph_X=graph)["z"]
        assert got["continuity"] == neighbourhood_scores(X, {"z": Z}, n_neighbors=k, graph_X=graph)["z"]["continuity"]


def test_rnx_from_a_sample_of_rows_ranks_each_against_all():
    """metrics.rnx_max_samples: the co-ranking counts summed over sampled rows only, each row
    ranked against every sample (tie rule included); trustworthiness and continuity unchanged."""
    X, Z = _tied_data(90, 12, seed=7)
    rX, rZ = _ranks(_exact_sq(X)), _ranks(_exact_sq(Z))
    K = 30
    rows = score.rnx_sample(90, 25, seed=3)
    assert rows.size == 25 and np.all(np.diff(rows) > 0) and score.rnx_sample(90, 90) is None
    expected = np.array([sum(int(((rX[i] <= k) & (rZ[i] <= k) & (np.arange(90) != i)).sum()) for i in rows)
                         for k in range(1, K + 1)])
    whole = neighbourhood_scores(X, {"z": Z}, n_neighbors=5, rnx_max_k=K)["z"]
    for kwargs in ({}, {"graph_X": knn_graph(X, n_neighbors=5, method="exact")}, {"block_size": 13}):
        got = neighbourhood_scores(X, {"z": Z}, n_neighbors=5, rnx_max_k=K, rnx_rows=rows, **kwargs)["z"]
        np.testing.assert_array_equal(got["rnx"].kept, expected)
        assert got["rnx"].n_rows == 25
        np.testing.assert_allclose(got["rnx"].q_nx, expected / (np.arange(1, K + 1) * 25.0))
        assert (got["trustworthiness"], got["continuity"]) == (whole["trustworthiness"], whole["continuity"])
    every = neighbourhood_scores(X, {"z": Z}, n_neighbors=5, rnx_max_k=K, rnx_rows=np.arange(90))["z"]
    np.testing.assert_array_equal(every["rnx"].kept, whole["rnx"].kept)
    assert every["rnx"].n_rows is None
    with pytest.raises(EvalkitError, match="rnx_rows"):
        neighbourhood_scores(X, {"z": Z}, n_neighbors=5, rnx_max_k=K, rnx_rows=np.array([3, 90]))


@pytest.mark.parametrize("numba", [True, False])
def test_topk_many_neighbours_follows_the_tie_rule(numba, monkeypatch):
    import torch

    if not numba:
        monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
        monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    X, _ = _tied_data(70, 6, seed=2)
    expected = np.argsort(_ranks(_exact_sq(X)) + np.eye(70, dtype=np.int64) * 10**6, axis=1)[:, :60]
    for scale, dtype in ((1.0, torch.float64), (0.5, torch.float64), (2.0**30, torch.float64), (0.5, torch.float32)):
        ranking = kernels.Ranking(X * scale, torch.device("cpu"), dtype)
        rows = np.arange(3, 40)
        for k in (5, 40, 60):  # insertion buffer; selection (k > 32)
            np.testing.assert_array_equal(ranking.topk(ranking.block(3, 40), rows, k), expected[3:40, :k])


# ------------------------------------------------------------------ silhouette


@pytest.mark.parametrize("n, d, n_classes, dtype, block", [
    (40, 2, 2, np.float64, 7),
    (77, 6, 5, np.float32, 7),
    (150, 30, 3, np.float64, None),
    (200, 12, 12, np.float32, 50),
])
def test_silhouette_equals_sklearn(n, d, n_classes, dtype, block):
    X, _, labels = _data(n, d, seed=n, dtype=dtype, n_classes=n_classes)
    s = silhouette(X, labels, block_size=block)
    assert isinstance(s, float)
    assert abs(s - sk_silhouette(X, labels)) <= TOL


def test_silhouette_singletons_strings_and_duplicates():
    X, _, labels = _data(50, 4, seed=5)
    labels = labels.astype(object)
    labels[:3] = ["solo-a", "solo-b", "solo-c"]  # singleton classes score 0
    names = np.array([str(v) for v in labels])
    assert abs(silhouette(X, names, block_size=7) - sk_silhouette(X, names)) <= TOL
    Xd = np.repeat(X[:10], 3, axis=0)  # every point three times
    yd = np.repeat(np.arange(10) % 3, 3)
    assert abs(silhouette(Xd, yd) - sk_silhouette(Xd, yd)) <= TOL
    assert silhouette(np.ones((6, 2)), [0, 0, 0, 1, 1, 1]) == 0.0


def test_silhouette_not_defined_is_nan():
    X = np.random.default_rng(0).normal(size=(5, 2))
    assert np.isnan(silhouette(X, [1, 1, 1, 1, 1]))
    assert np.isnan(silhouette(X, [0, 1, 2, 3, 4]))
    assert not np.isnan(silhouette(X, [0, 1, 2, 3, 3]))


def test_silhouette_sample_is_stratified_and_seeded():
    X, _, labels = _data(400, 5, seed=6, n_classes=3)
    exact = silhouette(X, labels)
    a = silhouette(X, labels, sample_size=200, random_state=1)
    assert a == silhouette(X, labels, sample_size=200, random_state=1)
    assert a != silhouette(X, labels, sample_size=200, random_state=2)
    assert abs(a - exact) < 0.1
    assert silhouette(X, labels, sample_size=10_000) == exact
    keep = stratified_subsample(labels, 100, seed=0)  # what sample_size uses
    assert len(keep) == 100 and len(set(keep)) == 100
    np.testing.assert_allclose(np.bincount(labels[keep]), np.bincount(labels) / 4, atol=1)
    with pytest.raises(ValueError, match="sample_size"):
        silhouette(X, labels, sample_size=1)


@pytest.mark.parametrize("d", [2, 3, 4])
def test_silhouette_low_dimensions_on_the_fly_equals_blocks(d, monkeypatch):
    # embeddings (<= 4 dims) sum distances on the fly in numba; the blocked path is the other
    X, _, labels = _data(300, d, seed=d, n_classes=4)
    labels[:2] = [7, 8]  # two singleton classes
    assert score.lowdim_class_sums(X, np.unique(labels, return_inverse=True)[1], 6) is not None  # the kernel runs
    fast = silhouette(X, labels)
    monkeypatch.setattr(score, "lowdim_class_sums", lambda *a: None)
    slow = silhouette(X, labels, block_size=64)
    assert abs(fast - slow) <= 1e-12
    assert abs(fast - sk_silhouette(X, labels)) <= TOL


def test_silhouette_class_sums_torch_equals_numpy():
    # index_add_ (what a GPU runs) and reduceat over label-sorted columns (CPU) agree
    import torch

    rng = np.random.default_rng(0)
    y = np.sort(rng.integers(0, 4, 30))
    D = torch.as_tensor(rng.random((7, 30)))
    starts = np.concatenate([[0], np.cumsum(np.bincount(y, minlength=4))[:-1]])
    a = score._class_sums(D, starts, torch.as_tensor(y), 4, use_numpy=True)
    b = score._class_sums(D, starts, torch.as_tensor(y), 4, use_numpy=False)
    np.testing.assert_allclose(a, b, rtol=1e-13)


# ------------------------------------------------------------------ kNN accuracy


def _brute_knn_accuracy(X, labels, k):
    """Leave-one-out majority vote written out directly (O(N^2) memory, small data only)."""
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(D, np.inf)
    correct = []
    for i in range(len(X)):
        nbrs = np.argsort(D[i], kind="stable")[:k]
        votes = {}
        for j in nbrs:
            votes[labels[j]] = votes.get(labels[j], 0) + 1
        best = max(votes.values())
        pred = next(labels[j] for j in nbrs if votes[labels[j]] == best)  # nearest among tied
        correct.append(pred == labels[i])
    return np.array(correct)


# Points on a line; labels a=0, b=2 (label 1 absent). k=2 votes tie 1-1 for points 0, 1, 3, 4
# and go to the nearest neighbour's class; points 2 and 5 are outvoted 0-2.
LINE_X = np.array([[0.0], [1.0], [2.5], [10.0], [11.0], [12.5]])
LINE_Y = np.array([0, 0, 2, 2, 2, 0])


def test_knn_accuracy_hand_worked():
    assert knn_accuracy(LINE_X, LINE_Y, n_neighbors=2) == pytest.approx(4 / 6)
    per_class = per_class_knn_accuracy(LINE_X, LINE_Y, n_neighbors=2)
    assert per_class.shape == (3,)
    np.testing.assert_allclose(per_class, [2 / 3, np.nan, 2 / 3])
    assert knn_accuracy(LINE_X, LINE_Y, n_neighbors=1) == pytest.approx(4 / 6)
    assert knn_accuracy(LINE_X, ["a", "a", "b", "b", "b", "a"], n_neighbors=2) == pytest.approx(4 / 6)


@pytest.mark.parametrize("n, d, k, n_classes", [(50, 3, 1, 2), (80, 5, 4, 3), (120, 10, 10, 5), (60, 4, 7, 6)])
def test_knn_accuracy_equals_brute_force(n, d, k, n_classes):
    X, _, labels = _data(n, d, seed=n * k, n_classes=n_classes)
    X += np.random.default_rng(0).normal(size=X.shape) * 2  # make it hard enough to have errors
    correct = _brute_knn_accuracy(X, labels, k)
    assert knn_accuracy(X, labels, n_neighbors=k) == pytest.approx(correct.mean(), abs=1e-12)
    per_class = per_class_knn_accuracy(X, labels, n_neighbors=k)
    for c in range(n_classes):
        if (labels == c).any():
            assert per_class[c] == pytest.approx(correct[labels == c].mean(), abs=1e-12)
    graph = knn_graph(X, n_neighbors=k + 3, method="exact")
    assert knn_accuracy(X, labels, n_neighbors=k, graph=graph) == knn_accuracy(X, labels, n_neighbors=k)


def test_per_class_needs_non_negative_integers():
    with pytest.raises(ValueError, match="non-negative integers"):
        per_class_knn_accuracy(LINE_X, LINE_Y - 1, n_neighbors=1)
    with pytest.raises(ValueError, match="non-negative integers"):
        per_class_knn_accuracy(LINE_X, LINE_Y.astype(str), n_neighbors=1)


def _unit(deg):
    r = np.deg2rad(deg)
    return [np.cos(r), np.sin(r)]


def test_weighted_knn_hand_worked():
    # Unit vectors: P0 sees P1 (cos 0.9, class A), P2 (cos 0.8, B), P3 (cos 0.7, B).
    # T=0.07: exp(0.9/T) > exp(0.8/T) + exp(0.7/T), so P0 -> A (right); at T=1 B wins.
    # P1, P2, P3 are outvoted for every T. Scaling rows changes nothing (cosine).
    a1, a2, a3 = np.rad2deg(np.arccos([0.9, 0.8, 0.7]))
    X = np.array([_unit(0), _unit(a1), _unit(-a2), _unit(a3)]) * np.array([[1.0], [3.0], [0.5], [2.0]])
    y = np.array(["A", "A", "B", "B"])
    assert weighted_knn_accuracy(X, y, n_neighbors=3, temperature=0.07) == pytest.approx(0.25)
    assert weighted_knn_accuracy(X, y, n_neighbors=3, temperature=1.0) == 0.0
    assert knn_accuracy(X, y, n_neighbors=3) == 0.0  # plain majority: B for P0


def test_weighted_knn_equals_dino_reference():
    import torch

    X, _, labels = _data(150, 12, seed=9, n_classes=4)
    X += np.random.default_rng(1).normal(size=X.shape) * 2
    k, T = 20, 0.07
    # DINO eval_knn.py, leave-one-out over the same set
    feats = torch.nn.functional.normalize(torch.as_tensor(X), dim=1)
    sim = feats @ feats.T
    sim.fill_diagonal_(-float("inf"))
    dist, idx = sim.topk(k, largest=True, sorted=True)
    retrieved = torch.as_tensor(labels)[idx]
    one_hot = torch.nn.functional.one_hot(retrieved, 4).double()
    probs = (one_hot * (dist / T).exp()[:, :, None]).sum(1)
    expected = (probs.argmax(1).numpy() == labels).mean()
    assert weighted_knn_accuracy(X, labels, n_neighbors=k, temperature=T) == pytest.approx(expected, abs=1e-12)


def test_weighted_knn_validation():
    with pytest.raises(ValueError, match="temperature"):
        weighted_knn_accuracy(LINE_X, LINE_Y, n_neighbors=2, temperature=0)
    with pytest.raises(ValueError, match="n_neighbors"):
        weighted_knn_accuracy(LINE_X, LINE_Y, n_neighbors=6)


# ------------------------------------------------------------------ CKA


def _cka_direct(X, Y):
    """HSIC with linear kernels on the N x N Gram matrices (small data only)."""
    n = len(X)
    H = np.eye(n) - 1.0 / n
    K, L = H @ X @ X.T @ H, H @ Y @ Y.T @ H
    return np.sum(K * L) / np.sqrt(np.sum(K * K) * np.sum(L * L))


@pytest.mark.parametrize("n, p, q", [(30, 5, 5), (50, 3, 12), (40, 60, 7)])
def test_linear_cka_equals_direct_formula(n, p, q):
    rng = np.random.default_rng(n + p + q)
    X = rng.normal(size=(n, p))
    Y = X[:, :1] @ rng.normal(size=(1, q)) + rng.normal(size=(n, q))
    assert linear_cka(X, Y) == pytest.approx(_cka_direct(X, Y), abs=1e-10)
    assert linear_cka(X.astype(np.float32), Y) == pytest.approx(_cka_direct(X, Y), abs=1e-5)


def test_linear_cka_invariances():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 6))
    Q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(X, X @ Q) == pytest.approx(1.0, abs=1e-12)
    Y = rng.normal(size=(80, 4))
    assert linear_cka(X, 7.5 * Y + 3) == pytest.approx(linear_cka(X, Y), abs=1e-12)
    assert linear_cka(X, Y) == pytest.approx(linear_cka(Y, X), abs=1e-12)
    assert 0 <= linear_cka(X, Y) <= 1
    assert np.isnan(linear_cka(X, np.ones((80, 3))))
    with pytest.raises(ValueError, match="Y has 79 samples"):
        linear_cka(X, Y[:-1])


def test_linear_cka_many_columns_uses_blocks():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(20, 2500))  # more columns than one 2048 block
    Y = rng.normal(size=(20, 3))
    assert linear_cka(X, Y) == pytest.approx(_cka_direct(X, Y), abs=1e-10)


def _unbiased_hsic_direct(K, L):
    """Song et al. (2012)'s unbiased HSIC on N x N Gram matrices, written as in Nguyen et al.
    (2021)'s code (diagonals zeroed; no centring)."""
    n = len(K)
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    ones = np.ones(n)
    middle = (ones @ K @ ones) * (ones @ L @ ones) / ((n - 1) * (n - 2)) - 2.0 * (ones @ K @ L @ ones) / (n - 2)
    return (np.trace(K @ L) + middle) / (n * (n - 3))


def _cka_debiased_direct(X, Y):
    K, L = X @ X.T, Y @ Y.T  # uncentred: the unbiased estimator does not need centring
    return _unbiased_hsic_direct(K, L) / np.sqrt(_unbiased_hsic_direct(K, K) * _unbiased_hsic_direct(L, L))


@pytest.mark.parametrize("n, p, q", [(30, 5, 5), (50, 3, 12), (40, 60, 7), (8, 2, 3)])
def test_debiased_cka_equals_direct_unbiased_hsic(n, p, q):
    rng = np.random.default_rng(n + p + q)
    X = rng.normal(size=(n, p)) + 5.0  # off-centre: checks the invariance the derivation uses
    Y = X[:, :1] @ rng.normal(size=(1, q)) + rng.normal(size=(n, q))
    ref = _cka_debiased_direct(X, Y)
    assert linear_cka(X, Y, debiased=True) == pytest.approx(ref, abs=1e-10)
    assert score.cka_matrix([X, Y, X], debiased=True)[0, 1] == pytest.approx(ref, abs=1e-10)
    # one batch holding every sample is the full estimator
    assert linear_cka(X, Y, debiased=True, batch_size=n) == pytest.approx(ref, abs=1e-10)


def test_debiased_cka_of_independent_features_is_near_zero():
    # the numbers: biased linear CKA of independent 32-sample sets is about 0.2+
    biased, debiased = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        X, Y = rng.normal(size=(32, 64)), rng.normal(size=(32, 64))
        biased.append(linear_cka(X, Y))
        debiased.append(linear_cka(X, Y, debiased=True))
        assert linear_cka(X, X, debiased=True) == pytest.approx(1.0, abs=1e-12)
        assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert np.mean(biased) > 0.2
    assert abs(np.mean(debiased)) < 0.05
    assert np.isnan(linear_cka(X, np.ones((32, 3)), debiased=True))


def test_minibatch_cka():
    """Nguyen et al. (2021): unbiased HSIC averaged over batches, then the ratio."""
    rng = np.random.default_rng(3)
    n = 600
    X = rng.normal(size=(n, 20))
    Y = X[:, :5] @ rng.normal(size=(5, 30)) + 0.5 * rng.normal(size=(n, 30))
    got = linear_cka(X, Y, debiased=True, batch_size=128, random_state=7)
    order = np.random.default_rng(7).permutation(n)
    parts = np.array_split(order, n // 128)
    assert min(map(len, parts)) >= 128
    xy = sum(_unbiased_hsic_direct(X[b] @ X[b].T, Y[b] @ Y[b].T) for b in parts)
    xx = sum(_unbiased_hsic_direct(X[b] @ X[b].T, X[b] @ X[b].T) for b in parts)
    yy = sum(_unbiased_hsic_direct(Y[b] @ Y[b].T, Y[b] @ Y[b].T) for b in parts)
    assert got == pytest.approx(xy / np.sqrt(xx * yy), abs=1e-10)
    full = linear_cka(X, Y, debiased=True)
    assert abs(got - full) < 0.05  # the same quantity, estimated from smaller batches
    # biased minibatch CKA: centred HSIC per batch
    want = [sum(np.sum((H := np.eye(len(b)) - 1.0 / len(b)) @ A[b] @ A[b].T @ H * (H @ B[b] @ B[b].T @ H))
                / (len(b) - 1) ** 2 for b in parts) for A, B in ((X, Y), (X, X), (Y, Y))]
    assert linear_cka(X, Y, batch_size=128, random_state=7) == pytest.approx(want[0] / np.sqrt(want[1] * want[2]), abs=1e-10)
    # independent features: debiased minibatch CKA near 0, biased one inflated by the batch size
    Z = rng.normal(size=(n, 30))
    assert abs(linear_cka(X, Z, debiased=True, batch_size=32)) < 0.05
    assert linear_cka(X, Z, batch_size=32) > 0.2
    with pytest.raises(ValueError, match="batch_size must be an integer >= 4"):
        linear_cka(X, Y, batch_size=2)


def test_cka_in_the_pipeline_follows_metrics_cka():
    from evalkit.config import MetricsConfig
    from evalkit.pipeline import Samples, evaluate_feature_sets
    from evalkit.config import EmbedConfig
    from evalkit.results import FeatureSet

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 16)
    sets = [FeatureSet("a", "l", rng.normal(size=(32, 64)).astype(np.float32)),
            FeatureSet("b", "l", rng.normal(size=(32, 64)).astype(np.float32))]
    samples = Samples(y, ("x", "y"), np.arange(32))
    embed = EmbedConfig(methods=("pca",))
    for setting, expected in (("debiased", True), ("biased", False)):
        res = evaluate_feature_sets(sets, samples, embed=embed, metrics=MetricsConfig(cka=setting, n_neighbors=5))
        assert res.cka.estimator == setting
        want = linear_cka(sets[0].features, sets[1].features, debiased=expected)
        assert res.cka.matrix[0][1] == pytest.approx(want, abs=1e-12) and res.cka.matrix[1][1] == pytest.approx(1.0)
    assert MetricsConfig().cka == "debiased"


def test_near_ties_far_from_the_origin():
    # near-duplicates 1e-6 apart at distance 500 from the origin: ranks need float64 on
    # centred data (||x||^2 ~ 1e6 would swamp the 1e-12 squared distances otherwise)
    rng = np.random.default_rng(2)
    base = rng.normal(size=(30, 12)) + 500
    X = np.concatenate([base + 1e-6 * rng.normal(size=base.shape) for _ in range(4)])
    Z = rng.normal(size=(len(X), 2))
    n, k = len(X), 9
    D = np.linalg.norm(X[:, None] - X[None], axis=2)
    np.fill_diagonal(D, np.inf)
    nbr = knn_graph(Z, n_neighbors=k).indices
    thresholds = np.take_along_axis(D, nbr, axis=1)
    ranks = (D[:, :, None] < thresholds[:, None, :]).sum(1) + 1
    expected = 1 - np.maximum(ranks - k, 0).sum() * 2 / (n * k * (2 * n - 3 * k - 1))
    assert trustworthiness(X, Z, n_neighbors=k, block_size=25) == pytest.approx(expected, abs=1e-12)
    np.testing.assert_array_equal(knn_graph(X, n_neighbors=3).indices, np.argsort(D, axis=1, kind="stable")[:, :3])


# ------------------------------------------------------------------ GPU (run where CUDA exists)


def _cuda_available():
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA")
def test_cuda_paths_equal_sklearn():
    X, Z, labels = _data(300, 40, seed=11, dtype=np.float32)
    g = knn_graph(X, n_neighbors=8, method="auto", device="cuda", block_size=64)
    assert g.method == "exact"
    np.testing.assert_array_equal(g.indices, knn_graph(X, n_neighbors=8, method="exact", device="cpu").indices)
    for block in (None, 37):
        kw = {"device": "cuda", "block_size": block}
        assert abs(trustworthiness(X, Z, n_neighbors=8, **kw) - sk_trustworthiness(X, Z, n_neighbors=8)) <= TOL
        assert abs(continuity(X, Z, n_neighbors=8, **kw) - sk_trustworthiness(Z, X, n_neighbors=8)) <= TOL
        assert abs(silhouette(X, labels, **kw) - sk_silhouette(X, labels)) <= TOL
        got = neighbourhood_scores(X, {"z": Z}, n_neighbors=8, **kw)["z"]
        assert abs(got["trustworthiness"] - sk_trustworthiness(X, Z, n_neighbors=8)) <= TOL
        assert abs(got["continuity"] - sk_trustworthiness(Z, X, n_neighbors=8)) <= TOL


def test_weighted_knn_is_scale_invariant_down_to_tiny_scales():
    from evalkit.score import weighted_knn_accuracy

    rng = np.random.default_rng(3)
    centres = np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    y = np.repeat(np.arange(3), 20)
    X = centres[y] + rng.normal(scale=0.3, size=(60, 3))
    ref = weighted_knn_accuracy(X, y, n_neighbors=5)
    assert ref == 1.0
    for scale in (1e-20, 1e-30, 1e20):
        assert weighted_knn_accuracy(X * scale, y, n_neighbors=5) == ref


# --------------------------------------------------------------------------- neighbourhood hit


def test_neighbourhood_hit_hand_worked():
    # points on a line at 0, 1, 2, 10, 11; classes a a b b b; k = 1: the nearest neighbour of
    # 0 is 1 (a: hit), of 1 is 0 (hit), of 2 is 1 (a vs b: miss), of 10 is 11 (hit), of 11 is 10 (hit)
    Z = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    y = np.array(["a", "a", "b", "b", "b"])
    assert score.neighbourhood_hit(Z, y, n_neighbors=1) == pytest.approx(4 / 5)
    # k = 2: 0 -> {1, 2}: 1/2; 1 -> {0, 2}: 1/2; 2 -> {1, 0}: 0; 10 -> {11, 2}: 1; 11 -> {10, 2}: 1
    assert score.neighbourhood_hit(Z, y, n_neighbors=2) == pytest.approx(3 / 5)


def test_neighbourhood_hit_equals_sklearn_neighbours():
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(3)
    Z = rng.normal(size=(300, 2))
    y = rng.integers(0, 4, 300)
    k = 7
    idx = NearestNeighbors(n_neighbors=k + 1).fit(Z).kneighbors(Z, return_distance=False)[:, 1:]
    assert score.neighbourhood_hit(Z, y, n_neighbors=k) == pytest.approx(float((y[idx] == y[:, None]).mean()))


def test_neighbourhood_hit_is_a_registered_embedding_score():
    """Defined once in evalkit.score, it reaches the rows, the checks and the report's notes."""
    from evalkit.config import parse_config
    from evalkit.registry import metrics
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    entry = metrics().get("neighbourhood_hit")
    assert entry.applies_to("pca") and not entry.applies_to("features") and entry.higher_is_better
    cfg = parse_config({"data": {"kind": "digits"}, "models": [{"name": "m", "source": "demo:cnn"}],
                        "embed": {"methods": ["pca"]},
                        "checks": [{"metric": "neighbourhood_hit", "where": {"method": "pca"}, "gte": 0.5}]})
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    X = (np.eye(3, 8)[y] * 6 + rng.normal(size=(90, 8))).astype(np.float32)
    out = score_feature_set(FeatureSet("m", "l", X), y, embed=cfg.embed, settings=cfg.metrics)
    pca_row = out.rows[1]
    Z = out.embeddings[0].coords
    assert pca_row["neighbourhood_hit"] == pytest.approx(score.neighbourhood_hit(Z, y, n_neighbors=10))
    assert "neighbourhood_hit" not in out.rows[0]  # not a raw-feature score


def test_rnx_auc_and_intervals_reach_the_rows():
    """rnx_auc comes from the shared pass (equal to rnx_curve); kNN accuracy carries its Wilson
    interval in rows (and per class), which survive the flat metrics.json form."""
    from evalkit.config import parse_config
    from evalkit.results import FeatureSet, ScoreRow
    from evalkit.scoring import score_feature_set

    cfg = parse_config({"data": {"kind": "digits"}, "models": [{"name": "m", "source": "demo:cnn"}],
                        "embed": {"methods": ["pca"], "seeds": [0, 1]}, "metrics": {"rnx_max_k": 30}})
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 30)
    X = (np.eye(3, 8)[y] * 2 + rng.normal(size=(90, 8))).astype(np.float32)
    out = score_feature_set(FeatureSet("m", "l", X), y, embed=cfg.embed, settings=cfg.metrics)
    features, pca = out.rows
    Z = out.embeddings[0].coords
    curve = score.rnx_curve(X, Z, max_k=30)
    assert pca["rnx_auc"] == pytest.approx(curve.auc, abs=1e-12) and "rnx_auc" not in features
    got = out.rnx_curves["m/l/pca"]
    np.testing.assert_array_equal(got.k, score.rnx_grid(30))
    np.testing.assert_allclose(got.r, curve.r_nx[got.k - 1], atol=1e-12)  # PCA: the same for both seeds
    for row in (features, pca):
        acc = row["knn_accuracy"]
        assert (row["knn_accuracy_lo"], row["knn_accuracy_hi"]) == score.wilson_interval(acc, 90)
        assert row["knn_accuracy_lo"] < acc < row["knn_accuracy_hi"]
        assert "silhouette_lo" not in row
        assert dict(ScoreRow.from_dict(dict(row))) == dict(row)
        assert ScoreRow.from_dict(dict(row)).bounds == {"knn_accuracy": row.bounds["knn_accuracy"]}
    per_class = score.per_class_knn_accuracy(X, y, n_neighbors=10)
    assert out.per_class_knn_interval == tuple(score.wilson_interval(a, 30) for a in per_class)


def test_wilson_interval_equals_scipy():
    from scipy.stats import binomtest

    for hits, n in ((820, 899), (0, 20), (20, 20), (1, 3), (449, 450), (7, 1000)):
        ref = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = score.wilson_interval(hits / n, n)
        assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    lo, hi = score.wilson_interval(0.912, 899)  # the example: 0.912 vs 0.905 is noise
    assert round(lo, 3) == 0.892 and round(hi, 3) == 0.929 and lo < 0.905 < hi


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA")
def test_cuda_ties_equal_cpu():
    for scale in (1.0, 0.5):  # exact integers; inexact expanded form decided by the band
        X, Z = _tied_data(64, 20, seed=5)
        X, Z = X * scale, Z * scale
        ref_t, ref_c = _reference_scores(np.round(X / scale), np.round(Z / scale), 6)
        for block in (None, 9):
            kw = {"n_neighbors": 6, "device": "cuda", "block_size": block}
            assert trustworthiness(X, Z, **kw) == pytest.approx(ref_t, abs=1e-12)
            assert continuity(X, Z, **kw) == pytest.approx(ref_c, abs=1e-12)
            assert neighbourhood_scores(X, {"z": Z}, **kw)["z"] == {
                "trustworthiness": trustworthiness(X, Z, n_neighbors=6), "continuity": continuity(X, Z, n_neighbors=6)}
        np.testing.assert_array_equal(knn_graph(X, n_neighbors=6, method="exact", device="cuda").indices,
                                      knn_graph(X, n_neighbors=6, method="exact", device="cpu").indices)


def test_per_point_shares_average_to_the_scores():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 6))
    Z = X[:, :2] + rng.normal(scale=0.3, size=(120, 2))
    out = score.neighbourhood_scores(X, {"z": Z}, n_neighbors=7, per_point=True)["z"]
    for name in ("trustworthiness", "continuity"):
        points = out[f"{name}_points"]
        assert points.shape == (120,) and points.max() <= 1.0
        assert points.mean() == pytest.approx(out[name], abs=1e-12)
    # a point whose embedding neighbours are its true neighbours scores 1
    assert out["trustworthiness"] == pytest.approx(sk_trustworthiness(X, Z, n_neighbors=7), abs=1e-12)


def test_raw_feature_scores_use_exact_neighbours_when_the_shared_graph_is_approximate(monkeypatch):
    """Above the exact limit t-SNE and UMAP get an approximate graph; kNN accuracy on the raw
    features still uses the exact neighbours (found by the neighbourhood pass)."""
    from evalkit import neighbors as nb
    from evalkit.config import EmbedConfig, MetricsConfig
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), 60)
    X = (np.eye(4, 12)[y] * 1.5 + rng.normal(size=(240, 12))).astype(np.float32)
    monkeypatch.setattr(nb, "EXACT_MAX_SAMPLES", 100)
    out = score_feature_set(FeatureSet("m", "l", X), y, embed=EmbedConfig(methods=["pca"]), settings=MetricsConfig())
    assert out.method_params["pca"] == {"n_components": 2}
    features = out.rows[0]
    assert features["method"] == "features"
    assert features["knn_accuracy"] == pytest.approx(score.knn_accuracy(X, y, n_neighbors=10))  # exact graph


@pytest.mark.parametrize("n_features, torch_first, loads_numba, loads_torch", [
    (16, True, False, True),    # torch already loaded (a model run, a notebook): small data take its paths
    (64, True, True, True),     # above kernels.NUMBA_MIN_ENTRIES: the numba kernels
    (16, False, True, False),   # nothing loaded: numba (0.5-0.8 s) is cheaper than torch (1.3 s); no torch
    (64, False, True, False),
])
def test_small_data_load_the_cheaper_of_torch_and_numba(n_features, torch_first, loads_numba, loads_torch, tmp_path):
    """300 x 16 is below kernels.NUMBA_MIN_ENTRIES: with torch loaded, numba is never imported
    (loading it and its cached kernels took 0.5-0.8 s, more than the whole scoring); without,
    the numba kernels run and torch is never imported (1.3 s). The scores are the same."""
    import json
    import subprocess
    import sys

    script = tmp_path / "which_path.py"
    script.write_text(
        "import json, sys\n"
        + ("import torch\n" if torch_first else "")
        + "import numpy as np\n"
        "from evalkit import evaluate\n"
        "rng = np.random.default_rng(0)\n"
        f"X = rng.normal(size=(300, {n_features}))\n"
        "y = np.arange(300) % 5\n"
        "r = evaluate({'m': X}, y, methods=['pca'])\n"
        "rows = [{k: v for k, v in dict(row).items() if isinstance(v, float)} for row in r.rows]\n"
        "print(json.dumps({'numba': 'numba' in sys.modules, 'torch': 'torch' in sys.modules, 'rows': rows}))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["numba"], out["torch"]) == (loads_numba, loads_torch)
    # the same scores as the numba kernels give in this process (kernels.NUMBA_MIN_ENTRIES = 0 here)
    from evalkit import evaluate

    rng = np.random.default_rng(0)
    here = evaluate({"m": rng.normal(size=(300, n_features))}, np.arange(300) % 5, methods=["pca"])
    assert_same_rows(out["rows"], [{k: v for k, v in dict(row).items() if isinstance(v, float)}
                                   for row in here.rows])


def test_weighted_knn_of_the_raw_features_votes_with_the_cosine_neighbours_of_the_graph_pass(monkeypatch):
    """On CPU the shared graph's pass also finds the exact cosine neighbours; the features row's
    weighted kNN accuracy is what the score gives with its own search, and it made none."""
    from evalkit import neighbors as nb
    from evalkit.config import EmbedConfig, MetricsConfig
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(4), 60)
    # rows of different norms, centre away from 0: cosine and euclidean neighbours differ
    X = ((np.eye(4, 16)[y] * 2.0 + rng.normal(size=(240, 16)) + 1.0) * rng.uniform(0.5, 2, (240, 1))).astype(np.float32)
    expected = score.weighted_knn_accuracy(X, y, n_neighbors=20)
    assert expected != score.weighted_knn_accuracy(X, y, n_neighbors=20, graph=nb.knn_graph(X, n_neighbors=20))
    searches = []
    real = nb.knn_graph
    for module in (nb, score):
        monkeypatch.setattr(module, "knn_graph", lambda *a, **k: searches.append(np.shape(a[0])) or real(*a, **k))
    lines = []
    out = score_feature_set(FeatureSet("m", "l", X), y, embed=EmbedConfig(methods=["pca"]), settings=MetricsConfig(),
                            log=lines.append)
    assert out.rows[0]["weighted_knn_accuracy"] == expected
    assert "cosine k = 20 from the same pass" in lines[0]
    assert all(shape[1] != 16 for shape in searches)  # no search of the raw (or normalised) features


@pytest.mark.parametrize("paths", ["numba", "torch"])
@pytest.mark.parametrize("sample", [None, 90])
def test_raw_features_silhouette_comes_from_the_neighbourhood_pass(paths, sample, request, monkeypatch):
    """The embeddings' pass over the raw features' distances also sums them per class: the
    features row's silhouette is scikit-learn's (on the same stratified sample when one is
    drawn) and no separate silhouette pass over the raw features runs."""
    from evalkit.config import EmbedConfig, MetricsConfig
    from evalkit.data import stratified_subsample
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    if paths == "torch":
        request.getfixturevalue("torch_only")
    rng = np.random.default_rng(7)
    y = np.repeat(np.arange(3), [40, 70, 50])
    X = (np.eye(3, 9)[y] * 2.0 + rng.normal(size=(160, 9))).astype(np.float32)
    keep = stratified_subsample(y, sample, seed=0)
    expected = sk_silhouette(X[keep].astype(np.float64), y[keep])
    calls = []
    real = score.silhouette
    monkeypatch.setattr(score, "silhouette", lambda A, *a, **k: calls.append(np.shape(A)) or real(A, *a, **k))
    settings = MetricsConfig(silhouette_max_samples=sample)
    out = score_feature_set(FeatureSet("m", "l", X), y, embed=EmbedConfig(methods=["pca"]), settings=settings)
    assert out.rows[0]["silhouette"] == pytest.approx(expected, abs=1e-12)
    assert all(shape[1] != 9 for shape in calls)  # only the embedding's own silhouette ran
    assert calls  # (which did run through the patched function)


@pytest.mark.parametrize("d, rnx", [(3, None), (3, 50), (12, None)])
def test_neighbourhood_scores_give_the_silhouette_of_X_from_their_pass(d, rnx):
    """``silhouette_out``: the pass's per-class distance sums give scikit-learn's silhouette of
    X, also for few dimensions without R_NX (where the pass would otherwise count on the fly)."""
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(3), [30, 45, 25])
    X = np.eye(3, d)[y] * 2.0 + rng.normal(size=(100, d))
    Z = X[:, :2] + rng.normal(scale=0.5, size=(100, 2))
    out = {"labels": y, "rows": None}
    scores = score.neighbourhood_scores(X, {"z": Z}, n_neighbors=5, rnx_max_k=rnx, silhouette_out=out)
    assert out["value"] == pytest.approx(sk_silhouette(X, y), abs=1e-12)
    assert scores["z"]["trustworthiness"] == pytest.approx(sk_trustworthiness(X, Z, n_neighbors=5), abs=1e-12)
