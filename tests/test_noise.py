import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.noise import estimate_coarse_transition_matrix, identity_prior

SAMPLES_PER_ROW = 50


def random_transition_matrix(rng: np.random.Generator, n_coarse: int) -> np.ndarray:
    """Rows with a dominant diagonal in [0.6, 0.95], the rest spread at random."""
    matrix = np.zeros((n_coarse, n_coarse))
    for i in range(n_coarse):
        diagonal = rng.uniform(0.6, 0.95)
        off = rng.dirichlet(np.ones(n_coarse - 1)) * (1.0 - diagonal)
        matrix[i] = np.insert(off, i, diagonal)
    return matrix


def largest_remainder_counts(row: np.ndarray, total: int) -> np.ndarray:
    exact = row * total
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:shortfall]] += 1
    return counts


def pairs_from_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    true, weak = [], []
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            true += [i] * int(count)
            weak += [j] * int(count)
    return np.array(true, dtype=np.int64), np.array(weak, dtype=np.int64)


@settings(max_examples=60, deadline=None)
@given(n_coarse=st.integers(2, 8), seed=st.integers(0, 2**32 - 1))
def test_recovers_known_matrix_from_50_stratified_samples_per_row(n_coarse: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    true_matrix = random_transition_matrix(rng, n_coarse)
    counts = np.stack([largest_remainder_counts(row, SAMPLES_PER_ROW) for row in true_matrix])
    true, weak = pairs_from_counts(counts)
    order = rng.permutation(true.size)

    estimate = estimate_coarse_transition_matrix(true[order], weak[order], n_coarse)

    assert np.abs(estimate.matrix - true_matrix).max() <= 0.05
    np.testing.assert_array_equal(estimate.counts, counts)
    np.testing.assert_array_equal(estimate.row_support, np.full(n_coarse, SAMPLES_PER_ROW))
    np.testing.assert_allclose(estimate.matrix.sum(axis=1), 1.0)


def test_mean_estimate_over_random_draws_is_close() -> None:
    rng = np.random.default_rng(7)
    n_coarse = 5
    true_matrix = random_transition_matrix(rng, n_coarse)
    estimates = []
    for _ in range(200):
        counts = np.stack([rng.multinomial(SAMPLES_PER_ROW, row) for row in true_matrix])
        true, weak = pairs_from_counts(counts)
        estimates.append(estimate_coarse_transition_matrix(true, weak, n_coarse).matrix)
    assert np.abs(np.mean(estimates, axis=0) - true_matrix).max() <= 0.05


def test_missing_labels_are_ignored_and_support_counted() -> None:
    true = np.array([0, 0, 0, 1, MISSING_LABEL, 1, 2], dtype=np.int64)
    weak = np.array([0, 1, MISSING_LABEL, 1, 2, 0, MISSING_LABEL], dtype=np.int64)
    estimate = estimate_coarse_transition_matrix(true, weak, 3, prior_strength=0.0)
    np.testing.assert_array_equal(estimate.row_support, [2, 2, 0])
    np.testing.assert_array_equal(estimate.counts, [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(estimate.matrix[0], [0.5, 0.5, 0.0])
    # An empty row with no prior weight still falls back to the near-identity prior.
    np.testing.assert_allclose(estimate.matrix[2], identity_prior(3)[2])


def test_row_without_trusted_samples_is_near_identity_and_never_zero() -> None:
    true = np.array([0, 0, 1], dtype=np.int64)
    weak = np.array([1, 1, 1], dtype=np.int64)
    estimate = estimate_coarse_transition_matrix(true, weak, 4)
    assert estimate.row_support[3] == 0
    assert estimate.matrix[3, 3] > 0.95
    assert np.all(estimate.matrix > 0)
    np.testing.assert_allclose(estimate.matrix.sum(axis=1), 1.0)
    # The prior pulls a two-sample row towards the identity but the evidence dominates.
    assert estimate.matrix[0, 1] > estimate.matrix[0, 0]


def test_stronger_prior_pulls_towards_identity() -> None:
    true = np.zeros(10, dtype=np.int64)
    weak = np.ones(10, dtype=np.int64)
    weak_prior = estimate_coarse_transition_matrix(true, weak, 2, prior_strength=1.0)
    strong_prior = estimate_coarse_transition_matrix(true, weak, 2, prior_strength=20.0)
    assert strong_prior.matrix[0, 0] > weak_prior.matrix[0, 0]
    assert strong_prior.row_standard_error()[0, 0] < 0.5


def test_to_dict_is_json_serialisable() -> None:
    estimate = estimate_coarse_transition_matrix(np.array([0, 1]), np.array([0, 0]), 2)
    data = json.loads(json.dumps(estimate.to_dict()))
    assert data["row_support"] == [1, 1]
    assert np.allclose(np.array(data["matrix"]).sum(axis=1), 1.0)


@pytest.mark.parametrize(
    ("true", "weak", "n_coarse", "prior", "message"),
    [
        (np.array([0, 1]), np.array([0]), 2, 1.0, "differ in length"),
        (np.array([0, 2]), np.array([0, 1]), 2, 1.0, "outside"),
        (np.array([0, -3]), np.array([0, 1]), 2, 1.0, "outside"),
        (np.array([[0, 1]]), np.array([0, 1]), 2, 1.0, "1-d"),
        (np.array([0.5, 1.0]), np.array([0, 1]), 2, 1.0, "integer"),
        (np.array([0, 1]), np.array([0, 1]), 2, -1.0, "prior_strength"),
        (np.array([0, 1]), np.array([0, 1]), 0, 1.0, "n_coarse"),
    ],
)
def test_bad_input_raises(true, weak, n_coarse, prior, message) -> None:
    with pytest.raises(ModelInputError, match=message):
        estimate_coarse_transition_matrix(true, weak, n_coarse, prior_strength=prior)
