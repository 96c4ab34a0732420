"""The simulated oracle: the simulated VLM's answers through a known T, the seed set, and label buying at a cost."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.simulate.datasets import BenchmarkData


SIMULATED_CONFUSION_NEIGHBOURS: dict[str, dict[str, float]] = {
    # Where the simulated VLM's errors go, per true group (shares of the error mass). Plausible look-alikes:
    # long tops vs dresses, boots vs handbags; never uniform noise, so the transition matrix matters.
    "tops": {"bottoms and dresses": 0.7, "bags": 0.3},
    "bottoms and dresses": {"tops": 0.85, "bags": 0.15},
    "footwear": {"bags": 0.8, "bottoms and dresses": 0.2},
    "bags": {"footwear": 0.5, "tops": 0.5},
}


# ------------------------------------------------------------------------------------ simulated annotators


def simulated_transition_matrix(hierarchy: LabelHierarchy, accuracy: float) -> np.ndarray:
    """The simulated VLM's known coarse transition matrix: ``accuracy`` on the diagonal of every row.

    The error mass goes to fixed look-alike groups (``SIMULATED_CONFUSION_NEIGHBOURS``) when the hierarchy has
    the default group names; for other hierarchies, to the next group in order (still systematic, not uniform).
    """
    if not 0 < accuracy <= 1:
        raise ModelInputError(f"simulated accuracy must be in (0, 1], got {accuracy}")
    n_coarse = hierarchy.n_coarse
    if n_coarse == 1:
        return np.ones((1, 1))
    matrix = np.zeros((n_coarse, n_coarse))
    use_named = set(hierarchy.coarse_classes) == set(SIMULATED_CONFUSION_NEIGHBOURS)
    for i, name in enumerate(hierarchy.coarse_classes):
        matrix[i, i] = accuracy
        if use_named:
            for neighbour, share in SIMULATED_CONFUSION_NEIGHBOURS[name].items():
                matrix[i, hierarchy.coarse_index(neighbour)] += (1.0 - accuracy) * share
        else:
            matrix[i, (i + 1) % n_coarse] += 1.0 - accuracy
    return matrix


def draw_weak_labels(true_coarse: np.ndarray, transition: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One weak answer per sample, drawn from the row of its true coarse class."""
    true_coarse = np.asarray(true_coarse, dtype=np.int64)
    n_coarse = transition.shape[0]
    if np.any((true_coarse < 0) | (true_coarse >= n_coarse)):
        raise ModelInputError(f"true coarse labels must lie in [0, {n_coarse})")
    cumulative = np.cumsum(transition, axis=1)
    cumulative[:, -1] = 1.0
    draws = rng.random(true_coarse.shape[0])
    return np.minimum((draws[:, None] >= cumulative[true_coarse]).sum(axis=1), n_coarse - 1).astype(np.int64)


def coarse_confusion_counts(true_coarse: np.ndarray, weak_coarse: np.ndarray, n_coarse: int) -> np.ndarray:
    """int64 (C, C+1): row = true coarse class, column = weak answer; the last column counts missing answers."""
    counts = np.zeros((n_coarse, n_coarse + 1), dtype=np.int64)
    answers = np.where(np.asarray(weak_coarse) == MISSING_LABEL, n_coarse, weak_coarse)
    np.add.at(counts, (np.asarray(true_coarse, dtype=np.int64), answers.astype(np.int64)), 1)
    return counts


def draw_seed_set(
    fine_labels: np.ndarray, n_fine: int, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``per_class`` random samples of every fine class (sorted)."""
    fine_labels = np.asarray(fine_labels, dtype=np.int64)
    chosen = []
    for fine in range(n_fine):
        members = np.flatnonzero(fine_labels == fine)
        if members.size < per_class:
            raise ModelInputError(
                f"fine class {fine} has {members.size} samples in the pool, fewer than the seed's {per_class}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------- the oracle


@dataclass
class LabelledPool:
    """What has been bought so far for every pool sample (``MISSING_LABEL`` = not yet)."""

    fine: np.ndarray
    weak_coarse: np.ndarray
    human_coarse: np.ndarray
    weak_asked: np.ndarray
    """bool: the weak annotator was asked (its answer may still be missing: it matched no class)."""

    @classmethod
    def empty(cls, n: int) -> LabelledPool:
        def missing() -> np.ndarray:
            return np.full(n, MISSING_LABEL, dtype=np.int64)

        return cls(fine=missing(), weak_coarse=missing(), human_coarse=missing(), weak_asked=np.zeros(n, dtype=bool))

    def trusted(self) -> np.ndarray:
        """Samples with a human fine label and a weak answer: the pairs that estimate the noise model."""
        return np.flatnonzero((self.fine != MISSING_LABEL) & (self.weak_coarse != MISSING_LABEL))


@dataclass(frozen=True)
class SimulatedOracle:
    """Answers queries from the truth: human fine/coarse labels, and the weak annotator's precomputed answers."""

    true_fine: np.ndarray
    true_coarse: np.ndarray
    weak_answers: np.ndarray
    cost_human_fine: float
    cost_weak: float
    cost_human_coarse: float

    def price(self, pool: LabelledPool, index: int, kind: str) -> float:
        """What ``buy`` would charge: nothing for a label that is already known."""
        if kind == "human_fine":
            return 0.0 if pool.fine[index] != MISSING_LABEL else self.cost_human_fine
        if kind == "weak_coarse":
            return 0.0 if pool.weak_asked[index] else self.cost_weak
        if kind == "human_coarse":
            known = pool.human_coarse[index] != MISSING_LABEL or pool.fine[index] != MISSING_LABEL
            return 0.0 if known else self.cost_human_coarse
        raise ModelInputError(f"unknown label kind {kind!r}")

    def buy(self, pool: LabelledPool, index: int, kind: str) -> float:
        """Record one label in ``pool`` and return what it cost."""
        price = self.price(pool, index, kind)
        if price == 0.0:
            return 0.0
        if kind == "human_fine":
            pool.fine[index] = self.true_fine[index]
        elif kind == "weak_coarse":
            pool.weak_asked[index] = True
            pool.weak_coarse[index] = self.weak_answers[index]
        else:
            pool.human_coarse[index] = self.true_coarse[index]
        return price


def seed_rng(seed: int, purpose: str) -> np.random.Generator:
    """Independent, reproducible streams per seed and purpose, so the seed set is the same for all strategies."""
    return np.random.default_rng([seed, sum(ord(ch) * 31**i for i, ch in enumerate(purpose)) % (2**32)])


def simulated_answers(seed: int, data: BenchmarkData, simulated_accuracy: float) -> np.ndarray:
    """The simulated VLM's answers on the pool: drawn through its known transition matrix, one stream per seed."""
    transition = simulated_transition_matrix(data.hierarchy, simulated_accuracy)
    return draw_weak_labels(data.pool_coarse, transition, seed_rng(seed, "simulated-vlm"))


def buy_within_budget(oracle: SimulatedOracle, pool: LabelledPool, selections: Sequence[tuple[int, str]],
                      budget: float, with_weak_on_full: bool) -> float:
    """Buy the selections in order while they fit in ``budget``; return the amount spent.

    With ``with_weak_on_full`` a human fine label also buys the weak annotator's answer on that sample, so it
    becomes a trusted pair for the noise model; that answer is paid for too.
    """
    spent = 0.0
    for index, kind in selections:
        price = oracle.price(pool, index, kind)
        if kind == "human_fine" and with_weak_on_full:
            price += oracle.price(pool, index, "weak_coarse")
        if spent + price > budget + 1e-9:
            continue
        spent += oracle.buy(pool, index, kind)
        if kind == "human_fine" and with_weak_on_full:
            spent += oracle.buy(pool, index, "weak_coarse")
    return spent
