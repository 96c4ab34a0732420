"""The labeling assistant against the real Label Studio: tasks imported after a fit are scored on arrival (a
prediction of the current model_version, no retrain); auto-accepted annotations are completed by a dedicated user
and never count as human labels; the label-errors tab filters the flagged annotations; the report renders.

One project for the module (a session fixture, so the browser test, sorted last, reuses it): 40 tasks, 30 human
labels (enough for the report's learning curve), one fit, then 4 imported tasks.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from harness import ls_bootstrap as lsb
from backend.assistant import LABEL_ERRORS_TAB_TITLE, Assistant, AssistantPlan
from backend.config import Config
from backend.label_config import parse_label_config, recommended_label_config
from model.datasets import fashion_mnist_hierarchy

from .conftest import IMAGE_SIZE, LabeledProject, Stack

N_FIRST, N_ARRIVING, N_LABELED = 40, 4, 30  # 30 human labels: the fewest the learning curve is drawn from
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def arrival_project(stack: Stack) -> tuple[LabeledProject, list[Path], list[str]]:
    """A fitted project and the images that arrive later (with their true classes)."""
    client = stack.client()
    label_config = recommended_label_config(fashion_mnist_hierarchy())
    project_id = lsb.create_project(client, "assistant check", label_config)
    images_dir = stack.document_root / f"project-{project_id}"
    images = lsb.write_fashion_mnist_pngs(images_dir, N_FIRST + N_ARRIVING, size=IMAGE_SIZE, seed=5)
    lsb.connect_local_files_storage(client, project_id, images_dir, stack.document_root)
    task_ids = lsb.import_image_tasks(client, project_id, images.paths[:N_FIRST], stack.document_root)
    project = LabeledProject(stack=stack, project_id=project_id, task_ids=task_ids,
                             class_by_task=dict(zip(task_ids, images.class_names[:N_FIRST])),
                             labeling=parse_label_config(label_config))
    project.connect()
    project.ensure_first_predictions()
    for task_id in task_ids[:N_LABELED]:
        project.annotate(task_id)
    project.wait_for_fit(n_fine=N_LABELED)
    project.wait_for_predictions(timeout_s=120)
    return project, images.paths[N_FIRST:], images.class_names[N_FIRST:]


@pytest.mark.e2e
def test_tasks_imported_after_a_fit_get_a_prediction_of_the_current_version_without_a_retrain(arrival_project):
    project, paths, classes = arrival_project
    version = project.model_version()
    started = time.monotonic()
    new_ids = lsb.import_image_tasks(project.client, project.project_id, paths, project.stack.document_root)
    project.task_ids += new_ids
    project.class_by_task.update(zip(new_ids, classes))

    def arrived() -> list[dict] | None:
        current = [p for p in project.predictions() if p["task"] in new_ids and p["model_version"] == version]
        return current if {p["task"] for p in current} == set(new_ids) else None

    predictions = lsb.wait_until(arrived, 120, "predictions of the arriving tasks", interval_s=0.5)
    seconds = time.monotonic() - started
    assert project.model_version() == version and project.state().current().model_version == version
    # Scored from the current model's queue: behind the fit's planned picks, and stored where /predict reads them.
    priorities_version, scores = project.state().priorities()
    assert priorities_version == version and set(new_ids) <= set(scores)
    for prediction in predictions:
        assert 0.0 < prediction["score"] <= 1.0
        assert prediction["score"] == pytest.approx(scores[prediction["task"]], abs=1e-6)
    print(f"arrival: {len(new_ids)} tasks had a {version} prediction {seconds:.1f} s after the import")


@pytest.mark.e2e
def test_auto_accepted_annotation_is_the_dedicated_users_and_never_a_human_label(arrival_project):
    project, _, _ = arrival_project
    client = project.client
    config = Config(auto_accept_precision=0.95, auto_accept_user="auto-accept-e2e@vlm-al.local")
    assistant = Assistant(config)
    state = project.state()
    unlabeled = [t for t in project.task_ids[:N_FIRST] if t not in project.annotated]
    chosen = unlabeled[0]
    fine = project.class_by_task[chosen]
    # The backend's own apply() against the real Label Studio (plan as a fit would make it).
    created = assistant.apply(state, project.labeling, client,
                              AssistantPlan(accepted={chosen: (fine, 0.99)}, model_version=project.model_version()))
    assert created == 1
    record = assistant.load(state)
    user_id = record["auto_user_id"]
    users = {u.id: u.email for u in client.users.list()}
    assert users[user_id] == "auto-accept-e2e@vlm-al.local"
    annotations = client.annotations.list(id=chosen)
    assert [a.completed_by for a in annotations] == [user_id]

    # A human label on another task: the next fit counts 9 human labels, not the auto-accepted 10th.
    human = unlabeled[1]
    project.annotate(human)
    project.wait_for_fit(n_fine=N_LABELED + 1)
    metrics = state.current().metrics
    assert metrics["n_fine"] == N_LABELED + 1
    assert state.transition_history()[-1]["n_trusted"] <= N_LABELED + 1
    ledger = assistant.load(state)["ledger"]
    assert ledger["human_fine"] == N_LABELED + 1 and ledger["auto_accepted"] == 1


@pytest.mark.e2e
def test_label_errors_tab_filters_exactly_the_flagged_annotations(arrival_project):
    project, _, _ = arrival_project
    client = project.client
    flagged_task = project.task_ids[0]
    annotation_id = client.annotations.list(id=flagged_task)[0].id
    Assistant(Config())._label_errors_tab(client, project.project_id,
                                          [{"task": flagged_task, "annotations": [annotation_id]}])
    view = next(v for v in client.views.list(project=project.project_id) if v.data.get("title") == LABEL_ERRORS_TAB_TITLE)
    listed = lsb.api_get(project.stack.label_studio.url, project.stack.login.token, "/api/tasks/",
                         project=project.project_id, view=view.id)
    assert [t["id"] for t in listed["tasks"]] == [flagged_task]


@pytest.mark.e2e
def test_report_json_and_html_behind_the_backend(arrival_project):
    project, _, _ = arrival_project
    url = f"{project.stack.backend.url}/report/{project.project_id}"

    def with_curve() -> dict | None:  # the learning curve is a job of its own, after the fit
        report = requests.get(url + ".json", timeout=30).json()
        return report if report["stopping"].get("curve") else None

    report = lsb.wait_until(with_curve, 180, "the report's learning curve", interval_s=1.0)
    assert report["model_version"] == project.model_version()
    assert report["ledger"]["human_fine"] >= N_LABELED and set(report["ledger"]) >= {"human_fine", "human_coarse",
                                                                                      "vlm", "auto_accepted"}
    assert len(report["transition"]["matrix"]) == 4
    assert report["stopping"]["curve"]["n_labels"] >= N_LABELED and report["stopping"]["suggestion"]["text"]
    assert report["savings"]["benchmark"] is not None  # Fashion-MNIST's classes: the offline benchmark's curve
    page = requests.get(url, timeout=60)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert requests.get(f"{project.stack.backend.url}/report/99999.json", timeout=10).status_code == 404


@pytest.mark.browser
def test_report_renders_in_the_browser(arrival_project, tmp_path: Path):
    from .test_browser import CHROMIUM, CHROMIUM_ARGS

    project, _, _ = arrival_project
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright

    shots = Path(os.environ.get("VLM_AL_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{project.stack.backend.url}/report/{project.project_id}", timeout=90_000)
            page.wait_for_selector("#suggestion")
            widths = page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) >= 6 and all(w > 100 for w in widths)  # the curve and the savings plots too
            assert "labeling report" in page.title() + page.inner_text("h1")
            page.screenshot(path=str(shots / "assistant_report.png"), full_page=True)
        finally:
            browser.close()
