"""Multi-label scores: mean average precision over labels and micro-averaged F1."""

from __future__ import annotations

import numpy as np

from model.errors import ModelInputError
from model.multilabel.noise import validated_label_sets


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve as a sum over the positives (ties broken against the positives, so
    a constant score earns only the prevalence); NaN when there is no positive."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    truth = np.asarray(truth, dtype=bool).reshape(-1)
    if scores.shape != truth.shape:
        raise ModelInputError(f"scores and truth differ in length: {scores.size} vs {truth.size}")
    positives = int(truth.sum())
    if positives == 0:
        return float("nan")
    order = np.lexsort((truth, -scores))  # descending score; among equal scores, negatives first
    hits = truth[order]
    precision_at_hit = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
    return float(precision_at_hit.sum() / positives)


def mean_average_precision(probabilities: np.ndarray, truth: np.ndarray) -> float:
    """Mean of the per-label average precision over the labels present at least once in ``truth``."""
    truth = validated_label_sets("truth", truth)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.shape != truth.shape:
        raise ModelInputError(f"probabilities {probabilities.shape} and truth {truth.shape} differ in shape")
    values = [average_precision(probabilities[:, label], truth[:, label]) for label in range(truth.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def micro_f1(predicted: np.ndarray, truth: np.ndarray) -> float:
    """F1 over every (image, label) decision; 1.0 when nothing is present and nothing is predicted."""
    predicted = validated_label_sets("predicted", predicted)
    truth = validated_label_sets("truth", truth, predicted.shape[1], predicted.shape[0])
    true_positives = int(np.sum(predicted & truth))
    denominator = int(predicted.sum() + truth.sum())
    return 1.0 if denominator == 0 else 2.0 * true_positives / denominator
