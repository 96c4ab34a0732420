"""model.assistant: auto-accept's precision bound and audits on a simulated oracle, cleanlab's label issues on
injected errors, and the stopping signal against known curves."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from model.assistant import (
    AuditRecord,
    class_thresholds,
    clopper_pearson_lower,
    decide_auto_accept,
    fit_inverse_power_law,
    kappa_average,
    likely_label_errors,
    suggest_stopping,
    summarize_audits,
)
from model.assistant.stopping import InversePowerLaw, cross_validated_curve, human_label_curve
from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.learner import SERVER_SETTINGS, ActiveLearner, RoundLabels
from model.simulate.oracle import draw_weak_labels, simulated_transition_matrix

GROUPS = {"tops": ["t1", "t2", "t3"], "shoes": ["s1", "s2"], "bags": ["b1", "b2", "b3"]}


def clusters(seed: int, n: int = 3000, dim: int = 16, hard_pairs: float = 1.2):
    """Eight fine clusters; t1/t2 and b1/b2 overlap (hard), the rest are well apart (easy)."""
    rng = np.random.default_rng(seed)
    hierarchy = LabelHierarchy.from_groups(GROUPS)
    centres = rng.normal(size=(hierarchy.n_fine, dim)) * 4
    centres[1] = centres[0] + hard_pairs
    centres[6] = centres[5] + hard_pairs
    fine = rng.integers(0, hierarchy.n_fine, size=n)
    embeddings = (centres[fine] + rng.normal(size=(n, dim))).astype(np.float32)
    weak = draw_weak_labels(hierarchy.coarse_of_fine_labels(fine), simulated_transition_matrix(hierarchy, 0.8), rng)
    return hierarchy, embeddings, fine, weak


def round_labels(hierarchy, fine_known, weak):
    return RoundLabels(fine=fine_known, weak_coarse=weak, weak_answers=weak,
                       trusted_coarse=hierarchy.coarse_of_fine_labels(fine_known))


# --- the precision bound ----------------------------------------------------------------------------------------


def test_clopper_pearson_lower_bound_matches_the_closed_form_and_is_below_the_frequency():
    n = np.arange(1, 200)
    # All right: the exact one-sided bound is alpha ** (1 / n).
    assert np.allclose(clopper_pearson_lower(n, n), 0.05 ** (1 / n))
    assert clopper_pearson_lower(np.array([58]), np.array([58]))[0] < 0.95 <= clopper_pearson_lower(
        np.array([59]), np.array([59]))[0]
    k = np.array([5, 50, 95, 0])
    trials = np.array([10, 60, 100, 10])
    bound = clopper_pearson_lower(k, trials)
    assert np.all(bound < np.maximum(k / trials, 1e-9)) and bound[-1] == 0.0
    with pytest.raises(ModelInputError):
        clopper_pearson_lower(np.array([3]), np.array([2]))


def test_class_threshold_is_the_lowest_confidence_whose_bound_reaches_the_target():
    # Class 0: 80 right at 0.99, then 10 wrong at 0.7. Class 1: right and wrong mixed at the top.
    confidence = np.r_[np.full(80, 0.99), np.full(10, 0.7), np.linspace(0.99, 0.5, 60)]
    predicted = np.r_[np.zeros(90, dtype=int), np.ones(60, dtype=int)]
    correct = np.r_[np.ones(80, bool), np.zeros(10, bool), np.arange(60) % 3 != 0]
    thresholds = class_thresholds(confidence, predicted, correct, n_classes=3, target=0.95)
    assert thresholds[0].threshold == 0.99 and thresholds[0].support == 80 and thresholds[0].bound >= 0.95
    assert thresholds[1].threshold is None and thresholds[1].n_predicted == 60
    assert thresholds[2].threshold is None and thresholds[2].n_predicted == 0


def test_a_paused_class_is_audited_and_never_accepted():
    rng = np.random.default_rng(0)
    probabilities = np.tile([0.98, 0.01, 0.01], (40, 1))
    thresholds = class_thresholds(np.full(100, 0.98), np.zeros(100, int), np.ones(100, bool), 3, 0.95)
    running = decide_auto_accept(probabilities, thresholds, (), audit_share=0.1, rng=rng)
    assert running.audit.size == 4 and running.accepted.size == 36
    assert not set(running.audit) & set(running.accepted)
    paused = decide_auto_accept(probabilities, thresholds, {0}, audit_share=0.1, rng=rng)
    assert paused.accepted.size == 0 and paused.audit.size == 5
    unaudited = decide_auto_accept(probabilities, thresholds, (), audit_share=0.0, rng=rng)
    assert unaudited.audit.size == 0 and unaudited.accepted.size == 40


def test_audits_pause_a_class_whose_audited_precision_is_below_target():
    records = [AuditRecord(0, 0)] * 19 + [AuditRecord(0, 1)] + [AuditRecord(1, 1)] * 9 + [AuditRecord(1, 2)]
    summary = summarize_audits(records, target=0.95)
    assert summary.class_precision(0) == 0.95 and summary.class_precision(1) == 0.9
    assert summary.paused == {1}
    assert summary.precision == pytest.approx(28 / 30)


def _auto_accept_round(hierarchy, embeddings, truth, weak, labeled_rows, target, probability_noise=None, seed=0):
    """One server round on the simulated oracle: thresholds from out-of-fold predictions on the human labels,
    then the decision on the unlabeled rows (their probabilities optionally corrupted)."""
    learner = ActiveLearner(hierarchy, embeddings.shape[1], replace(SERVER_SETTINGS, num_threads=1))
    fine_known = np.full(truth.size, MISSING_LABEL, dtype=np.int64)
    fine_known[labeled_rows] = truth[labeled_rows]
    labels = round_labels(hierarchy, fine_known, weak)
    model = learner.train(embeddings, labels)
    rows, oof = learner.out_of_fold_fine(embeddings, labels, model)
    thresholds = class_thresholds(oof.max(axis=1), oof.argmax(axis=1), oof.argmax(axis=1) == fine_known[rows],
                                  hierarchy.n_fine, target)
    unlabeled = np.flatnonzero(fine_known == MISSING_LABEL)
    probabilities = model.fine_probabilities[unlabeled]
    if probability_noise is not None:
        probabilities = probability_noise(probabilities)
    return unlabeled, thresholds, probabilities


def test_auto_accept_on_a_simulated_oracle_keeps_every_audited_class_at_the_target():
    hierarchy, embeddings, truth, weak = clusters(seed=1)
    rng = np.random.default_rng(1)
    labeled = rng.choice(truth.size, 800, replace=False)
    target = 0.95
    unlabeled, thresholds, probabilities = _auto_accept_round(hierarchy, embeddings, truth, weak, labeled, target)
    decision = decide_auto_accept(probabilities, thresholds, (), audit_share=0.2, rng=rng)
    assert decision.accepted.size > 0.3 * unlabeled.size  # the easy clusters are accepted
    audit = summarize_audits([AuditRecord(int(decision.predicted[i]), int(truth[unlabeled[i]]))
                              for i in decision.audit], target)
    assert audit.audited and not audit.paused
    assert all(audit.class_precision(c) >= target for c in audit.audited)
    accepted_precision = np.mean(decision.predicted[decision.accepted] == truth[unlabeled[decision.accepted]])
    assert accepted_precision >= target


def test_a_model_that_turns_bad_is_caught_by_the_audit_and_its_classes_paused():
    hierarchy, embeddings, truth, weak = clusters(seed=2)
    rng = np.random.default_rng(2)
    labeled = rng.choice(truth.size, 800, replace=False)

    def swap_easy_classes(probabilities):  # the served model now calls s1 "b3" and b3 "s1", just as sure
        swapped = probabilities.copy()
        swapped[:, [3, 7]] = probabilities[:, [7, 3]]
        return swapped

    unlabeled, thresholds, probabilities = _auto_accept_round(hierarchy, embeddings, truth, weak, labeled, 0.95,
                                                              swap_easy_classes)
    decision = decide_auto_accept(probabilities, thresholds, (), audit_share=0.2, rng=rng)
    audit = summarize_audits([AuditRecord(int(decision.predicted[i]), int(truth[unlabeled[i]]))
                              for i in decision.audit], 0.95)
    assert {3, 7} <= audit.paused
    after = decide_auto_accept(probabilities, thresholds, audit.paused, audit_share=0.2, rng=rng)
    assert not np.isin(after.predicted[after.accepted], [3, 7]).any()
    assert np.isin(after.predicted[after.audit], [3, 7]).any()


# --- label errors -----------------------------------------------------------------------------------------------


def test_injected_label_errors_are_found_by_cleanlab_on_out_of_fold_probabilities():
    hierarchy, embeddings, truth, weak = clusters(seed=3, hard_pairs=2.5)
    rng = np.random.default_rng(3)
    labeled = np.sort(rng.choice(truth.size, 600, replace=False))
    given = truth.copy()
    flipped = rng.choice(labeled, 30, replace=False)  # 5%
    given[flipped] = (truth[flipped] + rng.integers(1, hierarchy.n_fine, 30)) % hierarchy.n_fine
    fine_known = np.full(truth.size, MISSING_LABEL, dtype=np.int64)
    fine_known[labeled] = given[labeled]
    learner = ActiveLearner(hierarchy, embeddings.shape[1], replace(SERVER_SETTINGS, num_threads=1))
    labels = round_labels(hierarchy, fine_known, weak)
    rows, oof = learner.out_of_fold_fine(embeddings, labels, learner.train(embeddings, labels))
    issues = likely_label_errors(fine_known[rows], oof)
    top = rows[[issue.row for issue in issues[:30]]]
    assert np.isin(top, flipped).mean() >= 0.6  # precision at k = the number injected
    assert np.isin(flipped, rows[[issue.row for issue in issues]]).mean() >= 0.8  # recall of the whole list
    first = issues[0]
    assert first.given == fine_known[rows[first.row]] and first.suggested != first.given
    assert [i.quality for i in issues] == sorted(i.quality for i in issues)


def test_label_errors_need_two_classes_and_matching_shapes():
    assert likely_label_errors(np.zeros(5, int), np.full((5, 3), 1 / 3)) == []
    with pytest.raises(ModelInputError):
        likely_label_errors(np.zeros(5, int), np.full((4, 3), 1 / 3))


# --- stopping -----------------------------------------------------------------------------------------------------


def test_inverse_power_law_fit_recovers_where_a_known_curve_flattens():
    truth = InversePowerLaw(0.9, 1.5, 0.6)
    sizes = np.array([10, 20, 40, 80, 160])
    law = fit_inverse_power_law(sizes, truth(sizes), np.full(5, 0.01))
    assert law is not None
    # The gain per 100 labels of the true law falls below half a point here; the fit from n <= 160 agrees.
    assert law.flattens_at() == pytest.approx(truth.flattens_at(), rel=0.1)
    suggestion = suggest_stopping(law, 160)
    assert suggestion.text.startswith("about ") and suggestion.suggested_labels >= truth.flattens_at() * 0.9
    assert suggest_stopping(law, truth.flattens_at() * 2).text.startswith("gains have flattened")
    assert suggest_stopping(None, 5).more_labels is None


def test_cross_validated_curve_rises_with_labels_on_clusters_and_predicts_the_held_out_curve():
    hierarchy, embeddings, truth, weak = clusters(seed=4, n=1500)
    from model.finegrained import FineGrainedClassifier, TrainingConfig

    rng = np.random.default_rng(4)
    labeled = rng.choice(truth.size, 300, replace=False)
    fine_known = np.full(truth.size, MISSING_LABEL, dtype=np.int64)
    fine_known[labeled] = truth[labeled]
    config = TrainingConfig(seed=0, num_threads=1)
    curve = human_label_curve(lambda c: FineGrainedClassifier(hierarchy, embeddings.shape[1], c), config,
                              embeddings, fine_known, weak, None, n_folds=3)
    assert curve.sizes.tolist() == sorted(curve.sizes.tolist()) and curve.sizes.max() <= 200
    assert curve.accuracy[-1] > curve.accuracy[0]


def test_cross_validated_curve_uses_nested_subsets_and_held_out_folds():
    seen = []

    def evaluate(train, held_out):
        assert not set(train) & set(held_out)
        seen.append(len(train))
        return len(train) / 100

    curve = cross_validated_curve(90, evaluate, sizes=[10, 30, 60, 80], n_folds=3, n_repeats=2)
    assert curve.sizes.tolist() == [10, 30, 60]  # 80 > the 60 rows outside a fold
    assert seen == [10, 30, 60] * 6 and np.allclose(curve.accuracy, [0.1, 0.3, 0.6])
    assert curve.n_held_out == 180 and curve.n_runs == 6
    # Runs that agree exactly still leave each point its binomial error.
    assert np.allclose(curve.standard_error, np.sqrt(curve.accuracy * (1 - curve.accuracy) / 180))


def test_kappa_average_stops_once_predictions_stabilize():
    base = np.arange(200) % 5
    drifting = [np.where(np.arange(200) < 60 - 20 * i, (base + 1) % 5, base) for i in range(4)]
    assert not kappa_average(drifting).stop
    stable = drifting + [base, base, base]
    result = kappa_average(stable)
    assert result.kappas[-3:] == [1.0, 1.0, 1.0] and result.stop
