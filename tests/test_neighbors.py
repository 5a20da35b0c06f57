"""The neighbors stage: exact graph == scikit-learn, approximate recall, self exclusion."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from evalkit import kernels, neighbors
from evalkit.device import resolve_device
from evalkit.errors import EvalkitError
from evalkit.neighbors import KNNGraph, knn_graph


def _mixture(n, d, n_centers=5, seed=0, spread=4.0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_centers, d)) * spread
    labels = rng.integers(0, n_centers, n)
    return (centers[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def _sklearn_graph(X, k):
    dist, idx = NearestNeighbors(n_neighbors=k).fit(X).kneighbors()
    return idx, dist


@pytest.fixture
def no_numba(monkeypatch):
    """Force the pure-torch code paths (what a GPU runs) on CPU."""
    monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
    monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    monkeypatch.setattr(neighbors, "KDTREE_MAX_FEATURES", 0)


@pytest.mark.parametrize("n, d, k, dtype, block", [
    (50, 2, 5, np.float64, None),    # k-d tree path
    (120, 3, 10, np.float32, None),
    (90, 20, 7, np.float64, 7),      # blocked torch path, 13 blocks
    (300, 64, 15, np.float32, 64),
])
def test_exact_graph_equals_sklearn(n, d, k, dtype, block):
    X = np.random.default_rng(n).normal(size=(n, d)).astype(dtype)
    g = knn_graph(X, n_neighbors=k, method="exact", block_size=block)
    idx, dist = _sklearn_graph(X, k)
    assert isinstance(g, KNNGraph) and g.exact and g.method == "exact"
    assert g.indices.shape == (n, k) and g.indices.dtype == np.int64
    assert g.distances.shape == (n, k) and g.distances.dtype == np.float32
    np.testing.assert_array_equal(g.indices, idx)
    np.testing.assert_allclose(g.distances, dist, rtol=1e-5, atol=1e-5)
    assert (np.diff(g.distances, axis=1) >= 0).all()


def test_torch_path_equals_numba_path(no_numba):
    X = np.random.default_rng(1).normal(size=(150, 2))
    idx, _ = _sklearn_graph(X, 6)
    np.testing.assert_array_equal(knn_graph(X, n_neighbors=6, method="exact", block_size=16).indices, idx)


# pynndescent compiles ~40-80 s of numba code on the first call in a process (most of its
# functions are not cached), whatever the data size: hence "slow".
@pytest.mark.slow
def test_approximate_graph_recall():
    X, _ = _mixture(3000, 10, n_centers=8, seed=3)
    exact = knn_graph(X, n_neighbors=10, method="exact")
    approx = knn_graph(X, n_neighbors=10, method="pynndescent", random_state=0)
    assert approx.method == "pynndescent" and not approx.exact
    assert approx.indices.shape == (3000, 10)
    assert not (approx.indices == np.arange(3000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.indices, approx.indices)])
    assert recall >= 0.9


def test_annoy_graph_recall_and_determinism():
    X, _ = _mixture(3000, 10, n_centers=8, seed=3)
    exact = knn_graph(X, n_neighbors=10, method="exact")
    approx = knn_graph(X, n_neighbors=10, method="annoy", random_state=0)
    assert approx.method == "annoy" and not approx.exact and approx.indices.shape == (3000, 10)
    assert not (approx.indices == np.arange(3000)[:, None]).any()
    assert np.all(np.diff(approx.distances, axis=1) >= 0)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact.indices, approx.indices)])
    assert recall >= 0.9
    again = knn_graph(X, n_neighbors=10, method="annoy", random_state=0)
    np.testing.assert_array_equal(again.indices, approx.indices)  # seeded: the same graph


def test_auto_is_annoy_above_the_exact_limit(monkeypatch):
    X, _ = _mixture(300, 8)
    monkeypatch.setattr(neighbors, "EXACT_MAX_SAMPLES", 100)
    g = knn_graph(X, n_neighbors=5, method="auto", device="cpu")
    assert g.method == "annoy" and not g.exact


@pytest.mark.parametrize("method, d", [
    ("exact", 2), ("exact", 16), ("annoy", 5), pytest.param("pynndescent", 5, marks=pytest.mark.slow)])
def test_self_excluded_with_duplicates(method, d):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(40, d))
    X = np.concatenate([base, base, base[:10], np.repeat(base[:1], 8, axis=0)])  # many exact copies
    n = len(X)
    g = knn_graph(X, n_neighbors=5, method=method)
    assert not (g.indices == np.arange(n)[:, None]).any()
    assert g.indices.min() >= 0 and g.indices.max() < n
    # every point has a copy, so its nearest neighbour is at distance 0 (Annoy, approximate,
    # may miss a few among so many identical points)
    found = np.isclose(g.distances[:, 0], 0)
    assert found.all() if method != "annoy" else found.mean() >= 0.9
    # no repeated neighbour within a row
    assert all(len(set(row)) == 5 for row in g.indices)


def test_all_points_identical():
    X = np.ones((12, 3))
    g = knn_graph(X, n_neighbors=4, method="exact")
    assert not (g.indices == np.arange(12)[:, None]).any()
    assert np.all(g.distances == 0)


def test_auto_is_exact_below_threshold():
    X, _ = _mixture(200, 8)
    g = knn_graph(X, n_neighbors=5, method="auto", device="cpu")
    assert g.method == "exact" and g.exact
    assert neighbors.EXACT_MAX_SAMPLES >= 1000


def test_head_restricts_columns():
    X, _ = _mixture(100, 4)
    g = knn_graph(X, n_neighbors=8, method="exact")
    h = g.head(3)
    np.testing.assert_array_equal(h.indices, g.indices[:, :3])
    with pytest.raises(ValueError, match="at least"):
        g.head(9)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_neighbors": 10}, "n_neighbors"),        # n_samples - 1 = 9
    ({"n_neighbors": 0}, "n_neighbors"),
    ({"n_neighbors": 2.5}, "integer"),
    ({"n_neighbors": 3, "method": "exactt"}, "did you mean 'exact'"),
    ({"n_neighbors": 3, "block_size": 0}, "block_size"),
])
def test_validation(kwargs, match):
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match=match) as info:
        knn_graph(X, **kwargs)
    assert isinstance(info.value, EvalkitError)  # the CLI reports it with exit code 2


def test_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        knn_graph(np.array([[0.0, np.nan], [1, 2], [3, 4]]), n_neighbors=1)
    with pytest.raises(ValueError, match="2-D"):
        knn_graph(np.zeros(5), n_neighbors=1)


def test_resolve_device_cpu():
    import torch

    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    dev = resolve_device(None)
    assert dev == resolve_device("auto")
    if expected:
        assert dev.type == expected
    with pytest.raises(ValueError, match="device"):
        resolve_device("no-such-device")


def test_resolve_device_without_torch(tmp_path, monkeypatch):
    """With torch not loaded and no GPU driver on the machine, "auto" and "cpu" resolve to the
    CPU without importing torch; torch takes that value wherever it takes a device."""
    import subprocess
    import sys

    from evalkit import device

    script = ("import sys\n"
              "from evalkit.device import resolve_device, CPU\n"
              "a, c = resolve_device(None), resolve_device('cpu')\n"
              "print(type(a).__name__, a.type, str(c), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if device._no_gpu_without_torch():  # this machine has no GPU driver
        assert out.stdout.split() == ["CPU", "cpu", "cpu", "False"]
    import torch

    import pickle

    assert torch.zeros(2, device=device.CPU()).device == torch.device("cpu")
    assert resolve_device(device.CPU()) == "cpu"
    again = pickle.loads(pickle.dumps(device.CPU()))
    assert isinstance(again, device.CPU) and again.type == "cpu" and again == "cpu"
    # a GPU driver present: torch decides
    monkeypatch.setattr(device, "_GPU_MARKERS", (str(tmp_path),))
    monkeypatch.delitem(sys.modules, "torch")
    assert not device._no_gpu_without_torch()


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, evalkit.neighbors, evalkit.score, evalkit.kernels; print('torch' in sys.modules, 'numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _near_duplicates(seed=0, n_base=40, d=16, eps=1e-6, offset=1e3):
    """Triples of points 1e-6 apart, far from the origin: float32 alone cannot rank them."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n_base, d)) + offset
    return np.concatenate([base, base + eps * rng.normal(size=base.shape), base + eps * rng.normal(size=base.shape)])


def _brute_graph(X, k):
    D = np.linalg.norm(X[:, None, :] - X[None, :, :], axis=2)
    np.fill_diagonal(D, np.inf)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


def test_float32_ranking_is_certified_on_near_ties():
    import torch

    X = _near_duplicates()
    expected = _brute_graph(X, 6)
    assert kernels.Float32Ranking.usable(X, torch.device("cpu"))
    np.testing.assert_array_equal(knn_graph(X, n_neighbors=6, method="exact", block_size=13).indices, expected)
    # float32 alone gets these wrong: the certified path really did decide them in float64
    X32 = torch.as_tensor(X - X.mean(axis=0), dtype=torch.float32)
    naive = torch.cdist(X32, X32, compute_mode="use_mm_for_euclid_dist")
    naive.fill_diagonal_(float("inf"))
    assert not np.array_equal(torch.topk(naive, 6, largest=False).indices.numpy(), expected)


def test_float32_ranking_bound_holds():
    import torch

    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 700)) * rng.uniform(0.1, 10, size=(300, 1)) + 5
    ranking = kernels.Float32Ranking(X)
    R = np.asarray(ranking.block(0, 300), dtype=np.float64)
    # r(i, l) approximates dd(i, l) - ||x_i - mean||^2 within err[i]
    dd = ((X[:, None, :] - X[None, :, :]) ** 2).sum(axis=2)
    exact = dd - ranking.sq64[:, None]
    assert np.isinf(np.diag(R)).all()  # self masked by index
    off = ~np.eye(300, dtype=bool)
    assert (np.abs(R - exact)[off] <= np.broadcast_to(ranking.err[:, None], R.shape)[off]).all()


def _tied_grid(n=60, d=16, seed=0):
    """Integer data with duplicated rows: equal distances everywhere, also at the k-th."""
    rng = np.random.default_rng(seed)
    X = rng.integers(0, 2, size=(n, d)).astype(np.float64)
    X[n // 2:n // 2 + 8] = X[:8]
    return X


def _exact_graph_reference(X, k):
    """Neighbours by (distance, index) in exact integer arithmetic (X: integers times a
    power of two)."""
    P = np.round(X / np.abs(X).max()).astype(np.int64) if np.abs(X).max() else X.astype(np.int64)
    D = ((P[:, None, :] - P[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(D, np.iinfo(np.int64).max)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("d", [2, 16])
@pytest.mark.parametrize("scale", [1.0, 0.5, 2.0**30])  # small integers are ranked exactly (err = 0)
def test_every_exact_backend_breaks_ties_by_lower_index(d, scale, monkeypatch):
    import torch

    X = _tied_grid(d=d) * scale
    k = 7
    expected = _exact_graph_reference(X, k)
    n = len(X)

    def graph(**kw):
        return knn_graph(X, n_neighbors=k, method="exact", **kw).indices

    got = {"default": graph(block_size=11)}
    # Float32Ranking (CPU, numba) and the float64 numba kernel, block by block
    for name, ranking in (("float32", kernels.Float32Ranking(X)),
                          ("float64", kernels.Ranking(X, torch.device("cpu"), torch.float64))):
        got[name] = np.concatenate([ranking.topk(ranking.block(s, min(s + 13, n)), np.arange(s, min(s + 13, n)), k)
                                    for s in range(0, n, 13)])
    with monkeypatch.context() as m:  # k-d tree, and its fallback for rows with too many ties
        m.setattr(neighbors, "KDTREE_MAX_FEATURES", 100)
        got["kdtree"] = graph()
        m.setattr(neighbors, "_KDTREE_MAX_CANDIDATES", 4)
        got["kdtree+blocked"] = graph(block_size=5)
    with monkeypatch.context() as m:  # torch only (what a GPU runs): topk + exact decisions
        m.setattr(kernels, "_NUMBA_KERNELS", None)
        m.setattr(kernels, "_NUMBA_TRIED", True)
        m.setattr(neighbors, "KDTREE_MAX_FEATURES", 0)
        got["torch"] = graph(block_size=9)
    for name, indices in got.items():
        np.testing.assert_array_equal(indices, expected, err_msg=name)
    g = knn_graph(np.hstack([X, np.zeros((n, 3))]), n_neighbors=k, method="exact")  # zero columns
    np.testing.assert_array_equal(g.indices, expected)
    ref_d = np.sqrt(((X[:, None] - X[None]) ** 2).sum(2))
    np.testing.assert_array_equal(g.distances, np.take_along_axis(ref_d, expected, axis=1).astype(np.float32))


def test_identical_points_take_the_lowest_indices():
    X = np.ones((12, 3))
    for kw in ({}, {"block_size": 5}):
        g = knn_graph(X, n_neighbors=4, method="exact", **kw)
        np.testing.assert_array_equal(g.indices, _exact_graph_reference(X, 4))


def test_exact_distances_are_one_definition():
    # numba and numpy compute dd with the same additions in the same order: bitwise equal
    rng = np.random.default_rng(0)
    X = np.ascontiguousarray(rng.normal(size=(50, 37)) * 10 ** rng.uniform(-3, 3, size=(50, 1)))
    a, b = rng.integers(0, 50, 500), rng.integers(0, 50, 500)
    with_numba = kernels.exact_sq_distances(X, a, b)
    kernels._NUMBA_KERNELS, kernels._NUMBA_TRIED, saved = None, True, kernels.numba_kernels()
    try:
        without = kernels.exact_sq_distances(X, a, b)
    finally:
        kernels._NUMBA_KERNELS = saved
    np.testing.assert_array_equal(with_numba, without)


# --------------------------------------------------------------------------- cosine neighbours


def _cosine_reference(X, k):
    """Exact cosine neighbours by brute force: the (dd', index) order of the normalised rows."""
    Xn, _ = kernels.unit_rows(X)
    return _brute_graph(Xn, k)


@pytest.mark.parametrize("name, make, k, kc, block", [
    ("mixture", lambda rng: _mixture(400, 24, seed=1)[0], 15, 10, None),
    ("mixture, blocks, sorted selection", lambda rng: _mixture(400, 24, seed=2)[0], 40, 35, 57),
    ("relu features, centre far from 0", lambda rng: np.maximum(rng.normal(3, 1, (300, 40)), 0), 10, 20, 64),
    # many rows point the same way: cosine ties everywhere, decided by dd' and index
    ("small integers", lambda rng: rng.integers(0, 4, (300, 12)).astype(np.float64), 10, 10, 100),
])
def test_cosine_neighbours_from_the_euclidean_pass(name, make, k, kc, block):
    X = make(np.random.default_rng(0))
    graph, cosine = neighbors.knn_graphs(X, n_neighbors=k, cosine_neighbors=kc, block_size=block)
    assert cosine is not None, name  # the merged pass ran
    np.testing.assert_array_equal(graph.indices, knn_graph(X, n_neighbors=k, method="exact").indices)
    if name != "small integers":  # (a brute-force sort cannot order equal cosines as dd' does)
        np.testing.assert_array_equal(cosine.indices, _cosine_reference(X, kc))
    # exactly what a search of the normalised rows gives, distances included
    own = knn_graph(kernels.unit_rows(X)[0], n_neighbors=kc, method="exact")
    np.testing.assert_array_equal(cosine.indices, own.indices)
    np.testing.assert_array_equal(cosine.distances, own.distances)


def test_blocks_run_blas_on_one_thread_while_the_work_beside_runs(monkeypatch):
    """``beside`` (the methods' imports in another thread): while that future runs, each block's
    matmul runs BLAS on one thread; once it is done, on BLAS's own count. The graphs are the
    same either way."""
    from concurrent.futures import Future

    from threadpoolctl import threadpool_info, threadpool_limits

    X = _mixture(600, 24, seed=4)[0]
    threads = []
    block = kernels.Ranking.block

    def counting(self, start, stop):
        threads.append(max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
        return block(self, start, stop)

    monkeypatch.setattr(kernels.Ranking, "block", counting)
    with threadpool_limits(limits=2, user_api="blas"):  # (whatever this machine's core count)
        plain = neighbors.knn_graphs(X, n_neighbors=12, cosine_neighbors=8, block_size=200)
        running = Future()
        busy = neighbors.knn_graphs(X, n_neighbors=12, cosine_neighbors=8, block_size=200, beside=running)
        running.set_result(None)
        done = neighbors.knn_graphs(X, n_neighbors=12, cosine_neighbors=8, block_size=200, beside=running)
    assert threads == [2] * 3 + [1] * 3 + [2] * 3
    for graphs in (busy, done):
        for a, b in zip(graphs, plain):
            np.testing.assert_array_equal(a.indices, b.indices)
            np.testing.assert_array_equal(a.distances, b.distances)


def test_cosine_ranking_bound_holds():
    """rho (the float32 block turned into the cosine ranking) is within err[i] of
    |x_i| (dd'(i, l) - 2) for every pair, on data whose centre is far from 0 and whose
    norms vary."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(250, 300)) * rng.uniform(0.5, 2.0, size=(250, 1)) + rng.normal(size=300) * 3
    ranking = kernels.Float32Ranking(X)
    cos = kernels.CosineRanking.make(ranking)
    assert cos is not None
    rho = cos.rho(ranking.block(0, 250), np.arange(250)).astype(np.float64)
    Xn = cos.points
    dd = ((Xn[:, None, :] - Xn[None, :, :]) ** 2).sum(axis=2)
    norms = np.linalg.norm(X, axis=1)
    target = norms[:, None] * (dd - 2.0)
    off = ~np.eye(250, dtype=bool)
    assert np.isinf(np.diag(rho)).all()
    gap = np.abs(rho - target)[off]
    bound = np.broadcast_to(cos.err[:, None], rho.shape)[off]
    assert (gap <= bound).all()
    assert gap.max() > bound.max() / 1e4  # and the bound is not absurdly loose


@pytest.mark.parametrize("case", ["zero row", "norms 1e-6 to 1", "no numba"])
def test_cosine_neighbours_fall_back_where_the_pass_cannot_give_them(case, monkeypatch):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 20))
    if case == "zero row":
        X[7] = 0
    elif case == "norms 1e-6 to 1":
        X *= np.geomspace(1e-6, 1, 200)[:, None]
    else:
        monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
        monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    graph, cosine = neighbors.knn_graphs(X, n_neighbors=8, cosine_neighbors=8)
    assert cosine is None
    np.testing.assert_array_equal(graph.indices, knn_graph(X, n_neighbors=8, method="exact").indices)


@pytest.mark.parametrize("bad", [-1, 2.5, "20", True])
def test_knn_graphs_rejects_a_bad_cosine_neighbours_count(bad):
    with pytest.raises(EvalkitError, match="cosine_neighbors must be an integer >= 0"):
        neighbors.knn_graphs(np.zeros((10, 3)), n_neighbors=2, cosine_neighbors=bad)
