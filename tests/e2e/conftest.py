"""A real Label Studio and this backend (under gunicorn) on loopback ports, shared by the e2e and browser tests.

Label Studio runs from its own virtual environment: $VLM_AL_LABEL_STUDIO_VENV if set, otherwise one
installed by `ensure_label_studio_venv` (about 1 GB, once). A fresh database takes about a minute to
migrate; everything after that is polled with timeouts.
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from label_studio_sdk import LabelStudio

from harness import ls_bootstrap as lsb
from backend.label_config import ProjectLabeling, parse_label_config, recommended_label_config
from backend.state import ProjectState
from model.datasets import fashion_mnist_hierarchy

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 112
# Generous: the fit runs on a small shared CPU, and the first one also embeds every task.
FIT_TIMEOUT_S = 240.0


@dataclass
class Stack:
    label_studio: lsb.LabelStudioServer
    backend: lsb.BackendServer
    login: lsb.LabelStudioLogin
    document_root: Path
    model_dir: Path
    timings: dict[str, float] = field(default_factory=dict)

    def client(self) -> LabelStudio:
        return self.label_studio.client()


@dataclass
class LabeledProject:
    """A project of Fashion-MNIST tasks with the recommended layout; knows each task's true class."""

    stack: Stack
    project_id: int
    task_ids: list[int]
    class_by_task: dict[int, str]
    labeling: ProjectLabeling
    ml_backend_id: int | None = None
    annotated: set[int] = field(default_factory=set)

    @property
    def client(self) -> LabelStudio:
        return self.stack.client()

    def connect(self) -> int:
        if self.ml_backend_id is None:
            self.ml_backend_id = lsb.connect_ml_backend(self.client, self.project_id, self.stack.backend.url)
        return self.ml_backend_id

    def state(self) -> ProjectState:
        return ProjectState(self.stack.model_dir, self.project_id)

    def model_version(self) -> str | None:
        return self.client.projects.get(self.project_id).model_version

    def predictions(self) -> list[dict[str, Any]]:
        return lsb.project_predictions(self.client, self.project_id)

    def coarse_of(self, fine: str) -> str:
        return self.labeling.hierarchy.parent_name(fine)

    def annotation_result(self, fine: str, coarse: str | None = None) -> list[dict[str, Any]]:
        """What the labeling page saves: the coarse choice plus the species in that group's list."""
        coarse = coarse or self.coarse_of(fine)
        image = self.labeling.image_name
        return [
            {"from_name": self.labeling.coarse_control, "to_name": image, "type": "choices",
             "value": {"choices": [coarse]}, "origin": "prediction"},
            {"from_name": self.labeling.fine_control_by_coarse[coarse], "to_name": image, "type": "choices",
             "value": {"choices": [fine]}, "origin": "manual"},
        ]

    def annotate(self, task_id: int) -> None:
        self.client.annotations.create(id=task_id, result=self.annotation_result(self.class_by_task[task_id]))
        self.annotated.add(task_id)

    def wait_for_fit(self, n_fine: int, timeout_s: float = FIT_TIMEOUT_S) -> str:
        """Wait until a fit that saw `n_fine` full labels is current and Label Studio's project follows it."""

        def fitted() -> str | None:
            current = self.state().current()
            if current is None or current.metrics.get("n_fine") != n_fine:
                return None
            return current.model_version if self.model_version() == current.model_version else None

        return lsb.wait_until(fitted, timeout_s, f"a model fitted on {n_fine} fine labels", interval_s=1.0)

    def ensure_first_predictions(self, push_timeout_s: float = 120.0) -> list[dict]:
        """Wait for the backend's pushed pre-annotations; if none come, ask Label Studio to call /predict."""
        try:
            return self.wait_for_predictions(timeout_s=push_timeout_s)
        except TimeoutError:
            lsb.request_predictions(self.client, self.project_id)
            return self.wait_for_predictions(timeout_s=60)

    def wait_for_predictions(self, model_version: str | None = None, timeout_s: float = FIT_TIMEOUT_S) -> list[dict]:
        """Predictions of `model_version` (default: the project's) once one exists for every unlabeled task."""

        def ready() -> list[dict] | None:
            version = model_version or self.model_version()
            current = [p for p in self.predictions() if p["model_version"] == version]
            covered = {p["task"] for p in current}
            unlabeled = set(self.task_ids) - self.annotated
            return current if unlabeled and unlabeled <= covered else None

        return lsb.wait_until(ready, timeout_s, f"predictions of {model_version or 'the current version'}",
                              interval_s=1.0)


@pytest.fixture(scope="session")
def label_studio_venv() -> Path:
    """$VLM_AL_LABEL_STUDIO_VENV, or the default venv (installed on first use)."""
    configured = os.environ.get("VLM_AL_LABEL_STUDIO_VENV")
    return lsb.ensure_label_studio_venv(Path(configured) if configured else None)


def _backend_env(label_studio_url: str, token: str, model_dir: Path) -> dict[str, str]:
    return {
        **lsb.clean_environment(Path(sys.executable).parent),
        "LABEL_STUDIO_URL": label_studio_url,
        "LABEL_STUDIO_API_KEY": token,
        "MODEL_DIR": str(model_dir),
        "WEAK_ANNOTATOR": "imagenet-map",
        "BACKBONE": "timm:efficientnet_lite0",
        "IMAGE_SIZE": str(IMAGE_SIZE),
        "FIT_DEBOUNCE_SECONDS": "1",
        "WORKERS": "1",
        "THREADS": "4",
        "TORCH_THREADS": "1",
        "LOG_LEVEL": "INFO",
        # The backend makes the Data Manager queue tab at /setup; the browser test opens the labeling page from it.
        "QUEUE_TAB": "true",
    }


TIMINGS = pytest.StashKey[dict[str, float]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the browser check after the API-level e2e steps, so a failure points at the layer that broke."""
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    timings = config.stash.get(TIMINGS, None)
    if timings:
        rendered = ", ".join(f"{name} {seconds:.1f}" for name, seconds in timings.items())
        terminalreporter.write_line(f"e2e set-up timings (s): {rendered}")


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config, label_studio_venv: Path
) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e")
    started = time.monotonic()
    venv_dir = label_studio_venv
    timings: dict[str, float] = {}
    pytestconfig.stash[TIMINGS] = timings
    login = lsb.LabelStudioLogin("e2e@vlm-al.local", secrets.token_urlsafe(12), lsb.new_token())
    document_root = root / "files"
    model_dir = root / "model_dir"
    ls_port = lsb.ephemeral_port()
    backend_port = lsb.ephemeral_port()
    while backend_port == ls_port:
        backend_port = lsb.ephemeral_port()
    label_studio = lsb.LabelStudioServer(
        venv_dir, root / "label-studio", document_root, login, port=ls_port, log_path=root / "label-studio.log"
    )
    backend = lsb.BackendServer(
        _backend_env(f"http://127.0.0.1:{ls_port}", login.token, model_dir),
        log_path=root / "backend.log",
        port=backend_port,
        command=[sys.executable, "-m", "gunicorn", "backend.wsgi:app", "--bind", f"127.0.0.1:{backend_port}"],
        cwd=REPO_ROOT,
    )
    stack = Stack(label_studio, backend, login, document_root, model_dir, timings)
    try:
        # Label Studio's migrations and the backend's model loading overlap.
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(label_studio.start), pool.submit(backend.start)]:
                future.result()
        timings["label_studio_start"] = label_studio.startup_seconds or 0.0
        timings["backend_start"] = backend.startup_seconds or 0.0
        timings["both_ready"] = time.monotonic() - started
        yield stack
    finally:
        stopping = time.monotonic()
        backend.stop()
        label_studio.stop()
        timings["stop"] = time.monotonic() - stopping


def make_project(stack: Stack, title: str, n_tasks: int, seed: int) -> LabeledProject:
    """A project over `n_tasks` Fashion-MNIST test images with Uncertainty sampling, not yet connected."""
    client = stack.client()
    label_config = recommended_label_config(fashion_mnist_hierarchy())
    project_id = lsb.create_project(client, title, label_config)
    images_dir = stack.document_root / f"project-{project_id}"
    images = lsb.write_fashion_mnist_pngs(images_dir, n_tasks, size=IMAGE_SIZE, seed=seed)
    lsb.connect_local_files_storage(client, project_id, images_dir, stack.document_root)
    task_ids = lsb.import_image_tasks(client, project_id, images.paths, stack.document_root)
    return LabeledProject(
        stack=stack,
        project_id=project_id,
        task_ids=task_ids,
        class_by_task=dict(zip(task_ids, images.class_names)),
        labeling=parse_label_config(label_config),
    )


def backend_get(stack: Stack, path: str, **params: Any) -> Any:
    response = requests.get(stack.backend.url + path, params=params or None, timeout=5)
    response.raise_for_status()
    return response.json()
