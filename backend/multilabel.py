"""Multi-label projects (``LabelLayout.MULTI_LABEL``): label sets read back, the multi-label round, predictions.

A ``<Choices choice="multiple">`` over the image makes every annotation a set of labels; an empty set (submitted
with nothing ticked) is a valid "none of these". The service's index, fit and predict hand such projects to
``MultiLabelProjects``, which runs ``model.multilabel.MultiLabelLearner`` on the frozen backbone's spatial maps
(cached per image content under ``MODEL_DIR/spatial-maps``) and the weak annotator's per-label scores (its answers
over the labels, stored by the feature extractor like any project's). Checkpoints, versions, priorities and pushes
use the project's ``ProjectState`` as single-label projects do.

Pre-ticking: a label is ticked where the model's P(present) reaches that label's calibrated threshold, the lowest
probability whose out-of-fold precision on human label sets (95% Wilson lower bound, at least 10 predictions)
reaches ``SUGGESTION_PRECISION``; a label without one is never ticked. Every label's probability is in the
prediction (the result's ``meta``, and the ``model_confidence`` text area where the config has one).
"""

from __future__ import annotations

import io
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backend.features import FeatureExtractor, TaskFeatures
from backend.label_config import LabelLayout, ProjectLabeling, _annotation_rank
from backend.ls_client import ImageFetchError, LabelStudioAPI, LabelStudioError
from backend.predictions import confidence_control_of
from backend.projects import Projects, schema_hash
from backend.state import COLD_START_VERSION, ProjectState
from backend.training import cold_start_queue
from model.errors import ModelInputError
from model.io import atomic_write_bytes

logger = logging.getLogger(__name__)

SPATIAL_BACKBONE = "efficientnet_lite0"
"""The spatial maps come from the packaged efficientnet_lite0 whatever BACKBONE is (the label attention reads
its 7×7 map at 224 px)."""
MAP_CHUNK = 16


def is_multilabel(labeling: ProjectLabeling) -> bool:
    return labeling.layout is LabelLayout.MULTI_LABEL


# ---- annotations ------------------------------------------------------------------------------------------------


def annotation_label_set(labeling: ProjectLabeling, annotation: Mapping[str, Any]) -> frozenset[str] | None:
    """The labels one annotation ticks (empty: "none of these"), or None when it is cancelled or unreadable.

    Result items of other controls are ignored. An unchanged pre-ticked set counts as the annotator's: submitting
    it is vouching for every label in it (unticking is one click)."""
    if not isinstance(annotation, Mapping) or annotation.get("was_cancelled"):
        return None
    result = annotation.get("result") or []
    if not isinstance(result, list):
        logger.warning("skipping annotation %s: 'result' is not a list", annotation.get("id"))
        return None
    labels = set(labeling.hierarchy.coarse_classes)
    ticked: set[str] = set()
    for item in result:
        if not isinstance(item, Mapping):
            logger.warning("skipping annotation %s: a result item is not a JSON object", annotation.get("id"))
            return None
        if item.get("from_name") != labeling.fine_control:
            continue
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, Mapping) else None
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            logger.warning("skipping annotation %s: malformed value.choices %r", annotation.get("id"), value)
            return None
        unknown = sorted(set(choices) - labels)
        if unknown:
            logger.warning("skipping annotation %s: unknown labels %s in <Choices name=\"%s\">",
                           annotation.get("id"), unknown, labeling.fine_control)
            return None
        ticked.update(choices)
    return frozenset(ticked)


def task_label_set(labeling: ProjectLabeling, task: Mapping[str, Any]) -> frozenset[str] | None:
    """The label set that counts for a task: ground truth first, then the most recently updated annotation that
    can be read; None when no annotation gives one."""
    annotations = task.get("annotations") if isinstance(task, Mapping) else None
    if not isinstance(annotations, list):
        return None
    readable = [a for a in annotations if isinstance(a, Mapping) and not a.get("was_cancelled")]
    for annotation in sorted(readable, key=_annotation_rank, reverse=True):
        labels = annotation_label_set(labeling, annotation)
        if labels is not None:
            return labels
    return None


# ---- predictions --------------------------------------------------------------------------------------------


def build_multilabel_prediction(labeling: ProjectLabeling, label_probabilities: np.ndarray,
                                pretick: Sequence[float | None], queue_score: float, model_version: str,
                                ) -> dict[str, Any]:
    """One prediction: the labels whose probability reaches their pre-tick threshold, ticked in one result with
    every label's probability in its ``meta``, and every label's probability in the ``model_confidence`` text
    area where the config has one; ``score`` is the queue priority (ascending = label first)."""
    names = labeling.hierarchy.coarse_classes
    probabilities = [float(p) for p in np.asarray(label_probabilities, dtype=np.float64)]
    if len(probabilities) != len(names) or len(pretick) != len(names):
        raise ValueError(f"need one probability and one threshold per label ({len(names)})")
    ticked = [name for name, p, t in zip(names, probabilities, pretick) if t is not None and p >= t]
    label_scores = {name: round(p, 4) for name, p in zip(names, probabilities)}
    result: list[dict[str, Any]] = []
    if ticked:  # a prediction never ticks an empty set: "none of these" stays the annotator's call
        result.append({
            "from_name": labeling.fine_control, "to_name": labeling.image_name, "type": "choices",
            "value": {"choices": ticked}, "score": round(float(np.mean([label_scores[n] for n in ticked])), 4),
            "meta": {"label_scores": label_scores},
        })
    confidence = confidence_control_of(labeling)
    if confidence is not None:
        shown = " · ".join(f"{name} {p:.0%}{' (pre-ticked)' if name in ticked else ''}"
                           for name, p in sorted(zip(names, probabilities), key=lambda x: -x[1]))
        result.append({"from_name": confidence, "to_name": labeling.image_name, "type": "textarea",
                       "value": {"text": [f"Model: {shown}. Queue score {queue_score:.2f}: lower = label sooner."]}})
    return {"result": result, "score": float(queue_score), "model_version": model_version}


# ---- the service part -------------------------------------------------------------------------------------------


class ArrayCache:
    """One array per image content key, one .npy each (written atomically), of a fixed rank and dtype."""

    def __init__(self, directory: Path, ndim: int, dtype: Any) -> None:
        self.directory = Path(directory)
        self.ndim = ndim
        self.dtype = dtype

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        try:
            array = np.load(self._path(key), allow_pickle=False)
        except (OSError, ValueError):
            return None
        return array if array.ndim == self.ndim else None

    def put(self, key: str, array: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(array, dtype=self.dtype), allow_pickle=False)
        atomic_write_bytes(self._path(key), buffer.getvalue())


class MultiLabelProjects:
    """Index, fit and predict for multi-label projects (see the module docstring)."""

    def __init__(self, config: Any, projects: Projects, extractor: FeatureExtractor, decode: Callable[[bytes], Any],
                 metrics: Any, *, spatial_maps: Callable[[list[Any]], np.ndarray] | None = None,
                 text_embeddings: Callable[[Sequence[str]], np.ndarray] | None = None) -> None:
        self.config = config
        self.projects = projects
        self.extractor = extractor
        self.decode = decode
        self.metrics = metrics
        self.maps = ArrayCache(Path(config.model_dir) / "spatial-maps", 3, np.float16)
        """float16 (h, w, d) spatial maps by image content."""
        self._spatial_maps = spatial_maps or _packaged_spatial_maps
        self._text_embeddings = text_embeddings or _packaged_text_embeddings
        self._served: dict[int, tuple[str, Any]] = {}
        self._lock = threading.Lock()

    # -- inputs ---------------------------------------------------------------------------------------------

    def _label_text(self, labeling: ProjectLabeling) -> np.ndarray:
        return np.asarray(self._text_embeddings(labeling.hierarchy.coarse_classes), dtype=np.float32)

    def _list_scorer(self, labeling: ProjectLabeling) -> tuple[Any, ArrayCache] | None:
        """The project's weak annotator when it must be asked per image for its per-label scores (the API VLM's
        list question), with the cache of its answers. An annotator that reads the shared forward pass (semantic,
        open_clip) already stored its per-label scores as its answers: None."""
        from backend.features import weak_namespace

        annotator = self.extractor.weak_annotators.for_hierarchy(labeling.hierarchy)
        if annotator is None or not hasattr(annotator, "score_labels"):
            return None
        if hasattr(annotator, "annotate_logits") or hasattr(annotator, "annotate_embeddings"):
            return None
        folder = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{weak_namespace(annotator)}-labels")
        return annotator, ArrayCache(Path(self.config.model_dir) / "label-scores" / folder, 1, np.float32)

    def spatial_maps(self, labeling: ProjectLabeling, tasks: Sequence[Mapping[str, Any]], features: TaskFeatures,
                     positions: Sequence[int], client: LabelStudioAPI | None) -> dict[int, np.ndarray]:
        """Maps of the tasks at ``positions`` (cache first; the missing images are downloaded and embedded when a
        client is given, and asked to a list-scoring annotator in the same pass). Positions whose image cannot be
        had are left out."""
        scorer = self._list_scorer(labeling)
        found: dict[int, np.ndarray] = {}
        missing: list[int] = []
        for position in positions:
            key = features.keys[position]
            if not key:
                continue
            cached = self.maps.get(key)
            if cached is not None:
                found[position] = cached
            if cached is None or (scorer is not None and scorer[1].get(key) is None):
                missing.append(position)
        if not missing or client is None:
            return found
        for start in range(0, len(missing), MAP_CHUNK):
            chunk, images = [], []
            for position in missing[start : start + MAP_CHUNK]:
                image = self._image(client, tasks[position], labeling.image_value_key)
                if image is not None:
                    chunk.append(position)
                    images.append(image)
            if not images:
                continue
            need_maps = [row for row, position in enumerate(chunk) if position not in found]
            if need_maps:
                computed = np.asarray(self._spatial_maps([images[row] for row in need_maps]), dtype=np.float16)
                for index, row in enumerate(need_maps):
                    self.maps.put(features.keys[chunk[row]], computed[index])  # type: ignore[arg-type]
                    found[chunk[row]] = computed[index]
            if scorer is not None:
                answers = np.asarray(scorer[0].score_labels(images), dtype=np.float32)
                for row, position in enumerate(chunk):
                    scorer[1].put(features.keys[position], answers[row])  # type: ignore[arg-type]
        return found

    def weak_scores(self, labeling: ProjectLabeling, features: TaskFeatures, positions: Sequence[int]) -> np.ndarray:
        """float64 (n, L): the weak annotator's per-label scores in the project's label order, NaN rows where it
        gave no answer (a list answer of "none" is a row of zeros, an answer like any other)."""
        n_labels = labeling.hierarchy.n_coarse
        scorer = self._list_scorer(labeling)
        if scorer is not None:
            rows = [scorer[1].get(features.keys[p]) for p in positions]  # type: ignore[arg-type]
            order = [list(scorer[0].coarse_classes).index(name) for name in labeling.hierarchy.coarse_classes]
            return np.array([np.asarray(r, dtype=np.float64)[order] if r is not None else np.full(n_labels, np.nan)
                             for r in rows]).reshape(len(positions), n_labels)
        weak = features.weak_matrix(list(positions), labeling.hierarchy).astype(np.float64)
        weak[weak.sum(axis=1) <= 0] = np.nan  # an all-zero row is the extractor's "no answer"
        return weak

    def _image(self, client: LabelStudioAPI, task: Mapping[str, Any], image_value_key: str) -> Any:
        """The task's decoded image (the feature extractor has already checked its URL), or None."""
        data = task.get("data")
        url = data.get(image_value_key) if isinstance(data, Mapping) else None
        try:
            return self.decode(client.download_image(str(url).strip(), task_id=task.get("id")))
        except (ImageFetchError, LabelStudioError, ModelInputError, OSError, ValueError) as exc:
            logger.warning("task %s: no spatial map: %s", task.get("id"), exc)
            return None

    # -- the served model -----------------------------------------------------------------------------------

    def served(self, project_id: int, labeling: ProjectLabeling) -> tuple[Any, str, Mapping[str, Any]]:
        """(classifier or None, model_version, the version's metrics); reloads when another process moved it."""
        from model.multilabel import MultiLabelClassifier

        current = self.projects.state(project_id).current()
        if current is None:
            return None, COLD_START_VERSION, {}
        with self._lock:
            version, classifier = self._served.get(project_id, (None, None))
            if version != current.model_version:
                try:
                    classifier = MultiLabelClassifier.load(
                        self.projects.state(project_id).version_dir(current.model_version))
                except ModelInputError as exc:
                    logger.warning("project %s: cannot load multi-label model %s: %s", project_id,
                                   current.model_version, exc)
                    classifier = None
                self._served[project_id] = (current.model_version, classifier)
        if classifier is not None and classifier.label_names != labeling.hierarchy.coarse_classes:
            return None, current.model_version, {}  # the labels changed since it was trained
        return classifier, current.model_version, current.metrics

    def _pretick(self, metrics: Mapping[str, Any], n_labels: int) -> list[float | None]:
        thresholds = metrics.get("pretick_thresholds") if isinstance(metrics, Mapping) else None
        if not isinstance(thresholds, list) or len(thresholds) != n_labels:
            return [None] * n_labels
        return [None if t is None else float(t) for t in thresholds]

    def predictions(self, project_id: int | None, tasks: Sequence[Mapping[str, Any]], labeling: ProjectLabeling,
                    features: TaskFeatures, client: LabelStudioAPI | None,
                    queue_scores: Mapping[int, float] | None = None) -> tuple[list[dict[str, Any]], str]:
        """One prediction per task (empty where its image is unusable) and the version that made them."""
        n_labels = labeling.hierarchy.n_coarse
        classifier, version, metrics = (None, COLD_START_VERSION, {}) if project_id is None else self.served(
            project_id, labeling)
        if queue_scores is None and project_id is not None:
            stored_version, stored = self.projects.state(project_id).priorities()
            queue_scores = stored if stored_version == version else {}
        usable = features.usable_positions()
        if classifier is not None:
            maps = self.spatial_maps(labeling, tasks, features, usable, client)
            ready = [p for p in usable if p in maps]
            probabilities = (classifier.predict_proba(np.stack([maps[p] for p in ready])) if ready
                             else np.zeros((0, n_labels)))
        else:
            # Before the first model: the weak annotator's per-label scores, shown but never pre-ticked.
            ready = usable
            probabilities = np.nan_to_num(self.weak_scores(labeling, features, ready), nan=0.0)
        pretick = self._pretick(metrics, n_labels) if classifier is not None else [None] * n_labels
        out: list[dict[str, Any]] = [{"result": [], "model_version": version} for _ in tasks]
        for row, position in enumerate(ready):
            task_id = tasks[position].get("id")
            score = (queue_scores or {}).get(int(task_id), 1.0) if isinstance(task_id, int) else 1.0
            out[position] = build_multilabel_prediction(labeling, probabilities[row], pretick, score, version)
        return out, version

    # -- background jobs ------------------------------------------------------------------------------------

    def push(self, project_id: int, client: LabelStudioAPI, tasks: Sequence[Mapping[str, Any]],
             positions: Sequence[int], labeling: ProjectLabeling, features: TaskFeatures,
             queue_scores: Mapping[int, float] | None, replace: bool = False) -> int:
        """Push the predictions of the tasks at ``positions`` and move the project's model_version to them."""
        subset = [tasks[i] for i in positions]
        predictions, version = self.predictions(project_id, subset, labeling, features.subset(list(positions)), client,
                                                queue_scores)
        payload = [{"task": int(t["id"]), **p} for t, p in zip(subset, predictions) if p["result"]]
        created = client.import_predictions(project_id, payload)
        self.metrics.predictions_pushed.inc(created)
        state = self.projects.state(project_id)
        state.record_pushed(version, [p["task"] for p in payload], replace=replace)
        if created > 0:  # Label Studio refuses a model_version that no prediction carries
            client.set_model_version(project_id, version)
            state.record_label_studio_versions(pushed=[version])
        logger.info("project %s: pushed %d/%d multi-label predictions of %s", project_id, created, len(payload),
                    version)
        return created

    def index(self, project_id: int, client: LabelStudioAPI, labeling: ProjectLabeling, label_config: str) -> None:
        """Features and maps of every task; at cold start, a diverse queue from the weak per-label scores."""
        tasks = client.fetch_tasks(project_id)
        features = self.extractor.features(project_id, tasks, labeling, client)
        self.spatial_maps(labeling, tasks, features, features.usable_positions(), client)
        self.projects.context(project_id).indexed_schema = schema_hash(label_config)
        if not self.config.push_predictions:
            return
        state = self.projects.state(project_id)
        _, version, _ = self.served(project_id, labeling)
        unlabeled = [i for i in features.usable_positions() if task_label_set(labeling, tasks[i]) is None]
        if not unlabeled:
            return
        queue_scores = None
        if version == COLD_START_VERSION and state.priorities()[0] != COLD_START_VERSION:
            weak = np.nan_to_num(self.weak_scores(labeling, features, unlabeled), nan=0.0)
            scores = cold_start_queue(features.embedding_matrix(unlabeled), weak, labeling.hierarchy,
                                      self.config.query_batch_size)
            queue_scores = {int(tasks[i]["id"]): float(s) for i, s in zip(unlabeled, scores)}
            state.write_priorities(COLD_START_VERSION, queue_scores)
        already = state.pushed_tasks(version)
        to_push = [i for i in unlabeled if tasks[i]["id"] not in already]
        if to_push:
            self.push(project_id, client, tasks, to_push, labeling, features, queue_scores)

    def fit(self, project_id: int, state: ProjectState, client: LabelStudioAPI, labeling: ProjectLabeling,
            label_config: str) -> str | None:
        """Retrain on every label set, calibrate thresholds and noise, save a version, re-rank and push."""
        from model.multilabel import MultiLabelLearner, MultiLabelRoundLabels, MultiLabelSettings
        from model.query import LabelCosts

        tasks = client.fetch_tasks(project_id)
        features = self.extractor.features(project_id, tasks, labeling, client)
        maps = self.spatial_maps(labeling, tasks, features, features.usable_positions(), client)
        usable = [p for p in features.usable_positions() if p in maps]
        sets = [task_label_set(labeling, tasks[p]) for p in usable]
        labelled = np.array([s is not None for s in sets], dtype=bool)
        if not labelled.any():
            logger.info("project %s: no label sets yet; the cold-start queue stays", project_id)
            return None
        names = labeling.hierarchy.coarse_classes
        human_sets = np.array([[s is not None and name in s for name in names] for s in sets], dtype=bool)
        weak = self.weak_scores(labeling, features, usable)
        answered = np.all(np.isfinite(weak), axis=1)
        settings = MultiLabelSettings(strategy="multilabel-ours", strategy_options={"human_share": 1.0})
        learner = MultiLabelLearner(names, self._label_text(labeling), np.stack([maps[p] for p in usable]), settings)
        labels = MultiLabelRoundLabels(human_sets, labelled, weak if answered.any() else None, answered)
        model = learner.train(labels)
        pretick = learner.pretick_thresholds(labels, self.config.suggestion_precision)
        pool = learner.pool(labels, model)
        selections = learner.query(pool, float(self.config.query_batch_size),
                                   LabelCosts(self.config.cost_full, self.config.cost_weak), np.random.default_rng(0))
        ranks = learner.rank(pool, selections)
        scores = {int(tasks[usable[row]]["id"]): float(ranks[row]) for row in np.flatnonzero(~labelled)}
        version = state.next_version()
        state.write_priorities(version, scores)
        metrics = {
            "task": "multilabel", "n_tasks": len(tasks), "n_labelled": int(labelled.sum()),
            "n_weak": int(answered.sum()), "labels": list(names),
            "pretick_thresholds": [t.threshold for t in pretick],
            "pretick": [t.to_dict() for t in pretick],
            "weak_thresholds": None if model.thresholds is None else model.thresholds.to_dict(),
            "transitions": None if model.transitions is None else model.transitions.to_dict(),
        }
        state.commit_version(version, model.classifier.save, schema_hash(label_config), metrics)
        with self._lock:
            self._served[project_id] = (version, model.classifier)
        unlabeled = [usable[row] for row in np.flatnonzero(~labelled)]
        if self.config.push_predictions and unlabeled:
            self.push(project_id, client, tasks, unlabeled, labeling, features, scores, replace=True)
        logger.info("project %s: multi-label fit -> %s (%d label sets, %d weak answers)", project_id, version,
                    int(labelled.sum()), int(answered.sum()))
        return version


def _packaged_spatial_maps(images: list[Any]) -> np.ndarray:
    from model.spatial_features import image_spatial_features

    return image_spatial_features(images, SPATIAL_BACKBONE)


_TEXT_ENCODER: list[Any] = []


def _packaged_text_embeddings(names: Sequence[str]) -> np.ndarray:
    """MiniLM prompt-ensemble embeddings of the label names (the packaged encoder, loaded once)."""
    from model.weak.semantic_zeroshot import PROMPT_TEMPLATES, prompt_embedding, readable
    from model.weak.text_encoder import packaged_minilm

    if not _TEXT_ENCODER:
        _TEXT_ENCODER.append(packaged_minilm())
    return np.stack([prompt_embedding(_TEXT_ENCODER[0], [readable(n)], PROMPT_TEMPLATES) for n in names])


__all__ = ["MultiLabelProjects", "annotation_label_set", "build_multilabel_prediction", "is_multilabel",
           "task_label_set"]
