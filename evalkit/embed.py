"""2-D embeddings behind one small interface: t-SNE (openTSNE or scikit-learn), UMAP, PCA.

``create_embedder(method, embed_config)`` returns an object with ``fit_transform(X, *,
random_state, graph=None) -> (n_samples, 2) float32`` and ``params() -> dict`` (the
hyperparameters actually used, shown in the report). Every backend passes the same contract
tests (tests/test_embed.py).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from evalkit.errors import EvalkitError, unknown


def n_jobs() -> int:
    """All cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def reduce_dims(X: np.ndarray, n_components: int, *, random_state: int = 0) -> np.ndarray:
    """PCA to ``n_components`` when ``X`` is wider (the usual step before t-SNE and UMAP)."""
    if X.shape[1] <= n_components or X.shape[0] <= n_components:
        return np.ascontiguousarray(X, dtype=np.float32)
    from sklearn.decomposition import PCA

    return PCA(n_components=n_components, random_state=random_state).fit_transform(X).astype(np.float32)


def _finite(Z: np.ndarray, method: str) -> np.ndarray:
    Z = np.asarray(Z, dtype=np.float32)
    if not np.isfinite(Z).all():
        raise EvalkitError(f"embed: {method} produced non-finite coordinates; check the features for constant or duplicated rows")
    return Z


class PCAEmbedder:
    """The first two principal components of the raw features."""

    name = "pca"

    def __init__(self, cfg=None):
        self.cfg = cfg

    def params(self) -> dict:
        return {"n_components": 2}

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        from sklearn.decomposition import PCA

        X = np.asarray(X, dtype=np.float32)
        if X.shape[1] == 1:  # one feature: the second axis carries nothing
            return np.hstack([X - X.mean(), np.zeros_like(X)]).astype(np.float32)
        return _finite(PCA(n_components=2, random_state=random_state).fit_transform(X), self.name)


class TSNEEmbedder:
    """t-SNE through openTSNE (FFT-accelerated, all cores) or scikit-learn's ``TSNE``."""

    name = "tsne"

    def __init__(self, cfg):
        self.cfg = cfg  # evalkit.config.TSNEConfig

    def _perplexity(self, n: int) -> float:
        # perplexity must leave room for 3 * perplexity neighbours
        return float(min(self.cfg.perplexity, max(1.0, (n - 1) / 3.0)))

    def params(self, n: Optional[int] = None) -> dict:
        c = self.cfg
        early = min(250, c.n_iter // 3)
        return {
            "backend": c.backend, "perplexity": c.perplexity if n is None else self._perplexity(n),
            "learning_rate": c.learning_rate, "early_exaggeration": c.early_exaggeration,
            "early_exaggeration_iter": early, "n_iter": c.n_iter, "init": "pca",
        }

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        X = np.ascontiguousarray(X, dtype=np.float32)
        n = X.shape[0]
        if n < 4:
            raise EvalkitError(f"embed.methods: t-SNE needs at least 4 samples; got {n}")
        c, perplexity = self.cfg, self._perplexity(n)
        early = min(250, c.n_iter // 3)
        if c.backend == "sklearn":
            from sklearn.manifold import TSNE

            model = TSNE(
                n_components=2, perplexity=perplexity, learning_rate=c.learning_rate,
                early_exaggeration=c.early_exaggeration, max_iter=c.n_iter, init="pca",
                random_state=random_state, n_jobs=n_jobs() if c.n_jobs == -1 else c.n_jobs,
            )
            return _finite(model.fit_transform(X), self.name)
        import openTSNE

        model = openTSNE.TSNE(
            n_components=2, perplexity=perplexity, learning_rate=c.learning_rate,
            early_exaggeration=c.early_exaggeration, early_exaggeration_iter=early,
            n_iter=c.n_iter - early, initialization="pca", random_state=random_state,
            n_jobs=n_jobs() if c.n_jobs == -1 else c.n_jobs, verbose=False,
        )
        return _finite(np.asarray(model.fit(X)), self.name)


class UMAPEmbedder:
    """UMAP through umap-learn; reuses a precomputed neighbour graph when one is given."""

    name = "umap"

    def __init__(self, cfg):
        self.cfg = cfg  # evalkit.config.UMAPConfig

    def params(self, n: Optional[int] = None) -> dict:
        k = self.cfg.n_neighbors if n is None else min(self.cfg.n_neighbors, n - 1)
        return {"n_neighbors": k, "min_dist": self.cfg.min_dist, "n_epochs": self.cfg.n_epochs or "auto",
                "metric": "euclidean", "init": "spectral"}

    def fit_transform(self, X, *, random_state: int = 0, graph=None) -> np.ndarray:
        import warnings

        X = np.ascontiguousarray(X, dtype=np.float32)
        n = X.shape[0]
        if n < 4:
            raise EvalkitError(f"embed.methods: UMAP needs at least 4 samples; got {n}")
        import umap

        k = min(self.cfg.n_neighbors, n - 1)
        kw = {}
        if graph is not None and graph.indices.shape[1] >= k - 1:
            # umap-learn's convention: each point is its own first neighbour
            idx = np.hstack([np.arange(n)[:, None], graph.indices[:, : k - 1]]).astype(np.int32)
            dist = np.hstack([np.zeros((n, 1), np.float32), graph.distances[:, : k - 1]]).astype(np.float32)
            kw["precomputed_knn"] = (idx, dist, None)
        # init="spectral" falls back to random with a warning on tiny/disconnected graphs
        init = "spectral" if n > k + 2 else "random"
        model = umap.UMAP(n_neighbors=k, min_dist=self.cfg.min_dist, n_epochs=self.cfg.n_epochs,
                          random_state=random_state, init=init, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _finite(model.fit_transform(X), self.name)


EMBEDDERS = {"tsne": TSNEEmbedder, "umap": UMAPEmbedder, "pca": PCAEmbedder}


def create_embedder(method: str, embed_cfg):
    """The embedder for ``method`` configured from an :class:`evalkit.config.EmbedConfig`."""
    if method not in EMBEDDERS:
        raise unknown("embedding method", method, EMBEDDERS)
    sub = getattr(embed_cfg, method, None)
    return EMBEDDERS[method](sub)
