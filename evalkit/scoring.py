"""Embed and score one feature set: every registered method x seed, every registered score.

:func:`score_feature_set` is the loop the API and ``evalkit report`` share. It computes one
k-nearest-neighbour graph of the raw features (shared by t-SNE, UMAP and the scores), runs each
method of :data:`evalkit.registry.METHODS` for each seed, then asks each score of
:data:`evalkit.registry.METRICS` for its value in each space it applies to. A score sees a
:class:`Space`: the coordinates, the labels, exact neighbour graphs of that space (computed once
and cached), and :meth:`Space.neighbourhood`, which runs the one blocked pass over the raw
features that gives trustworthiness and continuity of every embedding and seed at once.
"""
from __future__ import annotations

import functools
import importlib
import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from evalkit.interrupt import check_interrupted
from evalkit.kernels import one_blas_thread
from evalkit.registry import FEATURES, metrics, methods
from evalkit.results import Curve, Embedding, FeatureSet, ScoreRow


@dataclass(frozen=True)
class FeatureSetScores:
    """What :func:`score_feature_set` returns for one feature set."""

    rows: tuple  # of ScoreRow: the raw features first, then one per method
    embeddings: tuple  # of Embedding, every method x seed
    per_class_knn: tuple  # kNN accuracy of each class on the raw features (None where undefined)
    knn_predictions: Optional[np.ndarray]  # (n_samples,) leave-one-out kNN prediction on the raw features
    per_class_knn_interval: tuple  # its 95% Wilson interval per class, (lo, hi) or None
    method_params: dict  # method -> the hyperparameters it used
    stability: dict  # "model/layer/method" -> mean Procrustes disparity across seeds
    rnx_curves: dict  # "model/layer/method" -> Curve: R_NX(K), mean over seeds
    point_scores: dict  # "model/layer/method" -> {"trustworthiness": (n,), "continuity": (n,)}, first seed
    notes: tuple
    undefined_reasons: dict  # score -> why it is undefined for these data


class _Shared:
    """What the spaces of one feature set share: the raw features, their graph, the embeddings,
    and results computed once for all of them."""

    def __init__(self, X, labels, settings, device, graph, embeddings: dict):
        self.X, self.labels, self.settings, self.device = X, labels, settings, device
        self.graph = graph
        self.cosine_graph = None  # the raw features' exact cosine neighbours, when the graph's pass gave them
        self.embeddings = embeddings  # "method/seed" -> coords
        self.n_classes = int(np.unique(labels).size)
        self.cache: dict = {}
        self.notes: list = []

    def once(self, key, compute: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def neighbourhood(self, k: int) -> dict:
        """:func:`evalkit.score.neighbourhood_scores` of every embedding, R_NX included."""
        from evalkit.score import neighbourhood_scores, rnx_sample

        def one_pass():
            exact = self.graph if self.graph.exact and self.graph.n_neighbors >= k else None
            found: list = []
            rows = rnx_sample(len(self.X), self.settings.rnx_max_samples)
            if rows is not None:
                note = (f"rnx_auc and the R_NX curves: co-ranking counts of a seeded uniform sample of {len(rows):,} of "
                        f"{len(self.X):,} points, each ranked against all (metrics.rnx_max_samples); "
                        f"trustworthiness and continuity use every point")
                if note not in self.notes:
                    self.notes.append(note)
            # the raw features' silhouette from the same blocks (on its stratified sample, as on its own)
            sil = {"labels": self.labels, "rows": self.silhouette_rows()} if self.n_classes > 1 else None
            out = neighbourhood_scores(self.X, self.embeddings, n_neighbors=k, graph_X=exact, device=self.device,
                                       rnx_max_k=self.settings.rnx_max_k, per_point=True, knn_out=found,
                                       rnx_rows=rows, silhouette_out=sil)
            if found:  # the exact neighbours of the raw features, from the same pass
                self.cache["exact_X"] = found[0]
            if sil is not None and "value" in sil:
                self.cache["features_silhouette"] = sil["value"]
            return out

        return self.once("neighbourhood", one_pass)

    def silhouette_rows(self) -> Optional[np.ndarray]:
        """The samples the raw features' silhouette is computed on: None (all) up to
        ``metrics.silhouette_max_samples``, else the seeded stratified sample
        :func:`evalkit.score.silhouette` draws."""
        from evalkit.data import stratified_subsample

        cap = self.settings.silhouette_max_samples
        return stratified_subsample(self.labels, int(cap), seed=0) if cap and len(self.X) > cap else None

    def features_silhouette(self) -> Optional[float]:
        """The raw features' silhouette from the embeddings' neighbourhood pass (run now if it
        has not run yet), or None when there are no embeddings to run it."""
        if not self.embeddings:
            return None
        self.neighbourhood(int(self.settings.n_neighbors))
        return self.cache.get("features_silhouette")

    def rnx_curve(self, method: str, seeds) -> Optional[Curve]:
        """R_NX of one method at log-spaced K, averaged over seeds (None before the pass ran)."""
        done = self.cache.get("neighbourhood")
        if not done:
            return None
        grids = [done[f"{method}/{seed}"]["rnx"].grid() for seed in seeds]
        return Curve(grids[0][0], np.mean([r for _, r in grids], axis=0))


@dataclass
class Space:
    """One space a score is computed in: the raw features (``method == "features"``) or one
    embedding (one method, one seed) of one feature set.

    Attributes
    ----------
    method : str
    seed : int or None
    coords : ndarray of shape (n_samples, n_dims)
        The space itself: the raw features, or the 2-D embedding.
    """

    method: str
    seed: Optional[int]
    coords: np.ndarray
    _shared: _Shared = field(repr=False)

    @property
    def features(self) -> np.ndarray:
        """The raw features (n_samples, n_features) of this feature set."""
        return self._shared.X

    @property
    def labels(self) -> np.ndarray:
        return self._shared.labels

    @property
    def n_samples(self) -> int:
        return int(self.coords.shape[0])

    @property
    def n_classes(self) -> int:
        return self._shared.n_classes

    @property
    def settings(self):
        """The ``metrics:`` settings (:class:`evalkit.config.MetricsConfig`)."""
        return self._shared.settings

    @property
    def device(self):
        return self._shared.device

    @property
    def k(self) -> int:
        """``metrics.n_neighbors``: the k of the neighbourhood scores."""
        return int(self.settings.n_neighbors)

    @property
    def knn_k(self) -> int:
        """``metrics.knn_k`` (``n_neighbors`` when unset): the k of kNN accuracy."""
        return int(self.settings.knn_k or self.settings.n_neighbors)

    @property
    def key(self) -> str:
        return FEATURES if self.method == FEATURES else f"{self.method}/{self.seed}"

    def note(self, text: str) -> None:
        """A note for the report (shown once however many spaces add it)."""
        if text not in self._shared.notes:
            self._shared.notes.append(text)

    def once(self, key, compute: Callable[[], Any]):
        """``compute()`` once per feature set, shared by every space and score."""
        return self._shared.once(key, compute)

    def graph(self, n_neighbors: int):
        """Neighbours of every sample in this space (self excluded, nearest first).

        For the raw features this is the feature set's shared graph (approximate above
        :data:`evalkit.neighbors.EXACT_MAX_SAMPLES` on CPU, like the graph t-SNE and UMAP use);
        in an embedding it is exact, computed once.
        """
        from evalkit.neighbors import knn_graph

        shared = self._shared
        if self.method == FEATURES:
            if shared.graph.exact and shared.graph.n_neighbors >= n_neighbors:
                return shared.graph.head(n_neighbors)
            # the shared graph is approximate (large N): the scores take exact neighbours, those the
            # neighbourhood pass found when it ran, else a search of their own
            found = shared.cache.get("exact_X")
            if found is not None and found.n_neighbors >= n_neighbors:
                return found.head(n_neighbors)
        graph = shared.cache.get(("graph", self.key))
        if graph is None or graph.n_neighbors < n_neighbors:
            graph = knn_graph(self.coords, n_neighbors=n_neighbors, method="exact", device=self.device)
            shared.cache[("graph", self.key)] = graph
        return graph.head(n_neighbors)

    def features_silhouette(self) -> Optional[float]:
        """The raw features' silhouette read from the neighbourhood pass over their distances
        (what :func:`evalkit.score.silhouette` gives on the same sample, ``metrics.
        silhouette_max_samples``), or None where no pass runs (no embeddings)."""
        return self._shared.features_silhouette() if self.method == FEATURES else None

    def cosine_graph(self, n_neighbors: int):
        """The raw features' exact cosine neighbours (the neighbours of the L2-normalised rows)
        from the pass that found the shared graph, or None where that pass did not give them
        (the score then searches them itself)."""
        found = self._shared.cosine_graph if self.method == FEATURES else None
        return found.head(n_neighbors) if found is not None and found.n_neighbors >= n_neighbors else None

    def neighbourhood(self, name: str):
        """``trustworthiness``, ``continuity``, ``rnx_auc`` or ``rnx`` (the
        :class:`~evalkit.score.RNXCurve`) of this embedding, from the one pass over the raw
        features' distances that serves every embedding and seed of the feature set."""
        return self._shared.neighbourhood(self.k)[self.key][name]


def score_feature_set(fs: FeatureSet, labels, *, embed, settings, device=None, log=None) -> FeatureSetScores:
    """Embed one feature set with every method and seed of ``embed`` and score every space.

    Parameters
    ----------
    fs : FeatureSet
        Features of shape (n_samples, n_features).
    labels : ndarray of shape (n_samples,), int64
    embed : evalkit.config.EmbedConfig
        Methods, seeds, ``pca_dims`` and each method's settings (already fitted to the data size).
    settings : evalkit.config.MetricsConfig
    device : torch.device, optional
        Where neighbour graphs and scores are computed.
    log : callable, optional
        Receives one line per finished method.
    """
    from evalkit.embed import create_embedder, reduce_dims, unit_scale
    from evalkit.neighbors import knn_graphs
    from evalkit.score import knn_predict, per_class_knn_accuracy, wilson_interval

    notes: list = []
    # Every score and embedding is the same for c * X as for X; float32 arithmetic is not. A
    # power of two is exact, so features of extreme magnitude are divided by one first.
    X, factor = unit_scale(fs.features)
    if factor != 1.0:
        notes.append(f"{fs.key}: features of magnitude ~{factor:.3g} divided by {factor:.3g} before scoring and "
                     f"embedding (every score is scale-invariant; float32 arithmetic is not)")
    n = X.shape[0]
    k = settings.n_neighbors
    knn_k = settings.knn_k or k
    specs = [methods().get(name) for name in embed.methods]
    embedders = {spec.name: create_embedder(spec.name, embed) for spec in specs}
    # One graph of the raw features serves the scores, t-SNE (3 x perplexity neighbours) and UMAP
    # (n_neighbors - 1 besides the point itself): neither searches its own.
    graph_k = min(n - 1, max(k, knn_k, settings.weighted_knn_k, *(e.graph_neighbors(n) for e in embedders.values())))
    # The weighted kNN score votes with the cosine neighbours: on CPU the exact search finds them
    # in the same pass as the euclidean graph (one matmul for both).
    cosine_k = min(n - 1, settings.weighted_knn_k) if any(m.name == "weighted_knn_accuracy" for m in metrics()) else 0
    t_graph = time.perf_counter()
    imports = _prepare_beside_graph(specs, embedders, X.shape, device)
    try:
        graph, cosine = knn_graphs(X, n_neighbors=graph_k, cosine_neighbors=cosine_k, device=device, beside=imports)
    except BaseException:
        if imports is not None:
            imports.exception()  # wait for it; the search's error is the one to report
        raise
    if imports is not None:
        imports.result()  # its error, if any, is raised here
    if log:
        also = f"; cosine k = {cosine_k} from the same pass" if cosine is not None else ""
        log(f"    {fs.key}: neighbour graph (k = {graph_k}, {graph.method}{also}) in "
            f"{time.perf_counter() - t_graph:.1f} s")
    check_interrupted()
    Xr = _embedding_input(X, fs.key, embed.pca_dims, notes, reduce_dims)
    constant = bool(n and np.ptp(X, axis=0).max() == 0)
    if constant:
        notes.append(f"{fs.key}: all {n} samples have identical features, so every embedding places them at one "
                     f"point (t-SNE and UMAP are not defined for such data)")

    coords: dict = {}
    shared = _Shared(X, labels, settings, device, graph, coords)
    shared.cosine_graph = cosine
    undefined: dict = {}
    feature_space = Space(FEATURES, None, X, shared)
    prepared = {spec.name for spec in specs} if imports is not None else set()  # beside the graph
    embeddings, found, method_params = _embed_all(fs, specs, embedders, embed, X, Xr, graph, constant, log,
                                                  prepared)
    coords.update(found)
    t_scores = time.perf_counter()
    # The embeddings first: their neighbourhood pass over the raw features' distances also gives
    # the raw features' silhouette and, above the exact graph's limit, their exact neighbours. The
    # raw features' other scores read the shared graph and the cosine neighbours of its pass.
    rows = []
    stability, rnx_curves = {}, {}
    for spec in specs:
        spaces = [Space(spec.name, seed, coords[f"{spec.name}/{seed}"], shared) for seed in embed.seeds]
        rows.append(_row(fs, spec.name, spaces, undefined))
        curve = shared.rnx_curve(spec.name, embed.seeds)
        if curve is not None:
            rnx_curves[f"{fs.key}/{spec.name}"] = curve
        if len(spaces) > 1:
            stability[f"{fs.key}/{spec.name}"] = procrustes_disparity([s.coords for s in spaces])
        check_interrupted()
    rows.insert(0, _row(fs, FEATURES, [feature_space], undefined, info={"n_features": int(X.shape[1])}))
    if log:
        log(f"    {fs.key}: scores in {time.perf_counter() - t_scores:.1f} s")
    per_class = per_class_knn_accuracy(X, labels, n_neighbors=knn_k, graph=feature_space.graph(knn_k), device=device)
    predictions = (knn_predict(X, labels, n_neighbors=knn_k, graph=feature_space.graph(knn_k))
                   if shared.n_classes > 1 else None)
    sizes = np.bincount(labels, minlength=len(per_class))
    return FeatureSetScores(
        rows=tuple(rows), embeddings=tuple(embeddings),
        per_class_knn=tuple(None if not np.isfinite(v) else float(v) for v in per_class),
        knn_predictions=predictions,
        per_class_knn_interval=tuple(None if not np.isfinite(v) else wilson_interval(float(v), int(size))
                                     for v, size in zip(per_class, sizes)),
        method_params=method_params, stability=stability, rnx_curves=rnx_curves, notes=tuple(notes + shared.notes),
        point_scores=_point_scores(shared, fs.key, specs, embed.seeds),
        undefined_reasons=undefined)


def _embed_all(fs: FeatureSet, specs, embedders: dict, embed, X, Xr, graph, constant: bool, log,
               prepared: set = frozenset()):
    """Every method x seed of one feature set, run side by side on a pool of threads.

    Why threads: openTSNE's FFT gradient keeps about one core busy whatever its ``n_jobs``
    (measured at 20,000 points on 2 cores: 11.9 s wall, 11.7 s CPU), UMAP with a seed runs
    on one thread, and both release Python's lock in their numeric loops (umap-learn's
    kernels through :func:`evalkit.embed.cache_umap_kernels`). Side by side they took 18.7 s
    where one after the other took 30.4 s, with identical coordinates. The longest jobs
    start first (by the registry's ``Method.cost``: UMAP, then t-SNE, then the rest, in the
    registry's order), and every job after the first runs at a lower priority
    (:func:`lower_thread_priority`), so it fills the cycles the costliest leaves idle instead of
    slowing it. A method that ignores the seed runs once.

    ``prepared``: the methods whose imports are done (:func:`_prepare_beside_graph`).

    Returns (list of Embedding in method, seed order; {"method/seed": coords}; {method: params}).
    """
    from evalkit.embed import n_jobs, quiet_notices
    from evalkit.kernels import numba_threadsafe

    n = X.shape[0]
    method_params, jobs = {}, []  # (spec, seed)
    for spec in specs:
        params = dict(embedders[spec.name].params(n, graph))
        if spec.input == "reduced" and X.shape[1] > embed.pca_dims:
            params["input"] = f"neighbours of the raw features, start from PCA to {embed.pca_dims} dims"
        method_params[spec.name] = params
        jobs.extend((spec, seed) for seed in (embed.seeds if spec.seeded else embed.seeds[:1]))

    def run(spec, seed):
        t0 = time.perf_counter()
        if constant:
            Z = np.zeros((n, 2), dtype=np.float32)
        else:
            Z = embedders[spec.name].fit_transform(X if spec.input == "raw" else Xr, random_state=seed, graph=graph)
        return Z, time.perf_counter() - t0

    done: dict = {}  # (method, seed) -> (Z, seconds)
    order = sorted(jobs, key=lambda job: job[0].cost, reverse=True)
    side_by_side = len(jobs) > 1 and n_jobs() > 1
    if side_by_side:
        # The costliest method's imports here, before its job starts. The others import in
        # their own jobs, at low priority while it runs.
        if order[0][0].name not in prepared:
            _prepare([order[0][0]], embedders)
        quiet_notices()  # permanent filters before any thread saves and restores the list
        side_by_side = numba_threadsafe()
    if not side_by_side:
        for spec, seed in jobs:
            done[spec.name, seed] = run(spec, seed)
            check_interrupted()  # between seeds and methods: a recorded Ctrl-C ends the run here
            _log_method_done(fs, spec, embed, done, log)
    else:
        prepared = set(prepared) | {order[0][0].name}

        def run_beside(i, spec, seed):
            if i > 0:
                lower_thread_priority()
                with _IMPORT_LOCK:  # one thread imports at a time: two can see a package half made
                    if spec.name not in prepared:
                        _prepare([spec], embedders)
                        prepared.add(spec.name)
            return run(spec, seed)

        calls = [functools.partial(run_beside, i, spec, seed) for i, (spec, seed) in enumerate(order)]
        calls.append(_import_report_modules)  # last, in the cycles the costliest job leaves
        for i, result in side_by_side_jobs(calls, min(n_jobs(), len(calls)), name="evalkit-embed"):
            if i < len(order):
                spec, seed = order[i]
                done[spec.name, seed] = result
                _log_method_done(fs, spec, embed, done, log)
    embeddings, coords = [], {}
    for spec in specs:
        for seed in embed.seeds:
            Z, seconds = done.get((spec.name, seed)) or done[spec.name, embed.seeds[0]]
            embeddings.append(Embedding(fs.model, fs.layer, spec.name, seed, Z, method_params[spec.name], seconds))
            coords[f"{spec.name}/{seed}"] = Z
    return embeddings, coords, method_params


#: How much :func:`lower_thread_priority` raises a thread's niceness (Linux; 19 at most): at
#: +10 it gets about a tenth of a core it contends for, and every idle cycle.
BESIDE_NICENESS = 10
_LOWERED = threading.local()


def lower_thread_priority() -> bool:
    """Lower the calling thread's CPU priority (Linux: its niceness + :data:`BESIDE_NICENESS`,
    this thread only; the threads it starts inherit it). Returns whether it did.

    For the jobs that run beside the costliest one, so that it runs almost as if alone and
    they fill the cycles it leaves. First measured with t-SNE as the longest job (openTSNE's
    FFT gradient is serial between its parallel parts, about 1.2 of 2 cores busy; UMAP beside
    it at equal priority took a core from those parts, whose threads then waited for each
    other), 10,000 x 256 report on a noisy 2-core machine, alternating runs: wall time / CPU
    time 0.59-0.65 at nice 10 (4 runs), 0.58-0.67 at nice 19 (5 runs), 0.61-0.75 at equal
    priority (7 runs); 70,000 x 256, one pair: t-SNE and UMAP done after 75.5 s instead of
    94.3 s. Since t-SNE got faster, UMAP (one thread, the seed) is the longest and goes first:
    the same report, 4 alternating pairs, 26.4 / 26.5 / 29.4 / 27.7 s against 27.8 / 28.5 /
    31.5 / 29.7 s with t-SNE first. Nice is relative within the process's scheduling group
    (autogroup, container cgroup), so this does not hand the cores to other programs. A thread
    cannot raise its priority back without privileges, so the pool's threads end with the jobs.
    Elsewhere (macOS, Windows) nothing changes.
    """
    if not sys.platform.startswith("linux") or not hasattr(threading, "get_native_id"):
        return False
    if getattr(_LOWERED, "done", False):  # once per thread: a pool thread runs several jobs
        return True
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + BESIDE_NICENESS))
    except (OSError, AttributeError):
        return False
    _LOWERED.done = True
    return True


_IMPORT_LOCK = threading.Lock()
#: What the report's images import (:mod:`evalkit.plots`: matplotlib's object API, no pyplot,
#: so no backend or global state is chosen): 0.45 s at the end of a run otherwise.
REPORT_MODULES = ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg",
                  "matplotlib.collections", "matplotlib.colors", "evalkit.plots")


def _import_report_modules() -> None:
    """Import :data:`REPORT_MODULES` in this job thread, at low priority, one importing thread
    at a time (the main thread waits for the pool and imports nothing meanwhile)."""
    if all(m in sys.modules for m in REPORT_MODULES):
        return
    lower_thread_priority()
    with _IMPORT_LOCK:
        for module in REPORT_MODULES:
            importlib.import_module(module)


def prepare(embed, n_samples: int, n_features: int) -> None:
    """Import in this thread what scoring a feature set of this shape uses, and load numba's
    kernels if it will: for feature sets scored side by side in threads (two threads importing
    one package at once can see it half made: "partially initialized module")."""
    from evalkit.embed import create_embedder
    from evalkit.kernels import numba_kernels

    specs = [methods().get(name) for name in embed.methods]
    _prepare(specs, {spec.name: create_embedder(spec.name, embed) for spec in specs})
    for module in ("evalkit.neighbors", "evalkit.score", "scipy.spatial", "sklearn.decomposition"):
        importlib.import_module(module)
    numba_kernels(n_samples, n_features)


def _prepare_beside_graph(specs, embedders: dict, shape: tuple, device):
    """Start importing what the methods use (:func:`_prepare` of each, and scikit-learn's PCA
    for their input) in a thread of its own while this thread searches the neighbour graph;
    returns its future, or None on one core or off the CPU.

    At 10,000 x 256 these imports (scikit-learn, openTSNE, umap-learn and its numba kernels)
    take about 1.4 s of one core, and t-SNE and UMAP can start only after them; the graph's
    pass leaves part of the second core idle. This thread first imports what that search
    will import (:func:`evalkit.neighbors.prepare_search`), so that only the other thread
    imports until the graph is found: two threads importing one package at once can see it
    half made ("partially initialized module"). Measured at 30,000 x 256 (alternating runs):
    the graph took 7.0-7.2 s beside the imports, 6.3-6.8 s alone, and the imports 1.4 s
    after it. On a GPU the search is short and torch may import as it runs: nothing beside.
    """
    from evalkit.device import resolve_device
    from evalkit.embed import n_jobs
    from evalkit.neighbors import prepare_search

    dev = resolve_device(device)
    if n_jobs() < 2 or dev.type != "cpu":
        return None
    from concurrent.futures import ThreadPoolExecutor

    prepare_search(*shape, device=dev)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evalkit-prepare")
    try:
        return pool.submit(_prepare_imports, specs, embedders)
    finally:
        pool.shutdown(wait=False)  # the thread ends with its one job


def _prepare_imports(specs, embedders: dict) -> None:
    with _IMPORT_LOCK:
        importlib.import_module("sklearn.decomposition")  # the methods' PCA input (reduce_dims)
        _prepare(specs, embedders)


def _prepare(specs, embedders: dict) -> None:
    for spec in specs:
        for module in spec.requires:
            importlib.import_module(module)
        ready = getattr(embedders[spec.name], "prepare", None)
        if ready is not None:
            ready()


def side_by_side_jobs(calls, workers: int, *, name: str):
    """Run ``calls`` (callables of no argument) on ``workers`` threads, BLAS on one thread
    (:func:`one_blas_thread`); yield ``(index, result)`` as each finishes. The first error is
    raised here (the jobs not started are cancelled), and a recorded Ctrl-C or SIGTERM is
    checked every half second (the running jobs stop at their own next check)."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        futures = {pool.submit(call): i for i, call in enumerate(calls)}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
                for future in finished:
                    yield futures[future], future.result()  # a job's error is raised here
                check_interrupted()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _log_method_done(fs, spec, embed, done: dict, log) -> None:
    """One line when the last seed of a method is done."""
    seeds = embed.seeds if spec.seeded else embed.seeds[:1]
    if log and all((spec.name, seed) in done for seed in seeds):
        seconds = sum(done[spec.name, seed][1] for seed in seeds)
        log(f"    {fs.key}: {spec.title} in {seconds:.1f} s")


def _point_scores(shared: _Shared, key: str, specs, seeds) -> dict:
    """Each point's share of trustworthiness and continuity in each method's first-seed embedding,
    when the scoring pass ran (it did whenever those scores are registered and defined)."""
    done = shared.cache.get("neighbourhood")
    if not done:
        return {}
    out = {}
    for spec in specs:
        entry = done.get(f"{spec.name}/{seeds[0]}") or {}
        if "trustworthiness_points" in entry:
            out[f"{key}/{spec.name}"] = {"trustworthiness": entry["trustworthiness_points"],
                                         "continuity": entry["continuity_points"]}
    return out


def _row(fs: FeatureSet, method: str, spaces: list, undefined: dict, info=None) -> ScoreRow:
    """Every score that applies to ``method``, averaged over the seeds' spaces."""
    scores, stds, bounds = {}, {}, {}
    first = spaces[0]
    for metric in metrics():
        if not metric.applies_to(method):
            continue
        if metric.needs_classes and first.n_classes < 2:
            undefined.setdefault(metric.name, "not defined for a single class")
            values = [None]
        elif metric.needs_class_pairs and first.n_classes >= first.n_samples:
            undefined.setdefault(metric.name, "every class has a single sample: no neighbour can share its class")
            values = [None]
        else:
            values = [metric.compute(space) for space in spaces]
        mean, std = _mean_std(values)
        scores[metric.name] = mean
        if len(spaces) > 1:
            stds[metric.name] = std
        if metric.interval is not None and mean is not None:
            bounds[metric.name] = metric.interval(mean, first.n_samples)
    return ScoreRow(fs.model, fs.layer, method, scores, stds, dict(info or {}), bounds)


def _embedding_input(X: np.ndarray, key: str, pca_dims: int, notes: list, reduce_dims) -> np.ndarray:
    """The input of the "reduced" methods: PCA to ``pca_dims``, at unit scale, at least 2 columns.

    t-SNE and UMAP take their neighbours from the graph of the raw features (the space the
    neighbourhood scores judge them in); the reduced features only give t-SNE its PCA start and
    UMAP the centroids of disconnected components.
    """
    Xr = reduce_dims(X, pca_dims)
    if Xr.shape[1] == 1:
        # t-SNE and UMAP initialise from two principal components; a zero second column changes
        # no distance, so the embedding is that of the single feature.
        Xr = np.hstack([Xr, np.zeros_like(Xr)])
    scale = float(np.sqrt(np.mean(np.square(Xr - Xr.mean(axis=0), dtype=np.float64))))
    if scale > 0 and not 1e-4 <= scale <= 1e4:
        # Neither t-SNE nor UMAP depends on the scale of the data; their numerics do (openTSNE's
        # PCA start divides by a std of ~0). The graph's distances are rescaled in evalkit.embed.
        Xr = ((Xr - Xr.mean(axis=0)) / scale).astype(np.float32)
        notes.append(f"{key}: features of scale {scale:.3g} are rescaled to unit scale before t-SNE and "
                     f"UMAP (neither depends on the scale; their numerics do)")
    return Xr


def _mean_std(values):
    vals = [float(v) for v in values if v is not None and np.isfinite(v)]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals)) if len(vals) > 1 else None)


def procrustes_disparity(coords) -> float | None:
    """Mean Procrustes disparity over pairs of seeds (0 = identical up to rotation, scale, shift)."""
    from scipy.spatial import procrustes

    pairs = list(itertools.combinations(coords, 2))
    if not pairs:
        return None
    out = []
    for a, b in pairs:
        try:
            out.append(procrustes(a.astype(np.float64), b.astype(np.float64))[2])
        except ValueError:  # a degenerate (constant) embedding
            out.append(float("nan"))
    return float(np.nanmean(out)) if np.isfinite(out).any() else None
