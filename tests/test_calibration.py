"""Pre-ticking is calibrated: a threshold whose precision is bounded from below on out-of-fold predictions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.calibration import coarse_answer_precision, precision_threshold, wilson_lower_bound
from model.errors import ModelInputError


def test_the_threshold_keeps_the_confident_part_whose_bound_reaches_the_target():
    rng = np.random.default_rng(0)
    confidence = rng.random(2000)
    correct = rng.random(2000) < confidence  # a calibrated model: right with probability = its confidence
    result = precision_threshold(confidence, correct, target=0.9)
    assert result.threshold is not None and 0.75 < result.threshold < 0.95
    above = confidence >= result.threshold
    assert correct[above].mean() >= 0.9 and above.sum() == result.support_at_threshold
    assert result.bound_at_threshold >= 0.9


def test_no_threshold_when_the_model_is_never_precise_enough_or_has_too_little_evidence():
    assert precision_threshold(np.full(50, 0.99), np.arange(50) % 3 == 0, 0.9).threshold is None
    # Nine right answers out of nine: the bound stays below 0.9, so ten lucky hits are needed at least.
    assert precision_threshold(np.full(9, 0.99), np.ones(9, bool), 0.9).threshold is None
    assert precision_threshold(np.zeros(0), np.zeros(0, bool), 0.9).threshold is None
    assert precision_threshold(np.zeros(3), np.zeros(3, bool), 0.0).threshold == 0.0  # target 0: always
    with pytest.raises(ModelInputError):
        precision_threshold(np.zeros(3), np.zeros(2, bool), 0.9)
    with pytest.raises(ModelInputError):
        precision_threshold(np.zeros(3), np.zeros(3, bool), 1.5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=200),
       st.floats(0.5, 0.99))
def test_what_the_threshold_admits_always_meets_the_target_on_the_validation_predictions(pairs, target):
    confidence = np.array([c for c, _ in pairs])
    correct = np.array([k for _, k in pairs])
    result = precision_threshold(confidence, correct, target)
    if result.threshold is not None:
        admitted = confidence >= result.threshold
        assert correct[admitted].mean() >= wilson_lower_bound(correct[admitted].sum(), admitted.sum()) >= target - 1e-9


def test_the_coarse_answer_precision_reads_t_with_the_class_balance():
    transition = np.array([[0.9, 0.1], [0.4, 0.6]])
    # Balanced classes: when the VLM says 0, it is right 0.9 / (0.9 + 0.4) of the time.
    np.testing.assert_allclose(coarse_answer_precision(transition, [0.5, 0.5]), [0.9 / 1.3, 0.6 / 0.7])
    # A rare class 1 makes the VLM's "1" less trustworthy.
    rare = coarse_answer_precision(transition, [0.9, 0.1])
    assert rare[1] < 0.6 / 0.7 and rare[0] > 0.9 / 1.3
    with pytest.raises(ModelInputError):
        coarse_answer_precision(transition, [1.0, 0.0, 0.0])
