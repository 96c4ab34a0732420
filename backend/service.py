"""The ML backend behind the HTTP layer: predict from cached embeddings, fit in the background, push the queue."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backend.config import Config, SecretRedactingFilter
from backend.jobs import JobRunner, ThreadJobRunner, project_lock
from backend.label_config import LabelConfigError, ProjectLabeling, build_prediction, parse_label_config, task_labels
from backend.ls_client import ImageFetchError, LabelStudioAPI, LabelStudioClientFactory, LabelStudioError
from backend.metrics import BackendMetrics
from backend.state import COLD_START_VERSION, ImageKeyIndex, ProjectState, version_number
from model.errors import ModelInputError, UnknownClassError
from model.hierarchy import MISSING_LABEL, LabelHierarchy

logger = logging.getLogger(__name__)

FEATURE_CHUNK = 64
"""Images decoded and embedded at a time (bounds memory while indexing a large project)."""
DOWNLOAD_THREADS = 4
MIN_FINE_LABELS_FOR_CV = 9
CV_CANDIDATES = {"weak_loss_weight": [0.25, 0.5, 1.0]}
SELECTED_SCORE_SPAN = 0.05
"""Queue scores below this are reserved for the planned next human labels, in the order they were chosen."""

HANDLED_FIT_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"})


class InvalidInput(ValueError):
    """A request the backend refuses; becomes an HTTP 4xx with this message."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


def parse_project_id(value: Any) -> int:
    """Label Studio sends ``"<id>.<created timestamp>"`` in /setup and /predict, an int in webhooks."""
    if isinstance(value, bool):
        raise InvalidInput(f"project must be an id, got {value!r}")
    if isinstance(value, int):
        project_id = value
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if not head.isdigit():
            raise InvalidInput(f"project must look like '<id>' or '<id>.<timestamp>', got {value!r}")
        project_id = int(head)
    elif isinstance(value, Mapping) and "id" in value:
        return parse_project_id(value["id"])
    else:
        raise InvalidInput(f"project must be an id, got {type(value).__name__}")
    if project_id < 0:
        raise InvalidInput(f"project id must be >= 0, got {project_id}")
    return project_id


def schema_hash(label_config: str) -> str:
    return hashlib.sha256(label_config.encode("utf-8")).hexdigest()[:16]


# --- component protocols (the model library implements them; tests inject small fakes) ------------------------


class Backbone(Protocol):
    name: str
    dim: int

    def embed(self, images: Sequence[Any]) -> np.ndarray: ...


class WeakAnnotator(Protocol):
    name: str
    coarse_classes: Sequence[str]
    cost_per_label: float

    def annotate(self, images: Sequence[Any]) -> Any: ...


class EmbeddingStoreLike(Protocol):
    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, np.ndarray]: ...

    def put_many(self, namespace: str, vectors: Mapping[str, np.ndarray]) -> None: ...


@dataclass(frozen=True)
class ImageCodec:
    """Turns downloaded bytes into a content key and a decoded RGB image (model.images / embedding_store)."""

    content_key: Callable[[bytes], str]
    decode: Callable[[bytes], Any]


@dataclass
class ProjectContext:
    project_id: int
    hostname: str | None = None
    access_token: str | None = None
    label_config: str | None = None
    model_version: str | None = None
    model: Any = None
    indexed_schema: str | None = None
    """Hash of the label config this process last indexed the project with (/setup comes often)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class TaskFeatures:
    """Per task position: content key or the error that made the task unusable."""

    keys: list[str | None]
    errors: dict[int, str]
    embeddings: dict[str, np.ndarray]
    weak_probabilities: dict[str, np.ndarray]
    """In the weak annotator's own class order."""


class MLBackend:
    """Active-learning backend for Label Studio projects. Thread-safe; heavy work runs on ``jobs``."""

    def __init__(
        self,
        config: Config,
        *,
        backbone: Backbone,
        weak_annotator: WeakAnnotator | None,
        embedding_store: EmbeddingStoreLike,
        image_codec: ImageCodec,
        ls_clients: Callable[[str | None, str | None], LabelStudioAPI],
        jobs: JobRunner | None = None,
        image_index: ImageKeyIndex | None = None,
        metrics: BackendMetrics | None = None,
        redactor: SecretRedactingFilter | None = None,
        classifier_factory: Callable[..., Any] | None = None,
        classifier_loader: Callable[[Path, LabelHierarchy], Any] | None = None,
    ) -> None:
        self.config = config
        self.backbone = backbone
        self.weak_annotator = weak_annotator
        self.store = embedding_store
        self.codec = image_codec
        self.ls_clients = ls_clients
        self.metrics = metrics or BackendMetrics()
        self.jobs = jobs or ThreadJobRunner(config.fit_debounce_seconds, on_finish=self._job_finished)
        self.image_index = image_index or ImageKeyIndex(Path(config.model_dir) / "image_keys.sqlite")
        self.redactor = redactor
        self._classifier_factory = classifier_factory
        self._classifier_loader = classifier_loader
        self._projects: dict[int, ProjectContext] = {}
        self._projects_lock = threading.Lock()
        self._states: dict[int, ProjectState] = {}
        self._labelings: OrderedDict[str, ProjectLabeling] = OrderedDict()
        self._labelings_lock = threading.Lock()
        self._parent_map = _read_parent_map(config.parent_map_file)
        self._downloads = ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="vlm-al-download")
        self.weak_namespace = f"weak:{weak_annotator.name}" if weak_annotator is not None else None
        shares_backbone = weak_annotator is not None and getattr(weak_annotator, "backbone", None) is backbone
        self._weak_from_logits = (
            shares_backbone and hasattr(backbone, "embed_and_logits") and hasattr(weak_annotator, "annotate_logits")
        )
        self._weak_from_embeddings = shares_backbone and hasattr(weak_annotator, "annotate_embeddings")

    # --- construction from the environment --------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Config, redactor: SecretRedactingFilter | None = None) -> MLBackend:
        """Load the backbone and the weak annotator now (server start-up), never inside a request."""
        components = build_components(config)
        backend = cls(
            config,
            backbone=components.backbone,
            weak_annotator=components.weak_annotator,
            embedding_store=components.embedding_store,
            image_codec=components.image_codec,
            ls_clients=LabelStudioClientFactory(
                download_root=Path(config.model_dir) / "downloads",
                max_image_bytes=config.max_image_bytes,
                default_url=config.label_studio_url,
                default_api_key=config.label_studio_api_key,
            ),
            redactor=redactor,
        )
        backend.warm_start()
        return backend

    def warm_start(self) -> None:
        """Load the current model of every project on disk, so the first request after a restart is served."""
        projects_dir = Path(self.config.model_dir) / "projects"
        if not projects_dir.is_dir():
            return
        for path in sorted(projects_dir.iterdir()):
            if path.is_dir() and path.name.isdigit():
                try:
                    self._served_model(int(path.name), None)
                except Exception:
                    logger.exception("project %s: cannot load its current model", path.name)

    # --- small helpers ----------------------------------------------------------------------------------------

    def _context(self, project_id: int) -> ProjectContext:
        with self._projects_lock:
            ctx = self._projects.get(project_id)
            if ctx is None:
                ctx = ProjectContext(project_id)
                self._projects[project_id] = ctx
            return ctx

    def state(self, project_id: int) -> ProjectState:
        """One ProjectState per project, so its parsed pointer and priorities stay cached between requests."""
        with self._projects_lock:
            state = self._states.get(project_id)
            if state is None:
                state = self._states[project_id] = ProjectState(Path(self.config.model_dir), project_id)
            return state

    def labeling(self, label_config: str) -> ProjectLabeling:
        """Parse (and cache by content) a label config; unusable ones raise InvalidInput 422 naming the problem."""
        digest = schema_hash(label_config)
        with self._labelings_lock:
            cached = self._labelings.get(digest)
            if cached is not None:
                self._labelings.move_to_end(digest)
                return cached
        try:
            parsed = parse_label_config(
                label_config, parent_map=self._parent_map, coarse_level=self.config.taxonomy_coarse_level
            )
        except (LabelConfigError, ModelInputError) as exc:
            raise InvalidInput(f"unsupported label config: {exc}", status=422, kind="unsupported_label_config") from exc
        with self._labelings_lock:
            self._labelings[digest] = parsed
            while len(self._labelings) > 64:
                self._labelings.popitem(last=False)
        return parsed

    def _client(self, project_id: int) -> LabelStudioAPI:
        ctx = self._context(project_id)
        return self.ls_clients(ctx.hostname, ctx.access_token)

    def current_model_version(self, project_id: int | None) -> str:
        if project_id is None:
            return COLD_START_VERSION
        current = self.state(project_id).current()
        return current.model_version if current is not None else COLD_START_VERSION

    def _served_model(self, project_id: int, labeling: ProjectLabeling | None) -> tuple[Any, str]:
        """(fine classifier or None, model_version); reloads when another process moved current.json."""
        current = self.state(project_id).current()
        if current is None:
            return None, COLD_START_VERSION
        ctx = self._context(project_id)
        with ctx.lock:
            if ctx.model_version != current.model_version:
                ctx.model = self._load_classifier(project_id, current.model_version)
                ctx.model_version = current.model_version
            model = ctx.model
        if model is not None and labeling is not None and model.hierarchy != labeling.hierarchy:
            # The label config changed since this model was trained; its classes no longer match.
            return None, current.model_version
        return model, current.model_version

    def _load_classifier(self, project_id: int, model_version: str) -> Any:
        directory = self.state(project_id).version_dir(model_version)
        try:
            if self._classifier_loader is not None:
                return self._classifier_loader(directory, None)
            from model.finegrained import FineGrainedClassifier

            return FineGrainedClassifier.load(directory)
        except Exception:
            logger.exception("project %s: cannot load model %s", project_id, model_version)
            return None

    def _new_classifier(self, hierarchy: LabelHierarchy, dim: int, training_config: Any) -> Any:
        if self._classifier_factory is not None:
            return self._classifier_factory(hierarchy, dim, training_config)
        from model.finegrained import FineGrainedClassifier

        return FineGrainedClassifier(hierarchy, dim, training_config)

    def _job_finished(self, key: str, error: BaseException | None, seconds: float) -> None:
        kind = key.split(":", 1)[0]
        self.metrics.job_seconds.labels(kind=kind).observe(seconds)
        if error is not None:
            self.metrics.jobs_failed.labels(kind=kind).inc()

    # --- HTTP-facing operations -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """From memory only: Label Studio gives /health one second."""
        with self._projects_lock:
            loaded = {pid: ctx.model_version for pid, ctx in self._projects.items() if ctx.model_version}
        newest = max(loaded.values(), key=lambda v: version_number(v) or 0, default=COLD_START_VERSION)
        return {
            "status": "UP",
            "model_class": type(self).__name__,
            "model_version": newest,
            "model_versions": {str(pid): version for pid, version in sorted(loaded.items())},
            "backbone": self.backbone.name,
            "weak_annotator": self.weak_annotator.name if self.weak_annotator is not None else None,
        }

    def setup(self, project_id: int, schema: str | None, hostname: str | None, access_token: str | None) -> str:
        """Remember how to reach Label Studio, check the config, queue indexing; answer in milliseconds."""
        if access_token and self.redactor is not None:
            self.redactor.add_secrets([access_token])
        labeling = self.labeling(schema) if schema is not None else None
        ctx = self._context(project_id)
        with ctx.lock:
            ctx.hostname = hostname or ctx.hostname
            ctx.access_token = access_token or ctx.access_token
            if schema:
                ctx.label_config = schema
        _, model_version = self._served_model(project_id, labeling)
        # Label Studio calls /setup on most reads of the ML backend; index once per config, then on TASKS_CREATED.
        if schema and ctx.indexed_schema != schema_hash(schema) and self._can_reach_label_studio(project_id):
            self.queue_index(project_id)
        return model_version

    def _can_reach_label_studio(self, project_id: int) -> bool:
        try:
            self._client(project_id)
            return True
        except LabelStudioError as exc:
            logger.warning("project %s: no background indexing: %s", project_id, exc)
            return False

    def predict(
        self, project_id: int | None, tasks: Sequence[Mapping[str, Any]], label_config: str | None
    ) -> tuple[list[dict[str, Any]], str]:
        """One prediction per task, in the same order. A task whose image is unusable gets an empty prediction;
        if every task fails, the request is refused (422) with the reasons."""
        ctx = self._context(project_id) if project_id is not None else None
        config_xml = label_config if label_config is not None else (ctx.label_config if ctx is not None else None)
        if config_xml is None:
            raise InvalidInput("missing 'label_config' and no /setup was received for this project")
        labeling = self.labeling(config_xml)
        if ctx is not None and label_config:
            ctx.label_config = label_config
        if project_id is None:
            model, model_version = None, COLD_START_VERSION
        else:
            model, model_version = self._served_model(project_id, labeling)
        if not tasks:
            return [], model_version
        features = self.features(project_id if project_id is not None else 0, tasks, labeling)
        if len(features.errors) == len(tasks):
            details = "; ".join(f"task {tasks[i].get('id')}: {features.errors[i]}" for i in sorted(features.errors))
            raise InvalidInput(f"no task image could be used: {details}", status=422, kind="unusable_images")
        predictions = self._predictions(project_id, tasks, labeling, features, model, model_version)
        self.metrics.predictions.inc(len(predictions))
        return predictions, model_version

    def handle_event(self, action: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Webhook events: enqueue only, so Label Studio's 1 s webhook timeout is never hit."""
        if action in HANDLED_FIT_EVENTS or action == "TASKS_CREATED" or action == "PROJECT_UPDATED":
            project_id = parse_project_id(_required_project(data))
        if action in HANDLED_FIT_EVENTS:
            self.queue_fit(project_id)
            outcome = {"status": "queued", "job": f"fit:{project_id}", "action": action}
        elif action == "TASKS_CREATED":
            tasks = data.get("tasks")
            self.queue_index(project_id)
            outcome = {"status": "queued", "job": f"index:{project_id}", "action": action,
                       "tasks": len(tasks) if isinstance(tasks, list) else 0}
        elif action == "PROJECT_UPDATED":
            outcome = {"status": "ok", "action": action, **self._project_updated(project_id, data)}
        else:
            outcome = {"status": "ignored", "action": action, "message": f"action {action!r} is not handled"}
        action_label = action if outcome["status"] != "ignored" else "other"
        self.metrics.webhooks.labels(action=action_label, outcome=outcome["status"]).inc()
        return outcome

    def _project_updated(self, project_id: int, data: Mapping[str, Any]) -> dict[str, Any]:
        project = data.get("project")
        new_config = project.get("label_config") if isinstance(project, Mapping) else None
        ctx = self._context(project_id)
        if not isinstance(new_config, str) or new_config == ctx.label_config:
            return {"label_config_changed": False}
        try:
            self.labeling(new_config)
        except InvalidInput as exc:
            logger.error("project %s: the updated label config is unusable: %s", project_id, exc)
            return {"label_config_changed": True, "usable": False, "message": str(exc)}
        ctx.label_config = new_config
        # The classes may have changed: the next model must be trained on the new ones.
        self.queue_fit(project_id)
        return {"label_config_changed": True, "usable": True, "job": f"fit:{project_id}"}

    def train_legacy(
        self, project_id: int, tasks: Sequence[Mapping[str, Any]], label_config: str | None
    ) -> dict[str, Any]:
        """POST /train: the body lists annotated tasks, but the fit fetches every annotation itself anyway."""
        if label_config:
            self.labeling(label_config)
            self._context(project_id).label_config = label_config
        self.queue_fit(project_id)
        return {"status": "queued", "job": f"fit:{project_id}", "annotated_tasks": len(tasks)}

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """The label-studio-ml ``fit(event, data)`` contract: same as a webhook."""
        return self.handle_event(event, data)

    def index(self, project_id: int, tasks: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Queue background indexing; the job fetches the project's task list itself, so ``tasks`` is advisory."""
        self.queue_index(project_id)

    def queue_index(self, project_id: int) -> None:
        self.jobs.submit(f"index:{project_id}", lambda: self.run_index(project_id))

    def queue_fit(self, project_id: int) -> None:
        self.jobs.submit(f"fit:{project_id}", lambda: self.run_fit(project_id))

    def versions(self, project_id: int | None) -> list[str]:
        if project_id is not None:
            return self.state(project_id).list_versions()
        projects_dir = Path(self.config.model_dir) / "projects"
        found: set[str] = set()
        if projects_dir.is_dir():
            for path in projects_dir.iterdir():
                if path.name.isdigit():
                    found.update(self.state(int(path.name)).list_versions())
        return sorted(found, key=lambda v: (version_number(v) or 0, v))

    # --- features: image -> content key -> embedding + weak answer (all cached) -------------------------------

    def features(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        labeling: ProjectLabeling,
        client: LabelStudioAPI | None = None,
    ) -> TaskFeatures:
        """Embeddings and weak answers of the tasks' images: cache first, download and compute what is missing."""
        urls: list[str | None] = []
        errors: dict[int, str] = {}
        for position, task in enumerate(tasks):
            data = task.get("data") if isinstance(task, Mapping) else None
            url = data.get(labeling.image_value_key) if isinstance(data, Mapping) else None
            if not isinstance(url, str) or not url.strip():
                errors[position] = f"the task has no image URL under data.{labeling.image_value_key}"
                urls.append(None)
            else:
                urls.append(url.strip())
        known = self.image_index.get_many(project_id, [u for u in urls if u])
        keys: list[str | None] = [known.get(u) if u else None for u in urls]

        downloaded: dict[int, bytes] = {}
        need_download = [i for i, u in enumerate(urls) if u and keys[i] is None]
        if need_download:
            self._download(project_id, tasks, urls, need_download, client, downloaded, errors)
            new_keys: dict[str, str] = {}
            for i, data_bytes in downloaded.items():
                keys[i] = self.codec.content_key(data_bytes)
                new_keys[urls[i]] = keys[i]  # type: ignore[index]
            self.image_index.put_many(project_id, new_keys)

        present = sorted({k for k in keys if k})
        embeddings = self.store.get_many(self.backbone.name, present) if present else {}
        weak = self.store.get_many(self.weak_namespace, present) if present and self.weak_namespace else {}
        missing_positions: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key and (key not in embeddings or (self.weak_namespace and key not in weak)):
                missing_positions.setdefault(key, i)
        if missing_positions:
            redownload = [i for i in missing_positions.values() if i not in downloaded]
            if redownload:
                self._download(project_id, tasks, urls, redownload, client, downloaded, errors)
            self._compute(missing_positions, downloaded, embeddings, weak, errors)
        for i, key in enumerate(keys):
            if key is not None and key not in embeddings and i not in errors:
                failed = next((errors[j] for j, k in enumerate(keys) if k == key and j in errors), "no embedding")
                errors[i] = failed
        for i in errors:
            keys[i] = None
        if errors:
            self.metrics.image_errors.inc(len(errors))
            for i, message in sorted(errors.items()):
                logger.error("project %s task %s: %s", project_id, tasks[i].get("id"), message)
        return TaskFeatures(keys=keys, errors=errors, embeddings=embeddings, weak_probabilities=weak)

    def _download(
        self,
        project_id: int,
        tasks: Sequence[Mapping[str, Any]],
        urls: list[str | None],
        positions: list[int],
        client: LabelStudioAPI | None,
        downloaded: dict[int, bytes],
        errors: dict[int, str],
    ) -> None:
        try:
            client = client or self._client(project_id)
        except LabelStudioError as exc:
            for i in positions:
                errors[i] = str(exc)
            return

        def fetch(i: int) -> tuple[int, bytes | None, str | None]:
            try:
                return i, client.download_image(urls[i], task_id=tasks[i].get("id")), None  # type: ignore[arg-type]
            except (ImageFetchError, LabelStudioError, OSError) as exc:
                return i, None, str(exc)

        for i, data_bytes, error in self._downloads.map(fetch, positions):
            if error is not None:
                errors[i] = error
            else:
                downloaded[i] = data_bytes  # type: ignore[assignment]
                self.metrics.images_downloaded.inc()

    def _compute(
        self,
        missing_positions: Mapping[str, int],
        downloaded: Mapping[int, bytes],
        embeddings: dict[str, np.ndarray],
        weak: dict[str, np.ndarray],
        errors: dict[int, str],
    ) -> None:
        items = [(key, i) for key, i in missing_positions.items() if i in downloaded]
        for start in range(0, len(items), FEATURE_CHUNK):
            chunk = items[start : start + FEATURE_CHUNK]
            images, chunk_keys = [], []
            for key, i in chunk:
                try:
                    images.append(self.codec.decode(downloaded[i]))
                    chunk_keys.append(key)
                except (ModelInputError, OSError, ValueError) as exc:
                    errors[i] = f"unreadable image: {exc}"
            if not images:
                continue
            need_embedding = [j for j, key in enumerate(chunk_keys) if key not in embeddings]
            if need_embedding and self._weak_from_logits:
                # One forward pass gives the embedding and the ImageNet logits the label map reads.
                vectors, logits = self.backbone.embed_and_logits([images[j] for j in need_embedding])
                new = {chunk_keys[j]: np.asarray(vectors[row], np.float32) for row, j in enumerate(need_embedding)}
                self.store.put_many(self.backbone.name, new)
                embeddings.update(_as_stored(new))
                self.metrics.embeddings_computed.inc(len(new))
                missing_weak = [row for row, j in enumerate(need_embedding) if chunk_keys[j] not in weak]
                if missing_weak:
                    answers = self.weak_annotator.annotate_logits(np.asarray(logits)[missing_weak])
                    new_weak = {
                        chunk_keys[need_embedding[row]]: np.asarray(answers.coarse_probabilities[k], np.float32)
                        for k, row in enumerate(missing_weak)
                    }
                    self.store.put_many(self.weak_namespace, new_weak)
                    weak.update(_as_stored(new_weak))
                    self.metrics.weak_labels_computed.inc(len(new_weak))
                need_embedding = []
            if need_embedding:
                vectors = np.asarray(self.backbone.embed([images[j] for j in need_embedding]), dtype=np.float32)
                new = {chunk_keys[j]: vectors[row] for row, j in enumerate(need_embedding)}
                self.store.put_many(self.backbone.name, new)
                embeddings.update(_as_stored(new))
                self.metrics.embeddings_computed.inc(len(new))
            if self.weak_annotator is not None and self.weak_namespace is not None:
                need_weak = [j for j, key in enumerate(chunk_keys) if key not in weak]
                if need_weak:
                    if self._weak_from_embeddings:
                        answers = self.weak_annotator.annotate_embeddings(
                            np.stack([embeddings[chunk_keys[j]] for j in need_weak])
                        )
                    else:
                        answers = self.weak_annotator.annotate([images[j] for j in need_weak])
                    probabilities = np.asarray(answers.coarse_probabilities, dtype=np.float32)
                    new_weak = {chunk_keys[j]: probabilities[row] for row, j in enumerate(need_weak)}
                    self.store.put_many(self.weak_namespace, new_weak)
                    weak.update(_as_stored(new_weak))
                    self.metrics.weak_labels_computed.inc(len(new_weak))

    def weak_in_project_order(self, probabilities: np.ndarray, hierarchy: LabelHierarchy) -> np.ndarray:
        """Reorder weak probability columns (annotator class order) into the project's coarse order by name.

        Classes the project lacks are dropped and rows renormalised; a row left at zero means no answer."""
        n = probabilities.shape[0]
        out = np.zeros((n, hierarchy.n_coarse), dtype=np.float32)
        if self.weak_annotator is None or n == 0:
            return out
        for column, name in enumerate(self.weak_annotator.coarse_classes):
            if name in hierarchy.coarse_classes:
                out[:, hierarchy.coarse_index(name)] = probabilities[:, column]
        totals = out.sum(axis=1, keepdims=True)
        np.divide(out, totals, out=out, where=totals > 0)
        return out

    # --- predictions ------------------------------------------------------------------------------------------

    def _predictions(
        self,
        project_id: int | None,
        tasks: Sequence[Mapping[str, Any]],
        labeling: ProjectLabeling,
        features: TaskFeatures,
        model: Any,
        model_version: str,
        queue_scores: Mapping[int, float] | None = None,
    ) -> list[dict[str, Any]]:
        hierarchy = labeling.hierarchy
        usable = [i for i, key in enumerate(features.keys) if key is not None]
        weak_rows = np.zeros((len(usable), hierarchy.n_coarse), dtype=np.float32)
        if self.weak_annotator is not None and usable:
            raw = np.stack([features.weak_probabilities[features.keys[i]] for i in usable]).astype(np.float32)
            weak_rows = self.weak_in_project_order(raw, hierarchy)
        fine_rows = coarse_rows = None
        if model is not None and usable:
            matrix = np.stack([features.embeddings[features.keys[i]] for i in usable]).astype(np.float32)
            fine_rows = np.asarray(model.predict_fine_proba(matrix), dtype=np.float32)
            coarse_rows = np.asarray(model.predict_coarse_proba(matrix), dtype=np.float32)
        if queue_scores is None and project_id is not None:
            priorities_version, stored = self.state(project_id).priorities()
            queue_scores = stored if priorities_version == model_version else {}
        queue_scores = queue_scores or {}

        # Per-row choices computed for the whole batch at once; the loop below only assembles predictions.
        weak_answered = weak_rows.sum(axis=1) > 0
        weak_choice = weak_rows.argmax(axis=1)
        weak_top = weak_rows.max(axis=1)
        if coarse_rows is not None:
            model_coarse_choice, model_coarse_top = coarse_rows.argmax(axis=1), coarse_rows.max(axis=1)
        if fine_rows is not None:
            fine_choice, fine_top = fine_rows.argmax(axis=1), fine_rows.max(axis=1)
            default_scores = _margins(fine_rows)
        else:
            default_scores = np.where(weak_answered, _margins(weak_rows), 0.0)

        results: list[dict[str, Any]] = []
        row_of = {i: row for row, i in enumerate(usable)}
        for i, task in enumerate(tasks):
            task_id = task.get("id")
            row = row_of.get(i)
            if row is None:
                results.append({"result": [], "score": 0.0, "model_version": model_version})
                continue
            coarse, coarse_score = None, 0.0
            if weak_answered[row]:
                coarse, coarse_score = hierarchy.coarse_classes[weak_choice[row]], float(weak_top[row])
            elif coarse_rows is not None:
                coarse = hierarchy.coarse_classes[model_coarse_choice[row]]
                coarse_score = float(model_coarse_top[row])
            fine, fine_score = None, None
            if fine_rows is not None and fine_top[row] >= self.config.fine_confidence_threshold:
                fine, fine_score = hierarchy.fine_classes[fine_choice[row]], _unit(fine_top[row])
            score = queue_scores.get(task_id) if isinstance(task_id, int) else None
            if score is None:
                score = float(default_scores[row])
            results.append(
                build_prediction(
                    labeling,
                    coarse=coarse,
                    coarse_score=_unit(coarse_score),
                    fine=fine,
                    fine_score=fine_score,
                    score=_unit(score),
                    model_version=model_version,
                )
            )
        return results

    # --- background jobs --------------------------------------------------------------------------------------

    def _project_labeling(self, project_id: int, client: LabelStudioAPI) -> tuple[ProjectLabeling, str]:
        project = client.get_project(project_id)
        label_config = project.get("label_config") if isinstance(project, Mapping) else None
        if not isinstance(label_config, str) or not label_config:
            label_config = self._context(project_id).label_config
        if not label_config:
            raise LabelStudioError(f"project {project_id} has no label config")
        self._context(project_id).label_config = label_config
        return self.labeling(label_config), label_config

    def run_index(self, project_id: int) -> None:
        """Embed every task and get its weak label; at cold start, push VLM pre-annotations ranked for diversity."""
        # Same lock as fit: an index push must never interleave with a fit's push and PATCH.
        with project_lock(self.state(project_id).lock_path):
            self._index_locked(project_id)

    def _index_locked(self, project_id: int) -> None:
        client = self._client(project_id)
        labeling, label_config = self._project_labeling(project_id, client)
        tasks = client.fetch_tasks(project_id)
        features = self.features(project_id, tasks, labeling, client)
        self._context(project_id).indexed_schema = schema_hash(label_config)
        if not self.config.push_predictions:
            return
        state = self.state(project_id)
        model, model_version = self._served_model(project_id, labeling)
        unlabeled = [
            i for i, t in enumerate(tasks) if features.keys[i] is not None and task_labels(labeling, t) is None
        ]
        if not unlabeled:
            return
        queue_scores: dict[int, float] | None = None
        if model is None and model_version == COLD_START_VERSION:
            priorities_version, _ = state.priorities()
            if priorities_version != COLD_START_VERSION:
                queue_scores = self._cold_start_scores(tasks, unlabeled, features, labeling.hierarchy)
                state.write_priorities(COLD_START_VERSION, queue_scores)
        already = state.pushed_tasks(model_version)
        to_push = [i for i in unlabeled if tasks[i]["id"] not in already]
        if to_push:
            self._push(project_id, client, tasks, to_push, labeling, features, model, model_version, queue_scores)

    def _cold_start_scores(
        self,
        tasks: Sequence[Mapping[str, Any]],
        unlabeled: list[int],
        features: TaskFeatures,
        hierarchy: LabelHierarchy,
    ) -> dict[int, float]:
        """Diverse first picks (k-means representatives) get the lowest scores; the rest follow the VLM's doubt."""
        matrix = np.stack([features.embeddings[features.keys[i]] for i in unlabeled]).astype(np.float32)
        weak_rows = np.zeros((len(unlabeled), hierarchy.n_coarse), dtype=np.float32)
        if self.weak_annotator is not None:
            raw = np.stack([features.weak_probabilities[features.keys[i]] for i in unlabeled]).astype(np.float32)
            weak_rows = self.weak_in_project_order(raw, hierarchy)
        answered = weak_rows.sum(axis=1) > 0
        weak_coarse = np.where(answered, weak_rows.argmax(axis=1), MISSING_LABEL).astype(np.int64)
        weak_margins = np.array([_margin(row) if ok else 0.0 for row, ok in zip(weak_rows, answered)])
        selected = cold_start_scores(matrix, hierarchy, weak_coarse, self.config.query_batch_size)
        scores = _rank_scores(selected, weak_margins, np.arange(len(unlabeled)))
        return {int(tasks[i]["id"]): float(s) for i, s in zip(unlabeled, scores)}

    def _push(
        self,
        project_id: int,
        client: LabelStudioAPI,
        tasks: Sequence[Mapping[str, Any]],
        positions: list[int],
        labeling: ProjectLabeling,
        features: TaskFeatures,
        model: Any,
        model_version: str,
        queue_scores: Mapping[int, float] | None,
        replace: bool = False,
    ) -> int:
        subset = [tasks[i] for i in positions]
        sub_features = TaskFeatures(
            keys=[features.keys[i] for i in positions],
            errors={},
            embeddings=features.embeddings,
            weak_probabilities=features.weak_probabilities,
        )
        predictions = self._predictions(
            project_id, subset, labeling, sub_features, model, model_version, queue_scores
        )
        payload = [
            {"task": int(task["id"]), **prediction}
            for task, prediction in zip(subset, predictions)
            if prediction["result"]
        ]
        created = client.import_predictions(project_id, payload)
        self.metrics.predictions_pushed.inc(created)
        self.state(project_id).record_pushed(model_version, [p["task"] for p in payload], replace=replace)
        # Label Studio refuses a model_version that no prediction carries.
        if created > 0:
            client.set_model_version(project_id, model_version)
        logger.info("project %s: pushed %d/%d predictions of %s", project_id, created, len(payload), model_version)
        return created

    def run_fit(self, project_id: int) -> str | None:
        """Retrain on every annotation, re-estimate T, save a new version, re-rank and push the queue."""
        state = self.state(project_id)
        started = time.monotonic()
        with project_lock(state.lock_path):
            try:
                new_version = self._fit_locked(project_id, state)
            except Exception:
                self.metrics.fits.labels(outcome="failed").inc()
                raise
        self.metrics.fits.labels(outcome="trained" if new_version else "skipped").inc()
        logger.info("project %s: fit finished in %.1f s -> %s", project_id, time.monotonic() - started, new_version)
        return new_version

    def _fit_locked(self, project_id: int, state: ProjectState) -> str | None:
        client = self._client(project_id)
        labeling, label_config = self._project_labeling(project_id, client)
        hierarchy = labeling.hierarchy
        tasks = client.fetch_tasks(project_id)
        features = self.features(project_id, tasks, labeling, client)
        usable = [i for i, key in enumerate(features.keys) if key is not None]
        if not usable:
            logger.warning("project %s: no usable task images; nothing to fit", project_id)
            return None
        embeddings = np.stack([features.embeddings[features.keys[i]] for i in usable]).astype(np.float32)
        n = len(usable)
        fine = np.full(n, MISSING_LABEL, dtype=np.int64)
        human_coarse = np.full(n, MISSING_LABEL, dtype=np.int64)
        trusted_coarse = np.full(n, MISSING_LABEL, dtype=np.int64)
        labeled = np.zeros(n, dtype=bool)
        for row, i in enumerate(usable):
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
            except UnknownClassError as exc:  # a label the current config no longer has
                logger.warning("project %s task %s: %s", project_id, tasks[i].get("id"), exc)
        if not np.any(fine != MISSING_LABEL):
            logger.info("project %s: no fine labels yet; the cold-start queue stays", project_id)
            return None

        weak_probabilities = np.zeros((n, hierarchy.n_coarse), dtype=np.float32)
        if self.weak_annotator is not None:
            raw = np.stack([features.weak_probabilities[features.keys[i]] for i in usable]).astype(np.float32)
            weak_probabilities = self.weak_in_project_order(raw, hierarchy)
        weak_answer = np.where(weak_probabilities.sum(axis=1) > 0, weak_probabilities.argmax(axis=1), MISSING_LABEL)
        weak_answer = weak_answer.astype(np.int64)

        from model.finegrained import TrainingConfig, select_training_config
        from model.noise import estimate_coarse_transition_matrix

        estimate = estimate_coarse_transition_matrix(trusted_coarse, weak_answer, hierarchy.n_coarse)
        new_version = state.next_version()
        n_trusted = int(np.sum((trusted_coarse != MISSING_LABEL) & (weak_answer != MISSING_LABEL)))
        # With a local VLM weak labels cost compute, not money: every task without a human label gets one.
        weak_for_training = np.where(labeled, MISSING_LABEL, weak_answer).astype(np.int64)
        base = TrainingConfig(variant="hierarchical", use_transition=True, num_threads=self.config.torch_threads)
        training_config = base
        n_fine = int(np.sum(fine != MISSING_LABEL))
        if n_fine >= MIN_FINE_LABELS_FOR_CV:
            training_config = select_training_config(
                hierarchy, embeddings, fine, weak_for_training, estimate.matrix, base, CV_CANDIDATES,
                human_coarse_labels=human_coarse,
            )
        classifier = self._new_classifier(hierarchy, int(embeddings.shape[1]), training_config)
        classifier.fit(embeddings, fine, weak_for_training, estimate.matrix, human_coarse)
        fine_probabilities = np.asarray(classifier.predict_fine_proba(embeddings), dtype=np.float32)
        coarse_probabilities = np.asarray(classifier.predict_coarse_proba(embeddings), dtype=np.float32)

        unlabeled_rows = np.flatnonzero(~labeled)
        from model.query import LabelCosts

        row_scores, queue_summary = queue_priorities(
            embeddings=embeddings,
            hierarchy=hierarchy,
            fine_labels=fine,
            # a human coarse label stands in for the VLM's answer on its task
            weak_coarse_labels=np.where(human_coarse != MISSING_LABEL, human_coarse, weak_for_training),
            fine_probabilities=fine_probabilities,
            coarse_probabilities=coarse_probabilities,
            coarse_transition_matrix=estimate.matrix,
            budget_labels=self.config.query_batch_size,
            costs=LabelCosts(human_fine=self.config.cost_full, weak_coarse=self.config.cost_weak),
            new_classifier=lambda cfg: self._new_classifier(
                hierarchy, int(embeddings.shape[1]), replace(cfg, num_threads=self.config.torch_threads)
            ),
        )
        scores = {int(tasks[usable[row]]["id"]): float(row_scores[row]) for row in unlabeled_rows}
        metrics = {
            "n_tasks": len(tasks),
            "n_usable": n,
            "n_fine": n_fine,
            "n_human_coarse": int(np.sum(human_coarse != MISSING_LABEL)),
            "n_weak": int(np.sum(weak_for_training != MISSING_LABEL)),
            "n_trusted_pairs": n_trusted,
            "training_config": training_config.to_dict() if hasattr(training_config, "to_dict") else {},
            "queue": queue_summary,
        }
        state.append_transition(
            {"model_version": new_version, "n_trusted": n_trusted, "coarse_classes": list(hierarchy.coarse_classes),
             **estimate.to_dict()}
        )
        state.write_priorities(new_version, scores)
        state.commit_version(new_version, classifier.save, schema_hash(label_config), metrics)
        ctx = self._context(project_id)
        with ctx.lock:
            ctx.model, ctx.model_version = classifier, new_version
        if self.config.push_predictions and unlabeled_rows.size:
            positions = [usable[row] for row in unlabeled_rows]
            self._push(project_id, client, tasks, positions, labeling, features, classifier, new_version, scores,
                       replace=True)
        removed = state.prune_versions(self.config.keep_model_versions)
        if removed and self.config.push_predictions:
            self.jobs.submit(f"prune:{project_id}", lambda: self._delete_versions(project_id, removed))
        return new_version

    def _delete_versions(self, project_id: int, versions: Sequence[str]) -> None:
        client = self._client(project_id)
        current = self.current_model_version(project_id)
        for version in versions:
            if version == current:
                continue  # deleting the current version would clear the project's model_version
            client.delete_model_version(project_id, version)


def _as_stored(vectors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float16 round trip of the store, so a fresh result equals the cached one bit for bit."""
    return {k: np.asarray(v, dtype=np.float16).astype(np.float32) for k, v in vectors.items()}


def _margins(probabilities: np.ndarray) -> np.ndarray:
    """Row-wise top-1 minus top-2 probability."""
    if probabilities.shape[1] < 2:
        return np.ones(probabilities.shape[0])
    top_two = np.partition(probabilities, -2, axis=1)[:, -2:]
    return (top_two[:, 1] - top_two[:, 0]).astype(np.float64)


def _margin(probabilities: np.ndarray) -> float:
    """Top-1 minus top-2 probability: small = uncertain = worth labeling first."""
    if probabilities.size < 2:
        return 1.0
    top = np.partition(probabilities, -2)[-2:]
    return float(top[1] - top[0])


def _unit(value: float) -> float:
    return float(min(max(float(value), 0.0), 1.0))


def _required_project(data: Mapping[str, Any]) -> Any:
    project = data.get("project")
    if project is None:
        raise InvalidInput("the webhook body has no 'project'")
    return project


def _read_parent_map(path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"PARENT_MAP_FILE {path}: cannot read a JSON parent map: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"PARENT_MAP_FILE {path}: expected a JSON object {{fine: coarse}}")
    return {str(k): str(v) for k, v in data.items()}


# --- queue scores: ascending = label first ------------------------------------------------------------------------


def _rank_scores(selected: Sequence[int], base: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Planned picks get [0, SELECTED_SCORE_SPAN) in pick order; every other row SPAN + (1 - SPAN) * base."""
    scores = np.full(base.shape[0], 1.0, dtype=np.float64)
    scores[rows] = SELECTED_SCORE_SPAN + (1.0 - SELECTED_SCORE_SPAN) * np.clip(base[rows], 0.0, 1.0)
    for order, row in enumerate(selected):
        scores[row] = SELECTED_SCORE_SPAN * order / max(len(selected), 1)
    return scores


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


MIN_FULL_LABELS_FOR_ISO = 6
ISO_EVALUATION_EPOCHS = 50


def queue_priorities(
    *,
    embeddings: np.ndarray,
    hierarchy: LabelHierarchy,
    fine_labels: np.ndarray,
    weak_coarse_labels: np.ndarray,
    fine_probabilities: np.ndarray,
    coarse_probabilities: np.ndarray,
    coarse_transition_matrix: np.ndarray,
    budget_labels: int,
    costs: Any,
    new_classifier: Callable[[Any], Any],
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Queue scores of every row (ascending = label first) and a summary of how they were chosen.

    The head of the queue is the ISO value-to-cost batch for the next ``budget_labels`` human labels, its expected
    improvement measured by retraining on parts of the labels and scoring a held-out third of the fine labels.
    With too few fine labels for that, the head is the margin-uncertainty batch. The rest follow the fine head's
    margin (model.query.priority_scores)."""
    from model.finegrained import TrainingConfig
    from model.query import IsoValueToCostQuery, MarginQuery, PoolState, priority_scores

    rng = np.random.default_rng(seed)
    full = np.flatnonzero(fine_labels != MISSING_LABEL)
    common = dict(
        embeddings=embeddings,
        hierarchy=hierarchy,
        fine_labels=fine_labels,
        weak_coarse_labels=weak_coarse_labels,
        fine_probabilities=fine_probabilities,
        coarse_probabilities=coarse_probabilities,
    )
    budget = float(budget_labels) * costs.human_fine
    if full.size < MIN_FULL_LABELS_FOR_ISO:
        pool = PoolState(**common)
        selections = MarginQuery().query(pool, budget, costs, rng)
        return priority_scores(pool, selections), {"strategy": "margin", "n_selected": len(selections)}

    validation = rng.permutation(full)[: max(2, full.size // 3)]
    parents = hierarchy.parent_array

    def train_and_evaluate(full_indices: np.ndarray, weak_indices: np.ndarray) -> float:
        train_full = np.setdiff1d(full_indices, validation)
        if train_full.size == 0:
            return 1.0 / hierarchy.n_fine
        rows = np.union1d(train_full, weak_indices)
        fine = np.full(rows.size, MISSING_LABEL, dtype=np.int64)
        weak = np.full(rows.size, MISSING_LABEL, dtype=np.int64)
        position = {int(r): i for i, r in enumerate(rows)}
        for r in train_full:
            fine[position[int(r)]] = fine_labels[r]
        for r in weak_indices:
            # A weak index without a weak label stands for the sample's true coarse label (model.query's contract).
            answer = weak_coarse_labels[r] if weak_coarse_labels[r] != MISSING_LABEL else parents[fine_labels[r]]
            if fine[position[int(r)]] == MISSING_LABEL:
                weak[position[int(r)]] = answer
        classifier = new_classifier(TrainingConfig(epochs=ISO_EVALUATION_EPOCHS))
        classifier.fit(embeddings[rows], fine, weak, coarse_transition_matrix)
        predicted = classifier.predict_fine_proba(embeddings[validation]).argmax(axis=1)
        return float(np.mean(predicted == fine_labels[validation]))

    pool = PoolState(**common, train_and_evaluate=train_and_evaluate)
    strategy = IsoValueToCostQuery(n_shuffles=1)
    selections = strategy.query(pool, budget, costs, rng)
    improvement = strategy.last_expected_improvement
    summary = {"strategy": "iso", "n_selected": len(selections), "n_validation": int(validation.size)}
    if improvement is not None:
        summary["expected_improvement"] = {"full_ratio": improvement.full_ratio, "weak_ratio": improvement.weak_ratio}
    return priority_scores(pool, selections), summary


# --- components loaded at start-up ---------------------------------------------------------------------------------


@dataclass
class Components:
    backbone: Any
    weak_annotator: Any
    embedding_store: Any
    image_codec: ImageCodec


def build_components(config: Config) -> Components:
    """Load the backbone, the weak annotator and the embedding store named by the config."""
    from model.embedding_store import EmbeddingStore, content_key
    from model.embeddings import configure_torch_threads, create_backbone
    from model.images import ImageLimits, decode_image

    if config.torch_threads:
        configure_torch_threads(config.torch_threads)
    backbone = create_backbone(config.backbone, image_size=config.image_size)
    weak_annotator = build_weak_annotator(config, backbone)
    store = EmbeddingStore(Path(config.model_dir) / "embeddings.sqlite")
    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    return Components(
        backbone=backbone,
        weak_annotator=weak_annotator,
        embedding_store=store,
        image_codec=ImageCodec(content_key=content_key, decode=lambda data: decode_image(data, limits)),
    )


def build_weak_annotator(config: Config, backbone: Any) -> Any:
    """The weak coarse annotator named by WEAK_ANNOTATOR, sharing the backbone's model where it can."""
    if config.weak_annotator == "none":
        return None
    if config.weak_annotator == "imagenet-map":
        from model.embeddings import TimmBackbone
        from model.weak.classifier_label_map import ClassifierLabelMap, load_imagenet_map

        try:
            groups = json.loads(Path(config.imagenet_map_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"IMAGENET_MAP_FILE {config.imagenet_map_file}: {exc}") from exc
        coarse_classes = list(groups)
        classifier = backbone if hasattr(backbone, "classify_logits") else TimmBackbone(
            "efficientnet_lite0", image_size=config.image_size
        )
        mapping = load_imagenet_map(config.imagenet_map_file, coarse_classes)
        return ClassifierLabelMap(classifier, mapping, coarse_classes, cost_per_label=config.cost_weak)
    # Open-vocabulary annotators need the class names up front: PARENT_MAP_FILE, else the demo's groups.
    hierarchy = _startup_hierarchy(config)
    if config.weak_annotator == "open-clip":
        from model.embeddings import OpenClipImageBackbone
        from model.weak.openclip_zeroshot import OpenClipZeroShot

        if (
            isinstance(backbone, OpenClipImageBackbone)
            and getattr(backbone, "model_name", None) == config.open_clip_model
        ):
            return OpenClipZeroShot.from_backbone(backbone, hierarchy, cost_per_label=config.cost_weak)
        return OpenClipZeroShot(
            config.open_clip_model, config.open_clip_pretrained, hierarchy, cost_per_label=config.cost_weak
        )
    if config.weak_annotator == "openai":
        from model.weak.openai_compatible import OpenAICompatibleVLM

        return OpenAICompatibleVLM(
            config.vlm_api_base_url or "",
            config.vlm_api_key,
            config.vlm_api_model or "",
            hierarchy.coarse_classes,
            cost_per_label=config.cost_weak,
        )
    raise ValueError(f"unknown WEAK_ANNOTATOR {config.weak_annotator!r}")


def _startup_hierarchy(config: Config) -> LabelHierarchy:
    if config.parent_map_file is not None:
        return LabelHierarchy.from_json_file(config.parent_map_file)
    from model.datasets import fashion_mnist_hierarchy

    return fashion_mnist_hierarchy()
