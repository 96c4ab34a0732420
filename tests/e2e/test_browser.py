"""Headless Chromium on Label Studio's labeling page: the VLM's coarse pre-annotation, then a human species.

Debian's chromium is driven by Python Playwright through `executable_path` (no `playwright install`).
Screenshots go to bench/results/browser/.
"""

from __future__ import annotations

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
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (scripts/setup.sh does)")
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
    choice(page, species[-1]).scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "before_submit.png"))

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
    assert set(by_control) == {project.labeling.coarse_control, fine_control}

    # The submitted annotation, reopened: what the annotator saved.
    page.goto(task_url)
    page.wait_for_selector(".lsf-main-view")
    choice(page, picked).wait_for(state="visible")
    assert choice(page, picked).locator("input").is_checked()
    choice(page, species[-1]).scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / "after_submit.png"))

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
