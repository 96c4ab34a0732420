"""The fit pipeline's pure parts: labels from tasks, trusted pairs, T estimation, training, queue priorities."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from backend.label_config import ProjectLabeling, task_labels
from backend.predictions import margins
from model.errors import UnknownClassError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.calibration import PrecisionThreshold, coarse_answer_precision, precision_threshold
from model.learner import SERVER_SETTINGS, ActiveLearner, LearnerSettings, NewClassifier, RoundLabels

logger = logging.getLogger(__name__)

SELECTED_SCORE_SPAN = 0.05
"""Queue scores below this are reserved for the planned next human labels, in the order they were chosen."""


@dataclass
class CollectedLabels:
    """Human labels per row (MISSING_LABEL where absent), as class indices of the project's hierarchy."""

    fine: np.ndarray
    human_coarse: np.ndarray
    """Coarse-only annotations."""
    trusted_coarse: np.ndarray
    """Coarse labels a human vouched for (the parent of a fine label, or a hand-set coarse choice): T's pairs."""
    labeled: np.ndarray
    """Whether the row's task has an annotation at all."""


def collect_labels(
    labeling: ProjectLabeling, tasks: Sequence[Mapping[str, Any]], positions: Sequence[int], project_id: int
) -> CollectedLabels:
    """The annotations of ``tasks[positions]``; a label the current config no longer has is logged and skipped."""
    hierarchy = labeling.hierarchy
    n = len(positions)
    fine = np.full(n, MISSING_LABEL, dtype=np.int64)
    human_coarse = np.full(n, MISSING_LABEL, dtype=np.int64)
    trusted_coarse = np.full(n, MISSING_LABEL, dtype=np.int64)
    labeled = np.zeros(n, dtype=bool)
    for row, i in enumerate(positions):
        labels = task_labels(labeling, tasks[i])
        if labels is None:
            continue
        labeled[row] = True
        try:
            if labels.fine is not None:
                fine[row] = hierarchy.fine_index(labels.fine)
                trusted_coarse[row] = hierarchy.coarse_index(hierarchy.parent_name(labels.fine))
            elif labels.coarse is not None:
                human_coarse[row] = hierarchy.coarse_index(labels.coarse)
                if labels.coarse_is_trusted:
                    trusted_coarse[row] = human_coarse[row]
        except UnknownClassError as exc:
            logger.warning("project %s task %s: %s", project_id, tasks[i].get("id"), exc)
    return CollectedLabels(fine=fine, human_coarse=human_coarse, trusted_coarse=trusted_coarse, labeled=labeled)


def weak_answers(weak_probabilities: np.ndarray) -> np.ndarray:
    """The weak annotator's coarse index per row (project order), MISSING_LABEL where it gave no answer."""
    answered = weak_probabilities.sum(axis=1) > 0
    return np.where(answered, weak_probabilities.argmax(axis=1), MISSING_LABEL).astype(np.int64)


@dataclass
class FitOutcome:
    classifier: Any
    training_config: Any
    transition_estimate: Any
    """model.noise's estimate of the coarse transition matrix T (``.matrix``, ``.to_dict()``)."""
    n_trusted: int
    weak_for_training: np.ndarray
    row_scores: np.ndarray
    """Queue score of every row (ascending = label first); only unlabeled rows are meant to be used."""
    queue_summary: dict[str, Any]
    suggestion: PrecisionThreshold
    """The fine confidence from which a suggestion is pre-ticked (out-of-fold precision bound >= target)."""
    coarse_precision: list[float]
    """P(true coarse = j | the VLM says j) for each coarse class j, from T and the model's class balance."""
    fine_probabilities: np.ndarray | None = None
    """The trained model's fine probabilities of every row."""
    out_of_fold_rows: np.ndarray | None = None
    """Rows with a human fine label, and their fine probabilities from models trained without them."""
    out_of_fold: np.ndarray | None = None

    def metrics(self, labels: CollectedLabels, n_tasks: int) -> dict[str, Any]:
        config = self.training_config
        return {
            "n_tasks": n_tasks,
            "n_usable": int(labels.fine.shape[0]),
            "n_fine": int(np.sum(labels.fine != MISSING_LABEL)),
            "n_human_coarse": int(np.sum(labels.human_coarse != MISSING_LABEL)),
            "n_weak": int(np.sum(self.weak_for_training != MISSING_LABEL)),
            "n_trusted_pairs": self.n_trusted,
            "training_config": config.to_dict() if hasattr(config, "to_dict") else {},
            "queue": self.queue_summary,
            "suggestion": self.suggestion.to_dict(),
            "coarse_precision": self.coarse_precision,
        }


def server_learner_settings(query_strategy: str) -> LearnerSettings:
    """The server's learner: ``SERVER_SETTINGS`` (ours), or the same round ordered by another strategy."""
    if query_strategy == SERVER_SETTINGS.strategy:
        return SERVER_SETTINGS
    return replace(SERVER_SETTINGS, strategy=query_strategy, strategy_options={})


def fit_and_rank(
    *,
    hierarchy: LabelHierarchy,
    embeddings: np.ndarray,
    labels: CollectedLabels,
    weak_probabilities: np.ndarray,
    new_classifier: NewClassifier,
    torch_threads: int | None,
    budget_labels: int,
    cost_full: float,
    cost_weak: float,
    settings: LearnerSettings = SERVER_SETTINGS,
    suggestion_precision: float = 0.9,
    out_of_fold: bool = False,
) -> FitOutcome:
    """One round of model.learner.ActiveLearner, the round ``vlm-al simulate`` runs: estimate T from trusted pairs,
    choose a training config, train on every row and rank the unlabeled rows for the next human labels."""
    from model.query import LabelCosts

    weak_answer = weak_answers(weak_probabilities)
    # With a local VLM weak labels cost compute, not money: every task without a human label gets one.
    weak_for_training = np.where(labels.labeled, MISSING_LABEL, weak_answer).astype(np.int64)
    learner = ActiveLearner(hierarchy, int(embeddings.shape[1]), replace(settings, num_threads=torch_threads),
                            new_classifier=new_classifier)
    round_labels = RoundLabels(fine=labels.fine, weak_coarse=weak_for_training, human_coarse=labels.human_coarse,
                               trusted_coarse=labels.trusted_coarse, weak_answers=weak_answer)
    model = learner.train(embeddings, round_labels)
    pool = learner.pool_state(embeddings, round_labels, model)
    costs = LabelCosts(human_fine=cost_full, weak_coarse=cost_weak)
    selections = learner.query(pool, float(budget_labels) * costs.human_fine, costs, np.random.default_rng(0))
    estimate = model.transition
    n_trusted = int(np.sum((labels.trusted_coarse != MISSING_LABEL) & (weak_answer != MISSING_LABEL)))
    rows = held_out = None
    if suggestion_precision > 0 or out_of_fold:  # out_of_fold: the assistant (backend/assistant.py) reads them
        rows, held_out = learner.out_of_fold_fine(embeddings, round_labels, model)
    if suggestion_precision > 0:
        suggestion = precision_threshold(held_out.max(axis=1), held_out.argmax(axis=1) == labels.fine[rows],
                                         suggestion_precision)
    else:
        suggestion = precision_threshold(np.zeros(0), np.zeros(0, dtype=bool), 0.0)
    class_balance = model.coarse_probabilities.mean(axis=0)
    coarse_precision = coarse_answer_precision(estimate.matrix, class_balance) if estimate is not None else None
    return FitOutcome(
        classifier=model.classifier,
        training_config=model.training_config,
        transition_estimate=estimate,
        n_trusted=n_trusted,
        weak_for_training=weak_for_training,
        row_scores=learner.rank(pool, selections),
        queue_summary={"strategy": settings.strategy, "n_selected": len(selections),
                       "strategy_options": dict(settings.strategy_options)},
        suggestion=suggestion,
        coarse_precision=[] if coarse_precision is None else [round(float(p), 4) for p in coarse_precision],
        fine_probabilities=model.fine_probabilities,
        out_of_fold_rows=rows,
        out_of_fold=held_out,
    )


# --- queue scores: ascending = label first ------------------------------------------------------------------------


def _rank_scores(selected: Sequence[int], base: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Planned picks get [0, SELECTED_SCORE_SPAN) in pick order; every other row SPAN + (1 - SPAN) * base."""
    scores = np.full(base.shape[0], 1.0, dtype=np.float64)
    scores[rows] = SELECTED_SCORE_SPAN + (1.0 - SELECTED_SCORE_SPAN) * np.clip(base[rows], 0.0, 1.0)
    for order, row in enumerate(selected):
        scores[row] = SELECTED_SCORE_SPAN * order / max(len(selected), 1)
    return scores


def cold_start_queue(
    embeddings: np.ndarray, weak_probabilities: np.ndarray, hierarchy: LabelHierarchy, budget: int
) -> np.ndarray:
    """Queue score per row before any fine label: diverse first picks (k-means representatives) lowest, the rest
    following the VLM's doubt."""
    answered = weak_probabilities.sum(axis=1) > 0
    weak_margins = np.where(answered, margins(weak_probabilities), 0.0)
    selected = cold_start_scores(embeddings, hierarchy, weak_answers(weak_probabilities), budget)
    return _rank_scores(selected, weak_margins, np.arange(embeddings.shape[0]))


def cold_start_scores(
    embeddings: np.ndarray, hierarchy: LabelHierarchy, weak_coarse: np.ndarray, budget: int, seed: int = 0
) -> list[int]:
    """No human label yet: the k-means representatives to label first (a diverse seed), in pick order."""
    from model.query import KMeansColdStart, LabelCosts, LabelKind, PoolState

    n = embeddings.shape[0]
    pool = PoolState(
        embeddings=embeddings,
        hierarchy=hierarchy,
        fine_labels=np.full(n, MISSING_LABEL, dtype=np.int64),
        weak_coarse_labels=weak_coarse,
    )
    selections = KMeansColdStart().query(pool, float(min(budget, n)), LabelCosts(), np.random.default_rng(seed))
    return [s.index for s in selections if s.kind is LabelKind.HUMAN_FINE]
