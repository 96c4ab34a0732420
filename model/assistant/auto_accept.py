"""Auto-accept with audited precision: label a task without a human where the model's fine prediction is known to
be right often enough, and check that claim on a random audit sample that humans label.

Precision is estimated **per predicted class** from out-of-fold predictions on human labels (each predicted by a
model that did not train on it), and bounded from below with the exact one-sided Clopper-Pearson bound, never the
raw frequency: at a 95% target and 95% confidence a class needs at least 59 confident out-of-fold predictions, all
right, before anything of it is accepted. The out-of-fold models train on two thirds of the labels, so they are
weaker than the served model, which errs on the safe side too.

Audits: a share of the tasks that qualify goes to the humans instead (the head of their queue); when a class's
audited precision falls below the target the class is *paused*: its qualifying tasks are all sent to audit and
none is accepted, until the audits bring its precision back to the target.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from model.errors import ModelInputError

PAUSED_AUDITS_PER_ROUND = 5
"""While a class is paused, at most this many of its qualifying tasks per round go to the audit (at least)."""


def clopper_pearson_lower(successes: np.ndarray, trials: np.ndarray, confidence: float = 0.95) -> np.ndarray:
    """Exact one-sided lower confidence bound of a binomial proportion (0 where there are no trials)."""
    from scipy.stats import beta  # scipy.stats costs ~60 MB: imported by fits, not by every web process

    if not 0.0 < confidence < 1.0:
        raise ModelInputError(f"confidence must be in (0, 1), got {confidence}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(k < 0) or np.any(k > n):
        raise ModelInputError("successes must lie in [0, trials]")
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(1.0 - confidence, np.maximum(k, 1e-12), n - k + 1.0)
    return np.where((k > 0) & (n > 0), np.nan_to_num(bound, nan=0.0), 0.0)


@dataclass(frozen=True)
class ClassThreshold:
    """For one fine class: the lowest confidence from which its predictions reach the precision bound."""

    fine_class: int
    threshold: float | None
    """None: no confidence of this class reaches the target (nothing of it is accepted)."""
    bound: float | None
    """The Clopper-Pearson lower bound of the precision at ``threshold``."""
    support: int
    """Out-of-fold predictions of this class at or above the threshold."""
    n_predicted: int
    """Out-of-fold predictions of this class in all."""

    def to_dict(self) -> dict:
        return {"fine_class": self.fine_class, "threshold": self.threshold, "bound": self.bound,
                "support": self.support, "n_predicted": self.n_predicted}


def class_thresholds(confidences: np.ndarray, predicted: np.ndarray, correct: np.ndarray, n_classes: int,
                     target: float, *, min_support: int = 10, confidence: float = 0.95) -> list[ClassThreshold]:
    """Per predicted class, the lowest confidence ``t`` such that the out-of-fold predictions of that class with
    confidence >= ``t`` (at least ``min_support`` of them) have a Clopper-Pearson lower bound >= ``target``."""
    confidences = np.asarray(confidences, dtype=np.float64).reshape(-1)
    predicted = np.asarray(predicted, dtype=np.int64).reshape(-1)
    correct = np.asarray(correct, dtype=bool).reshape(-1)
    if not (confidences.shape == predicted.shape == correct.shape):
        raise ModelInputError("confidences, predicted and correct differ in length")
    if not 0.0 < target <= 1.0:
        raise ModelInputError(f"target precision must be in (0, 1], got {target}")
    if np.any((predicted < 0) | (predicted >= n_classes)):
        raise ModelInputError(f"predicted classes must lie in [0, {n_classes})")
    thresholds = []
    for fine_class in range(n_classes):
        rows = np.flatnonzero(predicted == fine_class)
        order = rows[np.argsort(-confidences[rows], kind="stable")]
        sorted_confidence = confidences[order]
        counts = np.arange(1, order.size + 1)
        bound = clopper_pearson_lower(np.cumsum(correct[order]), counts, confidence)
        # Cut only between distinct confidences: every prediction at the threshold is accepted.
        last_of_value = np.r_[sorted_confidence[1:] != sorted_confidence[:-1], True] if order.size else counts > 0
        eligible = np.flatnonzero(last_of_value & (counts >= min_support) & (bound >= target))
        if eligible.size == 0:
            thresholds.append(ClassThreshold(fine_class, None, None, 0, int(order.size)))
            continue
        cut = int(eligible[-1])  # the most predictions whose precision bound still meets the target
        thresholds.append(ClassThreshold(fine_class, float(sorted_confidence[cut]), round(float(bound[cut]), 4),
                                         cut + 1, int(order.size)))
    return thresholds


@dataclass(frozen=True)
class AutoAcceptDecision:
    """Row indices of one pool: labeled automatically, and sent to the humans' audit instead."""

    accepted: np.ndarray
    audit: np.ndarray
    predicted: np.ndarray
    """The model's fine class for every row of the pool (argmax)."""
    confidence: np.ndarray


def choose_audit(candidates: np.ndarray, share: float, rng: np.random.Generator, minimum: int = 1) -> np.ndarray:
    """A uniform random ``share`` of ``candidates`` (rounded up, at least ``minimum`` when there are any)."""
    if not 0.0 <= share <= 1.0:
        raise ModelInputError(f"audit share must be in [0, 1], got {share}")
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0 or (share == 0.0 and minimum == 0):
        return candidates[:0]
    count = min(candidates.size, max(minimum, math.ceil(share * candidates.size)))
    return np.sort(rng.choice(candidates, size=count, replace=False))


def decide_auto_accept(probabilities: np.ndarray, thresholds: Sequence[ClassThreshold], paused: Iterable[int],
                       audit_share: float, rng: np.random.Generator) -> AutoAcceptDecision:
    """Which pool rows to accept: those whose fine prediction reaches its class's threshold. Of each class, a
    random ``audit_share`` (at least one; none at share 0) goes to audit instead; a paused class is audit only
    (``PAUSED_AUDITS_PER_ROUND`` at least), none of it accepted."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(thresholds):
        raise ModelInputError(f"need (n, {len(thresholds)}) probabilities, got {probabilities.shape}")
    predicted = probabilities.argmax(axis=1) if probabilities.shape[0] else np.zeros(0, dtype=np.int64)
    confidence = probabilities.max(axis=1) if probabilities.shape[0] else np.zeros(0)
    paused = set(paused)
    accepted, audit = [], []
    for entry in thresholds:
        if entry.threshold is None:
            continue
        qualifying = np.flatnonzero((predicted == entry.fine_class) & (confidence >= entry.threshold))
        if entry.fine_class in paused:
            audit.append(choose_audit(qualifying, audit_share, rng, minimum=PAUSED_AUDITS_PER_ROUND))
            continue
        sample = choose_audit(qualifying, audit_share, rng, minimum=1 if audit_share > 0 else 0)
        audit.append(sample)
        accepted.append(np.setdiff1d(qualifying, sample))
    empty = np.zeros(0, dtype=np.int64)
    return AutoAcceptDecision(
        accepted=np.sort(np.concatenate(accepted)) if accepted else empty,
        audit=np.sort(np.concatenate(audit)) if audit else empty,
        predicted=predicted.astype(np.int64), confidence=confidence,
    )


@dataclass(frozen=True)
class AuditRecord:
    """One audited task: the class auto-accept would have given it and the class a human gave it."""

    predicted: int
    human: int


@dataclass
class AuditSummary:
    target: float
    audited: dict[int, int] = field(default_factory=dict)
    correct: dict[int, int] = field(default_factory=dict)

    @property
    def paused(self) -> set[int]:
        """Classes whose audited precision is below the target."""
        return {c for c, n in self.audited.items() if n > 0 and self.correct.get(c, 0) / n < self.target}

    @property
    def precision(self) -> float | None:
        """Audited precision over every class (None before any audit)."""
        total = sum(self.audited.values())
        return None if total == 0 else sum(self.correct.values()) / total

    def class_precision(self, fine_class: int) -> float | None:
        n = self.audited.get(fine_class, 0)
        return None if n == 0 else self.correct.get(fine_class, 0) / n


def summarize_audits(records: Iterable[AuditRecord], target: float) -> AuditSummary:
    """Audited precision per class (the class auto-accept would have given) and which classes are paused."""
    summary = AuditSummary(target=target)
    for record in records:
        summary.audited[record.predicted] = summary.audited.get(record.predicted, 0) + 1
        if record.human == record.predicted:
            summary.correct[record.predicted] = summary.correct.get(record.predicted, 0) + 1
    return summary
