"""End to end with basic auth on: Label Studio's webhooks still reach the backend, annotations retrain it, and the
queue follows the new model. (Label Studio creates the project webhook without credentials; /setup adds them.)"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator

import pytest
import requests

from harness import ls_bootstrap as lsb
from backend.state import ProjectState

from .conftest import FIT_TIMEOUT_S, REPO_ROOT, Stack, _backend_env, make_project

pytestmark = pytest.mark.e2e

N_TASKS = 24
N_ANNOTATED = 8
USER = "ls-backend"


@pytest.fixture(scope="module")
def auth_backend(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[lsb.BackendServer, str,
                                                                                             ProjectState]]:
    root = tmp_path_factory.mktemp("e2e-basic-auth")
    password = secrets.token_urlsafe(16)
    env = {**_backend_env(stack.label_studio.url, stack.login.token, root / "model_dir"),
           "BASIC_AUTH_USER": USER, "BASIC_AUTH_PASS": password}
    port = lsb.ephemeral_port()
    server = lsb.BackendServer(env, log_path=root / "backend.log", port=port,
                               command=[sys.executable, "-m", "backend.cli", "serve", "--host", "127.0.0.1",
                                        "--port", str(port)], cwd=REPO_ROOT)
    server.start()
    try:
        yield server, password, root / "model_dir"
    finally:
        server.stop()


def test_basic_auth_project_retrains_on_annotations_and_reorders_the_queue(stack: Stack, auth_backend) -> None:
    server, password, model_dir = auth_backend
    project = make_project(stack, "basic auth", N_TASKS, seed=7)
    client = project.client
    assert requests.post(server.url + "/webhook", json={"action": "X", "project": 1}, timeout=5).status_code == 401

    client.ml.create(project=project.project_id, url=server.url, title="vlm-al-basic-auth", is_interactive=False,
                     auto_update=True, auth_method="BASIC_AUTH", basic_auth_user=USER, basic_auth_pass=password)

    def webhook_has_credentials():
        hooks = lsb.api_get(stack.label_studio.url, stack.login.token, "/api/webhooks/", project=project.project_id)
        ours = [h for h in hooks if h["url"].startswith(server.url)]
        return ours if ours and all((h.get("headers") or {}).get("Authorization", "").startswith("Basic ")
                                    for h in ours) else None

    lsb.wait_until(webhook_has_credentials, 60, "the project webhook with the basic auth header")

    state = ProjectState(model_dir, project.project_id)
    for task_id in project.task_ids[:N_ANNOTATED]:
        project.annotate(task_id)

    def fitted() -> str | None:
        current = state.current()
        if current is None or current.metrics.get("n_fine") != N_ANNOTATED:
            return None
        return current.model_version if project.model_version() == current.model_version else None

    version = lsb.wait_until(fitted, FIT_TIMEOUT_S, "a fit on the annotations sent through the webhook")
    log = server.log_path.read_text()
    assert "POST /webhook 200" in log and "POST /webhook 401" not in log.split("POST /webhook 200", 1)[1]

    def pushed():
        current = [p for p in project.predictions() if p["model_version"] == version]
        unlabeled = set(project.task_ids) - project.annotated
        return current if unlabeled <= {p["task"] for p in current} else None

    predictions = lsb.wait_until(pushed, FIT_TIMEOUT_S, "the new version's predictions")
    lowest = min(p["score"] for p in predictions)
    first_picks = {p["task"] for p in predictions if p["score"] == lowest}
    task = lsb.next_task(stack.label_studio.url, stack.login.token, project.project_id)
    assert task["id"] in first_picks
