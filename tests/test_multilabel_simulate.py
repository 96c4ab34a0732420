"""vlm-al simulate --task multilabel: the strategies' settings and one run on small synthetic maps."""

from __future__ import annotations

import numpy as np
import pytest
from test_multilabel import synthetic_maps

from model.errors import ModelInputError
from model.simulate.multilabel import (
    STRATEGIES,
    MultiLabelData,
    MultiLabelOptions,
    parse_options,
    run_strategy,
    strategy_settings,
    summarise,
)


def test_each_ablation_removes_exactly_one_idea_from_ours():
    ours = strategy_settings("ours", 50)
    assert ours.pseudo_labels and ours.training.label_features and ours.training.cooccurrence
    assert not strategy_settings("ours-no-pseudo", 50).pseudo_labels
    assert not strategy_settings("ours-no-cooccurrence", 50).training.cooccurrence
    assert not strategy_settings("ours-no-label-features", 50).training.label_features
    for name in ("ours-no-cooccurrence", "ours-no-label-features"):
        assert strategy_settings(name, 50).strategy == ours.strategy
    plain = strategy_settings("random", 50)
    assert not (plain.pseudo_labels or plain.training.label_features or plain.training.cooccurrence)
    with pytest.raises(ModelInputError):
        strategy_settings("best", 50)
    with pytest.raises(ModelInputError):
        parse_options(["--pool-size", "10", "--rounds", "5", "--budget", "8"])


def test_a_run_buys_within_budget_and_scores_every_round():
    maps, truth, text = synthetic_maps(160, n_labels=4, seed=4)
    rng = np.random.default_rng(4)
    scores = np.where(truth, 0.6, 0.3) + rng.normal(0, 0.2, truth.shape)
    data = MultiLabelData(tuple(f"l{i}" for i in range(4)), text, maps[:120], truth[:120], scores[:120],
                          maps[120:], truth[120:], scores[120:])
    options = MultiLabelOptions(pool_size=120, test_size=40, seeds=1, initial_sets=4, rounds=2, budget=4.0, epochs=30)
    curves = {}
    for name in ("random", "ours"):
        curves[name] = run_strategy(name, 0, data, options)
        assert len(curves[name]["map"]) == 3 and all(0 <= v <= 1 for v in curves[name]["map"])
        assert curves[name]["cost"][0] == 4.0 and np.all(np.diff(curves[name]["cost"]) <= 4.0 + 1e-9)
    assert curves["random"]["cost"] == [4.0, 8.0, 12.0]
    # Ours spends a quarter of each round on VLM answers: 3 human sets and 50 answers at 0.02.
    assert curves["ours"]["cost"] == pytest.approx([4.0, 8.0, 12.0])
    summary = summarise([curves["ours"], curves["ours"]])
    assert set(summary) >= {"cost", "map_mean", "map_std"} and summary["map_std"] == [0.0] * 3
    assert set(STRATEGIES) == {"random", "uncertainty", "ours", "ours-no-pseudo", "ours-no-cooccurrence",
                               "ours-no-label-features"}
