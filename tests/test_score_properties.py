"""Properties of the metrics that hold for any input (hypothesis)."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from evalkit.score import (
    continuity,
    knn_accuracy,
    linear_cka,
    neighbourhood_scores,
    per_class_knn_accuracy,
    silhouette,
    trustworthiness,
    weighted_knn_accuracy,
)

FEW = settings(max_examples=25, deadline=None)


@st.composite
def continuous_case(draw, max_n=60, max_d=8):
    """Random Gaussian data (tie-free with probability 1), a 2-D embedding, labels and a legal k."""
    n = draw(st.integers(8, max_n))
    d = draw(st.integers(1, max_d))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    Z = rng.normal(size=(n, 2))
    labels = rng.integers(0, draw(st.integers(1, 5)), n)
    k = draw(st.integers(1, (n - 1) // 2))  # k < n / 2
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return X.astype(dtype), Z.astype(dtype), labels, k, rng


@st.composite
def tied_case(draw):
    """Small integer grids: many duplicate points and equal distances."""
    n = draw(st.integers(6, 30))
    d = draw(st.integers(1, 4))
    X = draw(arrays(np.float64, (n, d), elements=st.integers(-2, 2).map(float)))
    Z = draw(arrays(np.float64, (n, 2), elements=st.integers(-2, 2).map(float)))
    labels = draw(arrays(np.int64, (n,), elements=st.integers(0, 3)))
    k = draw(st.integers(1, (n - 1) // 2))
    return X, Z, labels, k


def _random_rotation(rng, d):
    Q, R = np.linalg.qr(rng.normal(size=(d, d)))
    return Q * np.sign(np.diag(R))


@FEW
@given(continuous_case())
def test_similarity_transform_is_perfectly_trustworthy(case):
    X, _, _, k, rng = case
    X = X.astype(np.float64)
    Z = 3.7 * X @ _random_rotation(rng, X.shape[1]) + rng.normal(size=X.shape[1]) * 10
    assert abs(trustworthiness(X, Z, n_neighbors=k) - 1.0) <= 1e-9
    assert abs(continuity(X, Z, n_neighbors=k) - 1.0) <= 1e-9


@FEW
@given(continuous_case())
def test_scores_in_range(case):
    X, Z, labels, k, _ = case
    for value in (trustworthiness(X, Z, n_neighbors=k), continuity(X, Z, n_neighbors=k),
                  knn_accuracy(X, labels, n_neighbors=k), weighted_knn_accuracy(X, labels, n_neighbors=k)):
        assert isinstance(value, float) and 0.0 <= value <= 1.0
    s = silhouette(X, labels, block_size=7)
    assert np.isnan(s) == (len(np.unique(labels)) < 2) and (np.isnan(s) or -1.0 <= s <= 1.0)
    assert 0.0 <= linear_cka(X, Z) <= 1.0 + 1e-12


@FEW
@given(continuous_case())
def test_permutation_invariance(case):
    X, Z, labels, k, rng = case
    p = rng.permutation(len(X))
    assert abs(trustworthiness(X[p], Z[p], n_neighbors=k) - trustworthiness(X, Z, n_neighbors=k)) <= 1e-12
    assert abs(continuity(X[p], Z[p], n_neighbors=k) - continuity(X, Z, n_neighbors=k)) <= 1e-12
    assert knn_accuracy(X[p], labels[p], n_neighbors=k) == knn_accuracy(X, labels, n_neighbors=k)
    s, sp = silhouette(X, labels), silhouette(X[p], labels[p])
    assert (np.isnan(s) and np.isnan(sp)) or abs(s - sp) <= 1e-9
    assert abs(linear_cka(X[p], Z[p]) - linear_cka(X, Z)) <= 1e-9


@FEW
@given(continuous_case(max_n=40))
def test_block_size_does_not_change_scores(case):
    X, Z, labels, k, rng = case
    block = int(rng.integers(1, len(X) + 1))
    assert trustworthiness(X, Z, n_neighbors=k, block_size=block) == trustworthiness(X, Z, n_neighbors=k)
    assert continuity(X, Z, n_neighbors=k, block_size=block) == continuity(X, Z, n_neighbors=k)
    both = neighbourhood_scores(X, {"z": Z}, n_neighbors=k, block_size=block)["z"]
    assert both["trustworthiness"] == trustworthiness(X, Z, n_neighbors=k)
    assert both["continuity"] == continuity(X, Z, n_neighbors=k)


@FEW
@given(tied_case())
def test_no_exception_and_in_range_with_ties_and_duplicates(case):
    X, Z, labels, k = case
    for value in (trustworthiness(X, Z, n_neighbors=k), continuity(X, Z, n_neighbors=k),
                  knn_accuracy(X, labels, n_neighbors=k), weighted_knn_accuracy(X, labels, n_neighbors=k)):
        assert 0.0 <= value <= 1.0
    s = silhouette(X, labels, block_size=5)
    assert np.isnan(s) or -1.0 <= s <= 1.0
    per_class = per_class_knn_accuracy(X, labels, n_neighbors=k)
    assert per_class.shape == (labels.max() + 1,)
    present = np.bincount(labels, minlength=len(per_class)) > 0
    assert np.isnan(per_class[~present]).all() and ((per_class[present] >= 0) & (per_class[present] <= 1)).all()
    c = linear_cka(X, Z)
    assert np.isnan(c) or 0.0 <= c <= 1.0 + 1e-12
