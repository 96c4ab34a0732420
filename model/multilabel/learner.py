"""One multi-label active-learning round, as ``model.learner.ActiveLearner`` runs one for single-label projects.

A round calibrates every label's threshold on the VLM's scores against the human label sets, estimates every
label's 2×2 transition from the same pairs, trains the classifier on human label sets plus the forward-corrected
VLM answers, and asks a strategy from ``model.query.STRATEGIES`` for the next labels. The server's fit and
``vlm-al simulate --task multilabel`` both run it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from model.calibration import PrecisionThreshold, precision_threshold
from model.errors import ModelInputError
from model.multilabel.classifier import MultiLabelClassifier, MultiLabelTrainingConfig, SpatialProjection
from model.multilabel.noise import LabelTransitions, estimate_label_transitions, validated_label_sets
from model.multilabel.strategies import MultiLabelPool, multilabel_priority_scores
from model.multilabel.thresholds import LabelThresholds, calibrate_label_thresholds
from model.query import LabelCosts, Selection, create_strategy


@dataclass(frozen=True)
class MultiLabelSettings:
    """Everything that decides a multi-label round."""

    training: MultiLabelTrainingConfig = field(default_factory=MultiLabelTrainingConfig)
    pseudo_labels: bool = True
    """Train on the VLM's per-label answers (forward-corrected); off: human label sets only."""
    transition_prior_strength: float = 1.0
    strategy: str = "multilabel-ours"
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    projection_dim: int = 64

    def __post_init__(self) -> None:
        if not self.transition_prior_strength >= 0:
            raise ModelInputError("transition_prior_strength must be >= 0")
        if self.projection_dim < 1:
            raise ModelInputError("projection_dim must be positive")
        create_strategy(self.strategy, **dict(self.strategy_options))  # an unknown strategy or option fails here

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["strategy_options"] = dict(self.strategy_options)
        return data


@dataclass
class MultiLabelRoundLabels:
    """What is known of every pool row."""

    human_sets: np.ndarray
    """bool (n, L): a human's label set (meaningful where ``labelled``; an empty row is "none of these")."""
    labelled: np.ndarray
    """bool (n,)"""
    weak_scores: np.ndarray | None
    """float (n, L): the VLM's per-label scores (meaningful where ``weak_answered``), or None without a VLM."""
    weak_answered: np.ndarray | None = None
    """bool (n,): where the VLM's scores exist (all rows when None)."""

    def answered(self) -> np.ndarray:
        n = self.labelled.shape[0]
        if self.weak_scores is None:
            return np.zeros(n, dtype=bool)
        given = np.ones(n, dtype=bool) if self.weak_answered is None else np.asarray(self.weak_answered, dtype=bool)
        # A NaN row is an API VLM without a usable reply: never read as an answer.
        return given & np.all(np.isfinite(np.asarray(self.weak_scores, dtype=np.float64)), axis=1)


@dataclass
class MultiLabelRoundModel:
    classifier: MultiLabelClassifier
    thresholds: LabelThresholds | None
    transitions: LabelTransitions | None
    weak_sets: np.ndarray
    """bool (n, L): the VLM's answers after the calibrated thresholds (all False where unanswered)."""
    probabilities: np.ndarray
    """float32 (n, L)"""


class MultiLabelLearner:
    """Rounds for one label set and one pool of spatial maps (projected once, without reading a label)."""

    def __init__(self, label_names: Sequence[str], label_text: np.ndarray, maps: np.ndarray,
                 settings: MultiLabelSettings, seed: int = 0) -> None:
        self.label_names = tuple(label_names)
        self.label_text = np.asarray(label_text, dtype=np.float32)
        self.settings = settings
        self.seed = int(seed)
        self.projection = SpatialProjection.fit(maps, settings.projection_dim, seed=self.seed)
        self.positions = self.projection.transform(maps)
        self.global_features = self.positions.mean(axis=1)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def _check(self, labels: MultiLabelRoundLabels) -> None:
        n = self.positions.shape[0]
        validated_label_sets("human_sets", labels.human_sets, self.n_labels, n)
        if np.asarray(labels.labelled).shape != (n,):
            raise ModelInputError(f"labelled must have shape ({n},)")
        if labels.weak_scores is not None and np.asarray(labels.weak_scores).shape != (n, self.n_labels):
            raise ModelInputError(f"weak_scores must have shape ({n}, {self.n_labels})")

    def weak_answers(self, labels: MultiLabelRoundLabels) -> tuple[LabelThresholds | None, np.ndarray]:
        """Per-label thresholds calibrated on the human-labelled rows with a VLM answer, and the answers."""
        n = self.positions.shape[0]
        answered = labels.answered()
        if labels.weak_scores is None or not answered.any():
            return None, np.zeros((n, self.n_labels), dtype=bool)
        scores = np.where(answered[:, None], np.asarray(labels.weak_scores, dtype=np.float64), 0.0)
        trusted = answered & np.asarray(labels.labelled, dtype=bool)
        thresholds = calibrate_label_thresholds(scores[trusted], np.asarray(labels.human_sets)[trusted],
                                                pool_scores=scores[answered])
        return thresholds, thresholds.apply(scores) & answered[:, None]

    def train(self, labels: MultiLabelRoundLabels, config: MultiLabelTrainingConfig | None = None) -> MultiLabelRoundModel:
        self._check(labels)
        thresholds, weak_sets = self.weak_answers(labels)
        answered = labels.answered()
        labelled = np.asarray(labels.labelled, dtype=bool)
        transitions = None
        if thresholds is not None:
            trusted = answered & labelled
            transitions = estimate_label_transitions(labels.human_sets, weak_sets, trusted,
                                                     self.settings.transition_prior_strength)
        config = config or self.settings.training
        classifier = MultiLabelClassifier(self.label_names, self.label_text, self.projection, config)
        use_weak = self.settings.pseudo_labels and thresholds is not None
        classifier.fit_projected(self.positions, labels.human_sets, labelled,
                                 weak_sets if use_weak else None, answered if use_weak else None, transitions)
        return MultiLabelRoundModel(classifier, thresholds, transitions, weak_sets,
                                    classifier.predict_proba_projected(self.positions))

    def out_of_fold(self, labels: MultiLabelRoundLabels, n_folds: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, probabilities)`` for the human-labelled rows, each predicted by a model trained without its
        fold (its VLM answer kept, as for a task nobody has labelled): how sure and how right the model is on
        tasks it has not seen, which calibrates pre-ticking."""
        rows = np.flatnonzero(labels.labelled)
        if rows.size < n_folds:
            return rows[:0], np.zeros((0, self.n_labels), dtype=np.float32)
        folds = np.random.default_rng(self.seed).permutation(rows.size) % n_folds
        out = np.zeros((rows.size, self.n_labels), dtype=np.float32)
        for fold in range(n_folds):
            labelled = np.asarray(labels.labelled, dtype=bool).copy()
            labelled[rows[folds == fold]] = False
            model = self.train(replace(labels, labelled=labelled))
            out[folds == fold] = model.probabilities[rows[folds == fold]]
        return rows, out

    def pretick_thresholds(self, labels: MultiLabelRoundLabels, target_precision: float,
                           min_support: int = 10) -> list[PrecisionThreshold]:
        """Per label: the smallest P(present) whose out-of-fold precision (95% Wilson lower bound, at least
        ``min_support`` predictions) reaches ``target_precision``; ``threshold`` None where none does."""
        rows, probabilities = self.out_of_fold(labels)
        truth = np.asarray(labels.human_sets, dtype=bool)[rows]
        return [precision_threshold(probabilities[:, label], truth[:, label], target_precision, min_support)
                for label in range(self.n_labels)]

    def pool(self, labels: MultiLabelRoundLabels, model: MultiLabelRoundModel | None) -> MultiLabelPool:
        return MultiLabelPool(
            features=self.global_features, labelled=np.asarray(labels.labelled, dtype=bool),
            weak_answered=labels.answered(),
            weak_sets=model.weak_sets if model is not None else np.zeros((len(labels.labelled), self.n_labels), bool),
            probabilities=None if model is None else model.probabilities,
            transitions=None if model is None else model.transitions,
        )

    def query(self, pool: MultiLabelPool, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        strategy = create_strategy(self.settings.strategy, **dict(self.settings.strategy_options))
        return strategy.query(pool, budget, costs, rng)  # type: ignore[arg-type]  # a multilabel-* strategy

    def rank(self, pool: MultiLabelPool, selections: Sequence[Selection]) -> np.ndarray:
        return multilabel_priority_scores(pool, selections)
