"""End to end against a real Label Studio: connect, pre-annotate, retrain on webhooks, and drive the queue.

The tests run in file order and build on each other (one project, one backend), like an annotator's session.
The last one runs `vlm-al demo` with its own servers.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from label_studio_sdk import LabelStudio

from harness import ls_bootstrap as lsb
from backend.queue_tab import QUEUE_ORDERING, QUEUE_TAB_TITLE

from .conftest import FIT_TIMEOUT_S, REPO_ROOT, LabeledProject, Stack, backend_get, make_project

pytestmark = pytest.mark.e2e

N_TASKS = 40
N_ANNOTATED = 8


@pytest.fixture(scope="module")
def project(stack: Stack) -> LabeledProject:
    return make_project(stack, "e2e active learning", N_TASKS, seed=1)


def test_connect_backend(project: LabeledProject) -> None:
    health = backend_get(project.stack, "/health")
    assert health["status"] == "UP"

    ml_backend_id = project.connect()

    ml_backend = project.client.ml.get(ml_backend_id)
    # Label Studio only reports CONNECTED after /health and /setup answered.
    assert ml_backend.state == "CO", ml_backend.error_message
    assert ml_backend.url == project.stack.backend.url
    webhooks = lsb.api_get(project.stack.label_studio.url, project.stack.login.token,
                           "/api/webhooks/", project=project.project_id)
    assert [w["url"] for w in webhooks] == [project.stack.backend.url + "/webhook"]


def test_predictions_carry_coarse_labels(project: LabeledProject) -> None:
    project.connect()
    predictions = project.ensure_first_predictions()

    coarse_classes = set(project.labeling.hierarchy.coarse_classes)
    assert {p["task"] for p in predictions} == set(project.task_ids)
    for prediction in predictions:
        coarse = [r for r in prediction["result"] if r["from_name"] == project.labeling.coarse_control]
        assert len(coarse) == 1, prediction["result"]
        assert coarse[0]["to_name"] == project.labeling.image_name
        assert coarse[0]["value"]["choices"][0] in coarse_classes
        assert 0.0 <= prediction["score"] <= 1.0
    # Uncertainty sampling only sees predictions of the project's version.
    assert project.model_version() == predictions[0]["model_version"]


def test_annotations_lead_to_new_model_version(project: LabeledProject) -> None:
    project.connect()
    project.ensure_first_predictions()
    before = project.model_version()

    for task_id in project.task_ids[:N_ANNOTATED]:
        project.annotate(task_id)

    new_version = project.wait_for_fit(n_fine=N_ANNOTATED)
    assert new_version != before
    assert new_version in backend_get(project.stack, "/versions", project=project.project_id)["versions"]


def test_predictions_refreshed_for_unlabeled_tasks(project: LabeledProject) -> None:
    version = project.wait_for_fit(n_fine=N_ANNOTATED)

    predictions = project.wait_for_predictions(model_version=version, timeout_s=60)

    unlabeled = set(project.task_ids[N_ANNOTATED:])
    assert {p["task"] for p in predictions} == unlabeled
    assert project.model_version() == version
    # /setup (which Label Studio calls on ml.get) reports the same version, so "Retrieve predictions"
    # does not re-predict everything.
    assert project.client.ml.get(project.connect()).model_version == version


def test_the_fits_queue_head_came_through_label_studios_retrieve_action(project: LabeledProject) -> None:
    """Label Studio asked /predict for the head (its Retrieve predictions action) and saved it: no fallback import."""
    version = project.wait_for_fit(n_fine=N_ANNOTATED)
    log = project.stack.backend.log_path.read_text(errors="replace")
    assert re.search(rf"Label Studio retrieved the \d+-task head of {re.escape(version)}", log), log[-3000:]
    assert "did not retrieve the head" not in log


def test_next_task_is_the_backends_first_pick(project: LabeledProject) -> None:
    version = project.wait_for_fit(n_fine=N_ANNOTATED)
    predictions = project.wait_for_predictions(model_version=version, timeout_s=60)
    assert project.client.projects.get(project.project_id).sampling == lsb.UNCERTAINTY_SAMPLING

    lowest = min(p["score"] for p in predictions)
    backend_first = {p["task"] for p in predictions if p["score"] == lowest}
    priorities_version, priorities = project.state().priorities()
    assert priorities_version == version
    assert min(priorities, key=priorities.get) in backend_first

    task = lsb.next_task(project.stack.label_studio.url, project.stack.login.token, project.project_id)

    assert task["id"] in backend_first, (task["id"], lowest, sorted(p["score"] for p in predictions)[:5])


def _skipped_fits(stack: Stack) -> float:
    import requests

    text = requests.get(stack.backend.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith('vlm_al_fits_total{outcome="skipped"}'):
            return float(line.split()[-1])
    return 0.0


def test_start_training_with_nothing_new_keeps_the_version(project: LabeledProject) -> None:
    version = project.wait_for_fit(n_fine=N_ANNOTATED)
    skipped = _skipped_fits(project.stack)

    project.client.ml.train(project.connect())

    lsb.wait_until(lambda: _skipped_fits(project.stack) > skipped or None, FIT_TIMEOUT_S,
                   "the fit after START_TRAINING")
    assert project.state().current().model_version == version
    assert project.model_version() == version


def test_start_training_after_a_new_label_retrains(project: LabeledProject) -> None:
    version = project.wait_for_fit(n_fine=N_ANNOTATED)
    project.annotate(project.task_ids[N_ANNOTATED])

    project.client.ml.train(project.connect())

    def retrained() -> str | None:
        current = project.state().current()
        moved = current is not None and current.model_version != version
        return current.model_version if moved and project.model_version() == current.model_version else None

    new_version = lsb.wait_until(retrained, FIT_TIMEOUT_S, "a retrain after a new label and START_TRAINING")
    assert new_version != version
    assert project.state().current().metrics["n_fine"] == N_ANNOTATED + 1


def test_demo_sets_up_and_ctrl_c_stops_both(label_studio_venv: Path, tmp_path: Path) -> None:
    """`vlm-al demo`: its own Label Studio and backend, a connected project with predictions; SIGINT stops both."""
    data_dir = tmp_path / "demo"
    output = tmp_path / "demo.out"
    ls_port, backend_port = lsb.first_free_port(18080), lsb.first_free_port(19090)
    env = {**lsb.clean_environment(Path(sys.executable).parent), "TORCH_THREADS": "1"}
    with open(output, "wb") as stdout:
        demo = subprocess.Popen(
            [sys.executable, "-m", "backend.cli", "demo", "--tasks", "12", "--data-dir", str(data_dir),
             "--label-studio-venv", str(label_studio_venv),
             "--port", str(ls_port), "--backend-port", str(backend_port)],
            stdout=stdout, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
        )
    try:
        lsb.wait_until(lambda: "vlm-al demo is running" in output.read_text() or demo.poll() is not None,
                       420, "the demo's banner", interval_s=1.0)
        printed = output.read_text()
        assert demo.poll() is None, printed[-3000:]
        login = lsb.load_or_create_login(data_dir / "label-studio-login.json", "unused")
        assert login.password in printed and login.token in printed
        # Progress, not polling: no HTTP client request lines before (or after) the banner.
        assert "starting Label Studio" in printed and "HTTP Request" not in printed, printed[-3000:]
        # No secret on any command line (ps shows them to every user): Label Studio reads them from its environment.
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().decode(errors="replace")
            except OSError:
                continue
            assert login.password not in argv and login.token not in argv, argv.replace("\0", " ")
        client = LabelStudio(base_url=f"http://127.0.0.1:{ls_port}", api_key=login.token)
        (project,) = client.projects.list()
        assert project.sampling == lsb.UNCERTAINTY_SAMPLING
        assert f"/projects/{project.id}/" in printed
        # The first Data Manager tab keeps the queue order when the labeling page is opened from it.
        views = sorted(client.views.list(project=project.id), key=lambda v: (v.order or 0, v.id))
        assert views[0].data["title"] == QUEUE_TAB_TITLE and views[0].data["ordering"] == QUEUE_ORDERING
        assert f"?tab={views[0].id}" in printed
        (ml_backend,) = client.ml.list(project=project.id)
        assert ml_backend.url == f"http://127.0.0.1:{backend_port}"
        predictions = [p for p in client.predictions.list(project=project.id)
                       if p.model_version == project.model_version]
        assert len({p.task for p in predictions}) == 12

        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=90) == 0, output.read_text()[-3000:]
        assert lsb.port_is_free(ls_port) and lsb.port_is_free(backend_port)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
