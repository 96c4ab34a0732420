import numpy as np
import pytest

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.query import (
    EntropyQuery,
    IsoValueToCostQuery,
    KCenterQuery,
    KMeansColdStart,
    LabelCosts,
    LabelKind,
    LeastConfidenceQuery,
    MarginQuery,
    PoolState,
    RandomQuery,
    Selection,
    estimate_expected_improvement,
    improvement_ratio,
    percentile_rank,
    priority_scores,
)

HIERARCHY = LabelHierarchy.from_groups({"a": ["a0", "a1"], "b": ["b0", "b1", "b2"]})
N_BLOBS = 6
PER_BLOB = 20


def blob_embeddings(seed: int = 0, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Six well separated blobs around unit directions; returns embeddings and blob index."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:N_BLOBS] * 10 + 1.0
    blob = np.repeat(np.arange(N_BLOBS), PER_BLOB)
    return (centres[blob] + rng.normal(scale=0.3, size=(blob.size, dim))).astype(np.float32), blob


def random_probabilities(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return rng.dirichlet(np.ones(k), size=n).astype(np.float32)


def make_pool(
    n_full: int = 10, n_weak: int = 20, with_model: bool = True, train_and_evaluate=None, seed: int = 0, **overrides
) -> PoolState:
    embeddings, _ = blob_embeddings(seed)
    n = embeddings.shape[0]
    rng = np.random.default_rng(seed)
    fine_labels = np.full(n, MISSING_LABEL, dtype=np.int64)
    weak = np.full(n, MISSING_LABEL, dtype=np.int64)
    order = rng.permutation(n)
    fine_labels[order[:n_full]] = rng.integers(0, HIERARCHY.n_fine, n_full)
    weak[order[n_full : n_full + n_weak]] = rng.integers(0, HIERARCHY.n_coarse, n_weak)
    fields = dict(
        embeddings=embeddings,
        hierarchy=HIERARCHY,
        fine_labels=fine_labels,
        weak_coarse_labels=weak,
        fine_probabilities=random_probabilities(rng, n, HIERARCHY.n_fine) if with_model else None,
        train_and_evaluate=train_and_evaluate,
    )
    fields.update(overrides)
    return PoolState(**fields)


class CountingEvaluator:
    """A stand-in for retraining: accuracy grows with the number of labels, weak ones counting ``weak_share``."""

    def __init__(self, weak_share: float = 0.2) -> None:
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []
        self.weak_share = weak_share

    def __call__(self, full_indices: np.ndarray, weak_indices: np.ndarray) -> float:
        self.calls.append((np.asarray(full_indices), np.asarray(weak_indices)))
        return float(1.0 - np.exp(-(len(full_indices) + self.weak_share * len(weak_indices)) / 50.0))


HUMAN_STRATEGIES = [RandomQuery(), LeastConfidenceQuery(), MarginQuery(), EntropyQuery(), KCenterQuery(), KMeansColdStart()]


def total_cost(selections: list[Selection], costs: LabelCosts) -> float:
    return sum(costs.of(s.kind) for s in selections)


@pytest.mark.parametrize("strategy", HUMAN_STRATEGIES, ids=lambda s: type(s).__name__)
def test_human_strategies_spend_the_budget_exactly_on_unlabelled_samples(strategy) -> None:
    pool = make_pool()
    costs = LabelCosts(human_fine=1.5, weak_coarse=0.02)
    selections = strategy.query(pool, 10.0, costs, np.random.default_rng(0))

    assert len(selections) == 6  # floor(10 / 1.5)
    assert all(s.kind is LabelKind.HUMAN_FINE for s in selections)
    assert total_cost(selections, costs) <= 10.0
    indices = [s.index for s in selections]
    assert len(set(indices)) == len(indices)
    assert np.all(pool.fine_labels[indices] == MISSING_LABEL)


@pytest.mark.parametrize("strategy", HUMAN_STRATEGIES, ids=lambda s: type(s).__name__)
def test_human_strategies_are_deterministic_under_the_seed(strategy) -> None:
    pool = make_pool()
    first = strategy.query(pool, 7, LabelCosts(), np.random.default_rng(3))
    second = strategy.query(pool, 7, LabelCosts(), np.random.default_rng(3))
    assert first == second


def test_budget_larger_than_the_pool_takes_every_unlabelled_sample() -> None:
    pool = make_pool(n_full=110, n_weak=0)
    selections = RandomQuery().query(pool, 1000, LabelCosts(), np.random.default_rng(0))
    assert sorted(s.index for s in selections) == sorted(np.flatnonzero(pool.fine_labels == MISSING_LABEL))


def test_floating_point_budget_buys_every_affordable_label() -> None:
    pool = make_pool()
    costs = LabelCosts(human_fine=0.1)
    assert len(RandomQuery().query(pool, 0.3, costs, np.random.default_rng(0))) == 3


def test_margin_picks_the_most_uncertain_samples() -> None:
    pool = make_pool(n_full=0)
    probabilities = np.tile(np.array([0.96, 0.01, 0.01, 0.01, 0.01], dtype=np.float32), (pool.size, 1))
    probabilities[[5, 17, 42]] = [[0.45, 0.44, 0.05, 0.03, 0.03], [0.5, 0.3, 0.1, 0.05, 0.05], [0.4, 0.4, 0.1, 0.05, 0.05]]
    pool = make_pool(n_full=0, fine_probabilities=probabilities)
    selections = MarginQuery().query(pool, 3, LabelCosts(), np.random.default_rng(0))
    assert [s.index for s in selections] == [42, 5, 17]


def test_entropy_and_least_confidence_prefer_flat_predictions() -> None:
    probabilities = np.tile(np.array([0.96, 0.01, 0.01, 0.01, 0.01], dtype=np.float32), (N_BLOBS * PER_BLOB, 1))
    probabilities[9] = 0.2
    pool = make_pool(n_full=0, fine_probabilities=probabilities)
    for strategy in (EntropyQuery(), LeastConfidenceQuery()):
        assert strategy.query(pool, 1, LabelCosts(), np.random.default_rng(0)) == [Selection(9, LabelKind.HUMAN_FINE)]


@pytest.mark.parametrize("strategy", [MarginQuery(), EntropyQuery(), LeastConfidenceQuery()], ids=lambda s: type(s).__name__)
def test_uncertainty_strategies_need_a_model(strategy) -> None:
    with pytest.raises(ModelInputError, match="needs fine_probabilities"):
        strategy.query(make_pool(with_model=False), 3, LabelCosts(), np.random.default_rng(0))


def test_k_center_spreads_over_the_blobs_away_from_labelled_ones() -> None:
    embeddings, blob = blob_embeddings()
    fine_labels = np.full(blob.size, MISSING_LABEL, dtype=np.int64)
    fine_labels[blob == 0] = 0  # blob 0 is fully labelled already
    pool = PoolState(embeddings, HIERARCHY, fine_labels, np.full(blob.size, MISSING_LABEL, dtype=np.int64))
    selections = KCenterQuery().query(pool, 5, LabelCosts(), np.random.default_rng(0))
    assert sorted(blob[[s.index for s in selections]].tolist()) == [1, 2, 3, 4, 5]


def test_kmeans_cold_start_covers_every_blob() -> None:
    embeddings, blob = blob_embeddings()
    empty = np.full(blob.size, MISSING_LABEL, dtype=np.int64)
    pool = PoolState(embeddings, HIERARCHY, empty, empty)
    for seed in range(3):
        selections = KMeansColdStart().query(pool, N_BLOBS, LabelCosts(), np.random.default_rng(seed))
        assert sorted(blob[[s.index for s in selections]].tolist()) == list(range(N_BLOBS))


def test_iso_mixes_label_kinds_within_budget_and_never_repeats_labels() -> None:
    evaluator = CountingEvaluator(weak_share=0.2)
    pool = make_pool(train_and_evaluate=evaluator)
    costs = LabelCosts(human_fine=1.0, weak_coarse=0.02)
    strategy = IsoValueToCostQuery(n_shuffles=3)
    selections = strategy.query(pool, 5.0, costs, np.random.default_rng(0))

    kinds = {s.kind for s in selections}
    assert kinds == {LabelKind.HUMAN_FINE, LabelKind.VLM_COARSE}
    assert total_cost(selections, costs) <= 5.0 + 1e-9
    annotation = pool.annotation_type
    for selection in selections:
        assert annotation[selection.index] != 2
        if selection.kind is LabelKind.VLM_COARSE:
            assert annotation[selection.index] == 0
    assert len(set(selections)) == len(selections)
    # Budget left over is smaller than the cheapest label that some candidate could still take.
    remaining_weak = {int(i) for i in np.flatnonzero(annotation == 0)} - {s.index for s in selections}
    assert 5.0 - total_cost(selections, costs) < 0.02 + 1e-9 or not remaining_weak
    assert len(evaluator.calls) == 1 + 2 * 3 * 4 == strategy.last_expected_improvement.n_evaluations
    assert strategy.last_expected_improvement.full_per_label > strategy.last_expected_improvement.weak_per_label > 0


def test_iso_uses_the_pools_weak_kind() -> None:
    pool = make_pool(train_and_evaluate=CountingEvaluator(), weak_kind=LabelKind.HUMAN_COARSE)
    selections = IsoValueToCostQuery().query(pool, 3.0, LabelCosts(weak_coarse=0.1), np.random.default_rng(0))
    assert LabelKind.HUMAN_COARSE in {s.kind for s in selections}
    assert LabelKind.VLM_COARSE not in {s.kind for s in selections}


def test_iso_full_pick_retires_the_samples_weak_candidate() -> None:
    # A pool of two unlabelled samples and a budget that buys everything: the full pick must not be paired
    # with a weak pick of the same sample.
    embeddings, _ = blob_embeddings()
    fine_labels = np.zeros(embeddings.shape[0], dtype=np.int64)
    fine_labels[[3, 50]] = MISSING_LABEL
    weak = np.full(embeddings.shape[0], MISSING_LABEL, dtype=np.int64)
    rng = np.random.default_rng(0)
    pool = PoolState(
        embeddings, HIERARCHY, fine_labels, weak,
        fine_probabilities=random_probabilities(rng, embeddings.shape[0], HIERARCHY.n_fine),
        train_and_evaluate=CountingEvaluator(weak_share=0.5),
    )
    selections = IsoValueToCostQuery().query(pool, 100.0, LabelCosts(), np.random.default_rng(0))
    assert sorted((s.index, s.kind) for s in selections if s.kind is LabelKind.HUMAN_FINE) == [
        (3, LabelKind.HUMAN_FINE), (50, LabelKind.HUMAN_FINE)
    ]
    assert all(s.kind is LabelKind.HUMAN_FINE for s in selections)


def test_iso_without_weak_labels_lets_half_the_full_set_stand_in() -> None:
    evaluator = CountingEvaluator()
    pool = make_pool(n_full=20, n_weak=0, train_and_evaluate=evaluator)
    improvement = estimate_expected_improvement(pool, np.random.default_rng(0), n_shuffles=2)
    assert improvement.weak_set_from_full
    full_labelled = set(np.flatnonzero(pool.fine_labels != MISSING_LABEL).tolist())
    final_full, final_weak = evaluator.calls[0]
    assert len(final_full) == len(final_weak) == 10
    assert set(final_full) | set(final_weak) == full_labelled
    assert len(evaluator.calls) == 1 + 2 * 2 * 4


def test_iso_is_deterministic_under_the_seed() -> None:
    pool = make_pool(train_and_evaluate=CountingEvaluator())
    first = IsoValueToCostQuery().query(pool, 4.0, LabelCosts(), np.random.default_rng(5))
    second = IsoValueToCostQuery().query(pool, 4.0, LabelCosts(), np.random.default_rng(5))
    assert first == second


def test_iso_needs_an_evaluator_and_a_model() -> None:
    with pytest.raises(ModelInputError, match="train_and_evaluate"):
        IsoValueToCostQuery().query(make_pool(), 4.0, LabelCosts(), np.random.default_rng(0))
    with pytest.raises(ModelInputError, match="fine_probabilities"):
        IsoValueToCostQuery().query(
            make_pool(with_model=False, train_and_evaluate=CountingEvaluator()), 4.0, LabelCosts(), np.random.default_rng(0)
        )
    with pytest.raises(ModelInputError, match="unknown uncertainty"):
        IsoValueToCostQuery(uncertainty="variance")


def test_improvement_ratio_rules() -> None:
    assert improvement_ratio(0.04, 0.01) == pytest.approx((4.0, 1.0))
    assert improvement_ratio(0.04, -0.01) == (1.0, 0.0)
    assert improvement_ratio(0.0, 0.01) == (0.0, 1.0)
    assert improvement_ratio(-0.1, 0.0) == (1.0, 1.0)


def test_percentile_rank_is_in_unit_interval_and_monotone() -> None:
    values = np.array([0.3, 0.1, 0.9, 0.3])
    ranks = percentile_rank(values)
    assert ranks.tolist() == [0.75, 0.25, 1.0, 0.75]


def test_priority_scores_order_selected_then_uncertain_then_labelled() -> None:
    pool = make_pool(n_full=10)
    selections = [Selection(int(i), LabelKind.HUMAN_FINE) for i in np.flatnonzero(pool.fine_labels == MISSING_LABEL)[[7, 2]]]
    selections.append(Selection(int(np.flatnonzero(pool.fine_labels == MISSING_LABEL)[0]), LabelKind.VLM_COARSE))
    scores = priority_scores(pool, selections)

    assert scores.shape == (pool.size,) and np.all((scores >= 0) & (scores <= 1))
    labelled = pool.fine_labels != MISSING_LABEL
    assert np.all(scores[labelled] == 1.0) and np.all(scores[~labelled] < 1.0)
    order = np.argsort(scores, kind="stable")
    assert order[0] == selections[0].index and order[1] == selections[1].index
    rest = order[2 : int((~labelled).sum())]
    probabilities = np.sort(pool.fine_probabilities[rest], axis=1)
    margins = probabilities[:, -1] - probabilities[:, -2]
    assert np.all(np.diff(margins) >= -1e-7)  # most uncertain (smallest margin) first
    assert len(np.unique(scores[~labelled])) == int((~labelled).sum())


def test_priority_scores_without_model_or_selection() -> None:
    pool = make_pool(with_model=False)
    scores = priority_scores(pool)
    unlabelled = np.flatnonzero(pool.fine_labels == MISSING_LABEL)
    assert np.all(np.diff(scores[unlabelled]) > 0)
    with pytest.raises(ModelInputError, match="outside the pool"):
        priority_scores(pool, [Selection(10_000, LabelKind.HUMAN_FINE)])


@pytest.mark.parametrize("budget", [0, -1.0, float("nan")])
def test_non_positive_budget_is_rejected(budget) -> None:
    for strategy in [*HUMAN_STRATEGIES, IsoValueToCostQuery()]:
        with pytest.raises(ModelInputError, match="budget"):
            strategy.query(make_pool(train_and_evaluate=CountingEvaluator()), budget, LabelCosts(), np.random.default_rng(0))


def test_bad_pools_are_rejected() -> None:
    embeddings, _ = blob_embeddings()
    n = embeddings.shape[0]
    missing = np.full(n, MISSING_LABEL, dtype=np.int64)
    with pytest.raises(ModelInputError, match="empty"):
        PoolState(np.zeros((0, 8), dtype=np.float32), HIERARCHY, missing[:0], missing[:0])
    nan_embeddings = embeddings.copy()
    nan_embeddings[4, 0] = np.nan
    with pytest.raises(ModelInputError, match="NaN"):
        PoolState(nan_embeddings, HIERARCHY, missing, missing)
    with pytest.raises(ModelInputError, match="fine_labels must have shape"):
        PoolState(embeddings, HIERARCHY, missing[:-1], missing)
    with pytest.raises(ModelInputError, match="weak_coarse_labels has indices"):
        PoolState(embeddings, HIERARCHY, missing, np.full(n, 2, dtype=np.int64))
    with pytest.raises(ModelInputError, match="fine_probabilities must have shape"):
        PoolState(embeddings, HIERARCHY, missing, missing, fine_probabilities=np.ones((n, 2)))
    with pytest.raises(ModelInputError, match="weak_kind"):
        PoolState(embeddings, HIERARCHY, missing, missing, weak_kind=LabelKind.HUMAN_FINE)
    with pytest.raises(ModelInputError, match="LabelHierarchy"):
        PoolState(embeddings, None, missing, missing)
    with pytest.raises(ModelInputError, match="label cost"):
        LabelCosts(human_fine=0.0)


def test_annotation_type_is_derived_from_labels() -> None:
    embeddings, _ = blob_embeddings()
    n = embeddings.shape[0]
    fine = np.full(n, MISSING_LABEL, dtype=np.int64)
    weak = np.full(n, MISSING_LABEL, dtype=np.int64)
    fine[[0, 1]] = 2
    weak[[1, 2]] = 0
    pool = PoolState(embeddings, HIERARCHY, fine, weak)
    assert pool.annotation_type[:4].tolist() == [2, 2, 1, 0]


# ---- ours: weak labels plus human labels where the fine head stays unsure --------------------------------------


def test_posterior_given_weak_applies_bayes_rule_and_leaves_unanswered_rows_alone() -> None:
    from model.query import fine_posterior_given_weak

    transition = np.array([[0.8, 0.2], [0.1, 0.9]])
    pool = make_pool(n_full=0, n_weak=30, coarse_transition_matrix=transition)
    posterior = fine_posterior_given_weak(pool)
    prior = np.asarray(pool.fine_probabilities, dtype=np.float64)
    answered = np.flatnonzero(pool.weak_coarse_labels != MISSING_LABEL)
    unanswered = np.flatnonzero(pool.weak_coarse_labels == MISSING_LABEL)
    np.testing.assert_allclose(posterior[unanswered], prior[unanswered])
    row = answered[0]
    answer = pool.weak_coarse_labels[row]
    expected = prior[row] * transition[list(HIERARCHY.parent_of_fine), answer]
    np.testing.assert_allclose(posterior[row], expected / expected.sum())
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0)
    # Without a transition matrix the answer is taken as the truth: no mass outside the answered group.
    clean = fine_posterior_given_weak(make_pool(n_full=0, n_weak=30))
    outside = HIERARCHY.fine_to_coarse_matrix[:, answer] == 0
    assert np.all(clean[row][outside] == 0)


def test_group_margin_is_zero_for_a_single_class_group_and_one_for_a_tie() -> None:
    from model.query import group_margin_uncertainty

    hierarchy = LabelHierarchy.from_groups({"a": ["a0", "a1"], "b": ["b0"]})
    probabilities = np.array([[0.3, 0.3, 0.4], [0.05, 0.05, 0.9], [0.6, 0.2, 0.2]])
    # Row 0: group a is likelier (0.6) and tied inside; row 1: group b has one class; row 2: 0.75 vs 0.25.
    np.testing.assert_allclose(group_margin_uncertainty(probabilities, hierarchy), [1.0, 0.0, 0.5])


def test_ours_spends_its_floor_on_the_most_uncertain_and_the_rest_on_weak_labels() -> None:
    from model.query import WeakAndGroupMarginQuery, fine_posterior_given_weak, margin_uncertainty

    rng = np.random.default_rng(3)
    pool = make_pool(n_full=10, n_weak=20, coarse_probabilities=random_probabilities(rng, 120, HIERARCHY.n_coarse))
    costs = LabelCosts(human_fine=1.0, weak_coarse=0.1)
    strategy = WeakAndGroupMarginQuery(human_share=0.5, measure="posterior-margin")
    selections = strategy.query(pool, 8.0, costs, np.random.default_rng(0))
    human = [s.index for s in selections if s.kind is LabelKind.HUMAN_FINE]
    weak = [s.index for s in selections if s.kind is LabelKind.VLM_COARSE]
    assert len(human) == 4 and len(weak) == 40
    assert total_cost(selections, costs) <= 8.0 + 1e-9
    candidates = np.flatnonzero(pool.fine_labels == MISSING_LABEL)
    uncertainty = margin_uncertainty(fine_posterior_given_weak(pool)[candidates])
    assert set(human) == set(candidates[np.argsort(-uncertainty, kind="stable")[:4]].tolist())
    # Weak labels only for samples with no label yet, not for the ones just sent to humans, the most unsure first.
    assert not set(weak) & set(human)
    assert np.all(pool.annotation_type[weak] == 0)
    coarse_uncertainty = margin_uncertainty(pool.coarse_probabilities)
    unchosen = np.setdiff1d(np.flatnonzero(pool.annotation_type == 0), human + weak)
    assert coarse_uncertainty[weak].min() >= coarse_uncertainty[unchosen].max()


def test_ours_kmeans_shortlist_picks_distinct_uncertain_samples() -> None:
    from model.query import WeakAndGroupMarginQuery

    pool = make_pool(n_full=10, n_weak=0)
    strategy = WeakAndGroupMarginQuery(human_share=1.0, shortlist_factor=3.0, shortlist_selection="kmeans")
    selections = strategy.query(pool, 6.0, LabelCosts(), np.random.default_rng(0))
    picks = [s.index for s in selections]
    assert len(picks) == 6 == len(set(picks)) and all(s.kind is LabelKind.HUMAN_FINE for s in selections)
    assert np.all(pool.fine_labels[picks] == MISSING_LABEL)
    again = strategy.query(pool, 6.0, LabelCosts(), np.random.default_rng(0))
    assert [s.index for s in again] == picks


def test_ours_lets_the_measured_improvement_raise_the_human_share_above_the_floor() -> None:
    from model.query import WeakAndGroupMarginQuery

    # Weak labels worth nothing: the measured share of value is all human, above the 0.2 floor.
    pool = make_pool(n_full=20, n_weak=20, train_and_evaluate=CountingEvaluator(weak_share=0.0))
    strategy = WeakAndGroupMarginQuery(human_share=0.2)
    selections = strategy.query(pool, 5.0, LabelCosts(), np.random.default_rng(0))
    assert strategy.last_human_share == 1.0
    assert len(selections) == 5 and all(s.kind is LabelKind.HUMAN_FINE for s in selections)


def test_ours_rejects_bad_settings_and_needs_a_model() -> None:
    from model.query import WeakAndGroupMarginQuery

    for bad in ({"human_share": 1.5}, {"measure": "loudest"}, {"shortlist_factor": 0.5},
                {"weak_selection": "all"}, {"shortlist_selection": "best"}):
        with pytest.raises(ModelInputError):
            WeakAndGroupMarginQuery(**bad)
    with pytest.raises(ModelInputError, match="fine_probabilities"):
        WeakAndGroupMarginQuery().query(make_pool(with_model=False), 5.0, LabelCosts(), np.random.default_rng(0))
    with pytest.raises(ModelInputError, match="coarse_transition_matrix"):
        make_pool(coarse_transition_matrix=np.ones((3, 3)))


def test_strategies_come_from_one_registry_with_their_options():
    from model.query import STRATEGIES, MarginQuery, WeakAndGroupMarginQuery, create_strategy

    assert isinstance(create_strategy("margin"), MarginQuery)
    ours = create_strategy("ours", human_share=0.85, measure="posterior-margin")
    assert isinstance(ours, WeakAndGroupMarginQuery) and ours.human_share == 0.85
    assert {"random", "margin", "entropy", "k-center", "iso", "ours"} <= set(STRATEGIES)
    with pytest.raises(ModelInputError, match="unknown query strategy 'best'"):
        create_strategy("best")
    with pytest.raises(ModelInputError, match="query strategy 'margin'"):
        create_strategy("margin", human_share=0.5)


def test_ours_spends_on_humans_what_the_weak_share_cannot_buy():
    from model.query import WeakAndGroupMarginQuery

    rng = np.random.default_rng(0)
    hierarchy = LabelHierarchy.from_groups({"a": ["a1", "a2"], "b": ["b1", "b2"]})
    n = 60
    fine = np.full(n, MISSING_LABEL, dtype=np.int64)
    fine[:8] = np.arange(8) % 4
    weak = np.full(n, MISSING_LABEL, dtype=np.int64)
    weak[8:58] = 0  # only two samples are left without any label
    probabilities = rng.dirichlet(np.ones(4), size=n)
    pool = PoolState(embeddings=rng.normal(size=(n, 4)), hierarchy=hierarchy, fine_labels=fine,
                     weak_coarse_labels=weak, fine_probabilities=probabilities)
    selections = WeakAndGroupMarginQuery(human_share=0.5).query(pool, 10.0, LabelCosts(1.0, 0.02), rng)
    spent = sum(1.0 if s.kind is LabelKind.HUMAN_FINE else 0.02 for s in selections)
    # Half of 10 for humans would leave 5 unspent: two weak labels cost 0.04, the rest buys human labels.
    assert sum(s.kind is LabelKind.HUMAN_FINE for s in selections) == 9
    assert spent <= 10.0 and spent > 9.0
