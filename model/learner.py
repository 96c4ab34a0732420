"""One active-learning round, written once: the server's fit and ``vlm-al simulate`` both run it.

A round estimates the coarse transition matrix T from trusted pairs, chooses the training configuration, trains the
fine-grained classifier on frozen embeddings, and asks the query strategy for the next labels. Everything that
decides a round is a field of ``LearnerSettings``; where the server and the benchmark differ, the difference is a
named setting (``SERVER_SETTINGS`` vs ``BENCHMARK_OURS_SETTINGS``), and the benchmark prints both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from model.errors import ModelInputError
from model.finegrained import FineGrainedClassifier, PoolStatistics, TrainingConfig, select_training_config
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.noise import CoarseTransitionEstimate, estimate_coarse_transition_matrix
from model.query import (
    OURS_HUMAN_PICK_OPTIONS,
    LabelCosts,
    LabelKind,
    PoolState,
    Selection,
    TrainAndEvaluate,
    create_strategy,
    priority_scores,
)

TRANSITION_MODES = ("none", "round0", "every-round")
PSEUDO_LABEL_SOURCES = ("model", "spreading")


class Classifier(Protocol):
    """What a round trains and both callers read (model.finegrained.FineGrainedClassifier)."""

    def fit(
        self,
        embeddings: np.ndarray,
        fine_labels: np.ndarray,
        weak_coarse_labels: np.ndarray | None,
        coarse_transition_matrix: np.ndarray | None = None,
        human_coarse_labels: np.ndarray | None = None,
        pool: PoolStatistics | None = None,
    ) -> Any:
        """``pool``: statistics of ``embeddings`` (that array object) shared by the fits of a round; a classifier
        that has no use for them ignores them."""
        ...

    def predict_fine_proba(self, embeddings: np.ndarray) -> np.ndarray: ...

    def predict_coarse_proba(self, embeddings: np.ndarray) -> np.ndarray: ...

    def predict_fine_and_coarse_proba(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Both of the above from one pass over the rows (a round needs both for the whole pool)."""
        ...


NewClassifier = Callable[[Any], Classifier]
"""Builds an untrained classifier from a ``TrainingConfig`` (the caller knows the hierarchy and embedding size)."""


@dataclass(frozen=True)
class LearnerSettings:
    """Everything that decides an active-learning round."""

    variant: str = "hierarchical"
    """The FineGrainedClassifier variant: hierarchical (ours), reference (two heads) or fine-only."""
    transition: str = "every-round"
    """none | round0 (estimated once from the seed: the reference protocol) | every-round (re-estimated)."""
    transition_prior_strength: float = 1.0
    """Pseudo-count pulling each row of T towards the identity (0: the reference's raw counts)."""
    config_candidates: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: {"weak_loss_weight": (0.2,)})
    """TrainingConfig values cross-validated on the human labels when there are several; one value: fixed. How much
    the weak labels may count: choosing between 0.2 and 1.0 by cross-validation picked 1.0 too often for a real
    annotator whose errors depend on the image, and lost 0.7 points on validation (ours_validation.md)."""
    min_fine_labels_for_selection: int = 9
    pseudo_label_confidence: float | None = None
    """Self-training: after the first fit, rows without a human label whose fine posterior given the VLM's answer
    (through T) reaches this are trained on as fine labels in a second fit. None: off."""
    pseudo_label_source: str = "model"
    """Where that posterior's p(fine | x) comes from: the first fit ("model") or label spreading over a k-nearest-
    neighbour graph of the embeddings ("spreading", scikit-learn's LabelSpreading)."""
    """Below this many human fine labels, the first candidate is used without cross-validation."""
    strategy: str = "ours"
    """A name in model.query.STRATEGIES."""
    strategy_options: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        if self.transition not in TRANSITION_MODES:
            raise ModelInputError(f"transition must be one of {list(TRANSITION_MODES)}, got {self.transition!r}")
        if not self.transition_prior_strength >= 0:
            raise ModelInputError(f"transition_prior_strength must be >= 0, got {self.transition_prior_strength}")
        if self.pseudo_label_confidence is not None and not 0.0 < self.pseudo_label_confidence <= 1.0:
            raise ModelInputError(f"pseudo_label_confidence must be in (0, 1], got {self.pseudo_label_confidence}")
        if self.pseudo_label_source not in PSEUDO_LABEL_SOURCES:
            raise ModelInputError(f"pseudo_label_source must be one of {list(PSEUDO_LABEL_SOURCES)}")
        if not self.config_candidates or not all(len(v) for v in self.config_candidates.values()):
            raise ModelInputError("config_candidates needs at least one value per field")
        create_strategy(self.strategy, **dict(self.strategy_options))  # an unknown strategy or option fails here

    @property
    def uses_transition(self) -> bool:
        return self.transition != "none"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["config_candidates"] = {k: list(v) for k, v in self.config_candidates.items()}
        data["strategy_options"] = dict(self.strategy_options)
        return data


BENCHMARK_OURS_SETTINGS = LearnerSettings(
    strategy="ours",
    strategy_options={"human_share": 0.85, **OURS_HUMAN_PICK_OPTIONS, "weak_selection": "uncertain"},
)
"""Ours in ``vlm-al simulate``: settings chosen on a validation slice of the pool's split, never the test split
(bench/results/simulate/ours_validation.md)."""

SERVER_SETTINGS = replace(
    BENCHMARK_OURS_SETTINGS,
    strategy_options={**BENCHMARK_OURS_SETTINGS.strategy_options, "human_share": 1.0},
)
"""The server's round. The one difference, ``human_share`` 1.0: a local VLM labels every task when it is indexed
(weak labels cost compute, not money), so the whole budget of a round goes to human picks."""


@dataclass
class RoundLabels:
    """What is known of every pool row (int64, MISSING_LABEL where absent)."""

    fine: np.ndarray
    """Human fine labels (trusted)."""
    weak_coarse: np.ndarray | None
    """The VLM's coarse answers where known. They are trained on only where no human label exists: a row is either
    weak or full (the reference's annotation types), and a human label supersedes the VLM's."""
    human_coarse: np.ndarray | None = None
    """Human coarse-only labels, trained on without T."""
    trusted_coarse: np.ndarray | None = None
    """Coarse labels a human vouched for (a fine label's parent, a hand-set coarse choice): T's true side."""
    weak_answers: np.ndarray | None = None
    """The VLM's answers wherever known: T's observed side (defaults to ``weak_coarse``)."""

    def weak_for_training(self) -> np.ndarray | None:
        """``weak_coarse`` where the row has no human label (fine or coarse), MISSING_LABEL elsewhere."""
        if self.weak_coarse is None:
            return None
        human = self.fine != MISSING_LABEL
        if self.human_coarse is not None:
            human |= self.human_coarse != MISSING_LABEL
        return np.where(human, MISSING_LABEL, self.weak_coarse).astype(np.int64)


@dataclass
class RoundModel:
    classifier: Classifier
    training_config: Any
    transition: CoarseTransitionEstimate | None
    fine_probabilities: np.ndarray
    coarse_probabilities: np.ndarray
    pool: PoolStatistics | None = None
    """The statistics of the embeddings the model was trained on, for the round's later fits on them."""


class ActiveLearner:
    """Runs rounds for one hierarchy and embedding size under one ``LearnerSettings``."""

    def __init__(
        self,
        hierarchy: LabelHierarchy,
        embedding_dim: int,
        settings: LearnerSettings,
        new_classifier: NewClassifier | None = None,
    ) -> None:
        if not isinstance(hierarchy, LabelHierarchy):
            raise ModelInputError(f"ActiveLearner needs a LabelHierarchy, got {type(hierarchy).__name__}")
        self.hierarchy = hierarchy
        self.embedding_dim = int(embedding_dim)
        self.settings = settings
        self._new_classifier = new_classifier or self._default_classifier
        self._fixed_transition: CoarseTransitionEstimate | None = None

    def _default_classifier(self, training_config: Any) -> Classifier:
        return FineGrainedClassifier(self.hierarchy, self.embedding_dim, training_config)

    def base_config(self) -> Any:
        return TrainingConfig(
            variant=self.settings.variant, use_transition=self.settings.uses_transition, seed=self.settings.seed,
            num_threads=self.settings.num_threads,
        )

    def estimate_transition(self, labels: RoundLabels) -> CoarseTransitionEstimate | None:
        """T from the trusted pairs; ``round0`` keeps the first estimate (and its raw counts) for every later round."""
        if not self.settings.uses_transition:
            return None
        if self.settings.transition == "round0" and self._fixed_transition is not None:
            return self._fixed_transition
        trusted = labels.trusted_coarse
        if trusted is None:
            trusted = self.hierarchy.coarse_of_fine_labels(labels.fine)
        answers = labels.weak_answers if labels.weak_answers is not None else labels.weak_coarse
        if answers is None:
            answers = np.full_like(labels.fine, MISSING_LABEL)
        strength = 0.0 if self.settings.transition == "round0" else self.settings.transition_prior_strength
        estimate = estimate_coarse_transition_matrix(trusted, answers, self.hierarchy.n_coarse, prior_strength=strength)
        if self.settings.transition == "round0":
            self._fixed_transition = estimate
        return estimate

    def choose_config(self, embeddings: np.ndarray, labels: RoundLabels,
                      transition: CoarseTransitionEstimate | None, pool: PoolStatistics | None = None) -> Any:
        candidates = {k: list(v) for k, v in self.settings.config_candidates.items()}
        n_fine = int(np.sum(labels.fine != MISSING_LABEL))
        if n_fine < self.settings.min_fine_labels_for_selection:
            candidates = {k: v[:1] for k, v in candidates.items()}
        return select_training_config(
            self.hierarchy, embeddings, labels.fine, labels.weak_for_training(),
            None if transition is None else transition.matrix, self.base_config(), candidates, n_folds=3,
            human_coarse_labels=labels.human_coarse, pool=pool,
        )

    def train(self, embeddings: np.ndarray, labels: RoundLabels) -> RoundModel:
        """Estimate T, choose the training configuration, train on every row and predict the pool."""
        pool = PoolStatistics(embeddings)  # every fit of the round reads the pool's norms from here
        transition = self.estimate_transition(labels)
        training_config = self.choose_config(embeddings, labels, transition, pool)
        model = self._fit(embeddings, labels, labels.fine, training_config, transition, pool)
        if self.settings.pseudo_label_confidence is not None:
            model = self._fit(embeddings, labels, self.pseudo_labelled(embeddings, labels, model), training_config,
                              transition, pool)
        return model

    def _fit(self, embeddings: np.ndarray, labels: RoundLabels, fine: np.ndarray, training_config: Any,
             transition: CoarseTransitionEstimate | None, pool: PoolStatistics) -> RoundModel:
        classifier = self._new_classifier(training_config)
        # A fine label wins over a row's weak label inside the classifier, so pseudo-labelled rows train as full.
        classifier.fit(embeddings, fine, labels.weak_for_training(),
                       None if transition is None else transition.matrix, labels.human_coarse, pool=pool)
        fine_probabilities, coarse_probabilities = classifier.predict_fine_and_coarse_proba(embeddings)
        return RoundModel(
            classifier=classifier,
            training_config=training_config,
            transition=transition,
            fine_probabilities=np.asarray(fine_probabilities, dtype=np.float32),
            coarse_probabilities=np.asarray(coarse_probabilities, dtype=np.float32),
            pool=pool,
        )

    def pseudo_labelled(self, embeddings: np.ndarray, labels: RoundLabels, model: RoundModel) -> np.ndarray:
        """The human fine labels plus, on rows without any human label, the fine class whose posterior given the
        VLM's answer reaches ``pseudo_label_confidence``."""
        from model.query import fine_posterior_given_weak

        threshold = self.settings.pseudo_label_confidence
        if threshold is None:
            return labels.fine
        pool = self.pool_state(embeddings, labels, model)
        if self.settings.pseudo_label_source == "spreading":
            pool = replace(pool, fine_probabilities=label_spreading_probabilities(embeddings, labels.fine,
                                                                                  self.hierarchy.n_fine))
        posterior = fine_posterior_given_weak(pool)
        unlabelled = labels.fine == MISSING_LABEL
        if labels.human_coarse is not None:
            unlabelled &= labels.human_coarse == MISSING_LABEL
        confident = unlabelled & (posterior.max(axis=1) >= threshold)
        return np.where(confident, posterior.argmax(axis=1), labels.fine).astype(np.int64)

    def out_of_fold_fine(self, embeddings: np.ndarray, labels: RoundLabels, model: RoundModel,
                         n_folds: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, fine probabilities)`` for the rows with a human fine label, each predicted by a model trained
        without its fold: its VLM answer stays as a weak label, as for a task nobody has labelled yet. This is
        how confident and how right the model is on tasks it has not seen, which calibrates pre-ticking."""
        rows = np.flatnonzero(labels.fine != MISSING_LABEL)
        if rows.size < n_folds:
            return rows[:0], np.zeros((0, self.hierarchy.n_fine), dtype=np.float32)
        folds = np.random.default_rng(self.settings.seed).permutation(rows.size) % n_folds
        transition = None if model.transition is None else model.transition.matrix
        pool = PoolStatistics.reusing(model.pool, embeddings)
        out = np.zeros((rows.size, self.hierarchy.n_fine), dtype=np.float32)
        for fold in range(n_folds):
            held_out = rows[folds == fold]
            fine = labels.fine.copy()
            fine[held_out] = MISSING_LABEL
            fold_labels = replace(labels, fine=fine)
            classifier = self._new_classifier(model.training_config)
            classifier.fit(embeddings, fine, fold_labels.weak_for_training(), transition, labels.human_coarse,
                           pool=pool)
            out[folds == fold] = np.asarray(classifier.predict_fine_proba(embeddings[held_out]), dtype=np.float32)
        return rows, out

    def pool_state(self, embeddings: np.ndarray, labels: RoundLabels, model: RoundModel,
                   weak_kind: LabelKind = LabelKind.VLM_COARSE,
                   train_and_evaluate: TrainAndEvaluate | None = None) -> PoolState:
        missing = np.full_like(labels.fine, MISSING_LABEL)
        if weak_kind is LabelKind.HUMAN_COARSE:  # ISOAL's baseline: the weak labels are human coarse ones
            weak = labels.human_coarse if labels.human_coarse is not None else missing
        else:
            training_weak = labels.weak_for_training()
            weak = training_weak if training_weak is not None else missing
            if labels.human_coarse is not None:
                # A human coarse label stands in for the VLM's answer on its task.
                weak = np.where(labels.human_coarse != MISSING_LABEL, labels.human_coarse, weak)
        transition = model.transition.matrix if model.transition is not None and weak_kind is LabelKind.VLM_COARSE \
            else None
        return PoolState(
            embeddings=embeddings, hierarchy=self.hierarchy, fine_labels=labels.fine, weak_coarse_labels=weak,
            weak_kind=weak_kind, fine_probabilities=model.fine_probabilities,
            coarse_probabilities=model.coarse_probabilities, train_and_evaluate=train_and_evaluate,
            coarse_transition_matrix=transition,
        )

    def query(self, pool: PoolState, budget: float, costs: LabelCosts, rng: np.random.Generator,
              **strategy_overrides: Any) -> list[Selection]:
        """The next labels to buy: the settings' strategy with its options (``strategy_overrides`` on top)."""
        options = {**dict(self.settings.strategy_options), **strategy_overrides}
        return create_strategy(self.settings.strategy, **options).query(pool, budget, costs, rng)

    def rank(self, pool: PoolState, selections: Sequence[Selection]) -> np.ndarray:
        """Queue scores (ascending = label first): the planned human picks first, in order, then by margin."""
        return priority_scores(pool, selections)


def label_spreading_probabilities(embeddings: np.ndarray, fine: np.ndarray, n_fine: int,
                                  n_neighbors: int = 10, alpha: float = 0.2) -> np.ndarray:
    """p(fine | x) from the human fine labels spread over a k-nearest-neighbour graph of the L2-normalised
    embeddings (Zhou et al. 2004, scikit-learn's LabelSpreading); a class nobody labelled gets 0."""
    from sklearn.semi_supervised import LabelSpreading

    points = np.asarray(embeddings, dtype=np.float64)
    points = points / np.maximum(np.linalg.norm(points, axis=1, keepdims=True), 1e-12)
    targets = np.where(fine == MISSING_LABEL, -1, fine)
    out = np.zeros((points.shape[0], n_fine), dtype=np.float64)
    if not np.any(targets >= 0) or points.shape[0] < 2:
        return out
    spreading = LabelSpreading(kernel="knn", n_neighbors=min(n_neighbors, points.shape[0] - 1), alpha=alpha,
                               max_iter=50)
    spreading.fit(points, targets)
    out[:, spreading.classes_[spreading.classes_ >= 0]] = spreading.label_distributions_
    return out
