"""The weak annotator's noise model: a coarse transition matrix estimated from trusted samples.

``matrix[i, j] = P(weak annotator says j | true coarse class i)``. Trusted samples are those with a human
label (so a known true coarse class) and a weak answer. Each row is smoothed towards a prior that is almost
the identity, so a coarse class that no human has labelled yet is assumed to be answered correctly rather
than silently zeroed (a zero row would make the forward-corrected loss ignore every weak label of it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, validated_label_array

PRIOR_UNIFORM_SHARE = 0.02
"""Share of the prior row spread uniformly, so that no entry of the estimate is exactly zero."""


@dataclass(frozen=True)
class CoarseTransitionEstimate:
    """A smoothed estimate with the evidence behind it."""

    matrix: np.ndarray
    """float64 (C, C), rows sum to 1."""
    counts: np.ndarray
    """int64 (C, C): trusted pairs (true coarse i, weak answer j)."""
    row_support: np.ndarray
    """int64 (C,): trusted pairs per true coarse class."""
    prior_strength: float

    @property
    def n_coarse(self) -> int:
        return int(self.matrix.shape[0])

    def row_standard_error(self) -> np.ndarray:
        """float64 (C, C): binomial standard error of each entry given its row's support (prior counted in)."""
        effective = self.row_support.astype(np.float64) + self.prior_strength
        return np.sqrt(self.matrix * (1.0 - self.matrix) / effective[:, None])

    def to_dict(self) -> dict:
        return {
            "matrix": self.matrix.tolist(),
            "counts": self.counts.tolist(),
            "row_support": self.row_support.tolist(),
            "prior_strength": self.prior_strength,
        }


def identity_prior(n_coarse: int) -> np.ndarray:
    """The prior row set: identity mixed with a little uniform."""
    return (1.0 - PRIOR_UNIFORM_SHARE) * np.eye(n_coarse) + PRIOR_UNIFORM_SHARE / n_coarse


def estimate_coarse_transition_matrix(
    true_coarse: np.ndarray, weak_coarse: np.ndarray, n_coarse: int, prior_strength: float = 1.0
) -> CoarseTransitionEstimate:
    """Count (true, weak) pairs and smooth each row: ``(counts_i + s * prior_i) / (n_i + s)``.

    Pairs where either side is ``MISSING_LABEL`` are ignored (the weak annotator gave no usable answer,
    or no human label exists).
    """
    if isinstance(n_coarse, bool) or not isinstance(n_coarse, (int, np.integer)) or n_coarse < 1:
        raise ModelInputError(f"n_coarse must be a positive integer, got {n_coarse!r}")
    if not np.isfinite(prior_strength) or prior_strength < 0:
        raise ModelInputError(f"prior_strength must be a finite number >= 0, got {prior_strength!r}")
    true_array = validated_label_array("true_coarse", true_coarse, int(n_coarse))
    weak_array = validated_label_array("weak_coarse", weak_coarse, int(n_coarse))
    if true_array.shape != weak_array.shape:
        raise ModelInputError(
            f"true_coarse and weak_coarse differ in length: {true_array.shape[0]} vs {weak_array.shape[0]}"
        )
    paired = (true_array != MISSING_LABEL) & (weak_array != MISSING_LABEL)
    counts = np.zeros((n_coarse, n_coarse), dtype=np.int64)
    np.add.at(counts, (true_array[paired], weak_array[paired]), 1)
    row_support = counts.sum(axis=1)
    prior = identity_prior(int(n_coarse))
    denominator = row_support.astype(np.float64) + prior_strength
    # With prior_strength 0 an unseen row would divide 0 by 0: fall back to the prior for it.
    safe = denominator > 0
    matrix = prior.copy()
    matrix[safe] = (counts[safe] + prior_strength * prior[safe]) / denominator[safe, None]
    return CoarseTransitionEstimate(
        matrix=matrix, counts=counts, row_support=row_support, prior_strength=float(prior_strength)
    )
