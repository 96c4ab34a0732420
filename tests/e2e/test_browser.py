"""Headless Chromium on Label Studio's labeling page: the queue both ways in, a screen that needs no scrolling, the
VLM's coarse pre-annotation with its confidence, then a human species that reaches the next model.

Debian's chromium is driven by Python Playwright through `executable_path` (no `playwright install`).
Screenshots go to a temporary folder, or to $VLM_AL_SCREENSHOTS (scripts/refresh_screenshots.sh points it at
bench/results/browser/, the committed ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ls_bootstrap as lsb
from backend.label_config import RECOMMENDED_CONFIDENCE_NAME
from backend.queue_tab import QUEUE_ORDERING, QUEUE_TAB_TITLE, ensure_queue_tab

from .conftest import LabeledProject, Stack, make_project

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
N_TASKS = 12
# A first model exists before the browser's annotation, so "the next model includes it" means one more label.
N_ANNOTATED_BY_API = 3
PAGE_TIMEOUT_MS = 90_000
SCREENS = [(1440, 900), (1280, 720)]


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("VLM_AL_SCREENSHOTS")
    directory = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


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
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),  # fresh profile: no cookies or cached UI state
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": SCREENS[0][0], "height": SCREENS[0][1]},
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


def confidence(page):
    """The read-only model_confidence text the prediction fills in."""
    return page.locator(".lsf-main-view").get_by_text("Confidence:", exact=False).first


def lowest_score_tasks(project: LabeledProject) -> tuple[set[int], list[dict]]:
    version = project.model_version()
    current = [p for p in project.predictions() if p["model_version"] == version and p["task"] not in project.annotated]
    lowest = min(p["score"] for p in current)
    return {p["task"] for p in current if p["score"] == lowest}, current


def served_task(page, open_page) -> int:
    """The task id of Label Studio's next-task answer to what `open_page` does (the labeling stream's request)."""
    with page.expect_response(lambda r: "id=next_task" in r.url or "/next" in r.url) as answer:
        open_page()
    page.wait_for_selector(".lsf-main-view")
    return int(answer.value.json()["id"])


def assert_inside_viewport(page, locator, what: str) -> None:
    width, height = page.viewport_size["width"], page.viewport_size["height"]
    box = locator.bounding_box()
    assert box is not None, f"{what} is not rendered"
    assert box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= width and box["y"] + box["height"] <= height, (
        f"{what} at {box} is outside the {width}x{height} viewport: the annotator would have to scroll"
    )


def test_data_manager_opens_the_backends_queue_tab_and_labeling_from_it_follows_the_queue(
    project: LabeledProject, page, screenshots: Path
) -> None:
    """QUEUE_TAB=true: the backend made the first tab, ordered by ascending score. Opening (or reloading) the
    labeling page from the Data Manager serves the task the backend ranks first, not the lowest task id."""
    (tab,) = [v for v in project.client.views.list(project=project.project_id)
              if isinstance(v.data, dict) and v.data.get("title") == QUEUE_TAB_TITLE]
    assert tab.data["ordering"] == QUEUE_ORDERING
    ls_url = f"{project.stack.label_studio.url}/projects/{project.project_id}/data"

    page.goto(ls_url)
    page.wait_for_url(lambda url: f"tab={tab.id}" in url)  # a fresh browser lands on the first tab
    page.get_by_text(QUEUE_TAB_TITLE).first.wait_for(state="visible")
    page.screenshot(path=str(screenshots / "data_manager_queue_tab.png"))

    lowest, current = lowest_score_tasks(project)
    task_id = served_task(page, lambda: page.goto(f"{ls_url}?tab={tab.id}&labeling=1"))
    assert task_id in lowest, (task_id, sorted((p["score"], p["task"]) for p in current)[:5])


def test_label_all_tasks_follows_the_queue(stack: Stack, page) -> None:
    """Label All Tasks follows Uncertainty sampling (ascending score) whatever the tab: here the queue runs against
    the task ids (the last task first), on a project whose scores the test sets and whose tab the demo's code makes."""
    queue_project = make_project(stack, "browser queue paths", 4, seed=3)
    client = queue_project.client
    for rank, task_id in enumerate(reversed(queue_project.task_ids)):
        client.predictions.create(task=task_id, score=0.1 * (rank + 1), model_version="queue-check", result=[
            {"from_name": "coarse", "to_name": "image", "type": "choices", "value": {"choices": ["tops"]}}])
    lsb.set_project_model_version(client, queue_project.project_id, "queue-check")
    ensure_queue_tab(client, queue_project.project_id)

    page.goto(f"{stack.label_studio.url}/projects/{queue_project.project_id}/data")
    button = page.locator("button:has-text('Label All Tasks')")
    task_id = served_task(page, button.click)
    assert task_id == queue_project.task_ids[-1]


def test_the_labeling_screen_needs_no_scrolling(project: LabeledProject, page, screenshots: Path) -> None:
    """Image, coarse choices, the chosen group's fine choices, the confidence and Submit fit at 1440x900 and 1280x720."""
    version = project.model_version()
    predictions = {p["task"]: p for p in project.predictions() if p["model_version"] == version}
    task_id, predicted_coarse, _, _ = _task_to_label(project, predictions)
    hierarchy = project.labeling.hierarchy
    for width, height in SCREENS:
        page.set_viewport_size({"width": width, "height": height})
        page.goto(f"{project.stack.label_studio.url}/projects/{project.project_id}/data?task={task_id}")
        page.wait_for_selector(".lsf-main-view")
        choice(page, predicted_coarse).wait_for(state="visible")
        confidence(page).wait_for(state="visible")
        page.screenshot(path=str(screenshots / f"labeling_{width}x{height}.png"))
        assert_inside_viewport(page, page.locator(".lsf-main-view img").first, "the image")
        for coarse in hierarchy.coarse_classes:
            assert_inside_viewport(page, choice(page, coarse), f"coarse choice {coarse!r}")
        for fine in hierarchy.children(predicted_coarse):
            assert_inside_viewport(page, choice(page, fine), f"fine choice {fine!r}")
        assert_inside_viewport(page, confidence(page), "the confidence text")
        assert_inside_viewport(page, page.locator("button:has-text('Submit')").first, "Submit")


def test_coarse_preannotation_then_species_reaches_next_model(
    project: LabeledProject, page, screenshots: Path
) -> None:
    version_before = project.model_version()
    hierarchy = project.labeling.hierarchy
    predictions = {p["task"]: p for p in project.predictions() if p["model_version"] == version_before}
    task_id, predicted_coarse, suggested_fine, picked = _task_to_label(project, predictions)
    task_url = f"{project.stack.label_studio.url}/projects/{project.project_id}/data?task={task_id}"

    page.goto(task_url)
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
        assert choice(page, fine).locator("input").is_checked() == (fine == suggested_fine)
    for other_coarse in hierarchy.coarse_classes:
        if other_coarse != predicted_coarse:
            for fine in hierarchy.children(other_coarse):
                assert not choice(page, fine).is_visible(), f"{fine!r} of {other_coarse!r} is shown"
    # What the annotator reads: the coarse guess's confidence, and the queue score named as not a confidence.
    shown = confidence(page).inner_text()
    assert f"coarse {predicted_coarse} " in shown and "it is not a confidence" in shown, shown
    queue_score = predictions[task_id]["score"]
    assert f"Queue score {queue_score:.2f}" in shown, (shown, queue_score)
    page.screenshot(path=str(screenshots / "before_submit.png"))

    choice(page, picked).click()
    assert choice(page, picked).locator("input").is_checked()
    if suggested_fine is not None:
        assert not choice(page, suggested_fine).locator("input").is_checked(), "single choice kept two species"
    page.locator("button:has-text('Submit')").click()

    def saved_annotation() -> dict | None:
        annotations = project.client.annotations.list(id=task_id)
        return annotations[0].model_dump() if annotations else None

    annotation = lsb.wait_until(saved_annotation, 30, f"the annotation of task {task_id}")
    project.annotated.add(task_id)
    by_control = {r["from_name"]: r for r in annotation["result"]}
    fine_control = project.labeling.fine_control_by_coarse[predicted_coarse]
    assert by_control[project.labeling.coarse_control]["value"]["choices"] == [predicted_coarse]
    assert by_control[fine_control]["value"]["choices"] == [picked]
    # The confidence text comes along from the prediction; the backend reads only the choices.
    assert set(by_control) <= {project.labeling.coarse_control, fine_control, RECOMMENDED_CONFIDENCE_NAME}

    # The submitted annotation, reopened: what the annotator saved.
    page.goto(task_url)
    page.wait_for_selector(".lsf-main-view")
    choice(page, picked).wait_for(state="visible")
    assert choice(page, picked).locator("input").is_checked()
    page.screenshot(path=str(screenshots / "after_submit.png"))

    # The webhook leads to a retrain that includes the browser's label next to the API ones.
    version_after = project.wait_for_fit(n_fine=N_ANNOTATED_BY_API + 1)
    assert version_after != version_before
    assert project.state().current().metrics["n_fine"] == N_ANNOTATED_BY_API + 1


def _task_to_label(project: LabeledProject, predictions: dict[int, dict]) -> tuple[int, str, str | None, str]:
    """(task, VLM coarse, model's species suggestion or None, species the test picks) for an unlabeled task.

    The pick always differs from the suggestion, so the test really clicks. Preferred: a coarse-only
    prediction that the VLM got right, so the picked species is the true one.
    """
    labeling = project.labeling
    candidates = []
    for task_id in project.task_ids:
        prediction = predictions.get(task_id)
        if task_id in project.annotated or prediction is None:
            continue
        chosen = {r["from_name"]: r["value"]["choices"][0] for r in prediction["result"] if r.get("type") == "choices"}
        coarse = chosen.get(labeling.coarse_control)
        if coarse is None:
            continue
        suggested = chosen.get(labeling.fine_control_by_coarse[coarse])
        true_class = project.class_by_task[task_id]
        species = [fine for fine in labeling.hierarchy.children(coarse) if fine != suggested]
        if not species:
            continue
        right = true_class in species
        picked = true_class if right else species[0]
        candidates.append(((suggested is not None, not right, task_id), (task_id, coarse, suggested, picked)))
    assert candidates, "no unlabeled task has a coarse prediction with a species left to pick"
    return min(candidates)[1]
