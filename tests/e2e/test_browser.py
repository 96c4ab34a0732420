"""Headless Chromium on Label Studio's labeling page: the VLM's coarse pre-annotation, then a human species.

Debian's chromium is driven by Python Playwright through `executable_path` (no `playwright install`).
Screenshots go to bench/results/browser/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend import ls_bootstrap as lsb

from .conftest import REPO_ROOT, LabeledProject, Stack, make_project

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREENSHOTS = REPO_ROOT / "bench" / "results" / "browser"
N_TASKS = 12
# A first model exists before the browser's annotation, so "the next model includes it" means one more label.
N_ANNOTATED_BY_API = 3
PAGE_TIMEOUT_MS = 90_000


@pytest.fixture(scope="module")
def project(stack: Stack) -> LabeledProject:
    project = make_project(stack, "browser check", N_TASKS, seed=2)
    project.connect()
    project.ensure_first_predictions()
    for task_id in project.task_ids[:N_ANNOTATED_BY_API]:
        project.annotate(task_id)
    project.wait_for_fit(n_fine=N_ANNOTATED_BY_API)
    project.wait_for_predictions(timeout_s=120)
    return project


@pytest.fixture
def page(stack: Stack, tmp_path: Path) -> Iterator[object]:
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh profile: no cookies or cached UI state
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1300},
        )
        try:
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{stack.label_studio.url}/user/login/")
            page.fill("input[name=email]", stack.login.username)
            page.fill("input[name=password]", stack.login.password)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            yield page
        finally:
            context.close()


def choice(page, value: str):
    """The checkbox label Label Studio renders for one <Choice>."""
    return page.locator(f'label.lsf-choice__checkbox:has(input[name="{value}"])')


def test_coarse_preannotation_then_species_reaches_next_model(project: LabeledProject, page) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    version_before = project.model_version()
    hierarchy = project.labeling.hierarchy
    predictions = {p["task"]: p for p in project.predictions() if p["model_version"] == version_before}
    task_id, predicted_coarse = _unlabeled_task_and_coarse(project, predictions)

    page.goto(f"{project.stack.label_studio.url}/projects/{project.project_id}/data?task={task_id}")
    page.wait_for_selector(".lsf-main-view")

    coarse_box = choice(page, predicted_coarse)
    coarse_box.wait_for(state="visible")
    assert coarse_box.locator("input").is_checked(), f"the VLM's {predicted_coarse!r} is not ticked"
    for other in hierarchy.coarse_classes:
        if other != predicted_coarse:
            assert not choice(page, other).locator("input").is_checked()
    species = hierarchy.children(predicted_coarse)
    for fine in species:
        assert choice(page, fine).is_visible(), f"{fine!r} of {predicted_coarse!r} is not shown"
    for other_coarse in hierarchy.coarse_classes:
        if other_coarse != predicted_coarse:
            for fine in hierarchy.children(other_coarse):
                assert not choice(page, fine).is_visible(), f"{fine!r} of {other_coarse!r} is shown"
    choice(page, species[-1]).scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "before_submit.png"))

    true_class = project.class_by_task[task_id]
    picked = true_class if true_class in species else species[0]
    # A fine suggestion from the model may already be ticked; the human's pick is what must be saved.
    if not choice(page, picked).locator("input").is_checked():
        choice(page, picked).click()
    assert choice(page, picked).locator("input").is_checked()
    page.locator("button:has-text('Submit')").click()

    def saved_annotation() -> dict | None:
        annotations = project.client.annotations.list(id=task_id)
        return annotations[0].model_dump() if annotations else None

    annotation = lsb.wait_until(saved_annotation, 30, f"the annotation of task {task_id}")
    page.screenshot(path=str(SCREENSHOTS / "after_submit.png"))
    by_control = {r["from_name"]: r for r in annotation["result"]}
    fine_control = project.labeling.fine_control_by_coarse[predicted_coarse]
    assert by_control[project.labeling.coarse_control]["value"]["choices"] == [predicted_coarse]
    assert by_control[fine_control]["value"]["choices"] == [picked]

    # The webhook leads to a retrain that includes the browser's label next to the API ones.
    version_after = project.wait_for_fit(n_fine=N_ANNOTATED_BY_API + 1)
    assert version_after != version_before
    labeled_in_fit = project.state().current().metrics["n_fine"]
    assert labeled_in_fit == N_ANNOTATED_BY_API + 1


def _unlabeled_task_and_coarse(project: LabeledProject, predictions: dict[int, dict]) -> tuple[int, str]:
    """An unlabeled task with a coarse prediction; prefer one the VLM got right, so the true species is listed."""
    candidates = []
    for task_id in project.task_ids[N_ANNOTATED_BY_API:]:
        prediction = predictions.get(task_id)
        if prediction is None:
            continue
        coarse = [r for r in prediction["result"] if r["from_name"] == project.labeling.coarse_control]
        if coarse:
            predicted = coarse[0]["value"]["choices"][0]
            right = predicted == project.coarse_of(project.class_by_task[task_id])
            candidates.append((not right, task_id, predicted))
    assert candidates, "no unlabeled task has a coarse prediction"
    _, task_id, predicted = min(candidates)
    return task_id, predicted
