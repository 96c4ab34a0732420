"""One learner: the server's fit and the benchmark's round are the same computation on the same inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.learner import BENCHMARK_OURS_SETTINGS, SERVER_SETTINGS, ActiveLearner, LearnerSettings, RoundLabels

GROUPS = {"a": ["a1", "a2"], "b": ["b1", "b2"], "c": ["c1", "c2"]}


def problem(seed: int = 0, n: int = 240, dim: int = 12):
    """Six fine clusters; a third of the rows human-labelled; a VLM that confuses group a with b now and then."""
    rng = np.random.default_rng(seed)
    hierarchy = LabelHierarchy.from_groups(GROUPS)
    fine = rng.integers(0, hierarchy.n_fine, size=n)
    centres = rng.normal(size=(hierarchy.n_fine, dim)) * 3
    embeddings = (centres[fine] + rng.normal(size=(n, dim))).astype(np.float32)
    true_coarse = hierarchy.coarse_of_fine_labels(fine)
    weak = np.where((true_coarse == 0) & (rng.random(n) < 0.3), 1, true_coarse).astype(np.int64)
    labelled = np.zeros(n, dtype=bool)
    labelled[rng.choice(n, size=n // 3, replace=False)] = True
    fine_known = np.where(labelled, fine, MISSING_LABEL).astype(np.int64)
    return hierarchy, embeddings, fine_known, weak


def test_the_server_fit_and_the_benchmark_round_give_the_same_ranking():
    from backend.training import CollectedLabels, fit_and_rank
    from model.finegrained import FineGrainedClassifier
    from model.query import LabelCosts
    from model.simulate import LabelledPool, StrategySpec, round_labels

    hierarchy, embeddings, fine, weak = problem()
    n, dim = embeddings.shape
    # The server: Label Studio's annotations and the VLM's cached answers on every task.
    labels = CollectedLabels(
        fine=fine, human_coarse=np.full(n, MISSING_LABEL, dtype=np.int64),
        trusted_coarse=hierarchy.coarse_of_fine_labels(fine), labeled=fine != MISSING_LABEL,
    )
    weak_probabilities = np.eye(hierarchy.n_coarse, dtype=np.float32)[weak]
    server = fit_and_rank(
        hierarchy=hierarchy, embeddings=embeddings, labels=labels, weak_probabilities=weak_probabilities,
        new_classifier=lambda config: FineGrainedClassifier(hierarchy, dim, config), torch_threads=1,
        budget_labels=10, cost_full=1.0, cost_weak=0.02,
    )
    # The benchmark: the same labels bought from its oracle, run through its round with the server's settings.
    pool = LabelledPool.empty(n)
    pool.fine[:], pool.weak_coarse[:], pool.weak_asked[:] = fine, weak, True
    spec = StrategySpec(SERVER_SETTINGS, weak_source="vlm")
    learner = ActiveLearner(hierarchy, dim, replace(SERVER_SETTINGS, num_threads=1))
    model = learner.train(embeddings, round_labels(spec, pool))
    state = learner.pool_state(embeddings, round_labels(spec, pool), model)
    selections = learner.query(state, 10.0, LabelCosts(1.0, 0.02), np.random.default_rng(0))
    benchmark_scores = learner.rank(state, selections)

    np.testing.assert_allclose(model.transition.matrix, server.transition_estimate.matrix)
    assert model.training_config == server.training_config
    np.testing.assert_allclose(model.fine_probabilities, server.classifier.predict_fine_proba(embeddings), atol=1e-6)
    unlabelled = fine == MISSING_LABEL
    np.testing.assert_allclose(benchmark_scores[unlabelled], server.row_scores[unlabelled])
    assert server.queue_summary["n_selected"] == len(selections) == 10


def test_the_server_differs_from_the_benchmark_only_in_named_settings():
    server, benchmark = SERVER_SETTINGS.to_dict(), BENCHMARK_OURS_SETTINGS.to_dict()
    differs = {k for k in server if server[k] != benchmark[k]}
    assert differs == {"strategy_options"}
    options_differ = {k for k in server["strategy_options"]
                      if server["strategy_options"][k] != benchmark["strategy_options"].get(k)}
    assert options_differ == {"human_share"}
    assert server["strategy_options"]["human_share"] == 1.0


def test_weak_labels_train_only_where_no_human_label_exists_but_still_pair_with_trusted_labels_for_t():
    hierarchy, embeddings, fine, weak = problem(seed=1)
    labels = RoundLabels(fine=fine, weak_coarse=weak)
    trained_on = labels.weak_for_training()
    assert np.all(trained_on[fine != MISSING_LABEL] == MISSING_LABEL)
    np.testing.assert_array_equal(trained_on[fine == MISSING_LABEL], weak[fine == MISSING_LABEL])
    estimate = ActiveLearner(hierarchy, embeddings.shape[1], BENCHMARK_OURS_SETTINGS).estimate_transition(labels)
    assert estimate.counts.sum() == int(np.sum(fine != MISSING_LABEL))  # every human label is a trusted pair
    assert estimate.matrix[0, 1] > 0.15  # the VLM's a-to-b confusion is seen


def test_round0_keeps_the_first_estimate_and_every_round_re_estimates():
    hierarchy, embeddings, fine, weak = problem(seed=2)
    first = RoundLabels(fine=np.where(np.arange(fine.size) < 60, fine, MISSING_LABEL), weak_coarse=weak)
    later = RoundLabels(fine=fine, weak_coarse=weak)
    reference = ActiveLearner(hierarchy, embeddings.shape[1], replace(BENCHMARK_OURS_SETTINGS, transition="round0"))
    seed_estimate = reference.estimate_transition(first)
    assert reference.estimate_transition(later) is seed_estimate
    ours = ActiveLearner(hierarchy, embeddings.shape[1], BENCHMARK_OURS_SETTINGS)
    assert ours.estimate_transition(later).counts.sum() > ours.estimate_transition(first).counts.sum()
    assert ActiveLearner(hierarchy, embeddings.shape[1],
                         replace(BENCHMARK_OURS_SETTINGS, transition="none")).estimate_transition(later) is None


def test_bad_settings_are_refused_by_name():
    with pytest.raises(ModelInputError, match="transition"):
        LearnerSettings(transition="sometimes")
    with pytest.raises(ModelInputError, match="unknown query strategy"):
        LearnerSettings(strategy="best")
    with pytest.raises(ModelInputError, match="query strategy 'margin'"):
        LearnerSettings(strategy="margin", strategy_options={"human_share": 0.5})
    with pytest.raises(ModelInputError, match="config_candidates"):
        LearnerSettings(config_candidates={"weak_loss_weight": ()})


def test_the_server_queue_strategy_is_a_setting_whose_default_is_the_benchmarks_ours():
    from backend.config import Config, ConfigError
    from backend.training import server_learner_settings

    assert Config.from_env({}).query_strategy == "ours"
    assert server_learner_settings("ours") is SERVER_SETTINGS
    margin = server_learner_settings(Config.from_env({"QUERY_STRATEGY": "margin"}).query_strategy)
    assert margin.strategy == "margin" and margin.strategy_options == {}
    assert replace(margin, strategy="ours", strategy_options=SERVER_SETTINGS.strategy_options) == SERVER_SETTINGS
    with pytest.raises(ConfigError, match="QUERY_STRATEGY"):
        Config.from_env({"QUERY_STRATEGY": "iso"})


@pytest.mark.parametrize("source", ["model", "spreading"])
def test_pseudo_labels_only_fill_confident_rows_without_a_human_label(source):
    hierarchy, embeddings, fine, weak = problem(seed=3)
    human_coarse = np.full_like(fine, MISSING_LABEL)
    unlabelled = np.flatnonzero(fine == MISSING_LABEL)
    human_coarse[unlabelled[:5]] = weak[unlabelled[:5]]
    labels = RoundLabels(fine=fine, weak_coarse=weak, human_coarse=human_coarse)
    settings = replace(BENCHMARK_OURS_SETTINGS, pseudo_label_confidence=0.9, pseudo_label_source=source,
                       num_threads=1)
    learner = ActiveLearner(hierarchy, embeddings.shape[1], settings)
    model = learner.train(embeddings, labels)
    pseudo = learner.pseudo_labelled(embeddings, labels, model)
    human = fine != MISSING_LABEL
    assert np.array_equal(pseudo[human], fine[human])  # a human label is never replaced
    assert np.all(pseudo[unlabelled[:5]] == MISSING_LABEL)  # nor is a human coarse-only row pseudo-labelled
    added = (pseudo != MISSING_LABEL) & ~human
    assert added.sum() > 0.3 * (~human).sum()  # well-separated clusters: most rows are confident
    # On these clusters the confident pseudo-labels are nearly all right.
    rng = np.random.default_rng(3)
    truth = rng.integers(0, hierarchy.n_fine, size=fine.size)
    assert np.mean(pseudo[added] == truth[added]) > 0.9


def test_pseudo_label_settings_are_checked():
    with pytest.raises(ModelInputError):
        replace(BENCHMARK_OURS_SETTINGS, pseudo_label_confidence=1.5)
    with pytest.raises(ModelInputError):
        replace(BENCHMARK_OURS_SETTINGS, pseudo_label_source="oracle")
