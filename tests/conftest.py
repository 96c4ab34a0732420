"""Shared fixtures for the server tests: a fake Label Studio on 127.0.0.1, deterministic fake models."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from flask import Flask, jsonify, request
from PIL import Image
from werkzeug.serving import make_server

from backend.app import create_app
from backend.config import Config
from backend.jobs import InlineJobRunner
from backend.label_config import recommended_label_config
from backend.ls_client import LabelStudioClientFactory, MountedFiles
from backend.metrics import BackendMetrics
from backend.features import ImageCodec
from backend.service import MLBackend
from model.embedding_store import EmbeddingStore, content_key
from model.hierarchy import LabelHierarchy
from model.images import ImageLimits, decode_image

API_KEY = "0123456789abcdef0123456789abcdef01234567"
PROJECT_ID = 7

GROUPS = {"Top": ["T-shirt", "Shirt"], "Shoe": ["Sneaker", "Boot"]}
# colour of each fine class: red channel says the coarse group, blue channel the fine class within it
FINE_COLOURS = {"T-shirt": (220, 40, 30), "Shirt": (220, 40, 220), "Sneaker": (30, 200, 30), "Boot": (30, 200, 220)}


def hierarchy() -> LabelHierarchy:
    return LabelHierarchy.from_groups(GROUPS)


def label_config() -> str:
    return recommended_label_config(hierarchy())


def png_bytes(colour: tuple[int, int, int], size: int = 16, jitter: int = 0) -> bytes:
    rng = np.random.default_rng(jitter)
    pixels = np.clip(np.array(colour)[None, None, :] + rng.integers(-12, 13, (size, size, 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class FakeBackbone:
    """Embeds an image by its mean colour: deterministic, and separable enough for plumbing tests."""

    name = "fake-colour-backbone"
    dim = 6

    def __init__(self) -> None:
        self.images_embedded = 0

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        self.images_embedded += len(images)
        rows = []
        for image in images:
            mean = np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0
            rows.append(np.concatenate([mean, 1.0 - mean]))
        return np.asarray(rows, dtype=np.float32)


@dataclass
class FakeWeakLabels:
    coarse_index: np.ndarray
    coarse_probabilities: np.ndarray


class FakeWeakAnnotator:
    """A 'VLM' that calls reddish images Top and the rest Shoe, 80 % sure."""

    name = "fake-vlm"
    coarse_classes = ("Top", "Shoe")
    cost_per_label = 0.02

    def __init__(self) -> None:
        self.images_annotated = 0

    def annotate(self, images: Sequence[Image.Image]) -> FakeWeakLabels:
        self.images_annotated += len(images)
        probabilities = []
        for image in images:
            red = np.asarray(image, dtype=np.float32)[..., 0].mean()
            probabilities.append([0.8, 0.2] if red > 128 else [0.2, 0.8])
        p = np.asarray(probabilities, dtype=np.float32)
        return FakeWeakLabels(p.argmax(axis=1).astype(np.int64), p)


def image_codec(limits: ImageLimits | None = None) -> ImageCodec:
    return ImageCodec(
        content_key=content_key,
        decode=lambda data, *, at_least=None: decode_image(data, limits or ImageLimits(), at_least=at_least),
    )


# --- fake Label Studio ------------------------------------------------------------------------------------------


@dataclass
class FakeLabelStudio:
    """Just enough of Label Studio's API, over real HTTP, recording what the backend sent."""

    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    label_config: str = ""
    project_model_version: str = "backend-title"
    imports: list[list[dict[str, Any]]] = field(default_factory=list)
    patches: list[dict[str, Any]] = field(default_factory=list)
    deleted_versions: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)
    auth_headers: list[str] = field(default_factory=list)
    drop_predictions: int = 0
    ml_url: str | None = None
    """The ML backend connected to the project, which the "Retrieve predictions" action asks (None: none)."""
    refuse_actions: bool = False
    """Answer Data Manager actions 403, as for a key without that permission."""
    retrieved: list[list[dict[str, Any]]] = field(default_factory=list)
    """Predictions saved by each "Retrieve predictions" action, as the connected backend's /predict gave them."""
    requests: list[str] = field(default_factory=list)
    """Every API path called (images excluded), in order."""
    listed_fields: list[str] = field(default_factory=list)
    """The ``fields`` asked by each task-list request (Label Studio's default: task_only)."""
    listed_includes: list[str | None] = field(default_factory=list)
    """The ``include`` (sparse fields) of each task-list request; None: every field."""
    sparse_fields: bool = True
    """Honour ``include`` (Label Studio 1.23 does; False: a Label Studio that sends every field)."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_task(self, task_id: int, fine: str | None, jitter: int = 0, image: bytes | None = None,
                 uploaded: bool = False) -> dict[str, Any]:
        """``uploaded``: the image URL is an uploaded file's (``/data/upload/<project>/<name>``), else Local Files'."""
        name = f"img{task_id}.png"
        colour = FINE_COLOURS[fine] if fine else (128, 128, 128)
        self.files[name] = image if image is not None else png_bytes(colour, jitter=jitter or task_id)
        url = f"/data/upload/{PROJECT_ID}/{name}" if uploaded else f"/data/local-files/?d=fashion/{name}"
        task = {"id": task_id, "data": {"image": url}, "annotations": [], "predictions": [], "project": PROJECT_ID}
        self.tasks.append(task)
        return task

    def annotate(self, task_id: int, fine: str, annotation_id: int | None = None) -> None:
        coarse = hierarchy().parent_name(fine)
        fine_control = {"Top": "fine_top", "Shoe": "fine_shoe"}[coarse]
        result = [
            {"from_name": "coarse", "to_name": "image", "type": "choices", "value": {"choices": [coarse]},
             "origin": "prediction"},
            {"from_name": fine_control, "to_name": "image", "type": "choices", "value": {"choices": [fine]},
             "origin": "manual"},
        ]
        for task in self.tasks:
            if task["id"] == task_id:
                task["annotations"].append({"id": annotation_id or task_id * 100, "result": result,
                                            "was_cancelled": False, "ground_truth": False,
                                            "updated_at": "2026-01-01T00:00:00Z"})
                return
        raise KeyError(task_id)

    def make_app(self) -> Flask:
        app = Flask("fake_label_studio")

        def authorised() -> bool:
            header = request.headers.get("Authorization", "")
            with self.lock:
                self.auth_headers.append(header)
            return header == f"Token {API_KEY}"

        @app.before_request
        def check_auth():
            if request.path.startswith("/api/"):
                with self.lock:
                    self.requests.append(f"{request.method} {request.path}")
            if not authorised():
                return jsonify(detail="Authentication credentials were not provided."), 401
            return None

        @app.get("/api/tasks/")
        def list_tasks():
            page = int(request.args.get("page", 1))
            size = int(request.args.get("page_size", 100))
            chunk = self.tasks[(page - 1) * size : page * size]
            if page > 1 and not chunk:
                return jsonify(detail="Invalid page."), 404
            with self.lock:
                self.listed_fields.append(request.args.get("fields", "task_only"))
                self.listed_includes.append(request.args.get("include"))
            if request.args.get("fields", "task_only") != "all":  # Label Studio's default: counts, no annotations
                chunk = [{**{k: v for k, v in task.items() if k not in ("annotations", "predictions")},
                          "total_annotations": sum(not a.get("was_cancelled") for a in task["annotations"]),
                          "cancelled_annotations": sum(bool(a.get("was_cancelled")) for a in task["annotations"])}
                         for task in chunk]
            if request.args.get("include") and self.sparse_fields:  # Label Studio's sparse fields (REST_FLEX_FIELDS)
                wanted = set(request.args["include"].split(","))
                # as Label Studio 1.23.2 does: a nested annotation keeps only its id, whatever is named
                chunk = [{k: [{"id": a["id"]} for a in v] if k == "annotations" else v
                          for k, v in task.items() if k in wanted} for task in chunk]
            return jsonify(tasks=chunk, total=len(self.tasks), total_annotations=0, total_predictions=0)

        @app.get("/api/projects/<int:pid>/export")
        def export(pid: int):
            assert request.args.get("download_all_tasks") == "false"
            return jsonify([task for task in self.tasks if task["annotations"]])

        @app.route("/api/projects/<int:pid>/", methods=["GET", "PATCH"])
        def project(pid: int):
            if request.method == "PATCH":
                body = request.get_json()
                with self.lock:
                    self.patches.append(body)
                    self.project_model_version = body.get("model_version", self.project_model_version)
            return jsonify(id=pid, label_config=self.label_config, model_version=self.project_model_version)

        @app.post("/api/projects/<int:pid>/import/predictions")
        def import_predictions(pid: int):
            body = request.get_json()
            with self.lock:
                self.imports.append(body)
            return jsonify(created=max(len(body) - self.drop_predictions, 0)), 201

        @app.post("/api/dm/actions/")
        def action():
            if self.refuse_actions:
                return jsonify(detail="You do not have permission to perform this action."), 403
            if request.args.get("id") != "retrieve_tasks_predictions":
                return jsonify(detail="unknown action"), 404
            pid = int(request.args["project"])
            wanted = set(request.get_json()["selectedItems"]["included"])
            selected = [task for task in self.tasks if task["id"] in wanted]
            saved: list[dict[str, Any]] = []
            if self.ml_url is not None and selected:
                answer = requests.post(f"{self.ml_url}/predict", timeout=60, json={
                    "tasks": selected, "project": f"{pid}.1767225600", "label_config": self.label_config})
                answer.raise_for_status()
                saved = [{"task": task["id"], **result}
                         for task, result in zip(selected, answer.json()["results"]) if "result" in result]
            with self.lock:
                self.retrieved.append(saved)
            return jsonify(processed_items=len(selected), detail=f"Retrieved {len(selected)} predictions")

        @app.get("/api/predictions/")
        def list_predictions():
            task_id = int(request.args["task"])
            with self.lock:
                stored = [p for batch in self.imports + self.retrieved for p in batch if p["task"] == task_id]
            return jsonify([{"id": n + 1, "task": task_id, "project": PROJECT_ID, "result": p["result"],
                             "score": p.get("score"), "model_version": p.get("model_version")}
                            for n, p in enumerate(stored)])

        @app.delete("/api/projects/<int:pid>/model-versions/")
        def delete_version(pid: int):
            with self.lock:
                self.deleted_versions.append(request.get_json()["model_version"])
            return jsonify(deleted=1)

        @app.get("/data/upload/<path:filename>")
        @app.get("/data/local-files/")
        def local_file(filename: str = ""):
            name = (filename or request.args.get("d", "")).split("/")[-1]
            with self.lock:
                self.downloads.append(name)
            if name not in self.files:
                return "not found", 404
            return self.files[name], 200, {"Content-Type": "image/png"}

        return app


@pytest.fixture
def fake_ls() -> Iterator[FakeLabelStudio]:
    fake = FakeLabelStudio(label_config=label_config())
    server = make_server("127.0.0.1", 0, fake.make_app(), threaded=True)
    fake.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    def build(**overrides: Any) -> Config:
        base = Config(model_dir=tmp_path / "model_dir", fit_debounce_seconds=0.05, query_batch_size=3, torch_threads=1,
                      fine_confidence_threshold=0.0, suggestion_precision=0.0)
        return replace(base, **overrides)

    return build


@dataclass
class BackendParts:
    backend: MLBackend
    backbone: FakeBackbone
    weak: FakeWeakAnnotator
    store: EmbeddingStore


@pytest.fixture
def make_backend(fake_ls: FakeLabelStudio) -> Callable[..., BackendParts]:
    """A backend with fake models wired to the fake Label Studio (LABEL_STUDIO_URL/API key set in its Config)."""

    def build(config: Config, jobs: Any = None, weak_annotator_factory: Any = None) -> BackendParts:
        """With ``weak_annotator_factory``, each project's weak annotator comes from it instead of FakeWeakAnnotator."""
        config = replace(config, label_studio_url=fake_ls.url, label_studio_api_key=API_KEY)
        backbone, weak = FakeBackbone(), FakeWeakAnnotator()
        store = EmbeddingStore(config.model_dir / "embeddings.sqlite")
        backend = MLBackend(
            config,
            backbone=backbone,
            weak_annotator=weak if weak_annotator_factory is None else None,
            weak_annotator_factory=weak_annotator_factory,
            embedding_store=store,
            image_codec=image_codec(ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)),
            ls_clients=LabelStudioClientFactory(
                download_root=config.model_dir / "downloads",
                max_image_bytes=config.max_image_bytes,
                default_url=config.label_studio_url,
                default_api_key=config.label_studio_api_key,
                mounted=MountedFiles(config.local_files_document_root, config.uploaded_files_root),
            ),
            jobs=jobs if jobs is not None else InlineJobRunner(),
            metrics=BackendMetrics(),
        )
        built.append(backend)
        # Served over real HTTP as the project's connected model: the "Retrieve predictions" action calls /predict.
        server = make_server("127.0.0.1", 0, create_app(config, backend), threaded=True)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        fake_ls.ml_url = f"http://127.0.0.1:{server.server_port}"
        return BackendParts(backend, backbone, weak, store)

    built: list[MLBackend] = []
    servers: list[Any] = []
    yield build
    for server in servers:
        server.shutdown()
    for backend in built:
        backend.jobs.shutdown()


def counter_value(backend: MLBackend, name: str, **labels: str) -> float:
    value = backend.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value
