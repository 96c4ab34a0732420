"""vlm-al simulate --task segmentation: options, one seed of every strategy on synthetic pyramids, the targets."""

from __future__ import annotations

import numpy as np
import pytest
from test_segmentation import N_LABELS, synthetic

from model.errors import ModelInputError
from model.simulate.segmentation import (
    STRATEGIES,
    SceneData,
    SegmentationOptions,
    parse_segmentation_options,
    run_seed,
    segmentation_targets,
)


def test_options_are_checked():
    assert parse_segmentation_options(["--evaluate-on", "validation"]).evaluate_on == "validation"
    with pytest.raises(SystemExit):
        parse_segmentation_options(["--evaluate-on", "train"])
    with pytest.raises(ModelInputError):
        parse_segmentation_options(["--pool-size", "10", "--initial-masks", "4", "--rounds", "2",
                                    "--masks-per-round", "4"])
    with pytest.raises(ModelInputError):
        SegmentationOptions(strategies=("ours",)).validate()


def test_one_seed_scores_every_strategy_at_every_budget():
    pyramid, label_sets, masks = synthetic(150, seed=3)
    data = SceneData(("a", "b", "c"), pyramid.take(slice(0, 110)), label_sets[:110], masks[:110],
                     pyramid.take(slice(110, 150)), masks[110:])
    options = SegmentationOptions(initial_masks=3, masks_per_round=3, rounds=1, seeds=1, head_steps=30,
                                  progress=False)
    curves = run_seed(data, options, seed=0)
    assert set(curves) == set(STRATEGIES)
    for name, curve in curves.items():
        assert len(curve) == options.rounds + 1 and all(0.0 <= v <= 1.0 for v in curve), (name, curve)
    # the synthetic objects are easy: the head learns them, and pseudo-masks of the 100-odd unmasked images help
    assert np.mean(curves["ours-random"]) > np.mean(curves["human-only-random"])
    assert max(curves["ours-random"]) > 0.5
    targets = segmentation_targets({name: [curve] for name, curve in curves.items()})
    assert set(targets["mean_miou_over_rounds"]) == set(STRATEGIES)
    assert targets["ours_minus_human_only_random"] == pytest.approx(
        np.mean(curves["ours-random"]) - np.mean(curves["human-only-random"]), abs=1e-4)
    assert N_LABELS == 3
