"""Which images a person should label next in a multi-label project, registered in ``model.query.STRATEGIES``.

An image's value is its per-label uncertainty: the sum over labels of the binary entropy of P(present), read
after the VLM's answer where there is one (``p(y_l | x, w_l) ∝ p(y_l | x) T_l[y_l, w_l]``: a label the VLM is
reliable on is settled by its answer). Batches are made diverse by clustering a shortlist of the most uncertain
images and taking the one nearest each centre, as the single-label strategy does.

Selections reuse ``model.query.Selection``: ``HUMAN_FINE`` buys a human's full label set for the image,
``VLM_COARSE`` the VLM's per-label answers; ``LabelCosts.human_fine`` and ``weak_coarse`` price them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError
from model.multilabel.noise import LabelTransitions, validated_label_sets
from model.query import (
    STRATEGIES,
    LabelCosts,
    LabelKind,
    Selection,
    _check_budget,
    affordable_count,
    kmeans_typical,
    l2_normalised,
    random_projection,
)


@dataclass(frozen=True, eq=False)
class MultiLabelPool:
    """What a multi-label strategy may look at."""

    features: np.ndarray
    """float (n, d): one vector per image (the map's mean), for diversity."""
    labelled: np.ndarray
    """bool (n,): a human label set exists."""
    weak_answered: np.ndarray
    """bool (n,): the VLM's per-label answers exist."""
    weak_sets: np.ndarray
    """bool (n, L): the VLM's answers (meaningful where ``weak_answered``)."""
    probabilities: np.ndarray | None = None
    """float (n, L): the model's P(present); None before the first model."""
    transitions: LabelTransitions | None = None

    def __post_init__(self) -> None:
        features = np.asarray(self.features)
        if features.ndim != 2 or features.shape[0] == 0 or not np.all(np.isfinite(features)):
            raise ModelInputError(f"pool features must be a finite, non-empty (n, d) array, got {features.shape}")
        n = features.shape[0]
        for name in ("labelled", "weak_answered"):
            if np.asarray(getattr(self, name)).shape != (n,):
                raise ModelInputError(f"{name} must have shape ({n},)")
        weak = validated_label_sets("weak_sets", self.weak_sets, n_samples=n)
        if self.probabilities is not None:
            probabilities = np.asarray(self.probabilities)
            if probabilities.shape != weak.shape or not np.all(np.isfinite(probabilities)):
                raise ModelInputError(f"probabilities must be a finite {weak.shape} array")
        if self.transitions is not None and self.transitions.n_labels != weak.shape[1]:
            raise ModelInputError("transitions and weak_sets disagree on the number of labels")

    @property
    def size(self) -> int:
        return int(np.asarray(self.features).shape[0])

    def posterior(self) -> np.ndarray:
        """float64 (n, L): P(present | image, the VLM's answer where there is one)."""
        if self.probabilities is None:
            raise ModelInputError("the posterior needs probabilities from a trained model")
        present = np.asarray(self.probabilities, dtype=np.float64).copy()
        answered = np.asarray(self.weak_answered, dtype=bool)
        if self.transitions is None or not answered.any():
            return present
        likelihood = self.transitions.likelihood(np.asarray(self.weak_sets)[answered])  # (m, L, 2)
        p = present[answered]
        joint_present, joint_absent = p * likelihood[..., 1], (1 - p) * likelihood[..., 0]
        present[answered] = joint_present / np.maximum(joint_present + joint_absent, 1e-300)
        return present


def label_set_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """float64 (n,): the sum over labels of the binary entropy (in bits) of P(present)."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1 - 1e-12)
    return -(p * np.log2(p) + (1 - p) * np.log2(1 - p)).sum(axis=1)


def _checked(pool: object) -> MultiLabelPool:
    if not isinstance(pool, MultiLabelPool):
        raise ModelInputError(f"a multi-label strategy needs a MultiLabelPool, got {type(pool).__name__}")
    return pool


def _human(indices: Sequence[int] | np.ndarray) -> list[Selection]:
    return [Selection(int(i), LabelKind.HUMAN_FINE) for i in indices]


def _candidates(pool: MultiLabelPool, budget: float, cost: float) -> tuple[np.ndarray, int]:
    _check_budget(budget)
    candidates = np.flatnonzero(~np.asarray(pool.labelled, dtype=bool))
    return candidates, min(affordable_count(budget, cost), candidates.size)


@dataclass(frozen=True)
class MultiLabelRandomQuery:
    def query(self, pool: MultiLabelPool, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        candidates, n_picks = _candidates(_checked(pool), budget, costs.human_fine)
        return _human(rng.choice(candidates, size=n_picks, replace=False))


@dataclass(frozen=True)
class MultiLabelUncertaintyQuery:
    """The images with the highest summed per-label entropy of the model (no VLM answer read, no diversity)."""

    def query(self, pool: MultiLabelPool, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        pool = _checked(pool)
        candidates, n_picks = _candidates(pool, budget, costs.human_fine)
        if pool.probabilities is None:
            raise ModelInputError("uncertainty sampling needs probabilities from a trained model")
        uncertainty = label_set_uncertainty(np.asarray(pool.probabilities)[candidates])
        return _human(candidates[np.argsort(-uncertainty, kind="stable")[:n_picks]])


class MultiLabelDiverseUncertaintyQuery:
    """Ours: ``human_share`` of the budget buys human label sets for the most uncertain images after reading the
    VLM's answers, made diverse (k-means over a shortlist of ``shortlist_factor`` × n); the rest buys the VLM's
    answers for the unanswered images the model is least sure of."""

    def __init__(self, human_share: float = 0.85, shortlist_factor: float = 4.0, distance_dim: int | None = 64) -> None:
        if not 0.0 <= human_share <= 1.0:
            raise ModelInputError(f"human_share must be in [0, 1], got {human_share!r}")
        if not shortlist_factor >= 1.0:
            raise ModelInputError(f"shortlist_factor must be >= 1, got {shortlist_factor!r}")
        self.human_share = float(human_share)
        self.shortlist_factor = float(shortlist_factor)
        self.distance_dim = distance_dim

    def query(self, pool: MultiLabelPool, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        pool = _checked(pool)
        _check_budget(budget)
        if pool.probabilities is None:
            raise ModelInputError("the multi-label ours strategy needs probabilities from a trained model")
        answered = np.asarray(pool.weak_answered, dtype=bool)
        labelled = np.asarray(pool.labelled, dtype=bool)
        weak_capacity = int(np.sum(~answered & ~labelled)) * costs.weak_coarse
        human_budget = max(self.human_share * budget, budget - weak_capacity)
        candidates, n_human = _candidates(pool, human_budget, costs.human_fine)
        posterior = pool.posterior()
        human = self._diverse(pool, candidates, label_set_uncertainty(posterior[candidates]), n_human, rng)
        selections = _human(human)
        remaining = budget - len(human) * costs.human_fine
        weak_candidates = np.setdiff1d(np.flatnonzero(~answered & ~labelled), human)
        n_weak = min(affordable_count(max(remaining, 0.0), costs.weak_coarse), weak_candidates.size)
        if n_weak > 0:
            order = np.argsort(-label_set_uncertainty(posterior[weak_candidates]), kind="stable")
            selections += [Selection(int(i), LabelKind.VLM_COARSE) for i in weak_candidates[order[:n_weak]]]
        return selections

    def _diverse(self, pool: MultiLabelPool, candidates: np.ndarray, uncertainty: np.ndarray, n_picks: int,
                 rng: np.random.Generator) -> np.ndarray:
        if n_picks == 0:
            return np.empty(0, dtype=np.int64)
        shortlist = np.argsort(-uncertainty, kind="stable")[: min(candidates.size,
                                                                   int(np.ceil(n_picks * self.shortlist_factor)))]
        if shortlist.size == n_picks:
            return candidates[shortlist]
        points = random_projection(l2_normalised(np.asarray(pool.features)[candidates[shortlist]]), self.distance_dim,
                                   rng)
        return candidates[shortlist[kmeans_typical(points, n_picks, rng)]]


def multilabel_priority_scores(pool: MultiLabelPool, selections: Sequence[Selection] | None = None) -> np.ndarray:
    """float64 (n,) in [0, 1], ascending = label first: the planned human picks in order, then the other unlabelled
    images by descending uncertainty (after the VLM's answer), labelled images last at 1.0."""
    pool = _checked(pool)
    labelled = np.asarray(pool.labelled, dtype=bool)
    scores = np.ones(pool.size)
    unlabelled = np.flatnonzero(~labelled)
    if unlabelled.size == 0:
        return scores
    selected = [s.index for s in selections or () if s.kind is LabelKind.HUMAN_FINE]
    if any(not 0 <= i < pool.size for i in selected):
        raise ModelInputError(f"selections name images outside the pool of {pool.size}")
    selected = [i for i in dict.fromkeys(selected) if not labelled[i]]
    rest = np.setdiff1d(unlabelled, selected)
    if pool.probabilities is not None:
        rest = rest[np.argsort(-label_set_uncertainty(pool.posterior()[rest]), kind="stable")]
    order = np.concatenate([np.asarray(selected, dtype=np.int64), rest])
    scores[order] = np.arange(order.size) / order.size
    return scores


MULTILABEL_STRATEGIES = {
    "multilabel-random": MultiLabelRandomQuery,
    "multilabel-uncertainty": MultiLabelUncertaintyQuery,
    "multilabel-ours": MultiLabelDiverseUncertaintyQuery,
}
"""Registered in the one strategy registry, ``model.query.STRATEGIES``, when this module is imported."""
# The registry's type names single-label pools; these strategies refuse any pool but a MultiLabelPool (_checked).
STRATEGIES.update(MULTILABEL_STRATEGIES)  # type: ignore[arg-type]
