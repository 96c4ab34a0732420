"""Query strategies: which samples to label next, and with which kind of label.

Every strategy has one signature, ``strategy.query(pool, budget, costs, rng) -> list[Selection]``. The total cost
of the selections never exceeds ``budget``; a strategy stops only when no remaining candidate is affordable.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy, validated_label_array

UNLABELED, WEAK, FULL = 0, 1, 2
"""Values of ``PoolState.annotation_type``."""
_BUDGET_EPSILON = 1e-9
"""Budgets are sums of float costs: 150 * 0.02 must still buy 150 weak labels."""
_DISTANCE_CHUNK = 4096
ROW_CHUNK = 4096
"""Pool rows converted to float32 (checked, normalised, projected, predicted) at a time: a float16 pool of a large
project is never copied whole to float32, outside a classifier's training rows."""
_MIN_DISTANCE = 1e-300


class LabelKind(enum.Enum):
    HUMAN_FINE = "human_fine"
    VLM_COARSE = "vlm_coarse"
    HUMAN_COARSE = "human_coarse"


@dataclass(frozen=True)
class LabelCosts:
    """Cost of one label. ``weak_coarse`` is whatever the weak source costs (0.02 for the VLM, 0.1 for a human
    coarse label in the ISOAL baseline)."""

    human_fine: float = 1.0
    weak_coarse: float = 0.02

    def __post_init__(self) -> None:
        for name in ("human_fine", "weak_coarse"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ModelInputError(f"label cost {name} must be a number, got {value!r}")
            if not np.isfinite(value) or value <= 0:
                raise ModelInputError(f"label cost {name} must be a finite number > 0, got {value!r}")
            object.__setattr__(self, name, float(value))

    def of(self, kind: LabelKind) -> float:
        return self.human_fine if kind is LabelKind.HUMAN_FINE else self.weak_coarse


@dataclass(frozen=True)
class Selection:
    index: int
    kind: LabelKind


TrainAndEvaluate = Callable[[np.ndarray, np.ndarray], float]
"""``(full_indices, weak_indices) -> validation accuracy`` of a model trained on those samples. A weak index
whose sample has no weak label but a full one stands for that sample's true coarse label (its fine label's
parent): this is how ISO estimates the value of weak labels before any exist."""


@dataclass(frozen=True, eq=False)
class PoolState:
    """Everything a strategy may look at. Label arrays are int64 with ``MISSING_LABEL``."""

    embeddings: np.ndarray
    hierarchy: LabelHierarchy
    fine_labels: np.ndarray
    weak_coarse_labels: np.ndarray
    weak_kind: LabelKind = LabelKind.VLM_COARSE
    fine_probabilities: np.ndarray | None = None
    coarse_probabilities: np.ndarray | None = None
    train_and_evaluate: TrainAndEvaluate | None = None
    coarse_transition_matrix: np.ndarray | None = None
    """(C, C) P(weak answer | true coarse), rows summing to 1: lets a strategy read what a weak answer says."""

    def __post_init__(self) -> None:
        if not isinstance(self.hierarchy, LabelHierarchy):
            raise ModelInputError(f"PoolState needs a LabelHierarchy, got {type(self.hierarchy).__name__}")
        embeddings = np.asarray(self.embeddings)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
            raise ModelInputError(f"the pool is empty or not (n, d): embeddings have shape {embeddings.shape}")
        for start in range(0, embeddings.shape[0], ROW_CHUNK):  # no (n, d) mask of a large pool at once
            chunk = embeddings[start : start + ROW_CHUNK]
            if not np.all(np.isfinite(chunk)):
                bad_rows = start + np.flatnonzero(~np.all(np.isfinite(chunk), axis=1))
                raise ModelInputError(f"pool embeddings contain NaN or inf in rows {bad_rows[:10].tolist()}")
        n = embeddings.shape[0]
        validated_label_array("fine_labels", self.fine_labels, self.hierarchy.n_fine, n)
        validated_label_array("weak_coarse_labels", self.weak_coarse_labels, self.hierarchy.n_coarse, n)
        _check_probabilities("fine_probabilities", self.fine_probabilities, n, self.hierarchy.n_fine)
        _check_probabilities("coarse_probabilities", self.coarse_probabilities, n, self.hierarchy.n_coarse)
        if self.coarse_transition_matrix is not None:
            matrix = np.asarray(self.coarse_transition_matrix, dtype=np.float64)
            n_coarse = self.hierarchy.n_coarse
            if matrix.shape != (n_coarse, n_coarse) or not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
                raise ModelInputError(f"coarse_transition_matrix must be a finite, non-negative ({n_coarse}, {n_coarse})")
            if not np.allclose(matrix.sum(axis=1), 1.0, atol=1e-4):
                raise ModelInputError("coarse_transition_matrix rows must sum to 1")
        if self.weak_kind not in (LabelKind.VLM_COARSE, LabelKind.HUMAN_COARSE):
            raise ModelInputError(f"weak_kind must be VLM_COARSE or HUMAN_COARSE, got {self.weak_kind!r}")

    @property
    def size(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def annotation_type(self) -> np.ndarray:
        """int64 (n,): 0 unlabeled, 1 weak label only, 2 full (human fine) label."""
        types = np.where(np.asarray(self.weak_coarse_labels) != MISSING_LABEL, WEAK, UNLABELED)
        return np.where(np.asarray(self.fine_labels) != MISSING_LABEL, FULL, types).astype(np.int64)

    def coarse_probabilities_or_summed(self) -> np.ndarray | None:
        """The coarse head's probabilities, else the fine ones summed over each coarse group."""
        if self.coarse_probabilities is not None:
            return np.asarray(self.coarse_probabilities, dtype=np.float64)
        if self.fine_probabilities is None:
            return None
        return np.asarray(self.fine_probabilities, dtype=np.float64) @ self.hierarchy.fine_to_coarse_matrix


def _coarse_probabilities(pool: PoolState) -> np.ndarray:
    """``pool.coarse_probabilities_or_summed()`` for strategies that need a trained model's."""
    coarse = pool.coarse_probabilities_or_summed()
    if coarse is None:
        raise ModelInputError("this strategy needs probabilities from a trained model")
    return coarse


def _check_probabilities(name: str, probabilities: np.ndarray | None, n: int, n_classes: int) -> None:
    if probabilities is None:
        return
    array = np.asarray(probabilities)
    if array.shape != (n, n_classes):
        raise ModelInputError(f"{name} must have shape ({n}, {n_classes}), got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ModelInputError(f"{name} contain NaN or inf")


def _check_budget(budget: float) -> None:
    if not isinstance(budget, (int, float, np.floating, np.integer)) or not np.isfinite(budget) or budget <= 0:
        raise ModelInputError(f"budget must be a finite number > 0, got {budget!r}")


def affordable_count(budget: float, cost: float) -> int:
    return int(np.floor(budget / cost + _BUDGET_EPSILON))


def l2_normalised(embeddings: np.ndarray) -> np.ndarray:
    array = np.asarray(embeddings, dtype=np.float32)
    return array / np.maximum(np.linalg.norm(array, axis=1, keepdims=True), 1e-12)


def projected_unit_rows(embeddings: np.ndarray, rows: np.ndarray, dim: int | None,
                        rng: np.random.Generator) -> np.ndarray:
    """``random_projection(l2_normalised(embeddings[rows]), dim, rng)`` ROW_CHUNK rows at a time: a float16 pool is
    never copied whole to float32, only its projected rows are kept."""
    rows = np.asarray(rows, dtype=np.int64)
    n_features = int(np.shape(embeddings)[1])
    if dim is None or dim >= n_features:
        return l2_normalised(embeddings[rows])
    projection = rng.standard_normal((n_features, dim)).astype(np.float32)
    out = np.empty((rows.size, dim), dtype=np.float32)
    for start in range(0, rows.size, ROW_CHUNK):
        out[start : start + ROW_CHUNK] = l2_normalised(l2_normalised(embeddings[rows[start : start + ROW_CHUNK]])
                                                       @ projection)
    return out


# ---- uncertainty --------------------------------------------------------------------------------------------


def margin_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    """1 - (top1 - top2): 1 when the two best classes tie. A single class has margin 1 (no uncertainty)."""
    array = np.asarray(probabilities, dtype=np.float64)
    if array.shape[1] < 2:
        return np.zeros(array.shape[0])
    top_two = -np.partition(-array, 1, axis=1)[:, :2]
    return 1.0 - (top_two[:, 0] - top_two[:, 1])


def least_confidence_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    return 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=1)


def entropy_uncertainty(probabilities: np.ndarray) -> np.ndarray:
    array = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
    return -(array * np.log(array)).sum(axis=1)


UNCERTAINTY_MEASURES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "margin": margin_uncertainty,
    "entropy": entropy_uncertainty,
    "least-confidence": least_confidence_uncertainty,
}


def percentile_rank(values: np.ndarray) -> np.ndarray:
    """Rank of every value over all values, in (0, 1]; ties share their highest rank."""
    sorted_values = np.sort(values)
    return np.searchsorted(sorted_values, values, side="right") / values.size


# ---- strategies ---------------------------------------------------------------------------------------------


class QueryStrategy(Protocol):
    def query(
        self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator
    ) -> list[Selection]: ...


def _fine_candidates(pool: PoolState) -> np.ndarray:
    """Samples without a human fine label (weakly labelled ones included)."""
    return np.flatnonzero(np.asarray(pool.fine_labels) == MISSING_LABEL)


def _human_fine(indices: Sequence[int] | np.ndarray) -> list[Selection]:
    return [Selection(int(i), LabelKind.HUMAN_FINE) for i in indices]


def _start(pool: PoolState, budget: float, costs: LabelCosts) -> tuple[np.ndarray, int]:
    """Validate and return the fine candidates and how many fine labels the budget buys."""
    _check_budget(budget)
    candidates = _fine_candidates(pool)
    return candidates, min(affordable_count(budget, costs.human_fine), candidates.size)


@dataclass(frozen=True)
class RandomQuery:
    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        candidates, n_picks = _start(pool, budget, costs)
        return _human_fine(rng.choice(candidates, size=n_picks, replace=False))


@dataclass(frozen=True)
class _UncertaintyQuery:
    """Human fine labels for the samples where the fine head is least sure."""

    measure: str = "margin"

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        candidates, n_picks = _start(pool, budget, costs)
        if pool.fine_probabilities is None:
            raise ModelInputError(
                f"{type(self).__name__} needs fine_probabilities from a trained model; use a cold-start strategy first"
            )
        uncertainty = UNCERTAINTY_MEASURES[self.measure](np.asarray(pool.fine_probabilities)[candidates])
        # Stable sort: ties go to the lower index, so the choice is reproducible.
        order = np.argsort(-uncertainty, kind="stable")[:n_picks]
        return _human_fine(candidates[order])


@dataclass(frozen=True)
class LeastConfidenceQuery(_UncertaintyQuery):
    measure: str = "least-confidence"


@dataclass(frozen=True)
class MarginQuery(_UncertaintyQuery):
    measure: str = "margin"


@dataclass(frozen=True)
class EntropyQuery(_UncertaintyQuery):
    measure: str = "entropy"


def _squared_distances(unit_points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Squared distances from rows of unit norm to ``centre``; einsum, not BLAS, which stalls on a busy machine."""
    return np.maximum(1.0 + float(centre @ centre) - 2.0 * np.einsum("ij,j->i", unit_points, centre), 0.0)


def _min_squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Squared distance of every point to its nearest centre, in chunks to bound memory."""
    best = np.full(points.shape[0], np.inf)
    points_sq = np.square(points).sum(axis=1)
    for start in range(0, centres.shape[0], _DISTANCE_CHUNK):
        chunk = centres[start : start + _DISTANCE_CHUNK]
        distances = points_sq[:, None] + np.square(chunk).sum(axis=1)[None, :] - 2.0 * points @ chunk.T
        best = np.minimum(best, distances.min(axis=1))
    return np.maximum(best, 0.0)


@dataclass(frozen=True)
class KCenterQuery:
    """Greedy core-set: repeatedly the candidate farthest from every full-labelled or chosen sample."""

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        candidates, n_picks = _start(pool, budget, costs)
        if n_picks == 0:
            return []
        points = l2_normalised(pool.embeddings)
        candidate_points = points[candidates]
        labelled = np.flatnonzero(np.asarray(pool.fine_labels) != MISSING_LABEL)
        chosen: list[int] = []
        if labelled.size:
            distance = _min_squared_distances(candidate_points, points[labelled])
        else:
            first = int(rng.integers(candidates.size))
            chosen.append(first)
            distance = _squared_distances(candidate_points, candidate_points[first])
        while len(chosen) < n_picks:
            distance[chosen] = -1.0
            farthest = int(np.argmax(distance))
            chosen.append(farthest)
            distance = np.minimum(distance, _squared_distances(candidate_points, candidate_points[farthest]))
        return _human_fine(candidates[chosen])


def kmeans_plus_plus(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on rows of unit norm: indices of ``k`` distinct points, each drawn with probability
    proportional to D²."""
    chosen = [int(rng.integers(points.shape[0]))]
    distance = _squared_distances(points, points[chosen[0]])
    while len(chosen) < k:
        distance[chosen] = 0.0
        total = distance.sum()
        if total <= 0:  # fewer distinct points than k: take any not yet chosen
            remaining = np.setdiff1d(np.arange(points.shape[0]), chosen)
            chosen.append(int(rng.choice(remaining)))
        else:
            chosen.append(int(rng.choice(points.shape[0], p=distance / total)))
        distance = np.minimum(distance, _squared_distances(points, points[chosen[-1]]))
    return np.asarray(chosen)


def lloyd_kmeans(
    points: np.ndarray, k: int, rng: np.random.Generator, max_iterations: int = 50
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm from k-means++ seeds on rows of unit norm, until no assignment changes.
    Returns (centres (k, d), assignment (n,))."""
    points = np.asarray(points, dtype=np.float32)
    centres = points[kmeans_plus_plus(points, k, rng)].copy()
    points_squared = np.square(points).sum(axis=1)
    assignment = np.full(points.shape[0], -1)
    for _ in range(max_iterations):
        cross = np.einsum("ij,kj->ik", points, centres)  # einsum, not BLAS: see _squared_distances
        distances = points_squared[:, None] + np.square(centres).sum(axis=1)[None, :] - 2.0 * cross
        new_assignment = distances.argmin(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        order = np.argsort(assignment, kind="stable")
        counts = np.bincount(assignment, minlength=k)
        filled = counts > 0  # an emptied cluster keeps its old centre
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[filled]
        centres[filled] = np.add.reduceat(points[order], starts, axis=0) / counts[filled, None]
    return centres, assignment


def kmeans_typical(points: np.ndarray, k: int, rng: np.random.Generator, max_iterations: int = 50) -> list[int]:
    """Rows of ``points`` nearest each of ``k`` k-means centres, one distinct row per centre: a diverse batch of
    typical members (TypiClust's idea: the dense middle of each cluster, not its edge)."""
    centres, _ = lloyd_kmeans(points, k, rng, max_iterations)
    taken = np.zeros(points.shape[0], dtype=bool)
    typical = []
    for centre in centres:
        distance = _squared_distances(points, centre)
        distance[taken] = np.inf  # two centres never take the same sample
        nearest = int(np.argmin(distance))
        taken[nearest] = True
        typical.append(nearest)
    return typical


@dataclass(frozen=True)
class KMeansColdStart:
    """k = budget / fine cost clusters of the unlabelled samples; the sample nearest each centre is labelled.

    Clustering runs on L2-normalised embeddings after a seeded random projection to ``distance_dim``
    dimensions (None: none), which keeps distances within a few percent at a fraction of the cost.
    """

    max_iterations: int = 50
    distance_dim: int | None = 128

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        candidates, n_picks = _start(pool, budget, costs)
        if n_picks == 0:
            return []
        points = projected_unit_rows(pool.embeddings, candidates, self.distance_dim, rng)
        return _human_fine(candidates[kmeans_typical(points, n_picks, rng, self.max_iterations)])


# ---- ISO value-to-cost ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedImprovement:
    """Measured accuracy gain per label of each level and the normalised ratio used for the value."""

    full_per_label: float
    weak_per_label: float
    full_ratio: float
    weak_ratio: float
    full_accuracies: tuple[tuple[float, ...], ...]
    """Per shuffle: validation accuracy at 1/5 .. 5/5 of the full set."""
    weak_accuracies: tuple[tuple[float, ...], ...]
    weak_set_from_full: bool
    """True when no weak labels existed and half of the full set stood in for them."""
    n_evaluations: int

    def to_dict(self) -> dict:
        return {
            "full_per_label": self.full_per_label,
            "weak_per_label": self.weak_per_label,
            "full_ratio": self.full_ratio,
            "weak_ratio": self.weak_ratio,
            "full_accuracies": [list(a) for a in self.full_accuracies],
            "weak_accuracies": [list(a) for a in self.weak_accuracies],
            "weak_set_from_full": self.weak_set_from_full,
            "n_evaluations": self.n_evaluations,
        }


N_FIFTHS = 5
_GAIN_WEIGHTS = np.arange(1.0, N_FIFTHS)
"""Later gains weigh more: they describe the learning curve nearest the current set size."""


def _fifths(indices: np.ndarray) -> list[np.ndarray]:
    """Prefixes of 1/5 .. 5/5 of ``indices`` (each at least one sample; flat when ``indices`` is empty)."""
    if indices.size == 0:
        return [indices] * N_FIFTHS
    sizes = [max(1, int(round(indices.size * k / N_FIFTHS))) for k in range(1, N_FIFTHS + 1)]
    return [indices[:size] for size in sizes]


def _per_label_gain(accuracies: np.ndarray, set_size: int) -> float:
    """Weighted moving average of the gains between consecutive fifths, per label added."""
    gains = np.diff(accuracies, axis=1).mean(axis=0)
    return float(np.average(gains, weights=_GAIN_WEIGHTS) / (set_size / N_FIFTHS))


def improvement_ratio(full_per_label: float, weak_per_label: float) -> tuple[float, float]:
    """(full, weak) normalised so that weak = 1; a level whose gain is not positive gets 0 and the other 1;
    both not positive: (1, 1)."""
    if full_per_label > 0 and weak_per_label > 0:
        return full_per_label / weak_per_label, 1.0
    if full_per_label > 0:
        return 1.0, 0.0
    if weak_per_label > 0:
        return 0.0, 1.0
    return 1.0, 1.0


def estimate_expected_improvement(
    pool: PoolState, rng: np.random.Generator, n_shuffles: int = 3
) -> ExpectedImprovement:
    """Retrain on 1/5 .. 5/5 of the weak set (all full labels kept) and of the full set (all weak labels kept),
    ``n_shuffles`` shuffles each, through ``pool.train_and_evaluate``. The 5/5 point is the same training set
    for both levels and is evaluated once: ``1 + 2 * n_shuffles * 4`` evaluations in all."""
    if pool.train_and_evaluate is None:
        raise ModelInputError("ISO needs pool.train_and_evaluate to measure the expected improvement per label")
    if n_shuffles < 1:
        raise ModelInputError(f"n_shuffles must be >= 1, got {n_shuffles}")
    annotation = pool.annotation_type
    full = np.flatnonzero(annotation == FULL)
    weak = np.flatnonzero(annotation == WEAK)
    weak_from_full = weak.size == 0
    if full.size == 0:
        raise ModelInputError("ISO needs at least one full label to measure the expected improvement")
    if weak_from_full:
        shuffled = rng.permutation(full)
        weak, full = shuffled[: full.size // 2], shuffled[full.size // 2 :]
    evaluate = pool.train_and_evaluate
    everything = float(evaluate(full, weak))
    n_evaluations = 1
    full_curves, weak_curves = [], []
    for _ in range(n_shuffles):
        # Accuracy at 1/5 .. 4/5 of one level with the other level whole; 5/5 is ``everything``.
        full_curves.append([float(evaluate(part, weak)) for part in _fifths(rng.permutation(full))[:-1]])
        weak_curves.append([float(evaluate(full, part)) for part in _fifths(rng.permutation(weak))[:-1]])
        n_evaluations += len(full_curves[-1]) + len(weak_curves[-1])
    full_curves = [curve + [everything] for curve in full_curves]
    weak_curves = [curve + [everything] for curve in weak_curves]
    full_per_label = _per_label_gain(np.asarray(full_curves), full.size)
    weak_per_label = _per_label_gain(np.asarray(weak_curves), max(weak.size, 1))
    full_ratio, weak_ratio = improvement_ratio(full_per_label, weak_per_label)
    return ExpectedImprovement(
        full_per_label=full_per_label,
        weak_per_label=weak_per_label,
        full_ratio=full_ratio,
        weak_ratio=weak_ratio,
        full_accuracies=tuple(tuple(c) for c in full_curves),
        weak_accuracies=tuple(tuple(c) for c in weak_curves),
        weak_set_from_full=weak_from_full,
        n_evaluations=n_evaluations,
    )


@dataclass(frozen=True, eq=False)
class IsoCandidates:
    """Every unlabelled sample twice: as a full (human fine) candidate and, without a weak label yet, as a weak one."""

    sample: np.ndarray
    is_full: np.ndarray
    value: np.ndarray
    cost: np.ndarray


class IsoValueToCostQuery:
    """ISO: value-to-cost ratio with instance-wise assignment of weak or full labels, batched by D² sampling.

    value = percentile(uncertainty of the candidate's head) × expected improvement per label / cost. The best
    candidate comes first; the next ones are drawn with probability ∝ D², the squared distance in
    (L2-normalised feature × value) space to the nearest chosen candidate. Choosing a sample's full candidate
    also retires its weak candidate (the fine label implies the coarse one). After ``query``,
    ``last_expected_improvement`` holds the measured improvements.

    A batch of cheap labels can take thousands of picks, each updating every distance; with ``distance_dim``
    the unit features first go through a seeded Gaussian random projection (Johnson-Lindenstrauss), which keeps
    distances within a few percent and makes a pick cost O(n * distance_dim) instead of O(n * d).
    """

    def __init__(self, uncertainty: str = "margin", n_shuffles: int = 3, distance_dim: int | None = 128) -> None:
        if uncertainty not in UNCERTAINTY_MEASURES:
            raise ModelInputError(f"unknown uncertainty {uncertainty!r}; expected one of {list(UNCERTAINTY_MEASURES)}")
        if not isinstance(n_shuffles, int) or n_shuffles < 1:
            raise ModelInputError(f"n_shuffles must be a positive integer, got {n_shuffles!r}")
        if distance_dim is not None and (not isinstance(distance_dim, int) or distance_dim < 1):
            raise ModelInputError(f"distance_dim must be None or a positive integer, got {distance_dim!r}")
        self.uncertainty = uncertainty
        self.n_shuffles = n_shuffles
        self.distance_dim = distance_dim
        self.last_expected_improvement: ExpectedImprovement | None = None

    def candidates(self, pool: PoolState, costs: LabelCosts, improvement: ExpectedImprovement) -> IsoCandidates:
        if pool.fine_probabilities is None:
            raise ModelInputError("ISO needs fine_probabilities from a trained model; use a cold-start strategy first")
        measure = UNCERTAINTY_MEASURES[self.uncertainty]
        fine_percentile = percentile_rank(measure(np.asarray(pool.fine_probabilities)))
        coarse_percentile = percentile_rank(measure(_coarse_probabilities(pool)))
        annotation = pool.annotation_type
        full_samples = np.flatnonzero(annotation != FULL)
        weak_samples = np.flatnonzero(annotation == UNLABELED)
        full_value = fine_percentile[full_samples] * improvement.full_ratio / costs.human_fine
        weak_value = coarse_percentile[weak_samples] * improvement.weak_ratio / costs.weak_coarse
        return IsoCandidates(
            sample=np.concatenate([full_samples, weak_samples]),
            is_full=np.concatenate([np.ones(full_samples.size, bool), np.zeros(weak_samples.size, bool)]),
            value=np.concatenate([full_value, weak_value]),
            cost=np.concatenate(
                [np.full(full_samples.size, costs.human_fine), np.full(weak_samples.size, costs.weak_coarse)]
            ),
        )

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        _check_budget(budget)
        improvement = estimate_expected_improvement(pool, rng, self.n_shuffles)
        self.last_expected_improvement = improvement
        candidates = self.candidates(pool, costs, improvement)
        features = random_projection(l2_normalised(pool.embeddings), self.distance_dim, rng)
        chosen = _d2_batch(features, candidates, budget, rng)
        return [
            Selection(int(candidates.sample[c]), LabelKind.HUMAN_FINE if candidates.is_full[c] else pool.weak_kind)
            for c in chosen
        ]


def random_projection(unit_features: np.ndarray, dim: int | None, rng: np.random.Generator) -> np.ndarray:
    """Project to ``dim`` dimensions with a Gaussian matrix and renormalise; unchanged when ``dim`` is None or
    not smaller than the feature dimension."""
    if dim is None or dim >= unit_features.shape[1]:
        return unit_features
    projection = rng.standard_normal((unit_features.shape[1], dim)).astype(np.float32)
    return l2_normalised(unit_features @ projection)


def _d2_batch(features: np.ndarray, candidates: IsoCandidates, budget: float, rng: np.random.Generator) -> list[int]:
    """Indices into ``candidates``: the best value first, then D² draws until nothing affordable is left.

    Points are ``value × feature``; with unit features ``|v_a f_a - v_b f_b|² = v_a² + v_b² - 2 v_a v_b f_a·f_b``,
    so one matrix-vector product per pick updates every candidate's distance."""
    value = candidates.value.astype(np.float64)
    value_squared = value**2
    # Candidates come in pairs per sample: one product per sample, then gathered per candidate.
    samples, candidate_sample = np.unique(candidates.sample, return_inverse=True)
    sample_features = np.ascontiguousarray(features[samples])
    # Retired candidates (chosen, or weak ones of a sample chosen in full) keep distance 0: never drawn.
    distance = np.full(value.size, np.inf)
    weak_of_sample = {int(s): i for i, s in enumerate(candidates.sample) if not candidates.is_full[i]}
    remaining = float(budget)
    chosen: list[int] = []
    chosen_set: set[int] = set()
    while True:
        weights = np.where(candidates.cost <= remaining + _BUDGET_EPSILON, distance, 0.0)
        if not np.any(weights > 0):
            return chosen
        if not chosen:
            pick = int(np.argmax(np.where(weights > 0, value, -np.inf)))
        else:
            cumulative = np.cumsum(weights)
            pick = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        chosen.append(pick)
        chosen_set.add(pick)
        remaining -= float(candidates.cost[pick])
        # einsum, not BLAS: a threaded matrix-vector product stalls on a busy machine, thousands of times over.
        cosine = np.einsum("ij,j->i", sample_features, sample_features[candidate_sample[pick]])[candidate_sample]
        new_distance = value_squared + value_squared[pick] - 2.0 * value * value[pick] * cosine
        # A floor above 0 keeps candidates that coincide with a chosen point drawable once nothing else is left.
        np.minimum(distance, np.maximum(new_distance, _MIN_DISTANCE), out=distance)
        distance[pick] = 0.0
        weak_index = weak_of_sample.get(int(candidates.sample[pick]))
        if candidates.is_full[pick] and weak_index is not None:
            # The fine label implies the coarse one: retire the weak candidate, or refund it if already chosen.
            distance[weak_index] = 0.0
            if weak_index in chosen_set:
                chosen.remove(weak_index)
                chosen_set.discard(weak_index)
                remaining += float(candidates.cost[weak_index])


def fine_posterior_given_weak(pool: PoolState) -> np.ndarray:
    """p(fine | x, weak answer) ∝ p(fine | x) · T[parent(fine), answer]; rows without a weak answer keep p(fine | x).

    A human coarse answer (``weak_kind`` HUMAN_COARSE) or a missing transition matrix counts as noise-free."""
    if pool.fine_probabilities is None:
        raise ModelInputError("the posterior needs fine_probabilities from a trained model")
    probabilities = np.asarray(pool.fine_probabilities, dtype=np.float64).copy()
    weak = np.asarray(pool.weak_coarse_labels)
    answered = np.flatnonzero(weak != MISSING_LABEL)
    if answered.size == 0:
        return probabilities
    n_coarse = pool.hierarchy.n_coarse
    if pool.coarse_transition_matrix is None or pool.weak_kind is LabelKind.HUMAN_COARSE:
        transition = np.eye(n_coarse)
    else:
        transition = np.asarray(pool.coarse_transition_matrix, dtype=np.float64)
    parent = np.asarray(pool.hierarchy.parent_of_fine, dtype=np.int64)
    likelihood = transition[parent][:, weak[answered]].T  # (answered, n_fine): P(answer | parent of each fine)
    joint = probabilities[answered] * likelihood
    total = joint.sum(axis=1, keepdims=True)
    # An answer the model finds impossible (total 0) leaves the model's belief as it was.
    probabilities[answered] = np.where(total > 0, joint / np.maximum(total, 1e-300), probabilities[answered])
    return probabilities


def group_margin_uncertainty(fine_probabilities: np.ndarray, hierarchy: LabelHierarchy) -> np.ndarray:
    """1 - (top1 - top2) of the fine probabilities renormalised within the most likely coarse group; 0 for a
    group with a single fine class (the coarse answer already names the fine class)."""
    probabilities = np.asarray(fine_probabilities, dtype=np.float64)
    membership = np.asarray(hierarchy.fine_to_coarse_matrix, dtype=np.float64)
    group = (probabilities @ membership).argmax(axis=1)
    in_group = membership[:, group].T > 0  # (n, n_fine)
    within = np.where(in_group, probabilities, 0.0)
    within /= np.maximum(within.sum(axis=1, keepdims=True), 1e-300)
    top_two = -np.partition(-within, 1, axis=1)[:, :2]
    single = in_group.sum(axis=1) < 2
    return np.where(single, 0.0, 1.0 - (top_two[:, 0] - top_two[:, 1]))


OURS_HUMAN_PICK_OPTIONS: dict[str, object] = {
    "measure": "posterior-margin",
    "shortlist_factor": 40.0,
    "shortlist_selection": "kmeans",
}
"""How ours picks human labels, chosen on a validation slice of the train split outside the benchmark's pool
(bench/results/simulate/ours_validation.md); the benchmark and the server's queue both use it."""


class WeakAndGroupMarginQuery:
    """Ours: a floor of the budget buys human fine labels where the fine head, after reading the weak answer, is
    least sure; the rest buys weak coarse labels where the coarse prediction is least sure.

    The share of human labels is ``human_share`` at least; above it, the measured expected improvement decides
    (ISO's retraining on fifths, when ``pool.train_and_evaluate`` is given): the human share grows to the
    fraction of value-per-cost that full labels carry. Human picks: ``measure`` "group-margin" (margin within
    the predicted coarse group of the posterior given the weak answer) or "posterior-margin" (margin of that
    posterior over all fine classes); the best first, then D² draws among the ``shortlist_factor`` × n best
    (1: pure top-n). Weak picks: the highest coarse margin uncertainty among samples never weakly labelled.
    """

    def __init__(self, human_share: float = 0.5, measure: str = "group-margin", shortlist_factor: float = 1.0,
                 weak_selection: str = "uncertain", shortlist_selection: str = "d2", n_shuffles: int = 1,
                 distance_dim: int | None = 128) -> None:
        if not 0.0 <= human_share <= 1.0:
            raise ModelInputError(f"human_share must be in [0, 1], got {human_share!r}")
        if measure not in ("group-margin", "posterior-margin"):
            raise ModelInputError(f"unknown measure {measure!r}; expected group-margin or posterior-margin")
        if not shortlist_factor >= 1.0:
            raise ModelInputError(f"shortlist_factor must be >= 1, got {shortlist_factor!r}")
        if weak_selection not in ("uncertain", "random"):
            raise ModelInputError(f"unknown weak_selection {weak_selection!r}; expected uncertain or random")
        if shortlist_selection not in ("d2", "kmeans"):
            raise ModelInputError(f"unknown shortlist_selection {shortlist_selection!r}; expected d2 or kmeans")
        self.shortlist_selection = shortlist_selection
        self.human_share = float(human_share)
        self.measure = measure
        self.shortlist_factor = float(shortlist_factor)
        self.weak_selection = weak_selection
        self.n_shuffles = n_shuffles
        self.distance_dim = distance_dim
        self.last_expected_improvement: ExpectedImprovement | None = None
        self.last_human_share: float | None = None

    def _human_share(self, pool: PoolState, costs: LabelCosts, rng: np.random.Generator) -> float:
        if pool.train_and_evaluate is None or self.human_share >= 1.0:
            return self.human_share
        improvement = estimate_expected_improvement(pool, rng, self.n_shuffles)
        self.last_expected_improvement = improvement
        full_value = improvement.full_ratio / costs.human_fine
        weak_value = improvement.weak_ratio / costs.weak_coarse
        measured = full_value / (full_value + weak_value) if full_value + weak_value > 0 else 1.0
        return max(self.human_share, measured)

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        _check_budget(budget)
        if pool.fine_probabilities is None:
            raise ModelInputError(f"{type(self).__name__} needs fine_probabilities from a trained model")
        share = self._human_share(pool, costs, rng)
        self.last_human_share = share
        candidates = _fine_candidates(pool)
        # Once a pool has few samples left without a weak label, the weak share cannot be spent on them: what it
        # cannot buy goes to human labels rather than staying unspent.
        weak_capacity = int(np.sum(pool.annotation_type == UNLABELED)) * costs.weak_coarse
        human_budget = max(share * budget, budget - weak_capacity)
        n_human = min(affordable_count(human_budget, costs.human_fine), candidates.size)
        posterior = fine_posterior_given_weak(pool)
        if self.measure == "group-margin":
            uncertainty = group_margin_uncertainty(posterior[candidates], pool.hierarchy)
        else:
            uncertainty = margin_uncertainty(posterior[candidates])
        human = self._human_picks(pool, candidates, uncertainty, n_human, rng)
        selections = _human_fine(human)
        remaining = budget - len(human) * costs.human_fine
        weak_candidates = np.setdiff1d(np.flatnonzero(pool.annotation_type == UNLABELED), human)
        n_weak = min(affordable_count(max(remaining, 0.0), costs.weak_coarse), weak_candidates.size)
        if n_weak > 0:
            if self.weak_selection == "random":
                weak = rng.choice(weak_candidates, size=n_weak, replace=False)
            else:
                coarse = _coarse_probabilities(pool)
                order = np.argsort(-margin_uncertainty(coarse[weak_candidates]), kind="stable")
                weak = weak_candidates[order[:n_weak]]
            selections += [Selection(int(i), pool.weak_kind) for i in weak]
        return selections

    def _human_picks(self, pool: PoolState, candidates: np.ndarray, uncertainty: np.ndarray, n_picks: int,
                     rng: np.random.Generator) -> np.ndarray:
        if n_picks == 0:
            return np.empty(0, dtype=np.int64)
        order = np.argsort(-uncertainty, kind="stable")
        shortlist = order[: min(candidates.size, int(np.ceil(n_picks * self.shortlist_factor)))]
        if shortlist.size == n_picks:
            return candidates[shortlist]
        points = random_projection(l2_normalised(pool.embeddings[candidates[shortlist]]), self.distance_dim, rng)
        if self.shortlist_selection == "kmeans":
            return candidates[shortlist[kmeans_typical(points, n_picks, rng)]]
        chosen = [0]  # the most uncertain first
        distance = _squared_distances(points, points[0])
        while len(chosen) < n_picks:
            distance[chosen] = 0.0
            total = distance.sum()
            pick = int(rng.choice(shortlist.size, p=distance / total)) if total > 0 else int(
                rng.choice(np.setdiff1d(np.arange(shortlist.size), chosen)))
            chosen.append(pick)
            distance = np.minimum(distance, _squared_distances(points, points[pick]))
        return candidates[shortlist[chosen]]


# ---- queue order --------------------------------------------------------------------------------------------


def priority_scores(pool: PoolState, selections: Sequence[Selection] | None = None) -> np.ndarray:
    """float64 (n,) in [0, 1]; ascending order = label first (Label Studio shows low prediction scores first).

    Samples selected for ``HUMAN_FINE`` come first, in selection order; then the other samples without a fine
    label by descending fine-head margin uncertainty (index order without a model); full-labelled samples last
    with score 1.0. Unlabelled samples get ``rank / n_unlabelled``, which stays below 1.
    """
    fine_labels = np.asarray(pool.fine_labels)
    scores = np.ones(pool.size)
    unlabelled = np.flatnonzero(fine_labels == MISSING_LABEL)
    if unlabelled.size == 0:
        return scores
    selected = [s.index for s in selections or () if s.kind is LabelKind.HUMAN_FINE]
    out_of_range = [i for i in selected if not 0 <= i < pool.size]
    if out_of_range:
        raise ModelInputError(f"selections name samples outside the pool of {pool.size}: {out_of_range[:10]}")
    selected = [i for i in dict.fromkeys(selected) if fine_labels[i] == MISSING_LABEL]
    rest = np.setdiff1d(unlabelled, selected)
    if pool.fine_probabilities is not None:
        uncertainty = margin_uncertainty(np.asarray(pool.fine_probabilities)[rest])
        rest = rest[np.argsort(-uncertainty, kind="stable")]
    order = np.concatenate([np.asarray(selected, dtype=np.int64), rest])
    scores[order] = np.arange(order.size) / order.size
    return scores


STRATEGIES: dict[str, Callable[..., QueryStrategy]] = {
    "random": RandomQuery,
    "least-confidence": LeastConfidenceQuery,
    "margin": MarginQuery,
    "entropy": EntropyQuery,
    "k-center": KCenterQuery,
    "kmeans-cold-start": KMeansColdStart,
    "iso": IsoValueToCostQuery,
    "ours": WeakAndGroupMarginQuery,
}
"""Query strategies by name: the benchmark and the server build theirs through ``create_strategy``."""


def create_strategy(name: str, **options: object) -> QueryStrategy:
    """The strategy ``name`` with its keyword ``options``; an unknown name or option is a ModelInputError."""
    factory = STRATEGIES.get(name)
    if factory is None:
        raise ModelInputError(f"unknown query strategy {name!r}; known: {sorted(STRATEGIES)}")
    try:
        return factory(**options)
    except TypeError as exc:
        raise ModelInputError(f"query strategy {name!r}: {exc}") from exc
