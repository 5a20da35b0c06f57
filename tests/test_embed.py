"""The contract every embedding backend passes (one shared test class, as in openTSNE).

Backends: PCA, t-SNE through openTSNE, t-SNE through scikit-learn, UMAP, PaCMAP (optional). Each is run on a
few hundred points of well-separated Gaussian clusters, with and without the shared
neighbour graph; fits are cached per (backend, seed, graph) so the whole file stays fast.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from evalkit.config import EmbedConfig, TSNEConfig, UMAPConfig
from evalkit.embed import create_embedder
from evalkit.errors import EvalkitError
from evalkit.neighbors import KNNGraph, knn_graph
from evalkit.score import knn_accuracy

N_CLASSES, N_PER_CLASS, DIM = 6, 40, 20  # 240 points; 6 components > umap-learn's 4 fixed slots

BACKENDS = {
    "pca": ("pca", EmbedConfig()),
    "tsne-opentsne": ("tsne", EmbedConfig(tsne=TSNEConfig(n_iter=300))),
    "tsne-sklearn": ("tsne", EmbedConfig(tsne=TSNEConfig(backend="sklearn", n_iter=300))),
    "umap": ("umap", EmbedConfig(umap=UMAPConfig(n_epochs=100))),
    "pacmap": ("pacmap", EmbedConfig(methods=["pacmap"])),  # optional method, installed by the test extra
}
# What params(n_samples, graph) reports for each method (resolved values, no "auto").
PARAM_KEYS = {
    "pca": {"n_components"},
    "tsne": {"backend", "perplexity", "n_neighbors", "neighbors", "learning_rate", "early_exaggeration",
             "early_exaggeration_iter", "n_iter", "init", "gradient", "n_jobs"},
    "umap": {"n_neighbors", "min_dist", "n_epochs", "metric", "neighbors", "init", "n_jobs"},
    "pacmap": {"n_neighbors", "MN_ratio", "FP_ratio", "lr", "init", "neighbors"},
}


def clusters(n_per_class=N_PER_CLASS, n_classes=N_CLASSES, dim=DIM, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    centres = rng.normal(scale=8.0, size=(n_classes, dim))
    X = (centres[y] + rng.normal(size=(y.size, dim))) * scale
    return X.astype(np.float32), y


X, Y = clusters()
GRAPH = knn_graph(X, n_neighbors=X.shape[0] // 2)  # enough for every backend
_FITS: dict = {}


def embedder(backend):
    method, cfg = BACKENDS[backend]
    return create_embedder(method, cfg)


def fit(backend, *, seed=0, graph=True, cached=True):
    key = (backend, seed, graph)
    if not cached or key not in _FITS:
        Z = embedder(backend).fit_transform(X, random_state=seed, graph=GRAPH if graph else None)
        if not cached:
            return Z
        _FITS[key] = Z
    return _FITS[key]


@pytest.fixture(params=list(BACKENDS), scope="module")
def backend(request):
    return request.param


class TestEmbedderContract:
    @pytest.mark.parametrize("graph", [True, False], ids=["graph", "no-graph"])
    def test_shape_dtype_finite(self, backend, graph):
        Z = fit(backend, graph=graph)
        assert Z.shape == (X.shape[0], 2)
        assert Z.dtype == np.float32
        assert np.isfinite(Z).all()
        assert Z.std(axis=0).min() > 0  # not collapsed to a point or a line

    def test_deterministic_for_a_seed(self, backend):
        np.testing.assert_array_equal(fit(backend, seed=0), fit(backend, seed=0, cached=False))

    def test_seed_changes_the_embedding(self, backend):
        Z0, Z1 = fit(backend, seed=0), fit(backend, seed=1)
        if backend == "pca":  # one answer, whatever the seed
            np.testing.assert_array_equal(Z0, Z1)
        else:
            assert not np.allclose(Z0, Z1)

    @pytest.mark.parametrize("graph", [True, False], ids=["graph", "no-graph"])
    def test_separates_clusters(self, backend, graph):
        assert knn_accuracy(fit(backend, graph=graph), Y, n_neighbors=5) >= 0.95

    def test_scale_of_the_features_does_not_matter(self, backend):
        Xs, ys = clusters(scale=1e5)
        e = embedder(backend)
        g = knn_graph(Xs, n_neighbors=max(1, e.graph_neighbors(len(Xs))))
        Z = e.fit_transform(Xs, random_state=0, graph=g)
        assert np.isfinite(Z).all()
        assert knn_accuracy(Z, ys, n_neighbors=5) >= 0.95

    def test_tiny_data(self, backend):
        Xt, yt = clusters(n_per_class=5, n_classes=2, dim=4)
        e = embedder(backend)
        params = e.params(len(Xt))
        if "perplexity" in params:
            assert params["perplexity"] <= (len(Xt) - 1) / 3
        for graph in (None, knn_graph(Xt, n_neighbors=max(1, e.graph_neighbors(len(Xt))))):
            Z = e.fit_transform(Xt, random_state=0, graph=graph)
            assert Z.shape == (10, 2) and Z.dtype == np.float32 and np.isfinite(Z).all()

    def test_one_feature(self, backend):
        X1 = X[:, :1] - X[:, :1].mean()
        Z = embedder(backend).fit_transform(X1, random_state=0)
        assert Z.shape == (X.shape[0], 2) and Z.dtype == np.float32 and np.isfinite(Z).all()

    def test_params_report_what_is_used(self, backend):
        method, cfg = BACKENDS[backend]
        e = embedder(backend)
        params = e.params(X.shape[0], GRAPH)
        opentsne = backend == "tsne-opentsne"  # a learning rate per phase: N / 12, then N
        assert set(params) == PARAM_KEYS[method] | ({"learning_rate_early"} if opentsne else set())
        assert all(isinstance(v, (str, int, float)) and v != "auto" for v in params.values())
        if "neighbors" in params:
            assert params["neighbors"].startswith("shared kNN graph")
            assert not e.params(X.shape[0], None)["neighbors"].startswith("shared")
        assert set(e.params()) <= PARAM_KEYS[method] | {"learning_rate_early"}  # before the data is known

    def test_graph_with_too_few_neighbours_is_not_used(self, backend):
        e = embedder(backend)
        need = e.graph_neighbors(X.shape[0])
        if need <= 1:
            pytest.skip("uses no graph")
        short = GRAPH.head(need - 1)
        assert "shared" not in str(e.params(X.shape[0], short).get("neighbors"))
        Z = e.fit_transform(X, random_state=0, graph=short)
        assert knn_accuracy(Z, Y, n_neighbors=5) >= 0.95

    def test_graph_of_other_data_is_refused(self, backend):
        e = embedder(backend)
        if e.graph_neighbors(X.shape[0]) == 0:
            pytest.skip("uses no graph")
        with pytest.raises(EvalkitError, match="neighbour graph has shape"):
            e.fit_transform(X[:-1], random_state=0, graph=GRAPH)


# --------------------------------------------------------------------------- backend specifics


def test_opentsne_affinities_come_from_the_graph():
    """A graph whose neighbours are not the true ones changes the embedding: it is used."""
    e = embedder("tsne-opentsne")
    k = e.graph_neighbors(X.shape[0])
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(np.delete(np.arange(len(X)), i), size=k, replace=False) for i in range(len(X))])
    random_graph = KNNGraph(idx, np.sort(rng.random((len(X), k)).astype(np.float32), axis=1), False, "random")
    Z = e.fit_transform(X, random_state=0, graph=random_graph)
    assert knn_accuracy(Z, Y, n_neighbors=5) < 0.5


def test_learning_rate_auto_is_resolved(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    n = 1200
    ot = create_embedder("tsne", EmbedConfig()).params(n)
    assert ot["learning_rate_early"] == pytest.approx(n / 12) and ot["learning_rate"] == n
    assert ot["gradient"] == "exact" and ot["n_jobs"] == 1  # small data: one thread
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # as the command line sets it: idle threads sleep
    from evalkit.embed import n_jobs

    assert create_embedder("tsne", EmbedConfig()).params(n)["n_jobs"] == 1  # still: the set beside it has the core
    assert create_embedder("tsne", EmbedConfig()).params(5_000)["n_jobs"] == n_jobs()
    assert create_embedder("tsne", EmbedConfig()).params(20_000)["gradient"] == "fft"
    sk = create_embedder("tsne", EmbedConfig(tsne=TSNEConfig(backend="sklearn"))).params(n)
    assert sk["learning_rate"] == pytest.approx(max(n / 12 / 4, 50))
    assert create_embedder("tsne", EmbedConfig(tsne=TSNEConfig(learning_rate=200))).params(n)["learning_rate"] == 200


def test_sklearn_tsne_needs_its_early_phase():
    e = create_embedder("tsne", EmbedConfig(tsne=TSNEConfig(backend="sklearn", n_iter=100)))
    with pytest.raises(EvalkitError, match="embed.tsne.n_iter: 100 is too small"):
        e.fit_transform(X, random_state=0)


def test_too_few_samples_and_non_finite_features():
    bad = X.copy()
    bad[3, 2] = np.nan
    for method in ("tsne", "umap"):
        with pytest.raises(EvalkitError, match="at least 4 samples"):
            create_embedder(method, EmbedConfig()).fit_transform(X[:3], random_state=0)
        with pytest.raises(EvalkitError, match="NaN or infinite"):
            create_embedder(method, EmbedConfig()).fit_transform(bad, random_state=0)


def test_pipeline_shares_one_graph_with_tsne_and_umap():
    from evalkit.config import Config
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    cfg = Config.model_validate({
        "name": "t", "data": {"kind": "digits"}, "models": [{"name": "m", "features": "x.npz"}],
        "embed": {"methods": ["tsne", "umap", "pca"], "tsne": {"n_iter": 300}, "umap": {"n_epochs": 50},
                  "pca_dims": 8},
    })
    out = score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
    feature_row, rows, params = out.rows[0], out.rows[1:], out.method_params
    assert feature_row["method"] == "features"
    assert params["tsne"]["neighbors"] == "shared kNN graph (exact)"
    assert params["tsne"]["n_neighbors"] == 90  # 3 x perplexity 30
    assert params["umap"]["neighbors"] == "shared kNN graph (exact)"
    assert "raw features" in params["tsne"]["input"]
    assert [r["method"] for r in rows] == ["tsne", "umap", "pca"]
    for r in rows:
        assert 0.5 < r["trustworthiness"] <= 1 and 0.5 < r["continuity"] <= 1


def test_optional_method_is_not_a_default_and_runs_when_asked_for():
    from evalkit.config import parse_config

    base = {"data": {"kind": "digits"}, "models": [{"name": "m", "source": "demo:cnn"}]}
    assert "pacmap" not in parse_config(base).embed.methods
    cfg = parse_config({**base, "embed": {"methods": ["pacmap", "pca"], "pacmap": {"n_neighbors": 8}}})
    assert cfg.embed.pacmap.n_neighbors == 8
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    out = score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
    assert [r["method"] for r in out.rows] == ["features", "pacmap", "pca"]
    assert out.method_params["pacmap"]["neighbors"] == "shared kNN graph (exact)"
    assert out.rows[1]["knn_accuracy"] > 0.9  # well-separated clusters stay separated


@pytest.mark.parametrize("factor", [1.0, 1e18, 1e20, 1e-25, 1e-35, 1e37])
def test_unit_scale_and_pca_do_not_depend_on_a_global_factor(factor):
    from evalkit.embed import PCAEmbedder, reduce_dims, unit_scale

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 60)) + np.repeat(np.eye(60)[:4] * 6, 10, axis=0)
    Xs = (X * factor).astype(np.float32)
    scaled, f = unit_scale(Xs)
    if factor == 1.0:
        assert f == 1.0 and scaled is Xs  # ordinary features are left as they are
    else:
        assert np.log2(f) == np.round(np.log2(f)) and 2 ** -20 <= np.abs(scaled).max() <= 2 ** 20
        np.testing.assert_array_equal(scaled.astype(np.float64) * f, Xs.astype(np.float64))  # exact
    ref = PCAEmbedder().fit_transform(X.astype(np.float32))
    Z = PCAEmbedder().fit_transform(Xs)
    assert np.isfinite(Z).all() and np.isfinite(reduce_dims(Xs, 10)).all()
    # the same picture up to one factor and the sign of each axis
    Z = Z * (np.abs(ref).max() / np.abs(Z).max())
    for j in range(2):
        assert min(np.abs(Z[:, j] - ref[:, j]).max(), np.abs(Z[:, j] + ref[:, j]).max()) < 1e-3 * np.abs(ref).max()


# --------------------------------------------------------------------------- speed plumbing (issue 12)


def _two_seed_config(**embed):
    from evalkit.config import Config

    return Config.model_validate({
        "name": "t", "data": {"kind": "digits"}, "models": [{"name": "m", "features": "x.npz"}],
        "embed": {"methods": ["tsne", "umap", "pca"], "seeds": [0, 1], "tsne": {"n_iter": 150},
                  "umap": {"n_epochs": 40}, "pca_dims": 8, **embed},
    })


def test_methods_side_by_side_give_the_coordinates_of_one_after_the_other(monkeypatch):
    """The pool of threads changes when each job runs, never what it computes."""
    import evalkit.embed
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    cfg = _two_seed_config()
    outs = {}
    for cores in (1, 2):
        monkeypatch.setattr(evalkit.embed, "n_jobs", lambda cores=cores: cores)
        lines = []
        outs[cores] = score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics,
                                        log=lines.append)
        # one line per method once all its seeds are done, whatever the order they finish in
        methods = [line.split(": ")[1].split(" in ")[0] for line in lines]
        assert sorted(m for m in methods if m in ("PCA", "UMAP", "t-SNE")) == ["PCA", "UMAP", "t-SNE"]
    serial, pooled = outs[1], outs[2]
    assert [(e.method, e.seed) for e in pooled.embeddings] == [(e.method, e.seed) for e in serial.embeddings] == [
        ("tsne", 0), ("tsne", 1), ("umap", 0), ("umap", 1), ("pca", 0), ("pca", 1)]
    for a, b in zip(serial.embeddings, pooled.embeddings):
        np.testing.assert_array_equal(a.coords, b.coords)
    assert [dict(r) for r in serial.rows] == [dict(r) for r in pooled.rows]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is set on Linux only")
def test_jobs_beside_the_costliest_run_at_a_lower_priority(monkeypatch):
    """UMAP (the costliest job) keeps the process's priority; t-SNE and PCA beside it yield to
    it (their thread's niceness raised), and the main thread is left as it was."""
    import os
    import threading

    import evalkit.embed
    import evalkit.scoring
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    def niceness():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen = {}
    for cls in (evalkit.embed.TSNEEmbedder, evalkit.embed.UMAPEmbedder, evalkit.embed.PCAEmbedder):
        def fit(self, X, *, random_state=0, graph=None, name=cls.__name__):
            seen[name, random_state] = niceness()
            return np.zeros((len(X), 2), dtype=np.float32) + random_state
        monkeypatch.setattr(cls, "fit_transform", fit)
    monkeypatch.setattr(evalkit.embed, "n_jobs", lambda: 2)
    before = niceness()
    cfg = _two_seed_config(seeds=[0])
    score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
    lowered = min(19, before + evalkit.scoring.BESIDE_NICENESS)
    assert seen == {("UMAPEmbedder", 0): before, ("TSNEEmbedder", 0): lowered, ("PCAEmbedder", 0): lowered}
    assert niceness() == before


def test_a_failing_method_in_the_pool_raises_its_own_error(monkeypatch):
    import evalkit.embed
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    monkeypatch.setattr(evalkit.embed, "n_jobs", lambda: 2)

    def broken(self, X, *, random_state=0, graph=None):
        raise EvalkitError("umap broke")

    monkeypatch.setattr(evalkit.embed.UMAPEmbedder, "fit_transform", broken)
    cfg = _two_seed_config()
    with pytest.raises(EvalkitError, match="umap broke"):
        score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)


class _Bar:
    def __init__(self, total, desc, unit):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0

    def update(self, n=1):
        self.n += n


@pytest.fixture
def bars(monkeypatch):
    """Every inner progress bar opened, as a _Bar counting its steps."""
    import contextlib

    import evalkit.progress

    made = []

    @contextlib.contextmanager
    def fake(total, desc, *, unit="it", min_total=2, delay=0.0):
        made.append(_Bar(total, desc, unit))
        yield made[-1]

    monkeypatch.setattr(evalkit.progress, "progress_bar", fake)
    return made


def test_tsne_iterations_and_umap_epochs_move_their_own_bars(bars):
    """Each loop reports to the bar of the thread running it, however many run side by side."""
    from concurrent.futures import ThreadPoolExecutor

    graph = knn_graph(X, n_neighbors=90)
    tsne = create_embedder("tsne", EmbedConfig(tsne=TSNEConfig(n_iter=150)))
    umap_ = create_embedder("umap", EmbedConfig(umap=UMAPConfig(n_epochs=40)))
    umap_.prepare()
    tsne.prepare()
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(e.fit_transform, X, graph=graph) for e in (tsne, umap_, tsne, umap_)]
        for job in jobs:
            job.result()
    assert sorted((b.desc, b.unit, b.total, b.n) for b in bars) == [
        ("UMAP", "epoch", 40, 40), ("UMAP", "epoch", 40, 40), ("t-SNE", "it", 150, 150), ("t-SNE", "it", 150, 150)]


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_a_recorded_ctrl_c_stops_tsne_and_umap_inside_their_loops(method, bars, monkeypatch):
    """The progress step is also where a recorded signal is raised: no waiting for a long UMAP."""
    import signal

    import evalkit.interrupt

    e = create_embedder(method, EmbedConfig(tsne=TSNEConfig(n_iter=150), umap=UMAPConfig(n_epochs=40)))
    e.prepare()
    monkeypatch.setattr(evalkit.interrupt, "_pending", signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        e.fit_transform(X, graph=knn_graph(X, n_neighbors=90))
    assert [b.n for b in bars] == [0]  # stopped at the first step: 25 iterations or one epoch


def test_umap_kernels_compile_once_per_machine(tmp_path):
    """umap-learn's kernels, re-declared with numba's cache=True, load from the cache in a new
    process: the second process compiles none of them (umap-learn alone compiled ~9 s each time)."""
    import json
    import subprocess
    import sys

    script = tmp_path / "umap_compiles.py"
    script.write_text(
        "import json, sys\n"
        "import numpy as np\n"
        "from numba.core import event\n"
        "from evalkit.config import EmbedConfig, UMAPConfig\n"
        "from evalkit.embed import create_embedder\n"
        "compiled = []\n"
        "class Listener(event.Listener):\n"
        "    def on_start(self, ev): pass\n"
        "    def on_end(self, ev):\n"
        "        f = ev.data['dispatcher'].py_func\n"
        "        compiled.append(f.__module__ + '.' + f.__qualname__)\n"
        "X = np.random.default_rng(0).normal(size=(120, 5)).astype(np.float32)\n"
        "with event.install_listener('numba:compile', Listener()):\n"
        "    create_embedder('umap', EmbedConfig(umap=UMAPConfig(n_epochs=20))).fit_transform(X)\n"
        "print(json.dumps(sorted(set(c for c in compiled if c.startswith('umap.')))))\n")
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    from evalkit.embed import UMAP_KERNELS

    kernels = {f"{module}.{name}" for module, name in UMAP_KERNELS} - {"umap.layouts._nb_optimize_layout_euclidean_single_epoch"}
    kernels.add("umap.layouts._optimize_layout_euclidean_single_epoch")
    assert not kernels & set(runs[1]), runs[1]


def _small_sets():
    """Three small feature sets of the same samples (columns shuffled and scaled differently)."""
    rng = np.random.default_rng(5)
    return {f"m{i}": X[:, rng.permutation(X.shape[1])] * (1.0 + i) for i in range(3)}


def test_feature_sets_side_by_side_give_the_results_of_one_after_the_other(monkeypatch):
    """Small feature sets run in threads, one core each: the rows, coordinates and their order
    are those of the same sets run one after the other with every core."""
    import threading

    import evalkit.embed
    import evalkit.pipeline
    import evalkit.scoring
    from evalkit import evaluate

    monkeypatch.setattr(evalkit.embed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    seen = []
    original = evalkit.scoring.score_feature_set

    def spy(fs, *args, **kwargs):
        seen.append((fs.model, threading.current_thread().name, evalkit.embed.n_jobs()))
        return original(fs, *args, **kwargs)

    monkeypatch.setattr(evalkit.scoring, "score_feature_set", spy)
    settings = {"tsne": {"n_iter": 150}, "umap": {"n_epochs": 40}}
    runs = {}
    for below in (0, 10_000):  # one after the other; side by side
        monkeypatch.setattr(evalkit.pipeline, "SETS_SIDE_BY_SIDE_BELOW", below)
        seen.clear()
        runs[below] = evaluate(_small_sets(), Y, methods=["tsne", "umap", "pca"], method_settings=settings, pca_dims=8)
        threads = {name for _, name, _ in seen}
        if below:
            assert all(name.startswith("evalkit-set") for name in threads) and {c for *_, c in seen} == {1}
        else:
            assert threads == {"MainThread"} and {c for *_, c in seen} == {2}
    serial, pooled = runs[0], runs[10_000]
    assert [dict(r) for r in pooled.rows] == [dict(r) for r in serial.rows]
    assert [(e.model, e.method) for e in pooled.embeddings] == [(e.model, e.method) for e in serial.embeddings]
    for a, b in zip(serial.embeddings, pooled.embeddings):
        np.testing.assert_array_equal(a.coords, b.coords)
    assert pooled.method_params["tsne"]["n_jobs"] == 1  # t-SNE on its one core


def test_a_failing_feature_set_side_by_side_raises_its_own_error(monkeypatch):
    import evalkit.embed
    import evalkit.scoring
    from evalkit import evaluate

    monkeypatch.setattr(evalkit.embed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    original = evalkit.scoring.score_feature_set

    def second_breaks(fs, *args, **kwargs):
        if fs.model == "m1":
            raise EvalkitError("m1 broke")
        return original(fs, *args, **kwargs)

    monkeypatch.setattr(evalkit.scoring, "score_feature_set", second_breaks)
    with pytest.raises(EvalkitError, match="m1 broke"):
        evaluate(_small_sets(), Y, methods=["pca"])


def test_without_a_threadsafe_numba_layer_feature_sets_run_one_after_the_other(monkeypatch):
    """numba's workqueue layer aborts the process when two threads run its kernels at once."""
    import threading

    import numba

    import evalkit.embed
    import evalkit.scoring
    from evalkit import evaluate
    from evalkit.kernels import numba_threadsafe

    assert numba_threadsafe()  # this machine has OpenMP
    monkeypatch.setattr(numba.config, "THREADING_LAYER", "workqueue")
    assert not numba_threadsafe()
    monkeypatch.setattr(evalkit.embed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    threads = set()
    original = evalkit.scoring.score_feature_set

    def spy(fs, *args, **kwargs):
        threads.add(threading.current_thread().name)
        return original(fs, *args, **kwargs)

    monkeypatch.setattr(evalkit.scoring, "score_feature_set", spy)
    out = evaluate(_small_sets(), Y, methods=["umap", "pca"], method_settings={"umap": {"n_epochs": 20}})
    assert threads == {"MainThread"} and len(out.rows) == 9


def test_one_blas_thread_nests_across_threads():
    """Two holders whose spans overlap without nesting (A in, B in, A out, B out: two jobs'
    threads): the limit stays until the last one leaves (a plain threadpoolctl context would
    restore the previous limit at A's exit), then the previous limit comes back. Entered and
    left here, in one thread: OpenBLAS ignores limits set from a thread once others called it."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from evalkit.scoring import one_blas_thread

    def blas_threads():
        return sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")

    with threadpool_limits(limits=2, user_api="blas"):  # a limit to come back to, on any machine
        before = blas_threads()
        assert before and set(before) == {2}
        a, b = one_blas_thread(), one_blas_thread()
        a.__enter__()
        assert set(blas_threads()) == {1}
        b.__enter__()
        a.__exit__(None, None, None)
        assert set(blas_threads()) == {1}  # b still holds it
        b.__exit__(None, None, None)
        assert blas_threads() == before


def test_opentsne_fft_in_float32_is_far_below_the_interpolation_error():
    """openTSNE's FFT gradient with float32 scipy transforms: it moves the gradient by a
    small fraction of the interpolation's own error against the exact gradient."""
    from openTSNE import _tsne
    from openTSNE._matrix_mul import matrix_mul

    from evalkit.embed import opentsne_scipy_fft

    rng = np.random.default_rng(0)
    Y = np.ascontiguousarray(rng.normal(size=(3000, 2)) * [30.0, 20.0])  # a grid of ~180 boxes a side
    original = matrix_mul.np
    try:
        matrix_mul.np = np
        ref = np.zeros_like(Y)
        sum_ref = _tsne.estimate_negative_gradient_fft_2d(Y, ref)
        assert opentsne_scipy_fft() and opentsne_scipy_fft()  # idempotent
        assert matrix_mul.np.zeros is np.zeros  # the rest is numpy itself
        got = np.zeros_like(Y)
        sum_got = _tsne.estimate_negative_gradient_fft_2d(Y, got)
    finally:
        matrix_mul.np = original
    # the exact repulsion: -sum_j q_ij^2 (y_i - y_j) / Z, Z = sum_{i != j} q_ij
    diff = Y[:, None, :] - Y[None, :, :]
    q = 1.0 / (1.0 + (diff ** 2).sum(-1))
    np.fill_diagonal(q, 0.0)
    exact = -((q ** 2)[..., None] * diff).sum(1) / q.sum()
    interpolation = np.linalg.norm(ref - exact)
    assert interpolation < 0.05 * np.linalg.norm(exact)  # what openTSNE's float64 transforms give
    assert np.linalg.norm(got - ref) < 0.01 * interpolation
    assert sum_got == pytest.approx(sum_ref, rel=1e-5) and sum_ref == pytest.approx(q.sum(), rel=1e-2)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_opentsne_attraction_in_numba_gives_openTSNEs_forces(index_dtype):
    """The numba kernel behind openTSNE's attractive forces adds what openTSNE's own function
    adds (to rounding), on one thread and on two, for an embedding against itself and against
    a reference embedding; and what numpy's formula gives. The iterations that evaluate the KL
    divergence, other degrees of freedom and 3-D embeddings go to openTSNE's function."""
    import scipy.sparse as sp
    from openTSNE import _tsne as original
    import openTSNE.tsne as tsne_module

    from evalkit.embed import opentsne_numba_attraction

    assert opentsne_numba_attraction() and opentsne_numba_attraction()  # idempotent
    patched = tsne_module._tsne
    assert patched.estimate_positive_gradient_nn is not original.estimate_positive_gradient_nn
    assert patched.estimate_negative_gradient_bh is original.estimate_negative_gradient_bh  # the rest is openTSNE's
    rng = np.random.default_rng(3)
    n = 700
    P = sp.random(n, n, density=0.04, random_state=4, format="csr")
    P.indices, P.indptr = P.indices.astype(index_dtype), P.indptr.astype(index_dtype)
    Y = np.ascontiguousarray(rng.normal(size=(n, 2)) * 8.0)
    for ref in (Y, np.ascontiguousarray(rng.normal(size=(n, 2)) * 8.0)):
        diff = Y[P.tocoo().row] - ref[P.tocoo().col]
        forces = (P.tocoo().data / (1.0 + (diff ** 2).sum(1)))[:, None] * diff
        expected = np.zeros_like(Y)
        np.add.at(expected, P.tocoo().row, forces)
        for threads in (1, 2):
            start = rng.normal(size=(n, 2))  # the negative gradient is there first
            a, b = start.copy(), start.copy()
            assert patched.estimate_positive_gradient_nn(P.indices, P.indptr, P.data, Y, ref, a, 1,
                                                          num_threads=threads) == (0.0, 0.0)
            original.estimate_positive_gradient_nn(P.indices, P.indptr, P.data, Y, ref, b, 1, num_threads=threads)
            assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
            assert np.abs(a - start - expected).max() <= 1e-12 * np.abs(expected).max()
    # the rest is openTSNE's: the same numbers to the last bit
    Y3 = np.ascontiguousarray(rng.normal(size=(n, 3)))
    for emb, dof, evaluate in ((Y, 1, True), (Y, 0.5, False), (Y3, 1, False)):
        a, b = np.zeros_like(emb), np.zeros_like(emb)
        got = patched.estimate_positive_gradient_nn(P.indices, P.indptr, P.data, emb, emb, a, dof, num_threads=1,
                                                    should_eval_error=evaluate)
        want = original.estimate_positive_gradient_nn(P.indices, P.indptr, P.data, emb, emb, b, dof, num_threads=1,
                                                      should_eval_error=evaluate)
        assert got == want and np.array_equal(a, b)
        assert (got[0] > 0) == evaluate


@pytest.mark.parametrize("n, jobs", [(600, 1), (2_100, 2)])  # the serial kernel; the parallel one
def test_opentsne_exact_gradient_is_the_exact_gradient(n, jobs):
    """The gradient evalkit gives openTSNE below 10,000 points is t-SNE's exact gradient: what
    numpy's formula gives and what openTSNE's Barnes-Hut gives at theta = 0 (no cell stands
    for its points), with the same KL divergence; float32 sums keep it within 1e-5. An
    embedding against a reference embedding goes to openTSNE's Barnes-Hut unchanged."""
    import scipy.sparse as sp
    import openTSNE.tsne as tsne_module

    from evalkit.embed import opentsne_exact_gradient

    objective = opentsne_exact_gradient()
    assert objective is not None and opentsne_exact_gradient() is objective
    rng = np.random.default_rng(5)
    P = sp.random(n, n, density=0.02, random_state=6, format="csr")
    P = (P + P.T).tolil()
    P.setdiag(0.0)  # no self-affinity, as in t-SNE's
    P = P.tocsr()
    P.eliminate_zeros()
    P.data /= P.data.sum()
    Y = np.ascontiguousarray(rng.normal(size=(n, 2)) * 6.0)
    diff = Y[:, None, :] - Y[None, :, :]
    w = 1.0 / (1.0 + (diff ** 2).sum(-1))
    np.fill_diagonal(w, 0.0)
    z = w.sum()
    attraction = np.asarray((P.multiply(w)).sum(1)) * Y - P.multiply(w) @ Y
    expected = attraction - ((w ** 2)[..., None] * diff).sum(1) / z
    coo = P.tocoo()
    expected_kl = float((coo.data * np.log(coo.data / (w[coo.row, coo.col] / z))).sum())
    kl, grad = objective(Y, P, 1, bh_params={"theta": 0.5}, should_eval_error=True, n_jobs=jobs)
    assert np.abs(grad - expected).max() <= 1e-5 * np.abs(expected).max()
    assert kl == pytest.approx(expected_kl, rel=1e-6)
    bh_kl, bh_grad = tsne_module.kl_divergence_bh(Y, P, 1, {"theta": 0.0}, should_eval_error=True, n_jobs=1)
    assert np.abs(grad - bh_grad).max() <= 1e-5 * np.abs(bh_grad).max()
    assert kl == pytest.approx(bh_kl, rel=1e-6)
    # Barnes-Hut's own setting (theta 0.5) is further off than the float32 sums
    _, approx = tsne_module.kl_divergence_bh(Y, P, 1, {"theta": 0.5}, n_jobs=1)
    assert np.abs(approx - expected).max() > 10 * np.abs(grad - expected).max()
    _, quiet = objective(Y, P, 1, bh_params={"theta": 0.5}, n_jobs=jobs)
    assert np.abs(quiet - grad).max() <= 1e-12 * np.abs(grad).max()  # not evaluating the KL: the same forces
    ref = np.ascontiguousarray(rng.normal(size=(n, 2)))
    got = objective(Y, P, 1, bh_params={"theta": 0.5}, reference_embedding=ref, should_eval_error=True)
    want = tsne_module.kl_divergence_bh(Y, P, 1, {"theta": 0.5}, reference_embedding=ref, should_eval_error=True)
    assert got[0] == want[0] and np.array_equal(got[1], want[1])


def test_tsne_without_numba_keeps_barnes_hut_and_says_so(monkeypatch):
    """Where numba's kernels cannot load, t-SNE below 10,000 points runs openTSNE's Barnes-Hut,
    and its parameters say so."""
    from evalkit import embed, kernels

    monkeypatch.setattr(kernels, "_NUMBA_TRIED", True)
    monkeypatch.setattr(kernels, "_NUMBA_KERNELS", None)
    monkeypatch.setattr(embed, "_EXACT_REPULSION", None)
    e = create_embedder("tsne", EmbedConfig(tsne=TSNEConfig(n_iter=300)))
    assert e.params(1200)["gradient"] == "bh" and embed.opentsne_exact_gradient() is None
    import openTSNE.tsne as tsne_module

    calls = []
    barnes_hut = tsne_module.kl_divergence_bh
    monkeypatch.setattr(tsne_module, "kl_divergence_bh", lambda *a, **k: calls.append(1) or barnes_hut(*a, **k))
    X = np.random.default_rng(0).normal(size=(150, 5))
    Z = e.fit_transform(X, random_state=0)
    assert Z.shape == (150, 2) and np.isfinite(Z).all()
    assert len(calls) >= 300  # every iteration's gradient was Barnes-Hut's (and each phase's final KL)


def test_umap_notices_stay_hidden_when_fits_run_side_by_side():
    """umap-learn's two notices on every seeded fit from a given graph are filtered for good
    (``warnings.catch_warnings`` in two threads at once restored the filters under a running fit,
    and they reached the user); another umap-learn warning still shows."""
    import warnings

    from evalkit.embed import create_embedder

    create_embedder("umap", EmbedConfig()).prepare()
    with warnings.catch_warnings(record=True) as seen:
        for text in ("n_jobs value 1 overridden to 1 by setting random_state. Use no seed for parallelism.",
                     "precomputed_knn[2] (knn_search_index) is not an NNDescent object: transforming new data "
                     "with transform will be unavailable.", "something else"):
            warnings.warn_explicit(text, UserWarning, "umap_.py", 1, module="umap.umap_")
        warnings.warn_explicit("n_jobs value 1 overridden", UserWarning, "mine.py", 1, module="mine")
    assert [str(w.message) for w in seen] == ["something else", "n_jobs value 1 overridden"]


_FIT_IMPORTS_SCRIPT = r"""
import json, sys
import numpy as np
from evalkit.config import EmbedConfig
from evalkit.embed import create_embedder, reduce_dims
from evalkit.neighbors import knn_graph

rng = np.random.default_rng(0)
out = {}
for n in (300, 10_000):  # t-SNE's Barnes-Hut and FFT gradients
    X = (rng.normal(size=(n, 16)) + np.repeat(np.eye(16)[:4] * 6, n // 4, axis=0)).astype(np.float32)
    graph = knn_graph(X, n_neighbors=90)
    Xr = reduce_dims(X, 8)
    cfg = EmbedConfig.model_validate({"tsne": {"n_iter": 50}, "umap": {"n_epochs": 5}})
    for name in ("tsne", "umap", "pca"):
        embedder = create_embedder(name, cfg)
        embedder.prepare()
        before = set(sys.modules)
        embedder.fit_transform(Xr, random_state=0, graph=graph)
        out[f"{name}/{n}"] = sorted(set(sys.modules) - before)
print(json.dumps(out))
"""


def test_a_fit_imports_nothing_beyond_its_prepare(tmp_path):
    """Methods side by side import in their own job threads (``prepare()``, one thread at a
    time) while the costliest runs, and the report's modules are imported in the pool too: that
    is only safe if no fit imports a module of its own mid-run, where it could meet another
    thread importing the same package. Checked in a fresh process, both t-SNE gradients."""
    import json
    import subprocess

    script = tmp_path / "fit_imports.py"
    script.write_text(_FIT_IMPORTS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {f"{name}/{n}": [] for n in (300, 10_000) for name in ("tsne", "umap", "pca")}


def test_umap_fits_side_by_side_leave_the_warning_filters_as_they_were(monkeypatch):
    """Four UMAP seeds in a pool of two threads: every warning filter the process had is there
    after, and nothing more (a ``warnings.catch_warnings()`` per fit saved and restored the
    whole list; interleaved, they left a blanket "ignore" in the process: no warning shown
    again, in a notebook say)."""
    import warnings

    import evalkit.embed
    from evalkit.config import Config
    from evalkit.embed import quiet_notices
    from evalkit.results import FeatureSet
    from evalkit.scoring import score_feature_set

    monkeypatch.setattr(evalkit.embed, "n_jobs", lambda: 2)
    cfg = Config.model_validate({
        "name": "t", "data": {"kind": "digits"}, "models": [{"name": "m", "features": "x.npz"}],
        "embed": {"methods": ["umap", "pca"], "seeds": [0, 1, 2, 3], "umap": {"n_epochs": 100}}})
    with warnings.catch_warnings():  # this test's own changes stay here
        quiet_notices()
        before = list(warnings.filters)
        for _ in range(3):
            score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
            assert warnings.filters == before
        with pytest.warns(UserWarning, match="still shown"):
            warnings.warn("still shown", UserWarning)


def test_quiet_notices_adds_only_what_is_missing():
    """Once the filters are there, a fit's call changes nothing in the list (no rewrite from a
    thread); after a reset they come back."""
    import warnings

    from evalkit.embed import NOTICES, quiet_notices

    with warnings.catch_warnings():
        quiet_notices()
        before = list(warnings.filters)
        quiet_notices()
        assert len(warnings.filters) == len(before) and all(a is b for a, b in zip(warnings.filters, before))
        warnings.resetwarnings()
        quiet_notices()
        assert len(warnings.filters) == len(NOTICES)


_GRAPH_WINDOW_SCRIPT = r"""
import json, sys, threading, time
import numpy as np

events = []


def hook(event, args):
    if event == "import":  # a module loaded (not one already in sys.modules)
        events.append((time.perf_counter(), threading.current_thread().name, args[0]))


sys.addaudithook(hook)
import evalkit.embed
from evalkit import scoring
from evalkit.config import Config
from evalkit.results import FeatureSet

evalkit.embed.n_jobs = lambda: 2  # two cores or not, the imports run beside the graph
window = []
real = scoring._prepare_imports


def timed(*args):
    window.append(time.perf_counter())
    try:
        return real(*args)
    finally:
        window.append(time.perf_counter())


scoring._prepare_imports = timed
rng = np.random.default_rng(0)
n_features = int(sys.argv[1])
X = (rng.normal(size=(1200, n_features)) + np.repeat(np.eye(n_features)[:4] * 6, 300, axis=0)).astype(np.float32)
y = np.repeat(np.arange(4), 300)
cfg = Config.model_validate({"name": "t", "data": {"kind": "digits"}, "models": [{"name": "m", "features": "x.npz"}],
                             "embed": {"methods": ["tsne", "umap", "pca"], "tsne": {"n_iter": 50},
                                       "umap": {"n_epochs": 5}}})
scoring.score_feature_set(FeatureSet("m", "l", X), y, embed=cfg.embed, settings=cfg.metrics)
start, end = window
print(json.dumps({"main": [m for t, name, m in events if name == "MainThread" and start <= t <= end],
                  "beside": sorted({m.split(".")[0] for t, name, m in events if name.startswith("evalkit-prepare")})}))
"""


@pytest.mark.parametrize("n_features", [32, 4])  # the float32 blocked search; the k-d tree
def test_the_graph_imports_nothing_while_the_methods_import_beside_it(tmp_path, n_features):
    """The methods' imports run in a thread of their own while the neighbour graph is searched.
    That is only safe if the graph's thread imports nothing meanwhile (two threads importing
    one package at once can see it half made): checked in a fresh process with an audit hook
    that records every module loaded, and by which thread."""
    import json
    import subprocess

    script = tmp_path / "graph_window.py"
    script.write_text(_GRAPH_WINDOW_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(n_features)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["main"] == []
    assert {"sklearn", "openTSNE", "umap"} <= set(out["beside"])


def test_a_failed_search_reports_its_own_error_not_the_imports_beside_it(monkeypatch):
    """The graph's error is the one raised, once the imports beside it are done; with a graph
    found, the imports' own error is raised."""
    import time

    import evalkit.embed
    import evalkit.neighbors
    from evalkit import scoring
    from evalkit.config import Config
    from evalkit.errors import InputError
    from evalkit.results import FeatureSet

    waited = []

    def imports(*args):
        time.sleep(0.2)
        waited.append(True)
        raise ImportError("beside")

    def search(*args, **kwargs):
        raise InputError("the search failed")

    monkeypatch.setattr(evalkit.embed, "n_jobs", lambda: 2)
    monkeypatch.setattr(scoring, "_prepare_imports", imports)
    cfg = Config.model_validate({"name": "t", "data": {"kind": "digits"}, "models": [{"name": "m", "features": "x.npz"}],
                                 "embed": {"methods": ["pca"]}})
    with monkeypatch.context() as m:
        m.setattr(evalkit.neighbors, "knn_graphs", search)
        with pytest.raises(InputError, match="the search failed"):
            scoring.score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
    assert waited == [True]
    with pytest.raises(ImportError, match="beside"):
        scoring.score_feature_set(FeatureSet("m", "l", X), Y, embed=cfg.embed, settings=cfg.metrics)
