"""When may a suggestion be pre-ticked? A confidence threshold whose precision is bounded from below.

A fine suggestion is pre-ticked for the annotator only where predictions at least that confident were right often
enough on human labels the model did not train on (out of fold). The bound is the lower end of a Wilson score
interval, not the raw frequency, so ten lucky hits do not make a threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError

Z_95_ONE_SIDED = 1.6449
"""The normal quantile of a one-sided 95% lower bound."""


def wilson_lower_bound(successes: np.ndarray, trials: np.ndarray, z: float = Z_95_ONE_SIDED) -> np.ndarray:
    """Lower end of the Wilson score interval of ``successes / trials`` (0 where there is no trial)."""
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    safe = np.maximum(n, 1.0)
    p = k / safe
    centre = p + z * z / (2 * safe)
    spread = z * np.sqrt(p * (1 - p) / safe + z * z / (4 * safe * safe))
    return np.where(n > 0, (centre - spread) / (1 + z * z / safe), 0.0)


@dataclass(frozen=True)
class PrecisionThreshold:
    """The smallest confidence at which the precision bound reaches the target, or None when none does."""

    target: float
    threshold: float | None
    bound_at_threshold: float | None
    support_at_threshold: int
    n_validation: int

    def allows(self, confidence: float) -> bool:
        return self.threshold is not None and confidence >= self.threshold

    def to_dict(self) -> dict:
        return {"target": self.target, "threshold": self.threshold, "bound_at_threshold": self.bound_at_threshold,
                "support_at_threshold": self.support_at_threshold, "n_validation": self.n_validation}


def precision_threshold(confidences: np.ndarray, correct: np.ndarray, target: float,
                        min_support: int = 10) -> PrecisionThreshold:
    """The lowest confidence ``t`` such that predictions with confidence ≥ ``t`` have a precision whose 95% Wilson
    lower bound is at least ``target``, over at least ``min_support`` of them. ``target`` 0 allows everything."""
    confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if confidences.shape != correct.shape:
        raise ModelInputError(f"confidences and correct differ in length: {confidences.size} vs {correct.size}")
    if not 0.0 <= target <= 1.0 or math.isnan(target):
        raise ModelInputError(f"target precision must be in [0, 1], got {target}")
    n = int(confidences.size)
    if target == 0.0:
        return PrecisionThreshold(target, 0.0, None, n, n)
    if n == 0:
        return PrecisionThreshold(target, None, None, 0, 0)
    order = np.argsort(-confidences, kind="stable")
    sorted_confidence = confidences[order]
    hits = np.cumsum(correct[order])
    counts = np.arange(1, n + 1)
    # Only cut between distinct confidences: every prediction at the threshold is pre-ticked.
    last_of_value = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True]
    bound = wilson_lower_bound(hits, counts)
    eligible = np.flatnonzero(last_of_value & (counts >= min_support) & (bound >= target))
    if eligible.size == 0:
        return PrecisionThreshold(target, None, None, 0, n)
    cut = int(eligible[-1])  # the most predictions that still meet the bound
    return PrecisionThreshold(target, float(sorted_confidence[cut]), round(float(bound[cut]), 4), cut + 1, n)


def coarse_answer_precision(transition: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """P(true coarse = j | the weak annotator says j) for every j, from T (rows: true class) and a class prior."""
    transition = np.asarray(transition, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64).reshape(-1)
    if transition.ndim != 2 or transition.shape[0] != transition.shape[1] or transition.shape[0] != prior.size:
        raise ModelInputError(f"need a (C, C) transition and a (C,) prior, got {transition.shape} and {prior.shape}")
    prior = prior / max(prior.sum(), 1e-12)
    joint = prior[:, None] * transition  # P(true i, says j)
    says = joint.sum(axis=0)
    return np.where(says > 0, np.diag(joint) / np.maximum(says, 1e-12), 0.0)
