"""Likely label errors: human labels that the model, trained without them (out of fold), confidently contradicts.

cleanlab's ``find_label_issues`` (confident learning, Northcutt et al. 2021) decides which labels are issues from
the out-of-fold probabilities and the per-class thresholds it estimates; the list is ranked by cleanlab's label
quality score (self-confidence: the out-of-fold probability of the given label), lowest first.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError


@dataclass(frozen=True)
class LabelIssue:
    """One flagged human label, as positions into the arrays given to ``likely_label_errors``."""

    row: int
    given: int
    suggested: int
    """The class the out-of-fold model finds likeliest."""
    quality: float
    """cleanlab's label quality score: the out-of-fold probability of the given label (low = likely wrong)."""

    def to_dict(self) -> dict:
        return {"row": self.row, "given": self.given, "suggested": self.suggested, "quality": round(self.quality, 4)}


def likely_label_errors(labels: np.ndarray, out_of_fold: np.ndarray, *, min_examples_per_class: int = 1) -> list[LabelIssue]:
    """The labels cleanlab flags, most likely wrong first. ``labels``: (n,) class indices; ``out_of_fold``:
    (n, K) probabilities from models that did not train on each row. Classes that nobody labeled are dropped
    from the columns (cleanlab estimates per given class) and their probability mass renormalised."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    probabilities = np.asarray(out_of_fold, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] != labels.size:
        raise ModelInputError(f"need (n, K) out-of-fold probabilities for {labels.size} labels, got "
                              f"{probabilities.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probabilities.shape[1]):
        raise ModelInputError(f"labels must lie in [0, {probabilities.shape[1]})")
    present = np.unique(labels)
    if present.size < 2:
        return []  # with one class there is nothing to contradict it with
    columns = probabilities[:, present]
    columns = columns / np.maximum(columns.sum(axis=1, keepdims=True), 1e-12)
    compact = np.searchsorted(present, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleanlab warns about small classes; the list is still its answer
        # n_jobs=1: cleanlab's default forks a multiprocessing pool, which hangs inside a threaded server whose
        # torch and ONNX Runtime thread pools do not survive a fork (seen: a fit stuck for minutes in the replay).
        flagged = find_label_issues(compact, columns, return_indices_ranked_by="self_confidence",
                                    min_examples_per_class=min_examples_per_class, n_jobs=1)
    quality = get_label_quality_scores(compact, columns, method="self_confidence")
    suggested = present[columns.argmax(axis=1)]
    return [LabelIssue(int(row), int(labels[row]), int(suggested[row]), float(quality[row])) for row in flagged]
