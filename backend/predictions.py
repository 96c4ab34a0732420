"""Label Studio predictions from task features, the served model's probabilities and the queue scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from backend.features import TaskFeatures
from backend.label_config import RECOMMENDED_CONFIDENCE_NAME, ProjectLabeling, build_prediction

if TYPE_CHECKING:
    from model.learner import Classifier


def build_predictions(
    tasks: Sequence[Mapping[str, Any]],
    labeling: ProjectLabeling,
    features: TaskFeatures,
    model: Classifier | None,
    model_version: str,
    queue_scores: Mapping[int, float],
    fine_confidence_threshold: float,
    coarse_precision: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """One prediction per task, in order: the weak (else model) coarse choice, the model's fine choice when it is
    at least ``fine_confidence_threshold`` sure, and the task's queue score (else the margin: low = label first).
    ``coarse_precision[j]``: how often the VLM is right when it says j (from T); it is the VLM choice's score
    when known. A task without usable features gets an empty prediction."""
    hierarchy = labeling.hierarchy
    confidence_control = confidence_control_of(labeling)
    usable = features.usable_positions()
    weak_rows = features.weak_matrix(usable, hierarchy)
    fine_rows = coarse_rows = None
    if model is not None and usable:
        # float16 rows (the classifier converts them chunk by chunk), both heads from one pass
        fine, coarse = model.predict_fine_and_coarse_proba(features.pool_embeddings(usable))
        fine_rows, coarse_rows = np.asarray(fine, dtype=np.float32), np.asarray(coarse, dtype=np.float32)

    # Per-row choices computed for the whole batch at once; the loop below only assembles predictions.
    weak_answered = weak_rows.sum(axis=1) > 0
    weak_choice = weak_rows.argmax(axis=1)
    weak_top = weak_rows.max(axis=1)
    if coarse_rows is not None:
        model_coarse_choice, model_coarse_top = coarse_rows.argmax(axis=1), coarse_rows.max(axis=1)
    if fine_rows is not None:
        fine_choice, fine_top = fine_rows.argmax(axis=1), fine_rows.max(axis=1)
        default_scores = margins(fine_rows)
    else:
        default_scores = np.where(weak_answered, margins(weak_rows), 0.0)

    results: list[dict[str, Any]] = []
    row_of = {i: row for row, i in enumerate(usable)}
    for i, task in enumerate(tasks):
        task_id = task.get("id")
        row = row_of.get(i)
        if row is None:
            results.append({"result": [], "score": 0.0, "model_version": model_version})
            continue
        coarse, coarse_score, coarse_source = None, 0.0, None
        if weak_answered[row]:
            coarse, coarse_score = hierarchy.coarse_classes[weak_choice[row]], float(weak_top[row])
            coarse_source = "VLM"
            if coarse_precision is not None and len(coarse_precision) == hierarchy.n_coarse:
                coarse_score = float(coarse_precision[weak_choice[row]])
                coarse_source = "VLM, expected accuracy from T"
        elif coarse_rows is not None:
            coarse = hierarchy.coarse_classes[model_coarse_choice[row]]
            coarse_score, coarse_source = float(model_coarse_top[row]), "model"
        fine, fine_score = None, None
        if fine_rows is not None and fine_top[row] >= fine_confidence_threshold:
            fine, fine_score = hierarchy.fine_classes[fine_choice[row]], _unit(fine_top[row])
        score = queue_scores.get(task_id) if isinstance(task_id, int) else None
        if score is None:
            score = float(default_scores[row])
        prediction = build_prediction(
            labeling,
            coarse=coarse,
            coarse_score=_unit(coarse_score),
            fine=fine,
            fine_score=fine_score,
            score=_unit(score),
            model_version=model_version,
        )
        if confidence_control is not None and prediction["result"]:
            fine_guess = None
            if fine_rows is not None:
                fine_guess = (hierarchy.fine_classes[fine_choice[row]], float(fine_top[row]))
            prefilled = {r["value"]["choices"][0] for r in prediction["result"] if r.get("type") == "choices"}
            text = confidence_text(coarse, _unit(coarse_score), coarse_source, fine_guess, prefilled,
                                   prediction["score"])
            prediction["result"].append({
                "from_name": confidence_control, "to_name": labeling.image_name, "type": "textarea",
                "value": {"text": [text]},
            })
        results.append(prediction)
    return results


def confidence_control_of(labeling: ProjectLabeling) -> str | None:
    """The read-only <TextArea name="model_confidence"> of the recommended layout, if the config has one."""
    interface = labeling.interface
    for control in (getattr(interface, "controls", None) or ()) if interface is not None else ():
        if control.name == RECOMMENDED_CONFIDENCE_NAME and control.tag.lower() == "textarea":
            return control.name
    return None


def confidence_text(
    coarse: str | None,
    coarse_score: float,
    coarse_source: str | None,
    fine_guess: tuple[str, float] | None,
    prefilled: set[str],
    queue_score: float,
) -> str:
    """What the annotator reads under the choices: each guess with its probability, and the queue score named as
    such (Label Studio shows the prediction's score, the queue score, as a percentage on the prediction tab)."""
    parts = []
    if coarse is not None:
        parts.append(f"coarse {coarse} {coarse_score:.0%} ({coarse_source})")
    if fine_guess is None:
        parts.append("fine: no model yet")
    else:
        name, probability = fine_guess
        note = "model" if name in prefilled else "model, not pre-filled"
        parts.append(f"fine {name} {probability:.0%} ({note})")
    return (f"Confidence: {' · '.join(parts)}. Queue score {queue_score:.2f} (the tab's {queue_score:.2%}): "
            "lower = label sooner; it is not a confidence.")


def margins(probabilities: np.ndarray) -> np.ndarray:
    """Row-wise top-1 minus top-2 probability: small = uncertain = worth labeling first."""
    if probabilities.shape[1] < 2:
        return np.ones(probabilities.shape[0])
    top_two = np.partition(probabilities, -2, axis=1)[:, -2:]
    return (top_two[:, 1] - top_two[:, 0]).astype(np.float64)


def _unit(value: float) -> float:
    return float(min(max(float(value), 0.0), 1.0))
