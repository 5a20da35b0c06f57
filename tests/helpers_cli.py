"""Helpers for the command-line tests: tiny inputs on disk, a fake earlier run, folder digests."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import yaml

from evalkit.cli import main

RUN_FILES = {
    "index.html": b"<!doctype html><title>an earlier run</title>\n",
    "metrics.json": b'{"rows": [], "checks": [], "provenance": {}}\n',
    "config.yaml": b"name: earlier\nmodels: [{name: m, features: f.npz}]\n",
    "embeddings.npz": bytes(range(256)) * 4,
}


def make_run_folder(path: Path) -> Path:
    """A stand-in for an earlier run folder (what ``--out`` replaces), with a nested file too."""
    path.mkdir(parents=True)
    for name, data in RUN_FILES.items():
        (path / name).write_bytes(data)
    (path / "extra").mkdir()
    (path / "extra" / "note.txt").write_text("kept\n")
    return path


def tree_digest(path: Path) -> dict:
    """``{relative path: sha256}`` of every file under ``path``, plus ``path``'s hidden siblings.

    Equal digests before and after a command mean the folder is byte-for-byte unchanged and no
    temporary ``.NAME.tmp-*`` / ``.NAME.old-*`` folder was left beside it.
    """
    out = {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
           for p in sorted(path.rglob("*")) if p.is_file()}
    out["<siblings>"] = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))
    return out


def write_features(path: Path, X, y=None, names=None) -> Path:
    arrays = {"features": np.asarray(X)}
    if y is not None:
        arrays["labels"] = np.asarray(y)
    if names is not None:
        arrays["label_names"] = np.asarray(names)
    np.savez(path, **arrays)
    return path


def blobs(n_per_class: int = 10, n_classes: int = 3, dim: int = 6, seed: int = 0):
    """Separated Gaussian blobs: ``(X float32 (n, dim), y int64 (n,))``."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), n_per_class)
    centres = rng.normal(scale=5.0, size=(n_classes, dim))
    X = centres[y] + rng.normal(size=(y.size, dim))
    return X.astype(np.float32), y


def features_config(path: Path, features: str, *, name: str = "t", methods=("pca",), model_name: str = "m",
                    **sections) -> Path:
    """A config that reads ``features`` as both the data and one model entry."""
    cfg = {"name": name, "data": {"kind": "features", "path": str(features)},
           "models": [{"name": model_name, "features": str(features)}],
           "embed": {"methods": list(methods), "tsne": {"n_iter": 100}, "umap": {"n_epochs": 30}},
           "metrics": {"n_neighbors": 3}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_cli(argv, capsys):
    """``(exit code, stdout, stderr)`` of ``evalkit ARGV`` run in this process."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
