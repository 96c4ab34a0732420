"""Per-label thresholds, calibrated on human labels: when does a weak score mean "present"?

CLIP-like and label-map scores are miscalibrated per class (one label's 0.2 may be another's 0.6), so one global
cut-off would call some labels present everywhere and others nowhere. Each label gets the cut that maximises F1 of
the weak answer against the human label sets; a label with too few human positives or negatives falls back to the
cut that marks as many images present as the human labels say are (or ``default_positive_rate`` before any).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError
from model.multilabel.noise import validated_label_sets


@dataclass(frozen=True)
class LabelThresholds:
    thresholds: np.ndarray
    """float64 (L,): score >= threshold means present."""
    calibrated: np.ndarray
    """bool (L,): the threshold maximises F1 on human labels (False: the prevalence fallback)."""
    f1: np.ndarray
    """float64 (L,): F1 of the weak answer on the human labels at that threshold (NaN where not calibrated)."""

    def apply(self, scores: np.ndarray) -> np.ndarray:
        """bool (n, L): the weak answer for every label."""
        array = _validated_scores(scores, self.thresholds.size)
        return array >= self.thresholds[None, :]

    def to_dict(self) -> dict:
        return {"thresholds": self.thresholds.tolist(), "calibrated": self.calibrated.tolist(),
                "f1": [None if np.isnan(v) else round(float(v), 4) for v in self.f1]}


def _validated_scores(scores: np.ndarray, n_labels: int | None = None) -> np.ndarray:
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 2 or (n_labels is not None and array.shape[1] != n_labels):
        raise ModelInputError(f"scores must be (n, {n_labels or 'labels'}), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ModelInputError("scores contain NaN or inf")
    return array


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """The threshold (one of the scores) with the highest F1 of ``scores >= t`` against ``truth``, and that F1.
    Ties go to the higher threshold (fewer false positives)."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    true_positives = np.cumsum(sorted_truth)
    predicted = np.arange(1, scores.size + 1)
    f1 = 2 * true_positives / (predicted + max(int(truth.sum()), 0))
    # Only cut between distinct scores: every image at the threshold is called present.
    f1 = np.where(np.r_[sorted_scores[1:] != sorted_scores[:-1], True], f1, -1.0)
    best = int(np.argmax(f1))
    return float(sorted_scores[best]), float(f1[best])


def calibrate_label_thresholds(
    scores: np.ndarray,
    truth: np.ndarray,
    min_positives: int = 3,
    min_negatives: int = 3,
    default_positive_rate: float = 0.2,
    pool_scores: np.ndarray | None = None,
) -> LabelThresholds:
    """Thresholds from the weak ``scores`` (n, L) of the human-labelled rows and their label sets ``truth`` (n, L).

    ``pool_scores`` (m, L), the scores of every image, place the fallback cut at the human prevalence's quantile
    (default: ``scores`` themselves)."""
    array = _validated_scores(scores)
    n, n_labels = array.shape
    truth_array = validated_label_sets("truth", truth, n_labels, n)
    if not 0.0 < default_positive_rate < 1.0:
        raise ModelInputError(f"default_positive_rate must be in (0, 1), got {default_positive_rate}")
    reference = array if pool_scores is None else _validated_scores(pool_scores, n_labels)
    thresholds = np.empty(n_labels)
    calibrated = np.zeros(n_labels, dtype=bool)
    f1 = np.full(n_labels, np.nan)
    for label in range(n_labels):
        positives = int(truth_array[:, label].sum())
        if positives >= min_positives and n - positives >= min_negatives:
            thresholds[label], f1[label] = best_f1_threshold(array[:, label], truth_array[:, label])
            calibrated[label] = True
            continue
        # Laplace-smoothed prevalence: a label no human has seen present yet is not called absent everywhere.
        rate = (positives + default_positive_rate) / (n + 1.0)
        column = reference[:, label] if reference.shape[0] else array[:, label]
        thresholds[label] = float(np.quantile(column, 1.0 - rate)) if column.size else np.inf
    return LabelThresholds(thresholds=thresholds, calibrated=calibrated, f1=f1)
