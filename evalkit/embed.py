"""2-D embeddings behind one small interface: t-SNE (openTSNE or scikit-learn), UMAP, PCA.

``create_embedder(method, embed_config)`` returns an object (built by the method's entry in
:data:`evalkit.registry.METHODS`, registered at the bottom of this module) with

- ``fit_transform(X, *, random_state=0, graph=None) -> ndarray (n_samples, 2) float32``;
- ``graph_neighbors(n_samples) -> int``: how many neighbours per sample it takes from a
  shared :class:`evalkit.neighbors.KNNGraph` (0: it uses none);
- ``params(n_samples=None, graph=None) -> dict``: the hyperparameters it uses for that many
  samples and that graph (shown in the report), resolved ("auto" becomes a number).

With a ``graph`` (self excluded, nearest first, at least ``graph_neighbors(n)`` columns)
t-SNE builds its perplexity affinities and UMAP its fuzzy graph from those neighbours
instead of searching their own: the pipeline computes one graph per feature set and shares
it with the neighbourhood metrics. Without one, each library searches neighbours in ``X``.
Every backend passes the same contract tests (tests/test_embed.py).

openTSNE, umap-learn and scikit-learn are imported inside the methods that use them.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Optional

import numpy as np

from typing import Literal, Union

from pydantic import Field, field_validator

from evalkit.errors import EvalkitError
from evalkit.progress import inner_loop, step
from evalkit.registry import METHODS, Method, StrictModel

__all__ = ["create_embedder", "reduce_dims", "unit_scale", "TSNE_BACKENDS", "n_jobs", "cores_share",
           "opentsne_scipy_fft", "opentsne_numba_attraction", "opentsne_exact_gradient", "PCAConfig",
           "TSNEConfig", "UMAPConfig", "PaCMAPConfig", "PCAEmbedder", "TSNEEmbedder", "UMAPEmbedder",
           "PaCMAPEmbedder"]

#: openTSNE's "auto" switches from Barnes-Hut to FFT-interpolated gradients at this size;
#: below it evalkit gives openTSNE the exact gradient instead of Barnes-Hut's
#: (:func:`opentsne_exact_gradient`: faster at every size below this one).
OPENTSNE_FFT_MIN_SAMPLES = 10_000
#: Below this many points, ``n_jobs: -1`` runs t-SNE on one thread: an iteration is too little
#: work to share. Measured on a busy 2-core machine (openTSNE, PCA-50 input, 750 iterations):
#: 1,000 points 4-6 s on one thread vs 16-17 s on two; 10,000 points 45 s vs 50 s. Two
#: threads idling in OpenMP's spin-wait steal the cores they wait for. With the exact gradient
#: (:func:`opentsne_exact_gradient`) and ``OMP_WAIT_POLICY=PASSIVE`` (which the command line
#: sets), 899 digits: 0.69-0.76 s on one thread, 0.71-0.73 s on two for 0.95-0.99 CPU-s
#: against 0.88-0.94: one thread, which leaves the other core to the set beside it.
TSNE_SERIAL_BELOW = 2_000
#: scikit-learn runs its early-exaggeration phase for this many iterations, always.
SKLEARN_EARLY_ITER = 250
TSNE_BACKENDS = ("opentsne", "sklearn")
#: openTSNE calls back (progress, Ctrl-C) every this many iterations.
TSNE_CALLBACK_EVERY = 25


_SHARE = threading.local()  # .cores: this thread's share of the cores, inside cores_share()


def n_jobs() -> int:
    """The cores this thread's work may use: every core this process may use, or fewer inside
    :func:`cores_share` (a job that runs beside others)."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        cores = max(1, os.cpu_count() or 1)
    share = getattr(_SHARE, "cores", None)
    return min(cores, share) if share else cores


@contextlib.contextmanager
def cores_share(cores: int):
    """Within, in this thread: :func:`n_jobs` is at most ``cores``, so t-SNE's threads and the
    pool of methods stay inside the share of a job that runs beside others."""
    previous = getattr(_SHARE, "cores", None)
    _SHARE.cores = max(1, int(cores))
    try:
        yield
    finally:
        _SHARE.cores = previous


#: Features whose largest magnitude lies outside [2**-20, 2**20] (about 1e-6 .. 1e6) are
#: divided by a power of two near it before PCA and embedding (:func:`unit_scale`).
SCALE_LIMITS = (2.0 ** -20, 2.0 ** 20)


def unit_scale(X) -> tuple:
    """``(X / 2**e, 2**e)`` for features of extreme magnitude, else ``(X, 1.0)`` unchanged.

    Every score evalkit computes (neighbourhoods, kNN accuracy, silhouette, CKA) and every
    embedding up to its units is the same for ``c * X`` as for ``X``; float32 arithmetic is not:
    features of magnitude 1e18 overflow PCA's covariance, 1e-25 underflow squared distances.
    Dividing by a power of two is exact, so every ratio between values is kept bit for bit;
    features whose largest magnitude lies within :data:`SCALE_LIMITS` are returned as they are.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)

    Returns
    -------
    X : ndarray of shape (n_samples, n_features), float32 when rescaled, else as given
    factor : float
        What ``X`` was divided by (a power of two; 1.0 when unchanged).
    """
    X = np.asarray(X)
    finite = np.abs(X[np.isfinite(X)]) if X.size else X
    top = float(finite.max()) if finite.size else 0.0
    if top == 0.0 or SCALE_LIMITS[0] <= top <= SCALE_LIMITS[1]:
        return X, 1.0
    factor = float(2.0 ** np.round(np.log2(top)))
    return np.ascontiguousarray(X.astype(np.float64) / factor, dtype=np.float32), factor


def reduce_dims(X: np.ndarray, n_components: int, *, random_state: int = 0) -> np.ndarray:
    """PCA to ``n_components`` when ``X`` is wider (the usual step before t-SNE and UMAP).

    Features of extreme magnitude are rescaled first (:func:`unit_scale`), so the result is
    in units of ``X / factor``.
    """
    if X.shape[1] <= n_components or X.shape[0] <= n_components:
        return np.ascontiguousarray(X, dtype=np.float32)
    from sklearn.decomposition import PCA

    X = unit_scale(X)[0]
    return PCA(n_components=n_components, random_state=random_state).fit_transform(X).astype(np.float32)


def _finite(Z: np.ndarray, method: str) -> np.ndarray:
    Z = np.ascontiguousarray(Z, dtype=np.float32)
    if not np.isfinite(Z).all():
        raise EvalkitError(f"embed: {method} produced non-finite coordinates; check the features for constant "
                           f"or duplicated rows")
    return Z


def _as_input(X, method: str) -> np.ndarray:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] < 1:
        raise EvalkitError(f"embed: {method} expects features of shape (n_samples, n_features); got {X.shape}")
    if X.shape[0] < 4:
        raise EvalkitError(f"embed.methods: {method} needs at least 4 samples; got {X.shape[0]}")
    if not np.isfinite(X).all():
        raise EvalkitError(f"embed: {method} was given NaN or infinite features")
    if X.shape[1] == 1:  # the PCA start needs two columns; a zero one changes no distance
        X = np.hstack([X, np.zeros_like(X)])
    return unit_scale(X)[0]  # neither t-SNE nor UMAP depends on a global factor; float32 does


def _usable(graph, n: int, k: int) -> bool:
    """Does ``graph`` cover ``n`` samples with at least ``k`` neighbours each?"""
    if graph is None or k < 1:
        return False
    idx = np.asarray(graph.indices)
    if idx.ndim != 2 or idx.shape[0] != n:
        raise EvalkitError(f"embed: the neighbour graph has shape {idx.shape}; expected ({n}, >= {k})")
    return idx.shape[1] >= k


def _graph_head(graph, k: int):
    """The first ``k`` neighbours: (indices int64, distances float64 rescaled to mean 1).

    t-SNE calibrates a bandwidth per point (perplexity) and UMAP a scale per point, so one
    global factor on all distances changes neither result; it keeps their bandwidth searches,
    which start at 1, well inside floating-point range whatever the scale of the features.
    """
    idx = np.ascontiguousarray(graph.indices[:, :k], dtype=np.int64)
    dist = np.array(graph.distances[:, :k], dtype=np.float64)
    positive = dist[dist > 0]
    if positive.size:
        dist /= positive.mean()
    return idx, dist


def _graph_name(graph) -> str:
    how = getattr(graph, "method", None) or ("exact" if getattr(graph, "exact", False) else "approximate")
    return f"shared kNN graph ({how})"


def _pca_init(X: np.ndarray, random_state: int) -> np.ndarray:
    """openTSNE's PCA start: two principal components scaled to std 1e-4, plus 1% seeded jitter.

    Without the jitter, t-SNE from a PCA start does not depend on the seed at all.
    """
    from sklearn.decomposition import PCA

    Y = PCA(n_components=2, random_state=random_state).fit_transform(X).astype(np.float64)
    std = float(np.std(Y[:, 0]))
    if std > 0:
        Y *= 1e-4 / std
    rng = np.random.RandomState(random_state)
    Y += rng.normal(0.0, 1e-6 if std > 0 else 1e-4, Y.shape)
    return np.ascontiguousarray(Y)


class PCAEmbedder:
    """The first two principal components of the features it is given."""

    name = "pca"

    def __init__(self, cfg=None):
        self.cfg = cfg

    def graph_neighbors(self, n_samples: int) -> int:
        return 0

    def params(self, n_samples: Optional[int] = None, graph=None) -> dict:
        return {"n_components": 2}

    def prepare(self) -> None:
        _import("sklearn.decomposition")

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        from sklearn.decomposition import PCA

        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[0] < 2:
            raise EvalkitError(f"embed: pca expects at least 2 samples of shape (n_samples, n_features); got {X.shape}")
        if X.shape[1] == 1:  # one feature: the second axis carries nothing
            return np.hstack([X - X.mean(), np.zeros_like(X)]).astype(np.float32)
        X = unit_scale(X)[0]  # extreme magnitudes: the components of X / factor (float32-safe)
        # a fixed solver seed: PCA is one answer, whatever the run's seed
        return _finite(PCA(n_components=2, random_state=0).fit_transform(X), self.name)


class TSNEEmbedder:
    """t-SNE through openTSNE (FFT-accelerated above 10,000 points, all cores) or scikit-learn.

    Both backends start from the two principal components (scaled to std 1e-4) with a small
    seeded jitter, use ``3 x perplexity`` neighbours per sample, and run ``n_iter`` iterations
    in all, the first ``early_exaggeration_iter`` of them with exaggerated attraction.
    """

    name = "tsne"

    def __init__(self, cfg):
        self.cfg = cfg  # TSNEConfig

    def _perplexity(self, n: int) -> float:
        # perplexity must leave room for 3 * perplexity neighbours
        return float(min(self.cfg.perplexity, max(1.0, (n - 1) / 3.0)))

    def graph_neighbors(self, n_samples: int) -> int:
        """openTSNE's ``min(n - 1, int(3 perplexity))``; scikit-learn's ``int(3 perplexity + 1)``."""
        p = self._perplexity(n_samples)
        k = int(3 * p + 1) if self.cfg.backend == "sklearn" else int(3 * p)
        return int(max(1, min(n_samples - 1, k)))

    def _early_iter(self) -> int:
        if self.cfg.backend == "sklearn":
            return SKLEARN_EARLY_ITER
        return min(250, self.cfg.n_iter // 3)

    def _n_jobs(self, n_samples: Optional[int] = None) -> int:
        if self.cfg.n_jobs != -1:
            return max(1, int(self.cfg.n_jobs))
        return 1 if n_samples is not None and n_samples < TSNE_SERIAL_BELOW else n_jobs()

    def params(self, n_samples: Optional[int] = None, graph=None) -> dict:
        c = self.cfg
        perplexity = c.perplexity if n_samples is None else self._perplexity(n_samples)
        out = {"backend": c.backend, "perplexity": perplexity}
        if n_samples is not None:
            k = self.graph_neighbors(n_samples)
            out["n_neighbors"] = k
            if _usable(graph, n_samples, k):
                out["neighbors"] = _graph_name(graph)
            elif c.backend == "sklearn":
                out["neighbors"] = "scikit-learn (exact)"
            else:
                out["neighbors"] = "openTSNE (exact)" if n_samples < 1000 else "openTSNE (approximate)"
        ee = c.early_exaggeration
        if c.learning_rate != "auto" or n_samples is None:
            out["learning_rate"] = c.learning_rate
        elif c.backend == "sklearn":  # max(N / early_exaggeration / 4, 50), both phases
            out["learning_rate"] = float(max(n_samples / ee / 4.0, 50.0))
        else:  # openTSNE: N / exaggeration in each phase
            out["learning_rate_early"] = float(n_samples / ee)
            out["learning_rate"] = float(n_samples)
        out.update({"early_exaggeration": ee, "early_exaggeration_iter": self._early_iter(),
                    "n_iter": c.n_iter, "init": "pca"})
        if c.backend == "sklearn":
            out["gradient"] = "barnes_hut"
        elif n_samples is not None:
            out["gradient"] = "fft" if n_samples >= OPENTSNE_FFT_MIN_SAMPLES else _small_gradient()
        out["n_jobs"] = self._n_jobs(n_samples)
        return out

    def prepare(self) -> None:
        if self.cfg.backend == "sklearn":
            _import("sklearn.manifold", "threadpoolctl", "scipy.sparse")
        else:
            _import("openTSNE", "openTSNE.affinity", "openTSNE.nearest_neighbors", "sklearn.decomposition")
            opentsne_scipy_fft()
            opentsne_numba_attraction()
            opentsne_exact_gradient()

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        X = _as_input(X, "t-SNE")
        if self.cfg.backend == "sklearn":
            return _finite(self._fit_sklearn(X, random_state, graph), self.name)
        return _finite(self._fit_opentsne(X, random_state, graph), self.name)

    def _fit_opentsne(self, X, random_state, graph):
        import openTSNE
        from openTSNE.affinity import PerplexityBasedNN
        from openTSNE.nearest_neighbors import PrecomputedNeighbors

        opentsne_scipy_fft()
        opentsne_numba_attraction()

        c, n = self.cfg, X.shape[0]
        perplexity, k, jobs, early = self._perplexity(n), self.graph_neighbors(n), self._n_jobs(n), self._early_iter()
        gradient = (opentsne_exact_gradient() if n < OPENTSNE_FFT_MIN_SAMPLES else None) or "auto"
        affinities = None
        if _usable(graph, n, k):
            idx, dist = _graph_head(graph, k)
            affinities = PerplexityBasedNN(perplexity=perplexity, n_jobs=jobs,
                                           knn_index=PrecomputedNeighbors(idx, dist))
        model = openTSNE.TSNE(
            n_components=2, perplexity=perplexity, learning_rate=c.learning_rate,
            early_exaggeration=c.early_exaggeration, early_exaggeration_iter=early,
            n_iter=c.n_iter - early, initialization="pca", random_state=random_state,
            n_jobs=jobs, negative_gradient_method=gradient, verbose=False,
            callbacks=_stop_if_interrupted, callbacks_every_iters=TSNE_CALLBACK_EVERY,  # Ctrl-C stays responsive
        )
        # X still feeds the PCA start when the affinities come from the graph
        with inner_loop(c.n_iter, "t-SNE", unit="it"):
            return np.asarray(model.fit(X, affinities=affinities))

    def _fit_sklearn(self, X, random_state, graph):
        import scipy.sparse as sp
        from sklearn.manifold import TSNE

        c, n = self.cfg, X.shape[0]
        if c.n_iter < SKLEARN_EARLY_ITER:
            raise EvalkitError(f"embed.tsne.n_iter: {c.n_iter} is too small for backend sklearn, whose early "
                               f"exaggeration alone takes {SKLEARN_EARLY_ITER}; expected at least "
                               f"{SKLEARN_EARLY_ITER} (or backend: opentsne)")
        from threadpoolctl import threadpool_limits

        perplexity, k, jobs = self._perplexity(n), self.graph_neighbors(n), self._n_jobs(n)
        kw = dict(n_components=2, perplexity=perplexity, learning_rate=c.learning_rate,
                  early_exaggeration=c.early_exaggeration, max_iter=c.n_iter,
                  init=_pca_init(X, random_state).astype(np.float32), random_state=random_state,
                  n_jobs=jobs)
        # scikit-learn's gradient runs on every OpenMP thread whatever n_jobs says (n_jobs is
        # its neighbour search); the limit makes both follow n_jobs.
        with threadpool_limits(limits=jobs, user_api="openmp"):
            if not _usable(graph, n, k):
                return TSNE(**kw).fit_transform(X)
            # A sparse graph of squared distances (what scikit-learn squares for "euclidean"),
            # each row holding the sample itself first: NearestNeighbors drops it as "self".
            idx, dist = _graph_head(graph, k)
            cols = np.hstack([np.arange(n)[:, None], idx])
            vals = np.hstack([np.zeros((n, 1)), dist ** 2])
            D = sp.csr_matrix((vals.ravel(), cols.ravel(), np.arange(0, n * (k + 1) + 1, k + 1)), shape=(n, n))
            return TSNE(metric="precomputed", **kw).fit_transform(D)


def opentsne_scipy_fft() -> bool:
    """openTSNE's FFT gradient through single-precision :mod:`scipy.fft` transforms.

    openTSNE's wheels (built without FFTW) call ``np.fft.rfft2`` and ``irfft2`` on its
    interpolation grid nine times per iteration, through the name ``np`` of
    ``openTSNE._matrix_mul.matrix_mul``. That name is given a copy of numpy whose ``fft`` is
    scipy's (the same pocketfft, about twice as fast on these grid sizes: 576 x 576, 2.5 ms
    vs 5.3 ms), taking the transforms in float32 and handing back float64 and complex128 as
    numpy would (420 x 420: 0.6 ms vs 1.1 ms forward, 0.65 ms vs 2.0 ms back). The float32
    rounding moves the gradient by about 1e-5 of its size, a thousandth of the error of the
    interpolation itself (about 1% against the exact gradient at 10,000 points; see the
    test). t-SNE of 10,000 points, one thread: 16.7 s vs 18.0 s with float64 scipy
    transforms, 18.5-19 s with numpy's; the same KL divergence (2.807 vs 2.809) and
    trustworthiness (0.946 vs 0.945). Nothing else changes. Where that module is not what
    this expects (an FFTW build, another openTSNE) it is left alone. Returns whether these
    transforms are in use.
    """
    import types

    try:
        import scipy.fft
        from openTSNE._matrix_mul import matrix_mul
    except ImportError:
        return False
    current = getattr(matrix_mul, "np", None)
    if getattr(current, "_evalkit_scipy_fft", False):
        return True
    if current is not np or not all(hasattr(np.fft, f) for f in ("rfft2", "irfft2", "fft", "ifft")):
        return False

    def rfft2(a, *args, **kwargs):
        return scipy.fft.rfft2(np.asarray(a, dtype=np.float32), *args, **kwargs).astype(np.complex128)

    def irfft2(a, *args, **kwargs):
        return scipy.fft.irfft2(np.asarray(a, dtype=np.complex64), *args, **kwargs).astype(np.float64)

    fft = types.SimpleNamespace(rfft2=rfft2, irfft2=irfft2, fft=scipy.fft.fft, ifft=scipy.fft.ifft)
    matrix_mul.np = _module_with(np, "_evalkit_scipy_fft", fft=fft)
    return True


def opentsne_numba_attraction() -> bool:
    """openTSNE's attractive forces through a numba kernel, about three times as fast.

    Each iteration adds to the gradient a sum over the affinities' nonzeros (90 neighbours a
    sample, symmetrised: 1.36 million at 10,000 points). openTSNE 1.0's
    ``_tsne.estimate_positive_gradient_nn`` takes 14.5 ms for that on one thread and 9.0 ms on
    two; :func:`evalkit._numba_kernels.tsne_attraction` took 7.9 ms and 4.9 ms keeping each
    row's sums in registers where openTSNE's loop goes through memory, and takes about 4 ms on
    one thread since its sums run in SIMD lanes (reassociated: the same forces within about
    1e-15 of their size). t-SNE of 10,000 points alone on two threads, in a slow spell of this
    machine: 20.1 s instead of 24.6 s, 25.3 CPU-s instead of 31.8 with the first kernel; the
    SIMD sums took another 1.0-2.6 CPU-s off (12.9-14.9 against 15.0-15.8 CPU-s, three
    alternating pairs). The rest is openTSNE's FFT repulsion, on one thread. The name ``_tsne`` of
    :mod:`openTSNE.tsne` is given a copy of that module with this function replaced; the
    iterations that also evaluate the KL divergence, other degrees of freedom and other than 2
    dimensions keep openTSNE's own. Where that module is not what this expects it is left
    alone. Returns whether the kernel is in use.
    """
    from evalkit.kernels import numba_kernels, numba_threadsafe

    try:
        import openTSNE.tsne as tsne_module
    except ImportError:
        return False
    current = getattr(tsne_module, "_tsne", None)
    if getattr(current, "_evalkit_attraction", False):
        return True
    original = getattr(current, "estimate_positive_gradient_nn", None)
    nk = numba_kernels()
    if original is None or nk is None:
        return False
    parallel = numba_threadsafe()  # (workqueue: two parallel kernels at once abort the process)
    # compiled (or read from numba's cache) here, where the methods are prepared, not in the
    # thread of a t-SNE that runs beside other work (first calls may import numba's modules)
    tiny = (np.array([1, 0], dtype=np.int32), np.array([0, 1, 2], dtype=np.int32), np.ones(2),
            np.eye(2), np.eye(2))
    nk.tsne_attraction_rows(*tiny, np.zeros((2, 2)), 0, 2)
    if parallel:
        nk.tsne_attraction(*tiny, np.zeros((2, 2)), 1)

    def estimate_positive_gradient_nn(indices, indptr, P_data, embedding, reference_embedding, gradient, dof=1,
                                      num_threads=1, should_eval_error=False):
        Y, ref, grad = np.asarray(embedding), np.asarray(reference_embedding), np.asarray(gradient)
        if (should_eval_error or dof != 1 or grad.ndim != 2 or grad.shape[1] != 2 or Y.shape != grad.shape
                or ref.ndim != 2 or ref.shape[1] != 2
                or not all(a.dtype == np.float64 and a.flags.c_contiguous for a in (Y, ref, grad))):
            return original(indices, indptr, P_data, embedding, reference_embedding, gradient, dof,
                            num_threads=num_threads, should_eval_error=should_eval_error)
        indices, indptr, P_data = np.asarray(indices), np.asarray(indptr), np.asarray(P_data, dtype=np.float64)
        if num_threads > 1 and parallel:
            nk.tsne_attraction(indices, indptr, P_data, Y, ref, grad, int(num_threads))
        else:
            nk.tsne_attraction_rows(indices, indptr, P_data, Y, ref, grad, 0, grad.shape[0])
        return 0.0, 0.0  # openTSNE's sum_P and KL divergence, accumulated only when evaluated

    tsne_module._tsne = _module_with(current, "_evalkit_attraction",
                                     estimate_positive_gradient_nn=estimate_positive_gradient_nn)
    return True


_EXACT_REPULSION = None


def _small_gradient() -> str:
    """The gradient openTSNE runs with below :data:`OPENTSNE_FFT_MIN_SAMPLES` points (without
    loading numba to find out)."""
    from evalkit.kernels import numba_usable

    return "exact" if _EXACT_REPULSION is not None or numba_usable() else "bh"


def opentsne_exact_gradient():
    """An exact t-SNE gradient for openTSNE below :data:`OPENTSNE_FFT_MIN_SAMPLES` points,
    where openTSNE would use Barnes-Hut: a callable for ``TSNE(negative_gradient_method=...)``
    (openTSNE's documented way to give its optimiser another gradient), or None where numba
    cannot be used.

    The repulsion is summed over every pair of points
    (:func:`evalkit._numba_kernels.tsne_repulsion_rows`, float32 in SIMD lanes) instead of
    Barnes-Hut's tree of cells; the attraction is openTSNE's (``_tsne``, with
    :func:`opentsne_numba_attraction`). Per iteration on this 2-core machine, for a t-SNE
    layout: 899 points 0.18 ms against Barnes-Hut's 1.9 ms on two threads (3.0 on one);
    2,000 points 1.0 ms against 5.2; 5,000 5.2 against 16; 9,999 21 against 38. Barnes-Hut
    (theta 0.5) misses the exact repulsion by about 1% of its size; float32 sums by about
    1e-6. An embedding placed against a reference embedding (``transform``), other degrees of
    freedom and other than 2 dimensions go to openTSNE's Barnes-Hut.
    """
    global _EXACT_REPULSION
    if _EXACT_REPULSION is not None:
        return _EXACT_REPULSION
    from evalkit.kernels import numba_kernels, numba_threadsafe

    try:
        import openTSNE.tsne as tsne_module
    except ImportError:
        return None
    nk = numba_kernels()
    if nk is None:
        return None
    parallel = numba_threadsafe()  # (workqueue: two parallel kernels at once abort the process)
    # compiled (or read from numba's cache) here, not in a t-SNE thread beside other work
    tiny = (np.zeros(2, np.float32), np.ones(2, np.float32), np.zeros((2, 2)), np.zeros(2))
    nk.tsne_repulsion_rows(*tiny, 0, 2)
    if parallel:
        nk.tsne_repulsion(*tiny, 1)
    eps = float(np.finfo(np.float64).eps)  # openTSNE's guard on the normalisation

    def kl_divergence_exact(embedding, P, dof, bh_params=None, reference_embedding=None,
                            should_eval_error=False, n_jobs=1, **_):
        Y = np.asarray(embedding)
        if (reference_embedding is not None or dof != 1 or Y.ndim != 2 or Y.shape[1] != 2
                or Y.dtype != np.float64 or not Y.flags.c_contiguous):
            return tsne_module.kl_divergence_bh(embedding, P, dof, bh_params or {},
                                                reference_embedding=reference_embedding,
                                                should_eval_error=should_eval_error, n_jobs=n_jobs)
        n = Y.shape[0]
        a, b = Y[:, 0].astype(np.float32), Y[:, 1].astype(np.float32)
        forces, zsum = np.empty((n, 2)), np.empty(n)
        if n_jobs > 1 and parallel:
            nk.tsne_repulsion(a, b, forces, zsum, int(n_jobs))
        else:
            nk.tsne_repulsion_rows(a, b, forces, zsum, 0, n)
        sum_q = float(zsum.sum()) - n  # each row's own term, q_ii = 1
        gradient = forces * (-1.0 / (sum_q + eps))
        sum_p, kl = tsne_module._tsne.estimate_positive_gradient_nn(  # (looked up each time: patched)
            P.indices, P.indptr, P.data, Y, Y, gradient, dof, num_threads=n_jobs,
            should_eval_error=should_eval_error)
        if should_eval_error:
            kl += sum_p * np.log(sum_q + eps)
        return kl, gradient

    _EXACT_REPULSION = kl_divergence_exact
    return kl_divergence_exact


def _module_with(module, marker: str, **replaced):
    """A module object with ``module``'s names, ``replaced`` in place of some, and ``marker``
    set: what a library's module-level name (``np``, ``_tsne``) is pointed at to change what it
    calls, leaving the module itself, and every other user of it, alone."""
    import types

    proxy = types.ModuleType(module.__name__)
    proxy.__dict__.update(module.__dict__)
    proxy.__dict__.update(replaced)
    setattr(proxy, marker, True)
    return proxy


def _import(*modules: str) -> None:
    """Import these now, in this thread: an embedder's ``prepare()``, called before methods run
    side by side, because two threads importing one package at once can see it half made
    ("cannot import name ... from partially initialized module")."""
    import importlib

    for module in modules:
        importlib.import_module(module)


def _stop_if_interrupted(iteration, error, embedding):
    """openTSNE callback every 25 iterations: the progress bar moves, and a Ctrl-C the command
    line recorded ends t-SNE there."""
    step(TSNE_CALLBACK_EVERY)
    return False


class UMAPEmbedder:
    """UMAP through umap-learn, from a neighbour graph (the shared one, or one it computes).

    umap-learn optimises on one thread when given a seed (as here, for reproducibility). Its
    spectral start is computed here (:func:`_umap_init`): umap-learn lays out the connected
    components of a disconnected graph through an unseeded spectral embedding of their
    centroids, so well-separated classes gave a different embedding on every run.
    """

    name = "umap"

    def __init__(self, cfg):
        self.cfg = cfg  # UMAPConfig

    def _k(self, n: int) -> int:
        return int(min(self.cfg.n_neighbors, n - 1))

    def graph_neighbors(self, n_samples: int) -> int:
        """umap-learn counts each sample as its own first neighbour: k - 1 others."""
        return max(1, self._k(n_samples) - 1)

    def _epochs(self, n: int) -> int:
        return self.cfg.n_epochs if self.cfg.n_epochs is not None else (500 if n <= 10_000 else 200)

    def params(self, n_samples: Optional[int] = None, graph=None) -> dict:
        if n_samples is None:
            return {"n_neighbors": self.cfg.n_neighbors, "min_dist": self.cfg.min_dist,
                    "n_epochs": self.cfg.n_epochs or "auto", "metric": "euclidean", "init": "spectral"}
        k = self._k(n_samples)
        shared = _usable(graph, n_samples, self.graph_neighbors(n_samples))
        return {"n_neighbors": k, "min_dist": self.cfg.min_dist, "n_epochs": self._epochs(n_samples),
                "metric": "euclidean", "neighbors": _graph_name(graph) if shared else "evalkit kNN graph",
                "init": "spectral" if n_samples > k + 2 else "random", "n_jobs": 1}

    def prepare(self) -> None:
        quiet_notices()
        _import("umap", "umap.umap_", "umap.spectral", "umap.layouts", "scipy.sparse.csgraph",
                "sklearn.decomposition", "evalkit.neighbors")
        cache_umap_kernels()

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        X = _as_input(X, "UMAP")
        n = X.shape[0]
        k = self._k(n)
        if not _usable(graph, n, k - 1):
            from evalkit.neighbors import knn_graph

            graph = knn_graph(X, n_neighbors=k - 1, random_state=random_state)
        idx, dist = _graph_head(graph, k - 1)
        # umap-learn's convention: each point is its own first neighbour
        knn_idx = np.hstack([np.arange(n)[:, None], idx]).astype(np.int32)
        knn_dist = np.hstack([np.zeros((n, 1)), dist]).astype(np.float32)
        quiet_notices()  # for good, not in a catch_warnings() (see quiet_notices)
        import umap

        cache_umap_kernels()
        # a spectral start needs more points than neighbours; tiny data starts at random
        init = _umap_init(X, knn_idx, knn_dist, self._epochs(n), random_state) if n > k + 2 else "random"
        model = umap.UMAP(n_neighbors=k, min_dist=self.cfg.min_dist, n_epochs=self.cfg.n_epochs,
                          random_state=random_state, init=init,
                          precomputed_knn=(knn_idx.copy(), knn_dist.copy(), None))
        with inner_loop(self._epochs(n), "UMAP", unit="epoch"):
            return _finite(model.fit_transform(X), self.name)


#: What the embedding libraries say the way evalkit calls them, hidden for good from their
#: own modules only: (module regex, message regex, category). umap-learn: on every fit (a seed,
#: so one thread; a graph given, so no search index to keep) and on import without
#: TensorFlow. PaCMAP: a division on data evalkit never hands it (identical samples are placed
#: without a fit). Nothing else reached the user in fits of 8 to 600 points, one to seven
#: components, duplicates, constant and rank-one data, with and without a given graph.
NOTICES = ((r"umap(\.|$)", r"n_jobs value .* overridden", UserWarning),
           (r"umap(\.|$)", r"precomputed_knn\[2\] \(knn_search_index\) is not an NNDescent object", UserWarning),
           (r"umap(\.|$)", r"Tensorflow not installed", ImportWarning),
           (r"pacmap(\.|$)", r"invalid value encountered", RuntimeWarning))


def quiet_notices() -> None:
    """Add the filters of :data:`NOTICES` that the filter list lacks. They replace a
    ``warnings.catch_warnings()`` around each fit, which is not thread-safe: it saves and
    restores the whole filter list, so two fits side by side in threads (seeds, feature sets)
    lost each other's filters, once letting these notices through and once leaving a blanket
    "ignore" in the process. Called before fits run in threads, and by each embedder; once
    they are there, it changes nothing (a fit in a thread never rewrites the list)."""
    import warnings

    present = {(f[1].pattern, f[2], f[3].pattern) for f in warnings.filters
               if f[0] == "ignore" and f[1] is not None and f[3] is not None}
    for module, message, category in NOTICES:
        if (message, category, module) not in present:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)


#: umap-learn's numba kernels that a run from a precomputed graph compiles: (module, name).
UMAP_KERNELS = (("umap.umap_", "smooth_knn_dist"), ("umap.umap_", "compute_membership_strengths"),
                ("umap.layouts", "_nb_optimize_layout_euclidean_single_epoch"))
_UMAP_KERNELS_CACHED = False


def cache_umap_kernels() -> None:
    """Compile umap-learn's kernels once per machine instead of once per process.

    umap-learn declares these three without numba's ``cache=True``, so every fresh process
    compiled them again: about 9 s of a cold UMAP on this 2-core machine (1,000 points: 12 s
    in all). They are rebuilt here from umap-learn's own Python functions with the same
    options plus ``cache=True`` (the compiled code is kept beside umap-learn's sources, or in
    numba's user cache if that is read-only) and ``nogil=True`` (the epoch loop no longer holds
    Python's lock, so a t-SNE in another thread runs beside it). A umap-learn without these
    names keeps its own. Idempotent.
    """
    global _UMAP_KERNELS_CACHED
    if _UMAP_KERNELS_CACHED:
        return
    import importlib

    import numba
    from numba.core.registry import CPUDispatcher

    for module_name, name in UMAP_KERNELS:
        module = importlib.import_module(module_name)
        kernel = getattr(module, name, None)
        if not isinstance(kernel, CPUDispatcher):
            continue
        options = {k: v for k, v in kernel.targetoptions.items() if k != "nopython"}  # njit's own; numba warns
        cached = numba.njit(kernel.py_func, cache=True, nogil=True, locals=dict(kernel.locals), **options)
        if name == UMAP_EPOCH_KERNEL:
            cached = _counting_epochs(cached)
        setattr(module, name, cached)
    _UMAP_KERNELS_CACHED = True


#: umap-learn calls this once per epoch (through a module lookup, so a wrapper is seen).
UMAP_EPOCH_KERNEL = "_nb_optimize_layout_euclidean_single_epoch"


def _counting_epochs(kernel):
    """The epoch kernel, then one step of this thread's progress bar (and a Ctrl-C check)."""
    def epoch(*args, **kwargs):
        out = kernel(*args, **kwargs)
        step(1)
        return out

    epoch.kernel = kernel
    return epoch


def _umap_init(X, knn_idx, knn_dist, n_epochs: int, random_state: int) -> np.ndarray:
    """umap-learn's spectral start, made reproducible.

    The fuzzy graph and its pruning are umap-learn's (``fuzzy_simplicial_set``, then edges
    below max / n_epochs dropped, as ``simplicial_set_embedding`` does). A graph of at most
    4 components gets umap-learn's own ``spectral_layout`` (deterministic there). With more,
    umap-learn places the components by an unseeded spectral embedding of their centroids;
    here they go where the centroids' first two principal components put them (on a circle
    if those coincide), each laid out spectrally within half the distance to its nearest
    neighbour component, as umap-learn does.
    """
    from scipy.sparse.csgraph import connected_components
    from sklearn.decomposition import PCA
    from umap.spectral import spectral_layout
    from umap.umap_ import fuzzy_simplicial_set

    rs = np.random.RandomState(random_state)
    n = X.shape[0]
    G = fuzzy_simplicial_set(X, knn_idx.shape[1], rs, "euclidean", knn_indices=knn_idx.copy(),
                             knn_dists=knn_dist.copy())[0].tocoo()
    G.sum_duplicates()
    epochs = n_epochs if n_epochs > 10 else (500 if n <= 10_000 else 200)
    G.data[G.data < G.data.max() / float(epochs)] = 0.0
    G.eliminate_zeros()
    n_comp, labels = connected_components(G, directed=False)
    if n_comp <= 4:
        Y = np.asarray(spectral_layout(X, G, 2, rs), dtype=np.float64)
    else:
        centroids = np.stack([X[labels == c].mean(axis=0) for c in range(n_comp)]).astype(np.float64)
        meta = PCA(n_components=2, svd_solver="full").fit_transform(centroids) if X.shape[1] >= 2 else None
        if meta is None or np.unique(meta, axis=0).shape[0] < n_comp:
            angle = 2 * np.pi * np.arange(n_comp) / n_comp
            meta = np.c_[np.cos(angle), np.sin(angle)]
        meta = meta / np.abs(meta).max()
        G = G.tocsr()
        Y = np.empty((n, 2), dtype=np.float64)
        for c in range(n_comp):
            members = labels == c
            gap = np.sqrt(((meta - meta[c]) ** 2).sum(axis=1))
            half = gap[gap > 0].min() / 2.0
            sub = G[members][:, members]
            if sub.shape[0] <= 3:  # too small for an eigenvector layout
                Y[members] = rs.uniform(-half, half, size=(sub.shape[0], 2)) + meta[c]
                continue
            part = np.asarray(spectral_layout(None, sub.tocoo(), 2, rs), dtype=np.float64)
            top = np.abs(part).max()
            Y[members] = (part * (half / top) if top > 0 else part) + meta[c]
    # umap-learn's noisy_scale_coords: coordinates up to 10, plus noise of std 1e-4
    top = np.abs(Y).max()
    Y = Y * (10.0 / top) if top > 0 else Y
    return (Y + rs.normal(scale=1e-4, size=Y.shape)).astype(np.float32)


class PaCMAPEmbedder:
    """PaCMAP (Wang et al. 2021, package ``pacmap``): near pairs from the shared kNN graph,
    mid-near and far pairs sampled by PaCMAP, PCA start.

    Optional: ``pip install 'evalkit[pacmap]'``; asked for by name (``embed.methods``).
    """

    name = "pacmap"

    def __init__(self, cfg):
        self.cfg = cfg  # PaCMAPConfig

    def graph_neighbors(self, n_samples: int) -> int:
        """The near pairs PaCMAP keeps for ``n_samples`` (it shrinks them for tiny data)."""
        c, n = self.cfg, n_samples
        k = min(c.n_neighbors, n - 1)
        n_mn = min(int(round(k * c.mn_ratio)), n - 1)
        n_fp = min(int(round(k * c.fp_ratio)), n - 1 - k)
        if k + n_mn + n_fp >= n:
            k = int(n / (1 + c.mn_ratio + c.fp_ratio))
        return int(max(1, k))

    def params(self, n_samples: Optional[int] = None, graph=None) -> dict:
        c = self.cfg
        out = {"n_neighbors": c.n_neighbors if n_samples is None else self.graph_neighbors(n_samples),
               "MN_ratio": c.mn_ratio, "FP_ratio": c.fp_ratio, "lr": c.lr, "init": "pca"}
        if n_samples is not None:
            usable = _usable(graph, n_samples, self.graph_neighbors(n_samples))
            out["neighbors"] = _graph_name(graph) if usable else "PaCMAP (its own search)"
        return out

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        X = _as_input(X, "PaCMAP")
        n, k = X.shape[0], self.graph_neighbors(X.shape[0])
        pairs = None
        if _usable(graph, n, k):  # PaCMAP's near pairs are (point, neighbour) rows
            idx, _ = _graph_head(graph, k)
            pairs = np.column_stack([np.repeat(np.arange(n), k), idx.ravel()]).astype(np.int32)
        quiet_notices()  # for good, not in a catch_warnings() (see quiet_notices)
        import logging

        import pacmap

        logging.getLogger("pacmap").setLevel(logging.ERROR)  # its notes on sizes are ours to make
        model = pacmap.PaCMAP(n_components=2, n_neighbors=k, MN_ratio=self.cfg.mn_ratio,
                              FP_ratio=self.cfg.fp_ratio, lr=self.cfg.lr, pair_neighbors=pairs,
                              apply_pca=False, random_state=random_state, verbose=False)
        return _finite(model.fit_transform(X, init="pca"), self.name)


def create_embedder(method: str, embed_cfg):
    """The embedder for ``method`` configured from an :class:`evalkit.config.EmbedConfig`
    (its ``embed.<method>`` settings)."""
    spec = METHODS.get(method)
    settings = getattr(embed_cfg, method, None)
    return spec.create(settings if settings is not None else spec.config())


# =========================================================================== the registry
# Each method is defined once: its settings (validated under ``embed.<name>``), how to build
# it, its input, and how its defaults shrink for few samples. Config validation, the scoring
# loop and the report read these entries.


class PCAConfig(StrictModel):
    """PCA has no settings: the first two principal components of the raw features."""


class TSNEConfig(StrictModel):
    backend: Literal["opentsne", "sklearn"] = "opentsne"
    perplexity: float = Field(30.0, gt=0)
    learning_rate: Union[Literal["auto"], float] = "auto"
    early_exaggeration: float = Field(12.0, gt=0)
    n_iter: int = Field(750, ge=50, description="total iterations, early exaggeration included")
    n_jobs: int = -1

    @field_validator("learning_rate")
    @classmethod
    def _positive_step(cls, v):
        # openTSNE and scikit-learn take any number; a step of 0 or less never moves (or moves
        # uphill), which gives a meaningless embedding rather than an error
        if v != "auto" and not (0 < v < float("inf")):
            raise ValueError(f"expected 'auto' or a number greater than 0 (got {v:g}): it is the gradient "
                             f"step size, so 0 or less gives a meaningless embedding")
        return v


#: umap-learn's ``spread`` (evalkit keeps its default); umap-learn requires ``min_dist <= spread``.
UMAP_SPREAD = 1.0


class UMAPConfig(StrictModel):
    n_neighbors: int = Field(15, ge=2)
    min_dist: float = Field(0.1, ge=0)
    n_epochs: Optional[int] = Field(None, ge=1)

    @field_validator("min_dist")
    @classmethod
    def _within_spread(cls, v):
        if v > UMAP_SPREAD:
            raise ValueError(f"expected a number from 0 to {UMAP_SPREAD:g} (got {v:g}): umap-learn requires "
                             f"min_dist <= spread, and evalkit uses umap-learn's spread of {UMAP_SPREAD:g}")
        return v


def _tsne_sizes(cfg: TSNEConfig, n_samples: int):
    """t-SNE needs n_samples > 3 x perplexity: lower a default, refuse an explicit value."""
    p_max = (n_samples - 1) / 3.0
    if cfg.perplexity <= p_max:
        return cfg, []
    if "perplexity" in cfg.model_fields_set:
        raise EvalkitError(f"embed.tsne.perplexity: {cfg.perplexity:g} is too large for {n_samples} samples "
                           f"(t-SNE needs n_samples > 3 x perplexity); expected at most {p_max:.3g}: "
                           f"lower embed.tsne.perplexity or use more data")
    note = (f"embed.tsne.perplexity lowered from its default {cfg.perplexity:g} to {p_max:.3g}: only "
            f"{n_samples} samples (t-SNE needs n_samples > 3 x perplexity)")
    return cfg.model_copy(update={"perplexity": p_max}), [note]


def _neighbours_fit(method: str):
    """``fit_sizes`` for a method whose ``n_neighbors`` must leave n_samples - 1: a default is
    lowered with a note, an explicit value that does not fit is refused."""
    def fit(cfg, n_samples: int):
        k_max = n_samples - 1
        if cfg.n_neighbors <= k_max:
            return cfg, []
        key = f"embed.{method}.n_neighbors"
        if "n_neighbors" in cfg.model_fields_set:
            raise EvalkitError(f"{key}: {cfg.n_neighbors} is too large for {n_samples} samples (each sample has "
                               f"n_samples - 1 neighbours); expected at most {k_max}: lower {key} or use more data")
        note = (f"{key} lowered from its default {cfg.n_neighbors} to {k_max}: only {n_samples} samples (each "
                f"sample has n_samples - 1 neighbours)")
        return cfg.model_copy(update={"n_neighbors": k_max}), [note]

    return fit


_umap_sizes = _neighbours_fit("umap")


# cost: UMAP first. With a seed it runs on one thread, 500 epochs up to 10,000 points: the
# longest chain of the report since t-SNE's attraction and small-N gradient got faster (10,000
# points alone: UMAP 13.6-14.3 s, t-SNE 10.8-12.3 s beside it). Started first, it keeps the
# process's priority and t-SNE fills the other core (scoring.lower_thread_priority).
METHODS.register(Method("tsne", "t-SNE", TSNEConfig, TSNEEmbedder, input="reduced", fit_sizes=_tsne_sizes, cost=2))
METHODS.register(Method("umap", "UMAP", UMAPConfig, UMAPEmbedder, input="reduced", fit_sizes=_umap_sizes, cost=3))
METHODS.register(Method("pca", "PCA", PCAConfig, PCAEmbedder, input="raw", seeded=False))


class PaCMAPConfig(StrictModel):
    n_neighbors: int = Field(10, ge=1)
    mn_ratio: float = Field(0.5, ge=0, description="mid-near pairs per near pair")
    fp_ratio: float = Field(2.0, ge=0, description="further pairs per near pair")
    lr: float = Field(1.0, gt=0)


_pacmap_sizes = _neighbours_fit("pacmap")


METHODS.register(Method("pacmap", "PaCMAP", PaCMAPConfig, PaCMAPEmbedder, input="reduced", fit_sizes=_pacmap_sizes,
                        default=False, requires=("pacmap",), extra="pacmap", cost=1))
