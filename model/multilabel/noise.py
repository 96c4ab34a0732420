"""The weak annotator's noise per label: a 2×2 transition for every label, estimated from trusted human label sets.

``matrices[l, t, w] = P(weak annotator says w | label l truly t)`` with 0 = absent, 1 = present. Each label's
matrix is the single-label coarse transition (``model.noise``) over two classes, absent and present, so it gets the
same smoothing towards the same almost-identity prior: a label no human has judged yet is assumed to be read
correctly rather than silently ignored by the forward-corrected loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.noise import estimate_coarse_transition_matrix

ABSENT, PRESENT = 0, 1


def validated_label_sets(name: str, sets: object, n_labels: int | None = None, n_samples: int | None = None) -> np.ndarray:
    """``sets`` as a bool (n, L) array, or a ModelInputError naming ``name``."""
    array = np.asarray(sets)
    if array.ndim != 2:
        raise ModelInputError(f"{name} must be a 2-d (n, labels) array, got shape {array.shape}")
    if n_labels is not None and array.shape[1] != n_labels:
        raise ModelInputError(f"{name} must have {n_labels} label columns, got {array.shape[1]}")
    if n_samples is not None and array.shape[0] != n_samples:
        raise ModelInputError(f"{name} must have {n_samples} rows, got {array.shape[0]}")
    if array.dtype != bool:
        if array.size and (not np.issubdtype(array.dtype, np.number) or not np.all(np.isin(array, (0, 1)))):
            raise ModelInputError(f"{name} must hold booleans or 0/1")
        array = array.astype(bool)
    return array


@dataclass(frozen=True)
class LabelTransitions:
    """One smoothed 2×2 transition per label, with the evidence behind it."""

    matrices: np.ndarray
    """float64 (L, 2, 2), each row summing to 1."""
    counts: np.ndarray
    """int64 (L, 2, 2): trusted pairs (truly t, weak says w)."""
    prior_strength: float

    @property
    def n_labels(self) -> int:
        return int(self.matrices.shape[0])

    @property
    def row_support(self) -> np.ndarray:
        """int64 (L, 2): trusted pairs per (label, true state)."""
        return self.counts.sum(axis=2)

    def likelihood(self, weak_sets: np.ndarray) -> np.ndarray:
        """float64 (n, L, 2): P(the weak answer seen | label truly absent / present) for every row and label."""
        weak = validated_label_sets("weak_sets", weak_sets, self.n_labels).astype(np.int64)
        labels = np.arange(self.n_labels)[None, :]
        return np.stack([self.matrices[labels, ABSENT, weak], self.matrices[labels, PRESENT, weak]], axis=2)

    def to_dict(self) -> dict:
        return {"matrices": self.matrices.tolist(), "counts": self.counts.tolist(),
                "prior_strength": self.prior_strength}


def estimate_label_transitions(
    true_sets: np.ndarray, weak_sets: np.ndarray, trusted: np.ndarray | None = None, prior_strength: float = 1.0
) -> LabelTransitions:
    """Count (true, weak) pairs per label over the ``trusted`` rows (all rows when None) and smooth every row
    towards ``model.noise.identity_prior(2)`` with ``prior_strength`` pseudo-counts."""
    truth = validated_label_sets("true_sets", true_sets)
    n, n_labels = truth.shape
    weak = validated_label_sets("weak_sets", weak_sets, n_labels, n)
    rows = np.ones(n, dtype=bool) if trusted is None else np.asarray(trusted, dtype=bool).reshape(-1)
    if rows.shape != (n,):
        raise ModelInputError(f"trusted must have shape ({n},), got {rows.shape}")
    matrices = np.empty((n_labels, 2, 2))
    counts = np.empty((n_labels, 2, 2), dtype=np.int64)
    for label in range(n_labels):
        true_state = np.where(rows, truth[:, label].astype(np.int64), MISSING_LABEL)
        estimate = estimate_coarse_transition_matrix(true_state, weak[:, label].astype(np.int64), 2, prior_strength)
        matrices[label], counts[label] = estimate.matrix, estimate.counts
    return LabelTransitions(matrices=matrices, counts=counts, prior_strength=float(prior_strength))


def identity_transitions(n_labels: int) -> LabelTransitions:
    """The prior alone: what the estimate is before any human label."""
    empty = np.zeros((0, n_labels), dtype=bool)
    return estimate_label_transitions(empty, empty)
