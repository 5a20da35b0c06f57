"""The whole run: config -> data -> extract -> neighbours -> embed -> score -> report / check.

``run_report(config, out_dir)`` is what ``evalkit report`` calls; notebooks can call the
stages one by one (``evalkit.data.load_dataset``, ``evalkit.extract.extract_model``, ...).
"""
from __future__ import annotations

import itertools
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from evalkit.errors import EvalkitError
from evalkit.results import Embedding, RunResult


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def validate_sizes(config, n_samples: int, n_classes: int) -> None:
    """Fail early, naming the key, when the data are too small for the chosen parameters."""
    k = config.metrics.n_neighbors
    if n_samples < 4:
        raise EvalkitError(f"data: {n_samples} samples; evalkit needs at least 4 (raise data.max_samples or add data)")
    if "tsne" in config.embed.methods or "umap" in config.embed.methods or True:
        if not k < n_samples / 2:
            raise EvalkitError(
                f"metrics.n_neighbors: {k} needs more than {2 * k} samples (trustworthiness requires "
                f"n_neighbors < n_samples / 2); got {n_samples}: lower metrics.n_neighbors or use more data"
            )


def _mean_std(values):
    vals = [v for v in values if v is not None and np.isfinite(v)]
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


def _versions() -> dict:
    from importlib import metadata

    import evalkit

    out = {"python": platform.python_version(), "evalkit": evalkit.__version__}
    for pkg in ("numpy", "scikit-learn", "torch", "torchvision", "timm", "openTSNE", "umap-learn", "pynndescent", "matplotlib"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def score_feature_set(fs, labels, config, *, device=None, notes=None, undefined=None):
    """Rows, embeddings, extras for one feature set (every method x seed)."""
    from evalkit import score
    from evalkit.embed import create_embedder, reduce_dims
    from evalkit.neighbors import knn_graph

    X = fs.features
    n = X.shape[0]
    mc = config.metrics
    k = mc.n_neighbors
    knn_k = mc.knn_k or k
    n_classes = np.unique(labels).size
    graph_k = min(n - 1, max(k, knn_k, mc.weighted_knn_k, config.embed.umap.n_neighbors))
    graph = knn_graph(X, n_neighbors=graph_k, device=device)

    sil_sample = mc.silhouette_max_samples if (mc.silhouette_max_samples and n > mc.silhouette_max_samples) else None
    if sil_sample and notes is not None:
        notes.add(f"silhouette: computed on a seeded stratified sample of {sil_sample:,} of {n:,} points "
                  f"(metrics.silhouette_max_samples); every other score uses all points")

    def sil(Z):
        if n_classes < 2 or n_classes >= n:
            return None
        return score.silhouette(Z, labels, device=device, sample_size=sil_sample)

    if n_classes < 2 and undefined is not None:
        undefined["silhouette"] = "not defined for a single class"
        undefined["knn_accuracy"] = "not meaningful for a single class"
        undefined["weighted_knn_accuracy"] = "not meaningful for a single class"
    feature_row = {
        "model": fs.model, "layer": fs.layer, "method": "features", "n_features": int(X.shape[1]),
        "silhouette": sil(X),
        "knn_accuracy": score.knn_accuracy(X, labels, n_neighbors=knn_k, graph=graph) if n_classes > 1 else None,
        "weighted_knn_accuracy": score.weighted_knn_accuracy(X, labels, n_neighbors=min(mc.weighted_knn_k, n - 1))
        if n_classes > 1 else None,
    }
    per_class = score.per_class_knn_accuracy(X, labels, n_neighbors=knn_k, graph=graph)

    Xr = reduce_dims(X, config.embed.pca_dims)
    embeddings, rows, method_params, stability = [], [], {}, {}
    for method in config.embed.methods:
        embedder = create_embedder(method, config.embed)
        method_params[method] = embedder.params(n) if method != "pca" else embedder.params()
        if method in ("tsne", "umap") and X.shape[1] > config.embed.pca_dims:
            method_params[method]["input"] = f"PCA to {config.embed.pca_dims} dims"
        per_seed = []
        for seed in config.embed.seeds:
            t0 = time.perf_counter()
            Z = embedder.fit_transform(X if method == "pca" else Xr, random_state=seed,
                                       graph=graph if (method == "umap" and Xr is X) else None)
            embeddings.append(Embedding(fs.model, fs.layer, method, seed, Z, method_params[method],
                                        time.perf_counter() - t0))
            per_seed.append(Z)
        # one pass over X's distances scores every seed of this method
        nb = score.neighbourhood_scores(X, {str(i): Z for i, Z in enumerate(per_seed)}, n_neighbors=k,
                                        graph_X=graph if graph.indices.shape[1] >= k else None, device=device)
        vals = {
            "trustworthiness": [nb[str(i)]["trustworthiness"] for i in range(len(per_seed))],
            "continuity": [nb[str(i)]["continuity"] for i in range(len(per_seed))],
            "silhouette": [sil(Z) for Z in per_seed],
            "knn_accuracy": [score.knn_accuracy(Z, labels, n_neighbors=knn_k) if n_classes > 1 else None
                             for Z in per_seed],
        }
        row = {"model": fs.model, "layer": fs.layer, "method": method}
        for metric, vs in vals.items():
            mean, std = _mean_std(vs)
            row[metric] = mean
            if len(per_seed) > 1:
                row[f"{metric}_std"] = std
        rows.append(row)
        if len(per_seed) > 1:
            stability[f"{fs.model}/{fs.layer}/{method}"] = procrustes_disparity(per_seed)
    return feature_row, rows, embeddings, per_class, method_params, stability


def run_report(config, out_dir, *, use_cache: bool = True, log=_stderr, argv=None) -> RunResult:
    """Run every stage and write the run folder atomically; returns the :class:`RunResult`."""
    from evalkit.check import evaluate_checks
    from evalkit.data import load_dataset
    from evalkit.extract import extract_model, resolve_device
    from evalkit.report import write_run
    from evalkit.score import linear_cka

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    dataset = load_dataset(config.data)
    labels = dataset.labels
    n_classes = int(np.unique(labels).size)
    validate_sizes(config, len(dataset), n_classes)
    log(f"evalkit: {dataset.name}: {len(dataset):,} samples, {n_classes} classes")

    device = resolve_device(config.extract.device)
    feature_sets = []
    for mcfg in config.models:
        feature_sets.extend(extract_model(mcfg, dataset, config.extract, use_cache=use_cache, log=log))
    t_extract = time.perf_counter() - t0

    notes: set = set()
    undefined: dict = {}
    rows, embeddings, per_class, method_params, stability = [], [], {}, {}, {}
    for fs in feature_sets:
        if fs.features.shape[0] != len(dataset):
            raise EvalkitError(f"model {fs.model!r}: {fs.features.shape[0]} feature rows for {len(dataset)} samples")
        t1 = time.perf_counter()
        frow, erows, embs, pc, mp, stab = score_feature_set(fs, labels, config, device=device, notes=notes,
                                                            undefined=undefined)
        rows.append(frow)
        rows.extend(erows)
        embeddings.extend(embs)
        per_class[f"{fs.model}/{fs.layer}"] = [None if not np.isfinite(v) else float(v) for v in pc]
        method_params.update(mp)
        stability.update(stab)
        log(f"  {fs.model}/{fs.layer}: {fs.features.shape[1]} features, embedded and scored in "
            f"{time.perf_counter() - t1:.1f} s")

    keys = [fs.key for fs in feature_sets]
    cka = [[linear_cka(a.features, b.features) for b in feature_sets] for a in feature_sets]
    checks = evaluate_checks(rows, config.checks)
    finished = datetime.now(timezone.utc)
    provenance = {
        "started": started.isoformat(timespec="seconds"),
        "finished": finished.isoformat(timespec="seconds"),
        "duration_s": round(time.perf_counter() - t0, 2),
        "extract_s": round(t_extract, 2),
        "device": str(device) + (f" ({_gpu_name()})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()})"),
        "host": platform.node(),
        "platform": platform.platform(),
        "command": " ".join(argv) if argv else "evalkit report",
        "seeds": list(config.embed.seeds),
        "data_seed": config.data.seed,
        "dataset": dataset.name,
        "n_samples": len(dataset),
        "n_classes": n_classes,
        "versions": _versions(),
    }
    result = RunResult(
        name=config.name, labels=labels, label_names=dataset.label_names, indices=dataset.indices,
        feature_sets=tuple(feature_sets), embeddings=tuple(embeddings), rows=tuple(rows), checks=tuple(checks),
        provenance=provenance, config_yaml=config.to_yaml(),
        extras={
            "per_class_knn": per_class, "cka": {"keys": keys, "matrix": cka}, "method_params": method_params,
            "stability": stability, "notes": sorted(notes), "undefined_reasons": undefined,
            "n_neighbors": config.metrics.n_neighbors, "knn_k": config.metrics.knn_k or config.metrics.n_neighbors,
        },
    )
    write_run(Path(out_dir), result)
    return result


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name(0)
