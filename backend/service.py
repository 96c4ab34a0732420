"""The ML backend behind the HTTP layer: predict from cached embeddings, fit in the background, push the queue."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures import TimeoutError as FutureTimeout
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from backend.assistant import Assistant, FitContext
from backend.components import build_components
from backend.config import Config, SecretRedactingFilter
from backend.features import (
    Backbone,
    ProjectDownloadPools,
    EmbeddingStoreLike,
    FeatureExtractor,
    ImageCodec,
    TaskFeatures,
    WeakAnnotator,
    WeakAnnotatorFactory,
    WeakAnnotators,
)
from backend.jobs import JobRunner, JobStateCollector, ThreadJobRunner
from backend.label_config import LabelConfigError, ProjectLabeling, task_labels
from backend.ls_client import (
    LabelStudioAPI,
    LabelStudioClientFactory,
    LabelStudioError,
    MountedFiles,
    attach_annotations,
)
from backend.memory import bound_heap_growth, keep_triton_out, release_free_heap
from backend.metrics import BackendMetrics
from backend.multilabel import MultiLabelProjects, is_multilabel
from backend.predictions import build_predictions
from backend.projects import LabelConfigs, Projects, schema_hash
from backend.protocol import InvalidInput, parse_project_id
from backend.segmentation import SegmentationLabeling, SegmentationProjects, parse_segmentation_config
from backend.shared_store import StateStore, build_state_store
from backend.state import COLD_START_VERSION, ImageKeyIndex, ProjectState, version_number
from backend.training import cold_start_queue, collect_labels, fit_and_rank, server_learner_settings, weak_answers
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.round_libraries import import_round_libraries
from model.runtime import embedding_setup

__all__ = ["HANDLED_FIT_EVENTS", "InvalidInput", "MLBackend", "ModelResponse", "parse_project_id"]

logger = logging.getLogger(__name__)

MAX_QUEUED_PREDICT_BATCHES = 2
"""Per project: /predict batches whose missing features may wait for the project's worker at a time."""
INDEX_PAGES_IN_FLIGHT = 2
"""Pages of the task list an index job embeds at once (see MLBackend._list_and_embed)."""
HANDLED_FIT_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED", "START_TRAINING"})
TASK_LIST_EVENTS = frozenset({"TASKS_CREATED", "TASKS_DELETED"})


@dataclass
class ModelResponse:
    """What ``MLBackend.predict_response`` answers: one prediction per task and the version that made them."""

    predictions: list[dict[str, Any]]
    model_version: str



def build_job_runner(redis_url: str | None, debounce_seconds: float) -> JobRunner:
    """RQ over Redis when REDIS_URL is set (backend/rq_jobs.py), else the in-process threads."""
    if redis_url:
        from backend.rq_jobs import RQJobRunner

        return RQJobRunner.from_url(redis_url, debounce_seconds)
    return ThreadJobRunner(debounce_seconds)

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
        weak_annotator_factory: WeakAnnotatorFactory | None = None,
        state_store: StateStore | None = None,
    ) -> None:
        """``weak_annotator`` answers in its own classes for every project (matched by name);
        ``weak_annotator_factory`` instead builds each project's annotator from its own classes."""
        self.config = config
        self.backbone = backbone
        self.weak_annotators = WeakAnnotators(weak_annotator, weak_annotator_factory)
        self.ls_clients = ls_clients
        self.metrics = metrics or BackendMetrics()
        self.jobs = jobs or build_job_runner(config.redis_url, config.fit_debounce_seconds)
        self.jobs.bind(self.run_job, self._job_finished)
        self.metrics.registry.register(JobStateCollector(self.jobs))
        self.redactor = redactor
        self.state_store = state_store or build_state_store(config)
        self.projects = Projects(Path(config.model_dir), classifier_factory, classifier_loader, self.state_store)
        self.label_configs = LabelConfigs(config.parent_map_file, config.taxonomy_coarse_level, self.weak_annotators)
        self.extractor = FeatureExtractor(
            backbone=backbone,
            weak_annotators=self.weak_annotators,
            embedding_store=embedding_store,
            image_codec=image_codec,
            image_index=image_index or self.state_store.image_index(),
            metrics=self.metrics,
            client_for=self._client,
            claims=self.jobs.inflight_claims(),
        )
        self.multilabel = MultiLabelProjects(config, self.projects, self.extractor, image_codec.decode, self.metrics)
        """<Choices choice="multiple"> projects (backend.multilabel): label sets, their own model and predictions."""
        self._webhook_auth_done: set[int] = set()
        """Projects whose webhook got (or is getting) the basic auth header in this process."""
        self._predict_workers = ProjectDownloadPools(1, 64)
        self._predict_lock = threading.Lock()
        self._predict_queued: dict[int, int] = {}
        """One worker per project for /predict's missing features, so one project's slow batch waits on itself."""
        self._queue_tabs: set[int] = set()
        """Projects whose Data Manager queue tab (QUEUE_TAB=true) was ensured or is being ensured."""
        self.assistant = Assistant(config)
        self.segmentation = SegmentationProjects(image_codec.decode, image_codec.content_key, self.projects,
                                                 Path(config.model_dir) / "segmentation-maps",
                                                 batch_size=config.query_batch_size)
        """<BrushLabels> projects (backend.segmentation): their own models, fits and predictions."""

    # --- construction from the environment --------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Config, redactor: SecretRedactingFilter | None = None) -> MLBackend:
        """Load the backbone and the weak annotator now (server start-up), never inside a request."""
        bound_heap_growth()  # before the models load: a long-lived process's heap must not grow with the project
        keep_triton_out()
        components = build_components(config)
        backend = cls(
            config,
            backbone=components.backbone,
            weak_annotator=components.weak_annotator,
            weak_annotator_factory=components.weak_annotator_factory,
            embedding_store=components.embedding_store,
            state_store=components.state_store,
            image_codec=components.image_codec,
            ls_clients=LabelStudioClientFactory(
                download_root=Path(config.model_dir) / "downloads",
                max_image_bytes=config.max_image_bytes,
                default_url=config.label_studio_url,
                default_api_key=config.label_studio_api_key,
                download_timeout_seconds=config.image_download_timeout_seconds,
                mounted=MountedFiles(config.local_files_document_root, config.uploaded_files_root),
            ),
            redactor=redactor,
        )
        if backend.jobs.in_process:
            # Fits run on this process's threads: their libraries load now, not mid-fit while /health waits.
            import_round_libraries()
        backend.warm_start()
        return backend

    def warm_start(self) -> None:
        """Load the current model of every project on disk, so the first request after a restart is served."""
        self.projects.warm_start()

    # --- small helpers ----------------------------------------------------------------------------------------

    def state(self, project_id: int) -> ProjectState:
        return self.projects.state(project_id)

    def labeling(self, label_config: str) -> ProjectLabeling:
        """Parse (and cache by content) a label config; unusable ones raise InvalidInput 422 naming the problem."""
        return self.label_configs.parse(label_config)

    def current_model_version(self, project_id: int | None) -> str:
        return self.projects.current_model_version(project_id)

    def _client(self, project_id: int) -> LabelStudioAPI:
        ctx = self.projects.context(project_id)
        if ctx.hostname is None and ctx.access_token is None and not self.jobs.in_process:
            # An RQ worker: the /setup that connected the project reached a web process, which shared it.
            ctx.hostname, ctx.access_token = self.jobs.shared_connection(project_id)
            if ctx.access_token and self.redactor is not None:
                self.redactor.add_secrets([ctx.access_token])
        return self.ls_clients(ctx.hostname, ctx.access_token)

    def _job_finished(self, kind: str, error: BaseException | None, seconds: float) -> None:
        self.metrics.job_seconds.labels(kind=kind).observe(seconds)
        if error is not None:
            self.metrics.jobs_failed.labels(kind=kind).inc()

    # --- HTTP-facing operations -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """From memory only: Label Studio gives /health one second."""
        loaded = self.projects.loaded_versions()
        newest = max(loaded.values(), key=lambda v: version_number(v) or 0, default=COLD_START_VERSION)
        return {
            "status": "UP",
            "model_class": type(self).__name__,
            "model_version": newest,
            "model_versions": {str(pid): version for pid, version in sorted(loaded.items())},
            "backbone": self.backbone.name,
            "embedding": embedding_setup(self.backbone),
            "weak_annotator": self.weak_annotators.describe(),
            "jobs": self._job_state(),
            "state_store": self.state_store.health(),
        }

    def _job_state(self) -> dict[str, Any]:
        try:
            return self.jobs.state()
        except Exception as exc:  # Redis down: /health still answers, and says so
            return {"error": f"job state unavailable: {type(exc).__name__}: {exc}"[:300]}

    def setup(
        self,
        project_id: int,
        schema: str | None,
        hostname: str | None,
        access_token: str | None,
        *,
        backend_host: str | None = None,
    ) -> str:
        """Remember how to reach Label Studio, check the config, queue indexing; answer in milliseconds.

        ``backend_host`` is the Host Label Studio used to reach this backend: with basic auth on, the project's
        webhook to that host is given the credentials (once per project and process)."""
        if access_token and self.redactor is not None:
            self.redactor.add_secrets([access_token])
        segmentation = self._segmentation_labeling(schema)
        labeling = self.labeling(schema) if schema is not None and segmentation is None else None
        ctx = self.projects.context(project_id)
        with ctx.lock:
            if hostname and ctx.hostname and not _same_host(hostname, ctx.hostname) and not access_token:
                # A token stays with the host it was given for: a new host without a new token gets none.
                logger.warning("project %s: /setup moved Label Studio to another host without a token; the stored "
                               "token is dropped", project_id)
                ctx.access_token = None
            ctx.hostname = hostname or ctx.hostname
            ctx.access_token = access_token or ctx.access_token
            if schema:
                ctx.label_config = schema
        if not self.jobs.in_process and (hostname or access_token):
            self.jobs.share_connection(project_id, ctx.hostname, ctx.access_token)
        if labeling is not None and is_multilabel(labeling):
            model_version = self.multilabel.served(project_id, labeling)[1]
        else:
            _, model_version = self.projects.served_model(project_id, labeling)
        if (backend_host and self.config.basic_auth_enabled and self.config.webhook_basic_auth
                and project_id not in self._webhook_auth_done and self._can_reach_label_studio(project_id)):
            self._webhook_auth_done.add(project_id)
            self.jobs.submit("webhook-auth", project_id, {"backend_host": backend_host})
        # Label Studio calls /setup on most reads of the ML backend; index once per config, then on TASKS_CREATED.
        # Marked when queued, so a /setup during a long index queues no second one; a failed index clears it.
        if schema and ctx.indexed_schema != schema_hash(schema) and self._can_reach_label_studio(project_id):
            ctx.indexed_schema = schema_hash(schema)  # before: an inline runner's failed index clears it
            self.queue_index(project_id)
        if self.config.queue_tab and project_id not in self._queue_tabs and self._can_reach_label_studio(project_id):
            self._queue_tabs.add(project_id)
            self.jobs.submit("queue-tab", project_id)
        return self.segmentation.served(project_id, segmentation)[1] if segmentation is not None else model_version

    def ensure_queue_tab(self, project_id: int) -> int | None:
        """QUEUE_TAB=true: a first Data Manager tab ordered by ascending prediction score (the queue order), so
        opening the labeling page from the Data Manager follows the queue too; retried on the next /setup."""
        from backend.queue_tab import ensure_queue_tab

        try:
            # The same address, key and host checks as every other call to this project's Label Studio.
            sdk = getattr(self._client(project_id), "_sdk", None)
            if sdk is None:
                logger.warning("project %s: no Label Studio SDK client for the queue tab", project_id)
                return None
            return ensure_queue_tab(sdk, project_id)
        except Exception as exc:
            self._queue_tabs.discard(project_id)
            logger.warning("project %s: could not create the Data Manager queue tab: %s", project_id, exc)
            return None

    def ensure_webhook_auth(self, project_id: int, backend_host: str) -> int:
        """Basic auth on: put the credentials into the project's webhook to this backend (Label Studio stores
        webhook headers in plain text; README, Security). Retried on a later /setup if it fails."""
        import base64

        credentials = f"{self.config.basic_auth_user}:{self.config.basic_auth_pass}".encode()
        header = {"Authorization": "Basic " + base64.b64encode(credentials).decode()}
        client = self._client(project_id)
        if not hasattr(client, "ensure_webhook_headers"):
            return 0
        try:
            changed = client.ensure_webhook_headers(project_id, backend_host, header)
        except Exception as exc:
            self._webhook_auth_done.discard(project_id)
            logger.warning("project %s: could not give the Label Studio webhook the basic auth credentials: %s",
                           project_id, exc)
            return 0
        if changed:
            logger.info("project %s: gave %d Label Studio webhook(s) to %s the basic auth header", project_id,
                        changed, backend_host)
        return changed

    def _can_reach_label_studio(self, project_id: int) -> bool:
        try:
            self._client(project_id)
            return True
        except LabelStudioError as exc:
            logger.warning("project %s: no background indexing: %s", project_id, exc)
            return False

    def predict(
        self,
        tasks: Sequence[Mapping[str, Any]],
        context: Mapping[str, Any] | None = None,
        *,
        project: int | str | None = None,
        label_config: str | None = None,
    ) -> list[dict[str, Any]]:
        """The label-studio-ml ``predict(tasks, context)``: one prediction per task, in the same order.

        ``project`` is the id or Label Studio's ``"<id>.<timestamp>"``; ``context`` is accepted and unused
        (interactive pre-annotation is not offered). See ``predict_response`` for the model version."""
        return self.predict_response(tasks, project=project, label_config=label_config).predictions

    def predict_response(
        self,
        tasks: Sequence[Mapping[str, Any]],
        *,
        project: int | str | None = None,
        label_config: str | None = None,
    ) -> ModelResponse:
        """Predictions and the model version that made them. A task whose image is unusable gets an empty
        prediction; if every task fails, the request is refused (422) with the reasons."""
        project_id = parse_project_id(project) if project not in (None, "") else None
        ctx = self.projects.context(project_id) if project_id is not None else None
        config_xml = label_config if label_config is not None else (ctx.label_config if ctx is not None else None)
        if config_xml is None:
            raise InvalidInput("missing 'label_config' and no /setup was received for this project")
        segmentation = self._segmentation_labeling(config_xml)
        if segmentation is not None:
            if ctx is not None and label_config:
                ctx.label_config = label_config
            if project_id is None:  # a model is per project: without one there is nothing to draw from
                return ModelResponse([{"result": []} for _ in tasks], COLD_START_VERSION)
            predictions, version = self.segmentation.predictions(project_id, self._client(project_id), tasks,
                                                                 segmentation)
            return ModelResponse(predictions, version)
        labeling = self.labeling(config_xml)
        if ctx is not None and label_config:
            ctx.label_config = label_config
        if is_multilabel(labeling):
            features = self._features_within_deadline(project_id, tasks, labeling)
            return ModelResponse(*self.multilabel.predictions(project_id, tasks, labeling, features, None))
        if project_id is None:
            model, model_version = None, COLD_START_VERSION
        else:
            model, model_version = self.projects.served_model(project_id, labeling)
        if not tasks:
            return ModelResponse([], model_version)
        features = self._features_within_deadline(project_id, tasks, labeling)
        if len(features.errors) == len(tasks) and not features.pending:
            details = "; ".join(f"task {tasks[i].get('id')}: {features.errors[i]}" for i in sorted(features.errors))
            raise InvalidInput(f"no task image could be used: {details}", status=422, kind="unusable_images")
        predictions = self._predictions(project_id, tasks, labeling, features, model, model_version)
        if project_id is not None:  # an audit task's fine guess stays hidden on this path too
            predictions = self.assistant.mark_predictions(self.state(project_id), labeling, tasks, predictions)
        for position in features.pending:
            # Not ready within PREDICT_DEADLINE_SECONDS: an empty prediction without a score now (it does not
            # move the queue); the background work finishes it and the index job pushes the real one.
            predictions[position] = {"result": [], "model_version": model_version}
        self.metrics.predictions.inc(len(predictions))
        return ModelResponse(predictions, model_version)

    def _features_within_deadline(
        self, project_id: int | None, tasks: Sequence[Mapping[str, Any]], labeling: ProjectLabeling
    ) -> TaskFeatures:
        """Cached features at once; what is missing is computed on the project's own worker for at most
        PREDICT_DEADLINE_SECONDS, then left to finish in the background (Label Studio waits 100 s at most)."""
        key = project_id if project_id is not None else 0
        cached = self.extractor.features(key, tasks, labeling, fetch=False)
        if not cached.pending:
            return cached
        started = time.monotonic()
        with self._predict_lock:
            queued = self._predict_queued.get(key, 0)
            if queued >= MAX_QUEUED_PREDICT_BATCHES:
                # The project's worker is busy with earlier batches: answer from the cache now; the work queued
                # before finishes and the index job pushes whatever is still missing.
                logger.info("project %s: /predict of %d tasks answered from the cache (%d batches already "
                            "queued)", project_id, len(tasks), queued)
                return cached
            self._predict_queued[key] = queued + 1
        future = self._predict_workers.submit(key, self.extractor.features, key, tasks, labeling)
        future.add_done_callback(lambda _: self._predict_batch_done(key))
        try:
            return future.result(timeout=self.config.predict_deadline_seconds)
        except FutureTimeout:
            pass
        future.add_done_callback(lambda done: self._late_features_done(project_id, done))
        features = self.extractor.features(key, tasks, labeling, fetch=False)
        logger.info("project %s: /predict of %d tasks: %d not ready after %.1f s (PREDICT_DEADLINE_SECONDS); "
                    "answered empty, finishing in the background", project_id, len(tasks), len(features.pending),
                    time.monotonic() - started)
        return features

    def _predict_batch_done(self, key: int) -> None:
        with self._predict_lock:
            self._predict_queued[key] = max(self._predict_queued.get(key, 1) - 1, 0)

    def _late_features_done(self, project_id: int | None, future: Any) -> None:
        if future.exception() is not None:
            logger.warning("project %s: background features after /predict failed: %s", project_id,
                           future.exception())
            return
        if project_id is not None and self.config.push_predictions and self._can_reach_label_studio(project_id):
            self.queue_index(project_id)  # pushes the predictions the deadline cut short

    def handle_event(self, action: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Webhook events: enqueue only, so Label Studio's 1 s webhook timeout is never hit."""
        if action in HANDLED_FIT_EVENTS or action in TASK_LIST_EVENTS or action == "PROJECT_UPDATED":
            project_id = parse_project_id(_required_project(data))
        if action in HANDLED_FIT_EVENTS:
            self.queue_fit(project_id)
            outcome = {"status": "queued", "job": f"fit:{project_id}", "action": action}
        elif action in TASK_LIST_EVENTS:  # new tasks get embedded; the task list the fits start from is renewed
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
        ctx = self.projects.context(project_id)
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
            self.projects.context(project_id).label_config = label_config
        self.queue_fit(project_id)
        return {"status": "queued", "job": f"fit:{project_id}", "annotated_tasks": len(tasks)}

    def fit(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """The label-studio-ml ``fit(event, data)`` contract: same as a webhook."""
        return self.handle_event(event, data)

    def index(self, project_id: int, tasks: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Queue background indexing; the job fetches the project's task list itself, so ``tasks`` is advisory."""
        self.queue_index(project_id)

    def run_job(self, kind: str, project_id: int, params: Mapping[str, Any]) -> Any:
        """Run one named job (the handler of every job runner, in-process or RQ); unknown kinds raise."""
        jobs: dict[str, Callable[[], Any]] = {
            "index": lambda: self.run_index(project_id),
            "fit": lambda: self.run_fit(project_id),
            "prune": lambda: self._delete_versions(project_id, list(params.get("versions") or [])),
            "webhook-auth": lambda: self.ensure_webhook_auth(project_id, str(params["backend_host"])),
            "queue-tab": lambda: self.ensure_queue_tab(project_id),
            "push": lambda: self.run_push(project_id, str(params["model_version"])),
            "curve": lambda: self.run_curve(project_id),
        }
        if kind not in jobs:
            raise ValueError(f"unknown job kind {kind!r}; known: {sorted(jobs)}")
        return jobs[kind]()

    def queue_index(self, project_id: int) -> None:
        self.jobs.submit("index", project_id)

    def queue_fit(self, project_id: int) -> None:
        self.jobs.submit("fit", project_id)

    def versions(self, project_id: int | None) -> list[str]:
        return self.projects.versions(project_id)

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
        """Predictions scored by ``queue_scores``, else by the stored queue of ``model_version``."""
        if queue_scores is None and project_id is not None:
            priorities_version, stored = self.state(project_id).priorities()
            queue_scores = stored if priorities_version == model_version else {}
        current = self.state(project_id).current() if project_id is not None else None
        fitted = current.metrics if current is not None and current.model_version == model_version else {}
        return build_predictions(
            tasks, labeling, features, model, model_version, queue_scores or {},
            self._suggestion_threshold(fitted), fitted.get("coarse_precision") or None,
        )

    def _suggestion_threshold(self, fitted: Mapping[str, Any]) -> float:
        """The fine confidence from which a suggestion is pre-ticked: FINE_CONFIDENCE_THRESHOLD, raised to the
        calibrated threshold of the served version (never, when no threshold reached SUGGESTION_PRECISION)."""
        floor = self.config.fine_confidence_threshold
        if self.config.suggestion_precision <= 0:
            return floor
        suggestion = fitted.get("suggestion")
        calibrated = suggestion.get("threshold") if isinstance(suggestion, Mapping) else None
        return float("inf") if calibrated is None else max(floor, float(calibrated))

    # --- background jobs --------------------------------------------------------------------------------------

    def _project_labeling(self, project_id: int, client: LabelStudioAPI) -> tuple[ProjectLabeling, str]:
        project = client.get_project(project_id)
        label_config = project.get("label_config") if isinstance(project, Mapping) else None
        if not isinstance(label_config, str) or not label_config:
            label_config = self.projects.context(project_id).label_config
        if not label_config:
            raise LabelStudioError(f"project {project_id} has no label config")
        self.projects.context(project_id).label_config = label_config
        return self.labeling(label_config), label_config

    def _segmentation_labeling(self, label_config: str | None) -> SegmentationLabeling | None:
        """The config's segmentation tags, None for the other layouts; a broken <BrushLabels> is a 422."""
        try:
            return parse_segmentation_config(label_config) if label_config else None
        except LabelConfigError as exc:
            raise InvalidInput(f"unsupported label config: {exc}", status=422, kind="unsupported_label_config") from exc

    def _project_segmentation(self, project_id: int, client: LabelStudioAPI
                              ) -> tuple[SegmentationLabeling, str] | None:
        """The segmentation tags and the label config they came from (the one /setup or /predict brought; Label
        Studio is asked only when none came: a worker); None for the other layouts."""
        label_config = self.projects.context(project_id).label_config
        if not label_config:
            project = client.get_project(project_id)
            label_config = project.get("label_config") if isinstance(project, Mapping) else None
        segmentation = self._segmentation_labeling(label_config)
        return (segmentation, str(label_config)) if segmentation is not None else None

    def run_index(self, project_id: int) -> None:
        """Embed every task and get its weak label; at cold start, push VLM pre-annotations ranked for diversity."""
        # Same lock as fit: an index push must never interleave with a fit's push and PATCH.
        try:
            with self.jobs.project_lock(project_id, self.state(project_id).lock_path):
                self._index_locked(project_id)
        except Exception:
            self.projects.context(project_id).indexed_schema = None  # the next /setup queues the index again
            raise
        # What indexing left in memory stays: full collections stop scanning it, so they no longer stall every
        # thread (and /health, which Label Studio gives 1 s) for a time that grows with the project.
        gc.freeze()
        release_free_heap()

    def _index_locked(self, project_id: int) -> None:
        client = self._client(project_id)
        if self._project_segmentation(project_id, client) is not None:
            return  # a segmentation project's pre-annotations come from its fits (nothing to draw before one)
        labeling, label_config = self._project_labeling(project_id, client)
        if is_multilabel(labeling):
            return self.multilabel.index(project_id, client, labeling, label_config)
        tasks = self._list_and_embed(project_id, client, labeling)
        self.state(project_id).write_task_list(labeling.image_value_key, tasks)  # what the fits start from
        # Every image was worked on page by page: what is not cached now failed, and was counted then.
        features = self.extractor.features(project_id, tasks, labeling, client, fetch=False)
        self.projects.context(project_id).indexed_schema = schema_hash(label_config)
        if not self.config.push_predictions:
            return
        state = self.state(project_id)
        model, model_version = self.projects.served_model(project_id, labeling)
        unlabeled = [
            i for i, t in enumerate(tasks) if features.keys[i] is not None and task_labels(labeling, t) is None
        ]
        if not unlabeled:
            return
        queue_scores: dict[int, float] | None = None
        if model is None and model_version == COLD_START_VERSION:
            priorities_version, _ = state.priorities()
            if priorities_version != COLD_START_VERSION:
                scores = cold_start_queue(
                    features.pool_embeddings(unlabeled),
                    features.weak_matrix(unlabeled, labeling.hierarchy),
                    labeling.hierarchy,
                    self.config.query_batch_size,
                )
                queue_scores = {int(tasks[i]["id"]): float(score) for i, score in zip(unlabeled, scores)}
                state.write_priorities(COLD_START_VERSION, queue_scores)
        already = state.pushed_tasks(model_version)
        to_push = [i for i in unlabeled if tasks[i]["id"] not in already]
        if to_push and model is not None:  # tasks that arrived after the fit: placed in its queue, no retrain
            arrivals = features.subset(to_push)
            self.assistant.score_arrivals(state, model_version, [int(tasks[i]["id"]) for i in to_push],
                                          model.predict_fine_proba(arrivals.embedding_matrix(list(range(len(to_push))))))
        if to_push:
            # The head of the queue now (lowest scores first), the rest in a push job that does not hold the
            # project lock while Label Studio imports, so the first fit does not wait for the whole project's push.
            stored_version, stored = state.priorities()
            order = queue_scores if queue_scores is not None else stored if stored_version == model_version else {}
            to_push.sort(key=lambda i: order.get(int(tasks[i]["id"]), 1.0))
            head = to_push[: self.config.push_head_tasks]
            self._push(project_id, client, tasks, head, labeling, features, model, model_version, queue_scores)
            if len(to_push) > len(head) and state.priorities()[0] == model_version:
                self.jobs.submit("push", project_id, {"model_version": model_version})
            elif len(to_push) > len(head):  # no stored queue to resume from (arrivals into a version without one)
                self._push(project_id, client, tasks, to_push[len(head):], labeling, features, model, model_version,
                           queue_scores)

    def _list_and_embed(
        self, project_id: int, client: LabelStudioAPI, labeling: ProjectLabeling
    ) -> list[dict[str, Any]]:
        """Every task of the project, each page's images embedded while Label Studio lists the next page: listing
        is Label Studio's slowest answer, and when it was serial all of it came before the first embedding.

        Two pages are embedded at once (INDEX_PAGES_IN_FLIGHT): a page's last chunks run their forward passes
        while the next page's first chunks are downloaded and decoded, so the backbone never waits at a page's
        end for the next page to be prepared."""
        tasks: list[dict[str, Any]] = []
        pages = client.task_pages(project_id, annotations=False)  # images need no annotations: listed after
        embedding: set[Future[Any]] = set()
        with ThreadPoolExecutor(1, thread_name_prefix=f"vlm-al-list-{project_id}") as lister, \
                ThreadPoolExecutor(INDEX_PAGES_IN_FLIGHT, thread_name_prefix=f"vlm-al-page-{project_id}") as pager:
            upcoming = lister.submit(next, pages, None)
            while (page := upcoming.result()) is not None:
                upcoming = lister.submit(next, pages, None)
                if len(embedding) == INDEX_PAGES_IN_FLIGHT:
                    # whichever page is done first (the backbone may have taken the later page's chunks first)
                    done, embedding = wait_futures(embedding, return_when=FIRST_COMPLETED)
                    for future in done:
                        future.result()
                embedding.add(pager.submit(self.extractor.features, project_id, page, labeling, client))
                tasks.extend(page)
            for future in embedding:
                future.result()
        attach_annotations(client, project_id, tasks)
        return tasks

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
        serving: Callable[[], Any] | None = None,
    ) -> int:
        """Push the predictions of ``tasks[positions]`` in that order, PUSH_BATCH_TASKS per import request: each
        batch's predictions are built, sent and recorded before the next (a push cut short resumes after the last
        recorded batch), and the project follows ``model_version`` from the first batch Label Studio took.

        ``serving`` (the push job, which holds no lock while Label Studio imports): a context manager that takes
        the project lock and says whether ``model_version`` is still the served one. Each batch is checked before
        it is sent and recorded only if still current; the push stops once a newer version is served, and it
        never moves the project's version (the fit that made it did)."""
        state = self.state(project_id)
        created = sent = 0
        moved = serving is not None
        for start in range(0, len(positions), self.config.push_batch_tasks):
            if serving is not None:
                if self.jobs.is_pending("fit", project_id):
                    # A fit is due: it will push its own queue, and on a default Label Studio every import batch
                    # recounts the whole project, which would slow that fit's head push. A fit that makes no new
                    # version lets this push go on (``_resume_push``).
                    logger.info("project %s: the push of %s stops for a coming fit", project_id, model_version)
                    break
                with serving() as current:
                    if not current:
                        break
            batch = positions[start : start + self.config.push_batch_tasks]
            subset = [tasks[i] for i in batch]
            predictions = self._predictions(
                project_id, subset, labeling, features.subset(batch), model, model_version, queue_scores
            )
            predictions = self.assistant.mark_predictions(state, labeling, subset, predictions)
            payload = [
                {"task": int(task["id"]), **prediction}
                for task, prediction in zip(subset, predictions)
                if prediction["result"]
            ]
            del predictions
            batch_created = client.import_predictions(project_id, payload)
            created += batch_created
            sent += len(payload)
            self.metrics.predictions_pushed.inc(batch_created)
            if serving is None:
                state.record_pushed(model_version, [p["task"] for p in payload], replace=replace and start == 0)
            else:
                with serving() as current:
                    if not current:
                        break  # a newer version's record must not be overwritten
                    state.record_pushed(model_version, [p["task"] for p in payload])
            # Label Studio refuses a model_version that no prediction carries.
            if batch_created > 0 and not moved:
                client.set_model_version(project_id, model_version)
                state.record_label_studio_versions(pushed=[model_version])
                moved = True
        logger.info("project %s: pushed %d/%d predictions of %s", project_id, created, sent, model_version)
        return created

    def _push_head(self, project_id: int, client: LabelStudioAPI, model_version: str, task_ids: list[int],
                   import_instead: Callable[[], Any]) -> None:
        """A new queue's head through Label Studio's "Retrieve predictions" action on those tasks (it asks /predict
        for them, answered by the version just committed, and saves each prediction: its cost grows with the head,
        not with the project), then the project's model_version. When Label Studio saved none (no ML backend of
        the project reached this one), ``import_instead`` imports the head."""
        state = self.state(project_id)
        try:
            client.retrieve_predictions(project_id, task_ids)
            retrieved = model_version in client.prediction_versions(task_ids[0])
            why = "it saved no prediction of it (is this backend the project's connected model, reachable from " \
                  "Label Studio?)"
        except LabelStudioError as exc:  # e.g. a Label Studio without the action, or a key without its permission
            retrieved, why = False, str(exc)
        if not retrieved:
            logger.warning("project %s: Label Studio did not retrieve the head of %s: %s; importing it instead",
                           project_id, model_version, why)
            import_instead()
            return
        state.record_pushed(model_version, task_ids, replace=True)
        self.metrics.predictions_pushed.inc(len(task_ids))
        client.set_model_version(project_id, model_version)
        state.record_label_studio_versions(pushed=[model_version])
        logger.info("project %s: Label Studio retrieved the %d-task head of %s", project_id, len(task_ids),
                    model_version)

    def _tasks_for_fit(self, project_id: int, client: LabelStudioAPI) -> list[dict[str, Any]]:
        """The task list of the last index plus only the annotated tasks (Label Studio's export): a fit's Label
        Studio traffic grows with the annotations, not with the project. Before any index: every task."""
        task_list = self.state(project_id).task_list()
        if task_list is None:
            return client.fetch_tasks(project_id)
        return task_list.tasks_with(client.fetch_annotated_tasks(project_id))

    def run_push(self, project_id: int, model_version: str) -> int:
        """Push the rest of a queue (after the head its fit or the cold start pushed), unless a newer version has
        replaced it. The project lock is held to read the state and to record each batch, not while Label Studio
        imports: the next fit does not wait for a push whose size grows with the project."""
        state = self.state(project_id)

        @contextmanager
        def serving() -> Iterator[bool]:
            with self.jobs.project_lock(project_id, state.lock_path):
                current = state.current()
                yield (current.model_version if current is not None else COLD_START_VERSION) == model_version

        with serving() as current:
            priorities_version, scores = state.priorities()
            task_list = state.task_list()
            if not current or priorities_version != model_version or task_list is None:
                return 0  # a newer fit pushes its own queue
            already = state.pushed_tasks(model_version)
        client = self._client(project_id)
        labeling, _ = self._project_labeling(project_id, client)
        model, served_version = self.projects.served_model(project_id, labeling)
        if served_version != model_version:
            return 0
        tasks = [t for t in task_list.tasks_with(()) if t["id"] in scores and t["id"] not in already]
        features = self.extractor.features(project_id, tasks, labeling, client)
        positions = sorted(features.usable_positions(), key=lambda i: scores[int(tasks[i]["id"])])
        if not positions:
            return 0
        return self._push(project_id, client, tasks, positions, labeling, features, model, model_version, scores,
                          serving=serving)

    def run_fit(self, project_id: int) -> str | None:
        """Retrain on every annotation, re-estimate T, save a new version, re-rank and push the queue."""
        state = self.state(project_id)
        started = time.monotonic()
        with self.jobs.project_lock(project_id, state.lock_path):
            try:
                new_version = self._fit_locked(project_id, state)
            except Exception:
                self.metrics.fits.labels(outcome="failed").inc()
                raise
        self.metrics.fits.labels(outcome="trained" if new_version else "skipped").inc()
        release_free_heap()  # the fit's transient (n_tasks, dim) copies
        current = state.current()
        counts = current.metrics if (current is not None and new_version) else {}
        logger.info("project %s: fit finished in %.1f s -> %s (%s tasks, %s fine labels, %s weak labels)",
                    project_id, time.monotonic() - started, new_version or "no new version",
                    counts.get("n_tasks", "-"), counts.get("n_fine", "-"), counts.get("n_weak", "-"))
        return new_version

    def run_curve(self, project_id: int) -> bool:
        """The assistant's learning curve (extra fits) as its own job, outside the fit lock."""
        state = self.state(project_id)
        client = self._client(project_id)
        labeling, _ = self._project_labeling(project_id, client)
        tasks, _ = self.assistant.human_view(state, labeling, self._tasks_for_fit(project_id, client))
        features = self.extractor.features(project_id, tasks, labeling, client)
        usable = features.usable_positions()
        if not usable:
            return False
        hierarchy, embeddings = labeling.hierarchy, features.pool_embeddings(usable)
        return self.assistant.run_curve(
            state, embeddings, collect_labels(labeling, tasks, usable, project_id),
            weak_answers(features.weak_matrix(usable, hierarchy)),
            lambda config: self.projects.new_classifier(hierarchy, int(embeddings.shape[1]), config),
            lambda: self.jobs.project_lock(project_id, state.lock_path))

    def _fit_locked(self, project_id: int, state: ProjectState) -> str | None:
        client = self._client(project_id)
        segmentation = self._project_segmentation(project_id, client)
        if segmentation is not None:
            version = self.segmentation.fit_and_push(project_id, client, *segmentation,
                                                     push=self.config.push_predictions)
            state.prune_versions(self.config.keep_model_versions)
            return version
        labeling, label_config = self._project_labeling(project_id, client)
        if is_multilabel(labeling):
            version = self.multilabel.fit(project_id, state, client, labeling, label_config)
            state.prune_versions(self.config.keep_model_versions)
            return version
        hierarchy = labeling.hierarchy
        phases = PhaseTimes()
        # Auto-accepted annotations are not human labels: the fit sees those tasks as unlabeled.
        tasks, auto_accepted = self.assistant.human_view(state, labeling, self._tasks_for_fit(project_id, client))
        phases.mark("tasks")
        features = self.extractor.features(project_id, tasks, labeling, client)
        phases.mark("features")
        usable = features.usable_positions()
        if not usable:
            logger.warning("project %s: no usable task images; nothing to fit", project_id)
            return None
        labels = collect_labels(labeling, tasks, usable, project_id)
        if not np.any(labels.fine != MISSING_LABEL):
            logger.info("project %s: no fine labels yet; the cold-start queue stays", project_id)
            self._resume_push(project_id, state)
            return None
        digest = self._inputs_digest(label_config, tasks, usable, features, labels)
        current = state.current()
        if current is not None and current.metrics.get("inputs_digest") == digest:
            # Nothing new since the served version: keep it, push nothing, prune nothing.
            logger.info("project %s: nothing new since %s (same labels, images and config); no retrain",
                        project_id, current.model_version)
            self._resume_push(project_id, state)
            return None
        embeddings = features.pool_embeddings(usable)
        dim = int(embeddings.shape[1])
        outcome = fit_and_rank(
            hierarchy=hierarchy,
            embeddings=embeddings,
            labels=labels,
            weak_probabilities=features.weak_matrix(usable, hierarchy),
            new_classifier=lambda training_config: self.projects.new_classifier(hierarchy, dim, training_config),
            torch_threads=self.config.torch_threads,
            budget_labels=self.config.query_batch_size,
            cost_full=self.config.cost_full,
            cost_weak=self.config.cost_weak,
            settings=server_learner_settings(self.config.query_strategy),
            suggestion_precision=self.config.suggestion_precision,
            out_of_fold=True,
        )
        phases.mark("training")
        classifier, estimate = outcome.classifier, outcome.transition_estimate
        unlabeled_rows = np.flatnonzero(~labels.labeled)
        scores = {int(tasks[usable[row]]["id"]): float(outcome.row_scores[row]) for row in unlabeled_rows}
        new_version = state.next_version()
        plan = self.assistant.after_fit(
            FitContext(project_id, state, labeling, tasks, usable, labels, outcome, new_version, auto_accepted), scores)
        state.write_priorities(new_version, scores)
        state.commit_version(
            new_version, classifier.save, schema_hash(label_config),
            {**outcome.metrics(labels, len(tasks)), "inputs_digest": digest},
        )
        # Only now, after the commit: the T history never names a version that does not exist.
        state.append_transition(
            {"model_version": new_version, "n_trusted": outcome.n_trusted,
             "coarse_classes": list(hierarchy.coarse_classes), **estimate.to_dict()}
        )
        self.projects.serve(project_id, classifier, new_version)
        phases.mark("assistant and commit")
        if self.config.push_predictions and unlabeled_rows.size:
            # The head of the queue now (Label Studio serves ascending scores of the current version only); the
            # rest in a background job, so the time to a re-ordered queue does not grow with the project.
            positions = sorted((usable[row] for row in unlabeled_rows), key=lambda i: scores[int(tasks[i]["id"])])
            head = positions[: self.config.push_head_tasks]
            self._push_head(project_id, client, new_version, [int(tasks[i]["id"]) for i in head],
                            lambda: self._push(project_id, client, tasks, head, labeling, features, classifier,
                                               new_version, scores, replace=True))
            if len(positions) > len(head):
                self.jobs.submit("push", project_id, {"model_version": new_version})
            phases.mark("push head")
        logger.info("project %s: fit of %s: %s", project_id, new_version, phases)
        self.assistant.apply(state, labeling, getattr(client, "_sdk", None) if self.config.push_predictions else None,
                             plan)
        if plan.curve_due:
            self.jobs.submit("curve", project_id)
        state.prune_versions(self.config.keep_model_versions)
        # Deleting a version costs Label Studio about 30 s at 10k tasks and does not change what it serves: old
        # versions (v0 included) are deleted rarely, all in one background job.
        old = [v for v in state.versions_in_label_studio() if v != new_version]
        if self.config.push_predictions and len(old) >= self.config.prune_label_studio_every:
            self.jobs.submit("prune", project_id, {"versions": old})
        return new_version

    def _resume_push(self, project_id: int, state: ProjectState) -> None:
        """After a fit that made no version: the served queue's push job may have stopped for it; it goes on (and
        pushes nothing when everything was pushed)."""
        priorities_version, _ = state.priorities()
        if self.config.push_predictions and priorities_version is not None:
            self.jobs.submit("push", project_id, {"model_version": priorities_version})

    def _inputs_digest(
        self,
        label_config: str,
        tasks: Sequence[Mapping[str, Any]],
        usable: Sequence[int],
        features: TaskFeatures,
        labels: Any,
    ) -> str:
        """What a fit learns from: the config, the models, each usable task's image and labels."""
        digest = hashlib.sha256()
        weak = self.weak_annotators.describe() or ""
        digest.update(f"{schema_hash(label_config)}|{self.backbone.name}|{weak}\n".encode())
        for row, position in enumerate(usable):
            digest.update(f"{tasks[position].get('id')}|{features.keys[position]}|{int(labels.fine[row])}|"
                          f"{int(labels.human_coarse[row])}|{bool(labels.labeled[row])}\n".encode())
        return digest.hexdigest()

    def _delete_versions(self, project_id: int, versions: Sequence[str]) -> None:
        client = self._client(project_id)
        current = self.current_model_version(project_id)
        for version in versions:
            if version == current:
                continue  # deleting the current version would clear the project's model_version
            client.delete_model_version(project_id, version)
            self.state(project_id).record_label_studio_versions(deleted=[version])


class PhaseTimes:
    """Seconds between marks, for the log: where a fit's time goes as the project grows."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.seconds.items())


def _same_host(a: str, b: str) -> bool:
    """Whether two Label Studio base URLs name the same origin (scheme, host, port)."""
    from backend.fetch import ImageFetchError, parse_http_url

    try:
        return parse_http_url(a).origin == parse_http_url(b).origin
    except ImageFetchError:
        return a.rstrip("/") == b.rstrip("/")


def _required_project(data: Mapping[str, Any]) -> Any:
    project = data.get("project")
    if project is None:
        raise InvalidInput("the webhook body has no 'project'")
    return project

