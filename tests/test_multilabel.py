"""model.multilabel: per-label noise, thresholds, the classifier on spatial maps, strategies and metrics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.errors import ModelInputError
from model.multilabel import (
    MultiLabelClassifier,
    MultiLabelLearner,
    MultiLabelPool,
    MultiLabelRoundLabels,
    MultiLabelSettings,
    MultiLabelTrainingConfig,
    SpatialProjection,
    calibrate_label_thresholds,
    estimate_label_transitions,
    mean_average_precision,
    micro_f1,
    multilabel_priority_scores,
)
from model.multilabel.metrics import average_precision
from model.multilabel.noise import identity_transitions
from model.multilabel.strategies import label_set_uncertainty
from model.noise import identity_prior
from model.query import STRATEGIES, LabelCosts, LabelKind, Selection, create_strategy

# ---- per-label noise --------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    false_positive=st.lists(st.floats(0.0, 0.45), min_size=1, max_size=4),
    false_negative=st.lists(st.floats(0.0, 0.45), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_label_transitions_recover_a_known_2x2(false_positive, false_negative, seed):
    n_labels = min(len(false_positive), len(false_negative))
    known = np.array([[[1 - fp, fp], [fn, 1 - fn]] for fp, fn in zip(false_positive, false_negative)])
    rng = np.random.default_rng(seed)
    n = 20_000
    truth = rng.random((n, n_labels)) < 0.4
    says_present = np.where(truth, known[:, 1, 1], known[:, 0, 1])
    weak = rng.random((n, n_labels)) < says_present
    estimate = estimate_label_transitions(truth, weak)
    # 8000 trusted pairs per row: the binomial standard error is below 0.006.
    assert np.abs(estimate.matrices - known).max() < 0.03
    assert np.allclose(estimate.matrices.sum(axis=2), 1.0)
    assert estimate.counts.sum() == n * n_labels


def test_per_label_transitions_use_the_identity_prior_of_T_and_only_trusted_rows():
    assert np.allclose(identity_transitions(3).matrices, identity_prior(2)[None])
    truth = np.array([[1, 0], [1, 0], [0, 0]], dtype=bool)
    weak = np.array([[0, 1], [0, 1], [1, 1]], dtype=bool)
    trusted = np.array([True, True, False])
    estimate = estimate_label_transitions(truth, weak, trusted, prior_strength=1.0)
    # Label 0, truly present twice, read absent twice: (2 + 1 * 0.01) / 3 towards "absent".
    assert estimate.matrices[0, 1, 0] == pytest.approx((2 + identity_prior(2)[1, 0]) / 3)
    # Label 0 never truly absent among trusted rows: that row is the prior.
    assert np.allclose(estimate.matrices[0, 0], identity_prior(2)[0])
    assert estimate.counts[:, :, :].sum() == 4  # the untrusted row is not counted
    with pytest.raises(ModelInputError):
        estimate_label_transitions(truth, weak[:, :1])


# ---- thresholds ----------------------------------------------------------------------------------------------


def test_thresholds_are_calibrated_per_label_where_one_global_cut_off_fails():
    rng = np.random.default_rng(0)
    n = 400
    truth = rng.random((n, 3)) < 0.3
    # The same evidence on three different scales: label 0 scores around 0.1, label 2 around 0.8.
    evidence = np.where(truth, 1.0, 0.0) + rng.normal(0, 0.25, (n, 3))
    scores = evidence * np.array([0.05, 0.2, 0.4]) + np.array([0.05, 0.3, 0.6])
    thresholds = calibrate_label_thresholds(scores, truth)
    assert thresholds.calibrated.all()
    assert np.all(np.diff(thresholds.thresholds) > 0.05)  # one cut per scale
    per_label = micro_f1(thresholds.apply(scores), truth)
    global_cut = max(micro_f1(scores >= t, truth) for t in np.linspace(0, 1, 101))
    assert per_label > 0.9 and per_label > global_cut + 0.2
    assert np.all(thresholds.f1 > 0.85)


def test_thresholds_fall_back_to_the_human_prevalence_without_enough_positives():
    rng = np.random.default_rng(1)
    pool_scores = rng.random((1000, 2))
    truth = np.zeros((5, 2), dtype=bool)
    truth[:2, 0] = True  # two positives: fewer than min_positives
    thresholds = calibrate_label_thresholds(pool_scores[:5], truth, pool_scores=pool_scores, default_positive_rate=0.2)
    assert not thresholds.calibrated.any() and np.isnan(thresholds.f1).all()
    called = thresholds.apply(pool_scores).mean(axis=0)
    assert called[0] == pytest.approx((2 + 0.2) / 6, abs=0.02)
    assert called[1] == pytest.approx(0.2 / 6, abs=0.02)


# ---- classifier on spatial maps -------------------------------------------------------------------------------


def synthetic_maps(n: int, n_labels: int = 5, size: int = 4, channels: int = 32, seed: int = 0):
    """Each present label adds its own pattern at one random position of a noise map."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(99).standard_normal((n_labels, channels)) * 2.5
    truth = rng.random((n, n_labels)) < 0.3
    maps = rng.standard_normal((n, size, size, channels)).astype(np.float32)
    for i, label in zip(*np.nonzero(truth)):
        y, x = rng.integers(size, size=2)
        maps[i, y, x] += patterns[label]
    text = np.random.default_rng(7).standard_normal((n_labels, 12)).astype(np.float32)
    return maps.astype(np.float16), truth, text / np.linalg.norm(text, axis=1, keepdims=True)


def test_classifier_learns_labels_from_spatial_maps_and_round_trips_its_checkpoint(tmp_path):
    maps, truth, text = synthetic_maps(360)
    names = tuple(f"label {i}" for i in range(truth.shape[1]))
    projection = SpatialProjection.fit(maps[:300], 24)
    classifier = MultiLabelClassifier(names, text, projection, MultiLabelTrainingConfig(epochs=120))
    human = np.arange(80)
    classifier.fit(maps[:300], truth[:300], human)
    probabilities = classifier.predict_proba(maps[300:])
    assert probabilities.shape == (60, truth.shape[1])
    assert mean_average_precision(probabilities, truth[300:]) > 0.85
    classifier.save(tmp_path / "v1")
    loaded = MultiLabelClassifier.load(tmp_path / "v1", expected_labels=names)
    assert np.allclose(loaded.predict_proba(maps[300:]), probabilities, atol=1e-6)
    with pytest.raises(ModelInputError, match="trained on labels"):
        MultiLabelClassifier.load(tmp_path / "v1", expected_labels=names[::-1])
    with pytest.raises(ModelInputError, match="not fitted"):
        MultiLabelClassifier(names, text, projection).predict_proba(maps[:2])
    with pytest.raises(ModelInputError, match="no human label sets"):
        MultiLabelClassifier(names, text, projection).fit(maps[:10], truth[:10], np.zeros(10, dtype=bool))


def test_label_specific_features_beat_global_pooling_on_small_objects():
    maps, truth, text = synthetic_maps(400, size=6, seed=3)
    names = tuple(f"label {i}" for i in range(truth.shape[1]))
    projection = SpatialProjection.fit(maps, 24)
    scores = {}
    for label_features in (True, False):
        config = MultiLabelTrainingConfig(label_features=label_features, cooccurrence=False)
        classifier = MultiLabelClassifier(names, text, projection, config).fit(maps[:300], truth[:300], np.arange(100))
        scores[label_features] = mean_average_precision(classifier.predict_proba(maps[300:]), truth[300:])
    assert scores[True] > scores[False] + 0.05


def test_forward_correction_undoes_a_vlm_that_calls_a_label_present_too_often():
    maps, truth, text = synthetic_maps(500, n_labels=3, seed=5)
    rng = np.random.default_rng(5)
    # The VLM calls label 0 present on 60% of the images where it is absent; the other labels it reads right.
    weak = truth.copy()
    weak[:, 0] |= rng.random(500) < 0.6
    names = ("a", "b", "c")
    human = np.arange(40)
    learner_settings = MultiLabelSettings(training=MultiLabelTrainingConfig(cooccurrence=False, weak_loss_weight=1.0))
    transitions = estimate_label_transitions(truth[:200], weak[:200])  # as if from 200 trusted images
    assert transitions.matrices[0, 0, 1] == pytest.approx(0.6, abs=0.1)
    false_positive_rate = {}
    projection = SpatialProjection.fit(maps, 24)
    for corrected in (True, False):
        config = MultiLabelTrainingConfig(cooccurrence=False, weak_loss_weight=1.0, use_transition=corrected)
        classifier = MultiLabelClassifier(names, text, projection, config).fit(
            maps[:400], truth[:400], human, weak[:400], np.arange(40, 400), transitions)
        p = classifier.predict_proba(maps[400:])[:, 0]
        false_positive_rate[corrected] = float(np.mean(p[~truth[400:, 0]]))
    assert learner_settings.pseudo_labels
    assert false_positive_rate[True] < 0.3 < false_positive_rate[False]


def test_learner_round_uses_empty_sets_as_labels_and_ranks_the_queue():
    maps, truth, text = synthetic_maps(200, seed=2)
    truth[:10] = False  # ten images a human marked "none of these"
    rng = np.random.default_rng(2)
    scores = np.where(truth, 0.7, 0.3) + rng.normal(0, 0.15, truth.shape)
    learner = MultiLabelLearner([f"l{i}" for i in range(5)], text, maps,
                                MultiLabelSettings(training=MultiLabelTrainingConfig(epochs=60)))
    labelled = np.zeros(200, dtype=bool)
    labelled[:40] = True
    labels = MultiLabelRoundLabels(truth, labelled, scores)
    model = learner.train(labels)
    assert model.thresholds is not None and model.transitions is not None
    assert model.probabilities[:10].max(axis=1).mean() < 0.5  # the empty sets taught "nothing here"
    pool = learner.pool(labels, model)
    selections = learner.query(pool, 10.0, LabelCosts(1.0, 0.02), np.random.default_rng(0))
    human = [s.index for s in selections if s.kind is LabelKind.HUMAN_FINE]
    weak = [s.index for s in selections if s.kind is LabelKind.VLM_COARSE]
    assert len(human) == 10 and not labelled[human].any() and len(set(human)) == 10
    assert weak == []  # every image already has the VLM's answer: the whole budget buys human sets
    ranks = learner.rank(pool, selections)
    assert np.all(ranks[labelled] == 1.0) and np.all(ranks[~labelled] < 1.0)
    assert list(np.argsort(ranks, kind="stable")[:10]) == human
    rows, out_of_fold = learner.out_of_fold(labels)
    assert rows.tolist() == list(range(40)) and out_of_fold.shape == (40, 5)


# ---- strategies and metrics -------------------------------------------------------------------------------------


def test_multilabel_strategies_are_in_the_one_registry_and_refuse_a_single_label_pool():
    assert {"multilabel-random", "multilabel-uncertainty", "multilabel-ours"} <= set(STRATEGIES)
    with pytest.raises(ModelInputError, match="MultiLabelPool"):
        create_strategy("multilabel-ours").query(object(), 5.0, LabelCosts(), np.random.default_rng(0))


def test_ours_reads_the_vlm_answer_and_spends_the_rest_on_vlm_answers():
    n, n_labels = 50, 2
    probabilities = np.full((n, n_labels), 0.5)
    answered = np.zeros(n, dtype=bool)
    answered[:25] = True
    # A VLM that is never wrong settles every label it answered: those images are worth nothing to a human.
    perfect = estimate_label_transitions(np.zeros((0, 2), bool), np.zeros((0, 2), bool), prior_strength=0.0)
    pool = MultiLabelPool(features=np.random.default_rng(0).standard_normal((n, 4)), labelled=np.zeros(n, bool),
                          weak_answered=answered, weak_sets=np.zeros((n, 2), bool), probabilities=probabilities,
                          transitions=perfect)
    assert label_set_uncertainty(pool.posterior()[:25]).max() < 0.5
    strategy = create_strategy("multilabel-ours", human_share=0.5, shortlist_factor=1.0)
    selections = strategy.query(pool, 4.0, LabelCosts(1.0, 0.1), np.random.default_rng(0))
    human = [s.index for s in selections if s.kind is LabelKind.HUMAN_FINE]
    weak = [s.index for s in selections if s.kind is LabelKind.VLM_COARSE]
    assert len(human) == 2 and all(i >= 25 for i in human)
    assert len(weak) == 20 and all(i >= 25 and i not in human for i in weak)
    scores = multilabel_priority_scores(pool, [Selection(7, LabelKind.HUMAN_FINE)])
    assert scores[7] == 0.0 and scores.max() < 1.0


def test_average_precision_and_micro_f1():
    assert average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1], bool)) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(np.ones(4), np.array([1, 0, 0, 0], bool)) == pytest.approx(0.25)
    assert np.isnan(average_precision(np.ones(3), np.zeros(3, bool)))
    truth = np.array([[1, 0], [0, 0]], bool)
    assert micro_f1(truth, truth) == 1.0
    assert micro_f1(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) == 1.0
    assert micro_f1(np.array([[1, 1], [0, 0]], bool), truth) == pytest.approx(2 / 3)
