"""The labeling assistant in Label Studio terms: auto-accept with audits, likely label errors, the stopping signal,
arrival scoring and the label ledger. The numbers come from ``model.assistant``; this module maps them onto tasks,
annotations, Data Manager tabs and the queue, and keeps its per-project record in ``assistant.json``.

Hooks (all called by ``backend.service.MLBackend`` under the project's fit lock):

- ``human_view`` before a fit: auto-accepted annotations are taken out of the tasks, so they never become human
  labels, trusted pairs for T, or training labels as a human's (the task trains as one nobody labeled: on its
  VLM answer, a weak label).
- ``after_fit`` once the new model is trained: audits are scored against the humans' labels, classes are paused,
  cleanlab's list is made, the stop-set predictions and the learning curve are recorded, tasks to auto-accept and
  to audit are chosen, and the audits are put at the head of the queue.
- ``mark_predictions`` on every push: an audit task's prediction carries no fine suggestion (the audit is blind).
- ``apply`` after the push: the auto-accepted annotations are created (completed by the dedicated user) and the
  "Likely label errors" tab is refreshed.
- ``arrival_scores`` when tasks arrive after the last fit: their queue scores from the current model.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from backend.config import Config
from backend.label_config import ProjectLabeling, annotation_to_labels, build_prediction
from backend.predictions import margins
from backend.state import ProjectState, version_number
from model.assistant import (
    AuditRecord,
    class_thresholds,
    decide_auto_accept,
    fit_inverse_power_law,
    likely_label_errors,
    suggest_stopping,
    summarize_audits,
)
from model.assistant.auto_accept import PAUSED_AUDITS_PER_ROUND
from model.assistant.stopping import InversePowerLaw, human_label_curve, stabilizing_predictions
from model.hierarchy import MISSING_LABEL

logger = logging.getLogger(__name__)

ASSISTANT_RECORD = "assistant"
"""The project's record: ``assistant.json`` beside its checkpoints, or a Redis document (backend.state records)."""
AUDIT_SCORE_SPAN = 0.005
"""Queue scores below this are the pending audits: ahead of the fit's planned picks."""
STOP_SET_SIZE = 500
STOP_HISTORY = 10
TOP_LABEL_ISSUES = 50
CURVE_MIN_LABELS = 30
CURVE_GROWTH = 1.2
"""The learning curve (3 folds x up to 5 sizes of extra fits) is recomputed when the human labels grew by 20%."""
ARRIVAL_POINTS = 2000
LABEL_ERRORS_TAB_TITLE = "Likely label errors"


@dataclass
class FitContext:
    """What a fit knows, for the assistant (rows are the fit's usable tasks)."""

    project_id: int
    state: ProjectState
    labeling: ProjectLabeling
    tasks: Sequence[Mapping[str, Any]]
    usable: Sequence[int]
    labels: Any
    """backend.training.CollectedLabels"""
    outcome: Any
    """backend.training.FitOutcome"""
    model_version: str
    auto_accepted: Mapping[int, str]
    """Task id -> fine class of the auto-accepted annotations taken out of the tasks by ``human_view``."""


@dataclass
class AssistantPlan:
    accepted: dict[int, tuple[str, float]] = field(default_factory=dict)
    """Task id -> (fine class, confidence) to label automatically."""
    model_version: str = ""
    curve_due: bool = False
    """The human labels grew enough for a new learning curve (``run_curve``, a job of its own)."""


def _completed_by(annotation: Mapping[str, Any]) -> int | None:
    value = annotation.get("completed_by")
    if isinstance(value, Mapping):
        value = value.get("id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Assistant:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._pending_cache: dict[int, tuple[object, frozenset[str]]] = {}

    @property
    def auto_accept_on(self) -> bool:
        return self.config.auto_accept_precision > 0

    # --- the per-project record ------------------------------------------------------------------------------

    def load(self, state: ProjectState) -> dict[str, Any]:
        """The record (``assistant.json``, or in Redis with REDIS_URL: state.records), {} when there is none."""
        try:
            _, data = state.records.read_document(ASSISTANT_RECORD)
        except ValueError:
            logger.warning("project %s: the assistant record is unreadable; the assistant starts a new one",
                           state.project_id)
            return {}
        return data if isinstance(data, dict) else {}

    def save(self, state: ProjectState, record: Mapping[str, Any]) -> None:
        state.records.write_document(ASSISTANT_RECORD, record)

    # --- hooks ---------------------------------------------------------------------------------------------------

    def human_view(self, state: ProjectState, labeling: ProjectLabeling, tasks: Sequence[Mapping[str, Any]]
                   ) -> tuple[list[Mapping[str, Any]], dict[int, str]]:
        """The tasks without their auto-accepted annotations, and those annotations' fine classes by task id.

        An annotation is auto-accepted when the dedicated user completed it and it still carries the class that
        auto-accept gave it: once a human changes its fine class, it is a human's label."""
        record = self.load(state)
        user_id = record.get("auto_user_id")
        given = record.get("auto_accepted") or {}
        if not isinstance(user_id, int) or not given:
            return list(tasks), {}
        view: list[Mapping[str, Any]] = []
        removed: dict[int, str] = {}
        for task in tasks:
            annotations = task.get("annotations") if isinstance(task, Mapping) else None
            entry = given.get(str(task.get("id"))) if isinstance(task, Mapping) else None
            if not isinstance(annotations, list) or entry is None:
                view.append(task)
                continue
            kept = []
            for annotation in annotations:
                if isinstance(annotation, Mapping) and _completed_by(annotation) == user_id:
                    labels = annotation_to_labels(labeling, annotation)
                    if labels is not None and labels.fine == entry.get("fine"):
                        removed[int(task["id"])] = str(entry.get("fine"))
                        continue
                kept.append(annotation)
            view.append({**task, "annotations": kept} if len(kept) != len(annotations) else task)
        return view, removed

    def after_fit(self, ctx: FitContext, scores: dict[int, float]) -> AssistantPlan:
        """Record what the new model says (audits, label issues, stop set, curve, ledger) and plan auto-accept;
        ``scores`` (the new version's queue) gets the pending audits at its head."""
        hierarchy = ctx.labeling.hierarchy
        labels, outcome = ctx.labels, ctx.outcome
        record = self.load(ctx.state)
        task_ids = [int(ctx.tasks[p]["id"]) for p in ctx.usable]
        row_of = {task_id: row for row, task_id in enumerate(task_ids)}
        fine_names = list(hierarchy.fine_classes)

        # Audits: a human's fine label on an audit task scores the class auto-accept would have given it.
        audits: dict[str, dict[str, Any]] = record.get("audits") or {}
        for key, audit in audits.items():
            row = row_of.get(int(key))
            if audit.get("human") is None and row is not None and labels.fine[row] != MISSING_LABEL:
                audit["human"] = fine_names[int(labels.fine[row])]
        target = self.config.auto_accept_precision
        summary = summarize_audits(
            [AuditRecord(fine_names.index(a["fine"]), fine_names.index(a["human"])) for a in audits.values()
             if a.get("human") in fine_names and a.get("fine") in fine_names], target or 1.0)
        paused = sorted(summary.paused)

        rows = outcome.out_of_fold_rows
        oof = outcome.out_of_fold
        issues = self._label_issues(ctx, rows, oof) if rows is not None and rows.size >= 10 else []
        stop = self._stop_set(ctx, record, task_ids)
        n_fine = int(np.sum(labels.fine != MISSING_LABEL))
        plan = AssistantPlan(model_version=ctx.model_version, curve_due=self.curve_due(record, n_fine))
        thresholds = []
        unlabeled_rows = np.flatnonzero(~labels.labeled)
        pending = {int(k) for k, a in audits.items() if a.get("human") is None}
        if self.auto_accept_on and oof is not None and rows is not None and rows.size:
            thresholds = class_thresholds(oof.max(axis=1), oof.argmax(axis=1), oof.argmax(axis=1) == labels.fine[rows],
                                          hierarchy.n_fine, target)
            candidates = np.asarray([r for r in unlabeled_rows
                                     if task_ids[r] not in ctx.auto_accepted and task_ids[r] not in pending],
                                    dtype=np.int64)
            rng = np.random.default_rng([ctx.project_id, version_number(ctx.model_version) or 0])
            decision = decide_auto_accept(outcome.fine_probabilities[candidates], thresholds, paused,
                                          self.config.auto_accept_audit_share, rng)
            waiting = Counter(a["fine"] for a in audits.values() if a.get("human") is None)
            for position in decision.audit:
                row = int(candidates[position])
                fine_class = int(decision.predicted[position])
                if fine_class in paused and waiting[fine_names[fine_class]] >= PAUSED_AUDITS_PER_ROUND:
                    continue  # a paused class waits for its open audits before it gets more
                waiting[fine_names[fine_class]] += 1
                audits[str(task_ids[row])] = {"fine": fine_names[fine_class],
                                              "confidence": round(float(decision.confidence[position]), 4),
                                              "model_version": ctx.model_version, "human": None}
                pending.add(task_ids[row])
            for position in decision.accepted:
                row = int(candidates[position])
                plan.accepted[task_ids[row]] = (fine_names[int(decision.predicted[position])],
                                                float(decision.confidence[position]))
        self._audits_first(scores, pending)
        record.update({
            "model_version": ctx.model_version,
            "audits": audits,
            "audit_summary": {
                "target": target, "audited_precision": summary.precision,
                "per_class": {fine_names[c]: {"audited": n, "correct": summary.correct.get(c, 0)}
                              for c, n in sorted(summary.audited.items())},
                "paused": [fine_names[c] for c in paused],
            },
            "thresholds": [{**t.to_dict(), "fine": fine_names[t.fine_class]} for t in thresholds],
            "label_issues": issues,
            "stopping": self._stopping(record, n_fine, stop.to_dict()),
            "ledger": self._ledger(ctx, n_fine, len(plan.accepted)),
            "class_balance": self._class_balance(ctx, unlabeled_rows),
            "queue": {"n_unlabeled": int(unlabeled_rows.size), "pending_audits": len(pending & set(scores)),
                      "planned_picks": int(outcome.queue_summary.get("n_selected", 0)),
                      "auto_accepted": len(ctx.auto_accepted) + len(plan.accepted)},
            "arrival": self._arrival_table(ctx, scores, unlabeled_rows),
        })
        self.save(ctx.state, record)
        if paused:
            logger.warning("project %s: auto-accept paused for %s: audited precision below %.2f", ctx.project_id,
                           ", ".join(fine_names[c] for c in paused), target)
        return plan

    def pending_audits(self, state: ProjectState) -> frozenset[str]:
        """Task ids (as strings) of the audits no human has labeled yet; re-read only when the record changed, since
        every /predict asks."""
        stamp = state.records.document_stamp(ASSISTANT_RECORD)
        if stamp == -1:
            return frozenset()
        with self._lock:
            cached = self._pending_cache.get(state.project_id)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        audits = self.load(state).get("audits") or {}
        pending = frozenset(k for k, a in audits.items() if a.get("human") is None)
        with self._lock:
            self._pending_cache[state.project_id] = (stamp, pending)
        return pending

    def mark_predictions(self, state: ProjectState, labeling: ProjectLabeling, tasks: Sequence[Mapping[str, Any]],
                         predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pending audit tasks get no fine suggestion (and say why), so the human's label is not the model's echo."""
        pending = self.pending_audits(state)
        if not pending:
            return predictions
        fine_controls = set(labeling.fine_controls) - {None}
        for task, prediction in zip(tasks, predictions):
            if str(task.get("id")) not in pending or not prediction.get("result"):
                continue
            kept = []
            for item in prediction["result"]:
                if item.get("from_name") in fine_controls:
                    continue
                if item.get("type") == "textarea":
                    item = {**item, "value": {"text": ["Audit of auto-accept: label this task yourself; the "
                                                       "model's fine guess is hidden."]}}
                kept.append(item)
            prediction["result"] = kept
        return predictions

    def apply(self, state: ProjectState, labeling: ProjectLabeling, sdk: Any, plan: AssistantPlan) -> int:
        """After the push: create the auto-accepted annotations (completed by the dedicated user) and refresh the
        label-errors tab. ``sdk``: label_studio_sdk's client (None: no Label Studio side). Returns how many
        annotations were created."""
        record = self.load(state)
        created = 0
        if sdk is None:
            return 0
        if plan.accepted:
            try:
                user_id = self._auto_user(sdk, record)
            except Exception as exc:  # e.g. an API key without the right to list or create users
                logger.warning("project %s: no auto-accept user %s, nothing auto-accepted: %s", state.project_id,
                               self.config.auto_accept_user, exc)
                plan.accepted.clear()
        if plan.accepted:
            given = record.setdefault("auto_accepted", {})
            # Recorded before the annotations exist: the fit their webhooks start must already see them as ours.
            for task_id, (fine, confidence) in plan.accepted.items():
                given[str(task_id)] = {"fine": fine, "confidence": round(confidence, 4),
                                       "model_version": plan.model_version}
            self.save(state, record)
            hierarchy = labeling.hierarchy
            for task_id, (fine, confidence) in sorted(plan.accepted.items()):
                result = build_prediction(labeling, coarse=hierarchy.parent_name(fine), coarse_score=1.0, fine=fine,
                                          fine_score=min(max(confidence, 0.0), 1.0), score=1.0,
                                          model_version=plan.model_version)["result"]
                result = [{k: v for k, v in item.items() if k != "score"} for item in result
                          if item.get("type") in ("choices", "taxonomy")]
                try:
                    sdk.annotations.create(id=int(task_id), result=result, completed_by=user_id)
                except Exception as exc:
                    logger.warning("project %s: could not auto-accept task %s: %s", state.project_id, task_id, exc)
                    given.pop(str(task_id), None)
                    continue
                created += 1
            logger.info("project %s: auto-accepted %d tasks as %s", state.project_id, created,
                        self.config.auto_accept_user)
            ledger = record.get("ledger") or {}
            ledger["auto_accepted"] = len(given)
            record["ledger"] = ledger
            self.save(state, record)
        issues = record.get("label_issues") or []
        if self.config.label_errors_tab and (issues or record.get("label_errors_tab")):
            record["label_errors_tab"] = self._label_errors_tab(sdk, state.project_id, issues)
            self.save(state, record)
        return created

    def arrival_scores(self, state: ProjectState, model_version: str, task_ids: Sequence[int],
                       fine_probabilities: np.ndarray) -> dict[int, float]:
        """Queue scores for tasks that arrived after the fit: each is placed where its margin falls in the current
        version's queue (the fit's (margin, score) pairs), behind the planned picks and the audits."""
        arrival = self.load(state).get("arrival") or {}
        if arrival.get("model_version") != model_version or not arrival.get("margins") or not len(task_ids):
            return {}
        table_margins = np.asarray(arrival["margins"], dtype=np.float64)
        table_scores = np.asarray(arrival["scores"], dtype=np.float64)
        placed = np.interp(margins(np.asarray(fine_probabilities, dtype=np.float64)), table_margins, table_scores)
        return {int(t): float(s) for t, s in zip(task_ids, placed)}

    def score_arrivals(self, state: ProjectState, model_version: str, task_ids: Sequence[int],
                       fine_probabilities: np.ndarray) -> int:
        """Add the arrivals' scores (``arrival_scores``) to the stored queue of ``model_version``, where the push
        reads them; tasks the queue already ranks keep their scores. Returns how many were added."""
        version, stored = state.priorities()
        if version != model_version:
            return 0
        placed = {t: s for t, s in self.arrival_scores(state, model_version, task_ids, fine_probabilities).items()
                  if t not in stored}
        if placed:
            state.write_priorities(model_version, {**stored, **placed})
        return len(placed)

    # --- parts of after_fit --------------------------------------------------------------------------------------

    def _label_issues(self, ctx: FitContext, rows: np.ndarray, oof: np.ndarray) -> list[dict[str, Any]]:
        fine_names = ctx.labeling.hierarchy.fine_classes
        issues = likely_label_errors(ctx.labels.fine[rows], oof)
        listed = []
        for issue in issues[:TOP_LABEL_ISSUES]:
            task = ctx.tasks[ctx.usable[int(rows[issue.row])]]
            annotation_ids = [a.get("id") for a in task.get("annotations") or []
                              if isinstance(a, Mapping) and not a.get("was_cancelled") and isinstance(a.get("id"), int)]
            listed.append({"task": int(task["id"]), "annotations": annotation_ids, "given": fine_names[issue.given],
                           "suggested": fine_names[issue.suggested], "quality": round(issue.quality, 4)})
        return listed

    def _stop_set(self, ctx: FitContext, record: dict[str, Any], task_ids: list[int]):
        """Stabilizing predictions on a fixed stop set of tasks (chosen at the first fit)."""
        stop_ids = record.get("stop_set")
        if not stop_ids:
            rng = np.random.default_rng(ctx.project_id)
            chosen = rng.permutation(len(task_ids))[:STOP_SET_SIZE]
            stop_ids = sorted(task_ids[i] for i in chosen)
            record["stop_set"] = stop_ids
        row_of = {t: r for r, t in enumerate(task_ids)}
        rows = [row_of[t] for t in stop_ids if t in row_of]
        predicted = ctx.outcome.fine_probabilities[rows].argmax(axis=1) if rows else np.zeros(0, dtype=np.int64)
        history = [h for h in record.get("stop_predictions") or [] if h.get("model_version") != ctx.model_version]
        present = [t for t in stop_ids if t in row_of]
        history.append({"model_version": ctx.model_version,
                        "predictions": {str(t): int(p) for t, p in zip(present, predicted)}})
        history = history[-STOP_HISTORY:]
        record["stop_predictions"] = history
        pairs = []
        for before, after in zip(history[:-1], history[1:]):
            common = sorted(set(before["predictions"]) & set(after["predictions"]))
            pairs.append((np.asarray([before["predictions"][k] for k in common]),
                          np.asarray([after["predictions"][k] for k in common])))
        return stabilizing_predictions(pairs)

    @staticmethod
    def curve_due(record: Mapping[str, Any], n_fine: int) -> bool:
        last = record.get("curve") or {}
        return n_fine >= CURVE_MIN_LABELS and (not last or n_fine >= CURVE_GROWTH * int(last.get("n_labels", 0)))

    def run_curve(self, state: ProjectState, embeddings: np.ndarray, labels: Any, weak: np.ndarray,
                  new_classifier: Callable[[Any], Any], lock: Callable[[], Any]) -> bool:
        """The learning curve of the served version's training setup on the current human labels. The extra fits
        run outside the fit lock (arrivals and the next fit need it); ``lock()`` guards only the write. Whether a
        curve was recorded."""
        from model.finegrained import TrainingConfig

        current = state.current()
        n_fine = int(np.sum(labels.fine != MISSING_LABEL))
        if current is None or not self.curve_due(self.load(state), n_fine):
            return False
        history = state.transition_history()
        transition = np.asarray(history[-1]["matrix"]) if history and history[-1].get("matrix") else None
        config = TrainingConfig.from_dict(current.metrics.get("training_config") or {})
        curve = human_label_curve(new_classifier, config, embeddings, labels.fine, weak, transition,
                                  labels.human_coarse, seed=state.project_id)
        law = fit_inverse_power_law(curve.sizes, curve.accuracy, curve.standard_error)
        with lock():
            record = self.load(state)
            record["curve"] = {**curve.to_dict(), "n_labels": n_fine, "model_version": current.model_version}
            record["curve_fit"] = None if law is None else law.to_dict()
            n_now = int((record.get("ledger") or {}).get("human_fine", n_fine))
            record["stopping"] = self._stopping(record, n_now, (record.get("stopping") or {}).get("stabilizing"))
            self.save(state, record)
        logger.info("project %s: learning curve on %d human labels: %s", state.project_id, n_fine,
                    record["stopping"]["suggestion"]["text"])
        return True

    @staticmethod
    def _stopping(record: Mapping[str, Any], n_fine: int, stabilizing: Mapping[str, Any] | None) -> dict[str, Any]:
        """The suggestion from the last curve's fit at ``n_fine`` labels, and the stabilizing-predictions check."""
        from model.assistant.stopping import StabilizingPredictions

        law_data = record.get("curve_fit")
        law = InversePowerLaw(law_data["a"], law_data["b"], law_data["c"]) if law_data else None
        stop = None
        if stabilizing:
            stop = StabilizingPredictions(list(stabilizing.get("kappas") or []), int(stabilizing["window"]),
                                          float(stabilizing["threshold"]))
        suggestion = suggest_stopping(law, n_fine, stabilizing=stop)
        return {"suggestion": suggestion.to_dict(), "stabilizing": None if stop is None else stop.to_dict()}

    def _ledger(self, ctx: FitContext, n_fine: int, newly_accepted: int) -> dict[str, Any]:
        n_coarse = int(np.sum(ctx.labels.human_coarse != MISSING_LABEL))
        n_vlm = int(np.sum(ctx.outcome.weak_for_training != MISSING_LABEL))
        n_auto = len(ctx.auto_accepted) + newly_accepted
        cost = {"human_fine": n_fine * self.config.cost_full, "human_coarse": n_coarse * self.config.cost_full,
                "vlm": round(n_vlm * self.config.cost_weak, 4), "auto_accepted": 0.0}
        return {"human_fine": n_fine, "human_coarse": n_coarse, "vlm": n_vlm, "auto_accepted": n_auto,
                "cost": cost, "cost_total": round(sum(cost.values()), 4),
                "cost_units": "COST_FULL per human annotation, COST_WEAK per VLM label"}

    def _class_balance(self, ctx: FitContext, unlabeled_rows: np.ndarray) -> dict[str, Any]:
        names = list(ctx.labeling.hierarchy.fine_classes)
        fine = ctx.labels.fine[ctx.labels.fine != MISSING_LABEL]
        human = np.bincount(fine, minlength=len(names))
        predicted = np.bincount(ctx.outcome.fine_probabilities[unlabeled_rows].argmax(axis=1), minlength=len(names)) \
            if unlabeled_rows.size else np.zeros(len(names), dtype=np.int64)
        return {"classes": names, "human": human.tolist(), "pool_predicted": predicted.tolist()}

    def _audits_first(self, scores: dict[int, float], pending: set[int]) -> None:
        audits = sorted(t for t in pending if t in scores)
        for task_id in scores:
            scores[task_id] = AUDIT_SCORE_SPAN + (1.0 - AUDIT_SCORE_SPAN) * scores[task_id]
        for order, task_id in enumerate(audits):
            scores[task_id] = AUDIT_SCORE_SPAN * order / max(len(audits), 1)

    def _arrival_table(self, ctx: FitContext, scores: Mapping[int, float], unlabeled_rows: np.ndarray
                       ) -> dict[str, Any]:
        """(margin, queue score) of the ranked, unplanned unlabeled tasks, ascending margin: where a new task fits."""
        from backend.training import SELECTED_SCORE_SPAN

        floor = AUDIT_SCORE_SPAN + (1.0 - AUDIT_SCORE_SPAN) * SELECTED_SCORE_SPAN
        rows = [r for r in unlabeled_rows
                if scores.get(int(ctx.tasks[ctx.usable[r]]["id"]), -1.0) >= floor]
        if not rows:
            return {"model_version": ctx.model_version, "margins": [], "scores": []}
        row_margins = margins(ctx.outcome.fine_probabilities[rows])
        row_scores = np.asarray([scores[int(ctx.tasks[ctx.usable[r]]["id"])] for r in rows])
        order = np.argsort(row_margins, kind="stable")
        if order.size > ARRIVAL_POINTS:
            order = order[np.linspace(0, order.size - 1, ARRIVAL_POINTS).astype(np.int64)]
        # The queue orders by margin, so the scores rise with it; np.maximum.accumulate keeps interp monotone.
        return {"model_version": ctx.model_version, "margins": [round(float(m), 6) for m in row_margins[order]],
                "scores": [round(float(s), 6) for s in np.maximum.accumulate(row_scores[order])]}

    # --- Label Studio side -----------------------------------------------------------------------------------------

    def _auto_user(self, sdk: Any, record: dict[str, Any]) -> int:
        """The dedicated user's id: found by e-mail among the organization's users, else created."""
        email = self.config.auto_accept_user
        for user in sdk.users.list():
            if getattr(user, "email", None) == email and isinstance(getattr(user, "id", None), int):
                record["auto_user_id"] = int(user.id)
                return int(user.id)
        user = sdk.users.create(username=email.split("@")[0][:30], email=email, first_name="Auto-accept",
                                last_name="(vlm-al)")
        record["auto_user_id"] = int(user.id)
        logger.info("created the Label Studio user %s (id %s) for auto-accepted annotations", email, user.id)
        return int(user.id)

    def _label_errors_tab(self, sdk: Any, project_id: int, issues: Sequence[Mapping[str, Any]]) -> int | None:
        """A Data Manager tab filtered to the flagged annotations (Annotation IDs contain the list); its id."""
        annotation_ids = [str(a) for issue in issues for a in issue.get("annotations") or []]
        try:
            views = sdk.views.list(project=int(project_id))
            existing = next((v for v in views if isinstance(getattr(v, "data", None), dict)
                             and v.data.get("title") == LABEL_ERRORS_TAB_TITLE), None)
            if not annotation_ids and existing is None:
                return None
            data = {"title": LABEL_ERRORS_TAB_TITLE, "type": "list", "target": "tasks",
                    "filters": {"conjunction": "and", "items": [
                        {"filter": "filter:tasks:annotations_ids", "operator": "contains", "type": "String",
                         "value": " ".join(annotation_ids) or "0"}]}}
            if existing is None:
                return int(sdk.views.create(project=int(project_id), data=data).id)
            sdk.views.update(id=int(existing.id), project=int(project_id), data={**existing.data, **data})
            return int(existing.id)
        except Exception as exc:
            logger.warning("project %s: could not update the %r tab: %s", project_id, LABEL_ERRORS_TAB_TITLE, exc)
            return None

