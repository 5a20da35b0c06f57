"""Plain data passed between the pipeline's stages and into the report.

Every stage returns one of these frozen dataclasses; nothing here does work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class FeatureSet:
    """Features of one model at one layer.

    Attributes
    ----------
    model, layer : str
        Names as the config spells them.
    features : ndarray of shape (n_samples, n_features), float32
    """

    model: str
    layer: str
    features: np.ndarray

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}"


@dataclass(frozen=True)
class Embedding:
    """One 2-D embedding of one feature set by one method and seed."""

    model: str
    layer: str
    method: str
    seed: int
    coords: np.ndarray  # (n_samples, 2) float32
    params: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.model}/{self.layer}/{self.method}"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one threshold check against one metrics row."""

    name: str
    metric: str
    model: str
    layer: str
    method: str
    condition: str  # human-readable, e.g. ">= 0.9"
    value: float | None
    status: str  # "pass" | "fail" | "warn" | "error"
    severity: str  # "fail" | "warn"
    message: str = ""

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class RunResult:
    """Everything the report and metrics.json are made from.

    Attributes
    ----------
    name : str
        The config's ``name``.
    labels : ndarray of shape (n_samples,), int64
    label_names : tuple of str
        ``label_names[labels[i]]`` is the class name of sample i.
    indices : ndarray of shape (n_samples,), int64
        Positions of the samples in the dataset split.
    feature_sets : tuple of FeatureSet
        In config order (models, then layers).
    embeddings : tuple of Embedding
        Every method x seed for every feature set.
    rows : tuple of dict
        metrics.json rows: ``model``, ``layer``, ``method``, then one key per metric
        (mean across seeds), ``<metric>_std`` when there are several seeds.
    checks : tuple of CheckResult
    provenance : dict
        Date, duration, device, versions, seeds, sampling notes.
    config_yaml : str
        The fully resolved config as YAML.
    extras : dict
        Optional report material (per-class kNN accuracy, CKA matrix, seed stability...).
    """

    name: str
    labels: np.ndarray
    label_names: tuple
    indices: np.ndarray
    feature_sets: tuple
    embeddings: tuple
    rows: tuple
    checks: tuple
    provenance: dict
    config_yaml: str
    extras: dict = field(default_factory=dict)
