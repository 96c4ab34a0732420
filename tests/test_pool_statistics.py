"""PoolStatistics: the pass over a pool that every fit makes first, made once for all the fits of a round, with the
same bits as a fit that makes it itself."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from model.errors import ModelInputError
from model.finegrained import FineGrainedClassifier, PoolStatistics, TrainingConfig, select_training_config
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.learner import SERVER_SETTINGS, ActiveLearner, RoundLabels
from model.query import ROW_CHUNK

HIERARCHY = LabelHierarchy.from_groups({"a": ["a0", "a1"], "b": ["b0", "b1", "b2"], "c": ["c0"]})
DIM = 8
N = 3 * ROW_CHUNK + 123  # four slices, the last one short
TRANSITION = np.array([[0.8, 0.2, 0.0], [0.1, 0.8, 0.1], [0.0, 0.3, 0.7]])


def pool_problem(dtype: type = np.float16) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of several scales (so norms differ), 30 fine labels, weak labels on most other rows: a whole slice and
    scattered rows have none (not used by a fit), and a few rows carry human coarse labels."""
    rng = np.random.default_rng(7)
    embeddings = (rng.standard_normal((N, DIM)) * rng.uniform(0.2, 4.0, (N, 1))).astype(dtype)
    fine = np.full(N, MISSING_LABEL, dtype=np.int64)
    labelled = rng.choice(N, 30, replace=False)
    fine[labelled] = rng.integers(0, HIERARCHY.n_fine, 30)
    weak = rng.integers(0, HIERARCHY.n_coarse, N).astype(np.int64)
    weak[ROW_CHUNK : 2 * ROW_CHUNK] = MISSING_LABEL
    weak[rng.random(N) < 0.05] = MISSING_LABEL
    weak[labelled] = MISSING_LABEL
    human_coarse = np.full(N, MISSING_LABEL, dtype=np.int64)
    human_coarse[rng.choice(N, 12, replace=False)] = rng.integers(0, HIERARCHY.n_coarse, 12)
    return embeddings, fine, weak, human_coarse


def test_statistics_give_the_pools_normalised_rows_and_their_mean() -> None:
    embeddings, *_ = pool_problem()
    pool = PoolStatistics(embeddings)
    rows = embeddings.astype(np.float64)
    normalised = rows / np.linalg.norm(rows, axis=1)[:, None]
    used = np.ones(N, dtype=bool)
    used[ROW_CHUNK + 7 :: 3] = False  # slices partly used as well as whole
    picked = np.array([N - 1, 5, ROW_CHUNK + 3, 5])
    mean, centred = pool.mean_and_rows(used, picked)
    assert mean.dtype == np.float32 and centred.dtype == np.float32 and centred.shape == (4, DIM)
    np.testing.assert_allclose(mean, normalised[used].mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(centred, normalised[picked] - normalised[used].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(pool.normalised(picked), normalised[picked], atol=1e-6)
    assert pool.normalised([]).shape == (0, DIM)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("epochs", [3, 40])  # 40 steps of 512 go round the weak rows: they are prepared once
def test_a_fit_given_the_statistics_is_bit_for_bit_the_fit_that_computes_them(dtype: type, epochs: int) -> None:
    embeddings, fine, weak, human_coarse = pool_problem(dtype)
    config = TrainingConfig(epochs=epochs)
    pool = PoolStatistics(embeddings)
    alone = FineGrainedClassifier(HIERARCHY, DIM, config).fit(embeddings, fine, weak, TRANSITION, human_coarse)
    shared = FineGrainedClassifier(HIERARCHY, DIM, config).fit(embeddings, fine, weak, TRANSITION, human_coarse,
                                                               pool=pool)
    again = FineGrainedClassifier(HIERARCHY, DIM, config).fit(embeddings, fine, weak, TRANSITION, human_coarse,
                                                              pool=pool)
    assert alone._parameters is not None and shared._parameters is not None and again._parameters is not None
    for name, value in alone._parameters.items():
        np.testing.assert_array_equal(shared._parameters[name], value, err_msg=name)
        np.testing.assert_array_equal(again._parameters[name], value, err_msg=name)
    # The mean is over the rows some label trains (not the slice without weak labels).
    used = (fine != MISSING_LABEL) | (weak != MISSING_LABEL) | (human_coarse != MISSING_LABEL)
    rows = embeddings.astype(np.float64)
    expected_mean = (rows[used] / np.linalg.norm(rows[used], axis=1)[:, None]).mean(axis=0)
    np.testing.assert_allclose(alone._parameters["feature_mean"], expected_mean, atol=1e-6)


def test_a_round_passes_over_the_pool_once(monkeypatch) -> None:
    """The training fit, the cross-validation fits and the out-of-fold fits of a round check and record each slice
    of the pool once, between them; a fit on its own records its own."""
    recorded: list[tuple[int, int]] = []
    convert = PoolStatistics._slice

    def counted(self: PoolStatistics, index: int) -> np.ndarray:
        if not self._known[index]:
            recorded.append((id(self), index))
        return convert(self, index)

    monkeypatch.setattr(PoolStatistics, "_slice", counted)
    embeddings, fine, weak, human_coarse = pool_problem()
    settings = replace(SERVER_SETTINGS, config_candidates={"weak_loss_weight": (0.2, 1.0)})
    learner = ActiveLearner(HIERARCHY, DIM, settings)
    labels = RoundLabels(fine=fine, weak_coarse=weak, human_coarse=human_coarse)
    model = learner.train(embeddings, labels)  # 2 candidates x 3 folds, then the training fit
    rows, held_out = learner.out_of_fold_fine(embeddings, labels, model)  # 3 more fits
    assert [index for _, index in recorded] == [0, 1, 2, 3] and len({pool for pool, _ in recorded}) == 1

    # A model without its statistics: the three out-of-fold fits record the slices once for them all, and predict
    # the same.
    rows_again, held_out_again = learner.out_of_fold_fine(embeddings, labels, replace(model, pool=None))
    assert len(recorded) == 8
    np.testing.assert_array_equal(rows, rows_again)
    np.testing.assert_array_equal(held_out, held_out_again)

    for _ in range(2):
        FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=2)).fit(embeddings, fine, weak)
    assert len(recorded) == 16

    select_training_config(HIERARCHY, embeddings, fine, weak, TRANSITION, TrainingConfig(epochs=3),
                           {"weak_loss_weight": [0.2, 1.0]}, human_coarse_labels=human_coarse)
    assert len(recorded) == 20  # its own statistics, shared by its six fits


def test_statistics_are_computed_when_first_read() -> None:
    embeddings, *_ = pool_problem(np.float32)
    embeddings[2 * ROW_CHUNK + 1, 0] = np.inf
    pool = PoolStatistics(embeddings)  # converts nothing yet
    np.testing.assert_allclose(pool.normalised(np.array([3, ROW_CHUNK + 5]))[0],
                               embeddings[3] / np.linalg.norm(embeddings[3]), rtol=1e-6)
    assert pool._known.tolist() == [True, True, False, False]  # only the slices those rows are in
    with pytest.raises(ModelInputError, match=rf"NaN or inf in rows \[{2 * ROW_CHUNK + 1}\]"):
        pool.mean_and_rows(np.ones(N, dtype=bool), np.zeros(0, dtype=np.int64))


def test_statistics_of_another_array_are_refused() -> None:
    embeddings, fine, weak, _ = pool_problem()
    other = PoolStatistics(embeddings.copy())
    with pytest.raises(ModelInputError, match="another embeddings array"):
        FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=2)).fit(embeddings, fine, weak, pool=other)


def test_a_shared_pass_still_refuses_non_finite_rows() -> None:
    embeddings, fine, weak, human_coarse = pool_problem(np.float32)
    embeddings[ROW_CHUNK + 9, 3] = np.nan
    pool = PoolStatistics(embeddings)  # computed when a fit first reads it
    with pytest.raises(ModelInputError, match=rf"NaN or inf in rows \[{ROW_CHUNK + 9}\]"):
        FineGrainedClassifier(HIERARCHY, DIM, TrainingConfig(epochs=2)).fit(embeddings, fine, weak, pool=pool)
    with pytest.raises(ModelInputError, match=rf"NaN or inf in rows \[{ROW_CHUNK + 9}\]"):
        ActiveLearner(HIERARCHY, DIM, SERVER_SETTINGS).train(
            embeddings, RoundLabels(fine=fine, weak_coarse=weak, human_coarse=human_coarse))


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((0, DIM)), np.array([["a"] * DIM])])
def test_statistics_of_a_malformed_pool_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ModelInputError, match="embeddings"):
        PoolStatistics(bad)
