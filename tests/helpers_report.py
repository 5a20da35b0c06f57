"""A realistic fake Result for the report tests: random data, no torch, no embedders."""
from __future__ import annotations

import math
import zlib

import numpy as np

from evalkit.results import CKA, CheckResult, Curve, Embedding, FeatureSet, Result
from evalkit.score import rnx_grid, wilson_interval

LAYERS = ("features", "head")
DEFAULT_CHECKS = "default"

_METHOD_PARAMS = {
    "tsne": {"perplexity": 30, "learning_rate": "auto", "n_iter": 750, "init": "pca"},
    "umap": {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean"},
    "pca": {"n_components": 2, "whiten": False},
}


def make_result(n: int = 300, n_classes: int = 4, models=("a", "b"),
                methods=("tsne", "umap", "pca"), seeds=(0,), label_names=None,
                checks=DEFAULT_CHECKS, layers=LAYERS, extras: bool = True,
                name: str = "fake-run") -> Result:
    """A Result of ``n`` samples, ``len(models) * len(layers)`` feature sets.

    Coordinates are Gaussian blobs per class whose separation grows with the model's and the
    layer's position, so scores and pictures differ between feature sets. Everything is seeded:
    the same arguments give the same result.
    """
    rng = np.random.default_rng(1234)
    labels = np.sort(np.arange(n) % n_classes).astype(np.int64)
    rng.shuffle(labels)
    if label_names is None:
        label_names = tuple(f"class {i}" for i in range(n_classes))
    label_names = tuple(label_names)
    indices = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64)
    centres = rng.normal(size=(n_classes, 2)) * 4.0

    feature_sets, embeddings, rows = [], [], []
    for m, model in enumerate(models):
        for l, layer in enumerate(layers):
            spread = 2.5 / (1.0 + m + l)  # later models/layers separate classes better
            dim = 16 * (l + 1) * (m + 1)
            features = (np.eye(n_classes, dim)[labels] * 3
                        + rng.normal(scale=spread, size=(n, dim))).astype(np.float32)
            feature_sets.append(FeatureSet(model, layer, features))
            quality = 1.0 - spread / 3.0
            rows.append({
                "model": model, "layer": layer, "method": "features",
                "silhouette": round(0.6 * quality - 0.05, 4),
                "knn_accuracy": round(0.55 + 0.44 * quality, 4),
                "weighted_knn_accuracy": round(0.56 + 0.43 * quality, 4),
            })
            for method in methods:
                per_seed = {"trustworthiness": [], "continuity": [], "rnx_auc": [], "silhouette": [],
                            "knn_accuracy": []}
                for seed in seeds:
                    key = f"{model}/{layer}/{method}@{seed}".encode()
                    srng = np.random.default_rng(zlib.crc32(key))  # not hash(): salted per run
                    coords = centres[labels] + srng.normal(scale=spread * 1.6, size=(n, 2))
                    if method == "pca":
                        coords = coords * np.array([1.0, 0.35])
                    embeddings.append(Embedding(model, layer, method, int(seed),
                                                coords.astype(np.float32),
                                                params=dict(_METHOD_PARAMS.get(method, {})),
                                                seconds=round(0.5 + srng.random(), 3)))
                    jitter = srng.normal(scale=0.004, size=4)
                    base = 0.97 if method != "pca" else 0.85
                    per_seed["trustworthiness"].append(base * (0.85 + 0.15 * quality) + jitter[0])
                    per_seed["continuity"].append(base * (0.88 + 0.12 * quality) + jitter[1])
                    per_seed["rnx_auc"].append(base * 0.6 * quality + jitter[1])
                    per_seed["silhouette"].append(0.5 * quality + jitter[2])
                    per_seed["knn_accuracy"].append(0.5 + 0.45 * quality + jitter[3])
                row = {"model": model, "layer": layer, "method": method}
                for metric, values in per_seed.items():
                    row[metric] = round(float(np.mean(values)), 4)
                if len(seeds) > 1:
                    for metric, values in per_seed.items():
                        row[f"{metric}_std"] = round(float(np.std(values)), 4)
                rows.append(row)
    for row in rows:
        lo, hi = wilson_interval(row["knn_accuracy"], n)
        row["knn_accuracy_lo"], row["knn_accuracy_hi"] = round(lo, 4), round(hi, 4)
    # One undefined value, as score writes it when a metric cannot be computed.
    rows[0]["silhouette"] = float("nan")

    if checks == DEFAULT_CHECKS:
        first, last = models[0], models[-1]
        checks = (
            CheckResult("knn-raw", "knn_accuracy", last, layers[-1], "features", ">= 0.9",
                        rows[-1 - len(methods)]["knn_accuracy"], "pass", "fail"),
            CheckResult("trust-tsne", "trustworthiness", first, layers[0], methods[0], ">= 0.95",
                        0.9211, "fail", "fail", "trustworthiness 0.9211 < 0.95"),
            CheckResult("silhouette-warn", "silhouette", first, layers[0], "features", "> 0.2",
                        float("nan"), "warn", "warn", "value is undefined"),
        )
    checks = tuple(checks or ())

    keys = [fs.key for fs in feature_sets]
    result_extras = {}
    if extras:
        k = len(keys)
        cka = np.ones((k, k))
        for i in range(k):
            for j in range(i + 1, k):
                cka[i, j] = cka[j, i] = round(0.35 + 0.6 * math.exp(-abs(i - j) / 2.0), 4)
        result_extras = {
            "method_params": {m: dict(_METHOD_PARAMS.get(m, {})) for m in methods},
            "undefined_reasons": {"silhouette": "needs at least 2 classes with 2+ samples each"},
            "cka": CKA(tuple(keys), tuple(map(tuple, cka.tolist()))),
            "per_class_knn": {
                key: [round(float(v), 4) for v in np.clip(
                    0.6 + 0.07 * i + rng.normal(scale=0.08, size=n_classes), 0, 1)]
                for i, key in enumerate(keys)},
            "rnx_curves": {
                f"{key}/{m}": Curve(ks := rnx_grid(n - 2, 12),
                                    np.round((0.4 + 0.1 * i) * np.exp(-((np.log(ks) - 2.5) / 2.5) ** 2), 4))
                for i, key in enumerate(keys) for m in methods},
            "stability": ({f"{key}/{m}": round(float(rng.uniform(0.01, 0.2)), 4)
                           for key in keys for m in methods if m != "pca"}
                          if len(seeds) > 1 else {}),
            "notes": (f"stratified subsample of {n} from {10 * n} samples (seed 0)",
                      "features L2-normalised before kNN"),
            "n_neighbors": 10,
        }
        sizes = np.bincount(labels, minlength=n_classes)
        result_extras["per_class_knn_interval"] = {
            key: [tuple(round(b, 4) for b in wilson_interval(v, int(size))) for v, size in zip(values, sizes)]
            for key, values in result_extras["per_class_knn"].items()}

    provenance = {
        "started": "2024-05-01T12:00:00+00:00",
        "finished": "2024-05-01T12:03:25+00:00",
        "duration_s": 205.3,
        "device": "cpu",
        "python": "3.11.7",
        "versions": {"evalkit": "0.1.0", "numpy": "2.0.0", "torch": "2.3.0",
                     "scikit-learn": "1.5.0", "openTSNE": "1.0.1", "umap-learn": "0.5.6"},
        "seeds": list(seeds),
        "command": ["evalkit", "report", "configs/demo.yaml", "--out", "runs/demo"],
        "dataset": f"digits (N={n})",
    }
    config_yaml = (f"name: {name}\n"
                   "data:\n  kind: digits\n  max_samples: 2000\n"
                   "models:\n" + "".join(f"  - name: {m}\n    source: demo:cnn\n" for m in models)
                   + f"embed:\n  methods: [{', '.join(methods)}]\n"
                   + f"  seeds: [{', '.join(map(str, seeds))}]\n"
                   "metrics:\n  n_neighbors: 10\n")
    return Result(name=name, labels=labels, label_names=label_names, indices=indices,
                  feature_sets=tuple(feature_sets), embeddings=tuple(embeddings),
                  rows=tuple(rows), checks=checks, provenance=provenance,
                  config_yaml=config_yaml, **result_extras)
