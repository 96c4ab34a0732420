"""When to stop labeling: a learning curve from cross-validation on the human labels, extrapolated with an inverse
power law, and the stabilizing-predictions criterion (Bloodgood & Vijay-Shanker 2009; KappaAverage in small-text).

The curve: each fold of the human labels is held out in turn, models are trained on nested random subsets of the
other folds, and their fine accuracy on the held-out fold is measured. ``acc(n) = a - b * n^(-c)`` is fitted to the
means (Figueroa et al. 2012 found this family the best extrapolator of classifier learning curves), which gives the
expected gain per next 100 labels and the label count at which that gain falls below a threshold.

Stabilizing predictions: the predictions of consecutive models on a fixed *stop set* of unlabeled tasks are
compared with Cohen's kappa; when the mean of the last ``window`` kappas reaches 0.99, new labels no longer change
what the model says, and labeling can stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.errors import ModelInputError
from model.finegrained import PoolStatistics
from model.hierarchy import MISSING_LABEL

GAIN_PER_100_FLAT = 0.005
"""Below half a point of accuracy per next 100 labels, the curve counts as flat."""
KAPPA_STOP = 0.99
KAPPA_WINDOW = 3
MAX_EXTRAPOLATION = 1_000_000


@dataclass(frozen=True)
class LearningCurve:
    sizes: np.ndarray
    """Training labels per point."""
    accuracy: np.ndarray
    """Mean held-out fine accuracy over folds."""
    spread: np.ndarray
    """Standard deviation over folds (and repeats)."""
    n_held_out: int = 0
    """Held-out predictions behind each mean (every labeled row, once per repeat)."""
    n_runs: int = 1
    """Models behind each mean (folds x repeats)."""

    @property
    def standard_error(self) -> np.ndarray:
        """Of each mean: the binomial error of ``n_held_out`` predictions, or the runs' spread if larger. Three
        folds can agree by chance (a spread near 0), which must not make one point decide the fit."""
        binomial = np.sqrt(self.accuracy * (1 - self.accuracy) / max(self.n_held_out, 1))
        return np.maximum(binomial, self.spread / np.sqrt(self.n_runs))

    def to_dict(self) -> dict:
        return {"sizes": [int(s) for s in self.sizes], "accuracy": [round(float(a), 4) for a in self.accuracy],
                "spread": [round(float(s), 4) for s in self.spread],
                "standard_error": [round(float(s), 4) for s in self.standard_error], "n_held_out": self.n_held_out}


def curve_sizes(n_train_max: int, n_points: int = 5, smallest: int = 10) -> np.ndarray:
    """Geometrically spaced training sizes up to ``n_train_max`` (distinct, at least ``smallest``)."""
    if n_train_max < smallest:
        return np.zeros(0, dtype=np.int64)
    sizes = np.unique(np.round(np.geomspace(smallest, n_train_max, n_points)).astype(np.int64))
    return sizes


def cross_validated_curve(n_labels: int, evaluate: Callable[[np.ndarray, np.ndarray], float], *,
                          sizes: Sequence[int] | None = None, n_folds: int = 3, n_repeats: int = 1,
                          seed: int = 0) -> LearningCurve:
    """Accuracy against the number of training labels, from ``n_folds``-fold cross-validation over ``n_labels``
    labeled rows, ``n_repeats`` times with new folds. ``evaluate(train_rows, held_out_rows)`` trains on the train
    rows (positions into the labeled rows) and returns the accuracy on the held-out ones. Each fold's subsets are
    nested (a larger one contains the smaller), so a curve is never non-monotone by the luck of the draw alone."""
    if n_folds < 2 or n_repeats < 1:
        raise ModelInputError(f"need n_folds >= 2 and n_repeats >= 1, got {n_folds} and {n_repeats}")
    rng = np.random.default_rng(seed)
    n_train_max = n_labels - int(np.ceil(n_labels / n_folds))
    grid = curve_sizes(n_train_max) if sizes is None else np.asarray([s for s in sizes if s <= n_train_max])
    if grid.size == 0:
        return LearningCurve(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0))
    scores = np.zeros((n_repeats * n_folds, grid.size))
    for repeat in range(n_repeats):
        folds = rng.permutation(n_labels) % n_folds
        for fold in range(n_folds):
            held_out = np.flatnonzero(folds == fold)
            order = rng.permutation(np.flatnonzero(folds != fold))
            for column, size in enumerate(grid):
                scores[repeat * n_folds + fold, column] = evaluate(np.sort(order[:size]), held_out)
    return LearningCurve(grid.astype(np.int64), scores.mean(axis=0), scores.std(axis=0),
                         n_held_out=n_labels * n_repeats, n_runs=n_repeats * n_folds)


@dataclass(frozen=True)
class InversePowerLaw:
    """acc(n) = a - b * n^(-c)."""

    a: float
    b: float
    c: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        return self.a - self.b * np.power(np.maximum(np.asarray(n, dtype=np.float64), 1.0), -self.c)

    def gain(self, n: float, more: float = 100.0) -> float:
        """Expected accuracy gained by the next ``more`` labels after ``n``."""
        return float(self(n + more) - self(n))

    def flattens_at(self, threshold: float = GAIN_PER_100_FLAT, more: float = 100.0) -> int:
        """The smallest label count whose next ``more`` labels gain less than ``threshold`` (the gain falls)."""
        low, high = 1.0, float(MAX_EXTRAPOLATION)
        if self.gain(low, more) < threshold:
            return 1
        if self.gain(high, more) >= threshold:
            return MAX_EXTRAPOLATION
        while high - low > 1.0:
            middle = (low + high) / 2
            low, high = (middle, high) if self.gain(middle, more) >= threshold else (low, middle)
        return int(math.ceil(high))

    def to_dict(self) -> dict:
        return {"a": round(self.a, 5), "b": round(self.b, 5), "c": round(self.c, 5), "form": "a - b * n^(-c)"}


def fit_inverse_power_law(sizes: np.ndarray, accuracy: np.ndarray, standard_error: np.ndarray | None = None
                          ) -> InversePowerLaw | None:
    """Least-squares fit (weighted by each point's standard error when given); None with fewer than 3 points or
    no fit."""
    from scipy.optimize import curve_fit

    sizes = np.asarray(sizes, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    if sizes.size < 3 or sizes.size != accuracy.size:
        return None
    sigma = None if standard_error is None else np.maximum(np.asarray(standard_error, dtype=np.float64), 1e-3)

    def law(n: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a - b * np.power(n, -c)

    start = (min(1.0, float(accuracy.max()) + 0.02), max(float(accuracy.max() - accuracy.min()), 0.05)
             * float(sizes.min()) ** 0.5, 0.5)
    try:
        (a, b, c), _ = curve_fit(law, sizes, accuracy, p0=start, sigma=sigma, bounds=([0.0, 0.0, 0.01],
                                 [1.0, 1e4, 3.0]), maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    return InversePowerLaw(float(a), float(b), float(c))


@dataclass(frozen=True)
class StabilizingPredictions:
    kappas: list[float]
    """Cohen's kappa between each pair of consecutive models' predictions on the stop set."""
    window: int
    threshold: float

    @property
    def average(self) -> float | None:
        return float(np.mean(self.kappas[-self.window:])) if len(self.kappas) >= self.window else None

    @property
    def stop(self) -> bool:
        return self.average is not None and self.average >= self.threshold

    def to_dict(self) -> dict:
        return {"criterion": "stabilizing predictions (KappaAverage)", "kappas": [round(k, 4) for k in self.kappas],
                "window": self.window, "threshold": self.threshold,
                "average": None if self.average is None else round(self.average, 4), "stop": self.stop}


def kappa_average(predictions: Sequence[np.ndarray], window: int = KAPPA_WINDOW,
                  threshold: float = KAPPA_STOP) -> StabilizingPredictions:
    """Stabilizing predictions over successive models' class predictions on the same stop set."""
    return stabilizing_predictions(list(zip(predictions[:-1], predictions[1:])), window, threshold)


def stabilizing_predictions(pairs: Sequence[tuple[np.ndarray, np.ndarray]], window: int = KAPPA_WINDOW,
                            threshold: float = KAPPA_STOP) -> StabilizingPredictions:
    """KappaAverage over (earlier, later) prediction pairs of consecutive models on the stop set (empty pairs,
    a stop set with no task in common, are skipped)."""
    from sklearn.metrics import cohen_kappa_score

    kappas = []
    for before, after in pairs:
        before, after = np.asarray(before), np.asarray(after)
        if before.shape != after.shape:
            raise ModelInputError("stop-set predictions of consecutive models differ in length")
        if before.size == 0:
            continue
        # Identical single-class predictions make kappa undefined (0/0): they agree completely.
        agree = np.array_equal(before, after)
        kappas.append(1.0 if agree else float(cohen_kappa_score(before, after)))
    return StabilizingPredictions(kappas, window, threshold)


@dataclass(frozen=True)
class StoppingSuggestion:
    n_labels: int
    estimated_accuracy: float | None
    gain_per_100: float | None
    """Expected accuracy gain of the next 100 labels (a fraction, not points)."""
    more_labels: int | None
    """Labels still worth buying before the gain per 100 falls below the threshold (0: flattened)."""
    expected_gain: float | None
    flattens_at: int | None
    text: str

    @property
    def suggested_labels(self) -> int | None:
        return None if self.more_labels is None else self.n_labels + self.more_labels

    def to_dict(self) -> dict:
        def rounded(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {"n_labels": self.n_labels, "estimated_accuracy": rounded(self.estimated_accuracy),
                "gain_per_100": rounded(self.gain_per_100), "more_labels": self.more_labels,
                "suggested_labels": self.suggested_labels, "expected_gain": rounded(self.expected_gain),
                "flattens_at": self.flattens_at, "text": self.text}


def suggest_stopping(law: InversePowerLaw | None, n_labels: int, threshold: float = GAIN_PER_100_FLAT,
                     stabilizing: StabilizingPredictions | None = None) -> StoppingSuggestion:
    """"about N more labels for +x points", or "gains have flattened" (the curve's gain per 100 labels is below
    ``threshold``, or the predictions have stabilized)."""
    if law is None:
        return StoppingSuggestion(n_labels, None, None, None, None, None,
                                  "not enough human labels for a learning curve yet")
    flat_at = law.flattens_at(threshold)
    gain = law.gain(n_labels)
    accuracy = float(law(n_labels))
    if gain < threshold or (stabilizing is not None and stabilizing.stop):
        reason = "predictions have stabilized" if gain >= threshold else \
            f"the next 100 labels add about {100 * gain:.1f} points"
        return StoppingSuggestion(n_labels, accuracy, gain, 0, 0.0, flat_at, f"gains have flattened ({reason})")
    more = int(math.ceil((flat_at - n_labels) / 10.0) * 10)
    expected = float(law(n_labels + more) - law(n_labels))
    return StoppingSuggestion(n_labels, accuracy, gain, more, expected, flat_at,
                              f"about {more} more labels for +{100 * expected:.1f} points")


def human_label_curve(new_classifier: Callable[[Any], Any], training_config: Any, embeddings: np.ndarray,
                      fine: np.ndarray, weak_answers: np.ndarray | None, transition: np.ndarray | None,
                      human_coarse: np.ndarray | None = None, *, n_folds: int = 3, n_repeats: int = 2,
                      sizes: Sequence[int] | None = None, seed: int = 0) -> LearningCurve:
    """``cross_validated_curve`` over the rows with a human fine label (3 folds, twice: one split of a few hundred
    labels is noisy enough to call a rising curve flat), each point trained as a round trains:
    a labeled row outside the training subset keeps only its VLM answer (``weak_answers``), as a task nobody has
    labeled yet; rows with a human coarse label train on it, without the VLM's."""
    labeled = np.flatnonzero(fine != MISSING_LABEL)
    pool = PoolStatistics(embeddings)  # every point's fits share the pool's norms

    def evaluate(train: np.ndarray, held_out: np.ndarray) -> float:
        subset = np.full_like(fine, MISSING_LABEL)
        subset[labeled[train]] = fine[labeled[train]]
        weak = None
        if weak_answers is not None:
            human = subset != MISSING_LABEL
            if human_coarse is not None:
                human |= human_coarse != MISSING_LABEL
            weak = np.where(human, MISSING_LABEL, weak_answers).astype(np.int64)
        classifier = new_classifier(training_config)
        classifier.fit(embeddings, subset, weak, transition, human_coarse, pool=pool)
        rows = labeled[held_out]
        predicted = np.asarray(classifier.predict_fine_proba(embeddings[rows])).argmax(axis=1)
        return float(np.mean(predicted == fine[rows]))

    return cross_validated_curve(labeled.size, evaluate, sizes=sizes, n_folds=n_folds, n_repeats=n_repeats,
                                 seed=seed)
