"""A multi-label project (<Choices choice="multiple">) against the real Label Studio and this backend.

Each task shows one or two Fashion-MNIST items side by side (or none); its labels are the groups present. The
project gets per-label pre-annotations at once (every label's score, nothing ticked before a model), label sets
(an empty one included) retrain it, the retrained model pre-ticks labels whose measured precision reaches
SUGGESTION_PRECISION, and the queue moves to the new version's picks. In headless Chromium, the pre-ticked labels
show ticked on the labeling page (marker browser).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import ls_bootstrap as lsb
from backend.state import COLD_START_VERSION, ProjectState
from model.datasets import fashion_mnist_hierarchy, load_fashion_mnist, to_pil

from .conftest import REPO_ROOT, Stack, _backend_env
from .test_browser import choice, page  # noqa: F401 (page is a fixture)

pytestmark = pytest.mark.e2e

LABELS = fashion_mnist_hierarchy().coarse_classes
N_TASKS = 48
N_ANNOTATED = 40
CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="groups" toName="image" choice="multiple">'
    + "".join(f'<Choice value="{label}"/>' for label in LABELS)
    + '</Choices><TextArea name="model_confidence" toName="image" editable="false"/></View>'
)


def write_scenes(directory: Path, seed: int = 0) -> tuple[list[Path], list[frozenset[str]]]:
    """Two items side by side on white (one in four tasks: one item; task 0: nothing), and the groups present."""
    hierarchy = fashion_mnist_hierarchy()
    images, labels = load_fashion_mnist("test")
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    paths, sets = [], []
    for task in range(N_TASKS):
        canvas = Image.new("RGB", (224, 112), (255, 255, 255))
        n_items = 0 if task == 0 else (1 if task % 4 == 0 else 2)
        present = set()
        for slot, index in enumerate(rng.choice(len(images), size=n_items, replace=False)):
            canvas.paste(to_pil(images[index], invert=True, size=112, pad_fraction=0.15), (112 * slot, 0))
            present.add(hierarchy.coarse_classes[hierarchy.parent_of_fine[int(labels[index])]])
        path = directory / f"scene-{task:03d}.png"
        canvas.save(path)
        paths.append(path)
        sets.append(frozenset(present))
    return paths, sets


# Session scope: the conftest runs browser tests last, so a module-scoped project would be built twice.
@pytest.fixture(scope="session")
def multilabel_backend(stack: Stack, tmp_path_factory: pytest.TempPathFactory):
    """This backend with the default semantic annotator and a precision target that 40 label sets can meet."""
    root = tmp_path_factory.mktemp("multilabel")
    env = {**_backend_env(stack.label_studio.url, stack.login.token, root / "model_dir"),
           "WEAK_ANNOTATOR": "semantic", "SUGGESTION_PRECISION": "0.7", "QUEUE_TAB": "false",
           "QUERY_BATCH_SIZE": "4"}
    port = lsb.ephemeral_port()
    backend = lsb.BackendServer(env, log_path=root / "backend.log", port=port, cwd=REPO_ROOT,
                                command=[sys.executable, "-m", "gunicorn", "backend.wsgi:app", "--bind",
                                         f"127.0.0.1:{port}"])
    backend.start()
    try:
        yield backend, root / "model_dir"
    finally:
        backend.stop()


@pytest.fixture(scope="session")
def fitted(stack: Stack, multilabel_backend) -> dict:
    """The project after its cold-start predictions and a fit on 40 label sets, with what the test checks."""
    backend, model_dir = multilabel_backend
    client = stack.client()
    project_id = lsb.create_project(client, "multi-label scenes", CONFIG)
    images_dir = stack.document_root / f"project-{project_id}"
    paths, sets = write_scenes(images_dir)
    lsb.connect_local_files_storage(client, project_id, images_dir, stack.document_root)
    task_ids = lsb.import_image_tasks(client, project_id, paths, stack.document_root)
    lsb.connect_ml_backend(client, project_id, backend.url)

    def predictions_of(version: str, tasks: set[int]) -> dict[int, dict] | None:
        found = {p["task"]: p for p in lsb.project_predictions(client, project_id) if p["model_version"] == version}
        return found if tasks <= set(found) else None

    # Cold start: every task gets the VLM's per-label scores, and nothing is ticked before a model exists.
    cold = lsb.wait_until(lambda: predictions_of(COLD_START_VERSION, set(task_ids)) if
                          client.projects.get(project_id).model_version else None, 300, "cold-start predictions")

    # Label sets, the empty one ("none of these") included; each creation is a webhook that queues a fit.
    annotated = task_ids[:N_ANNOTATED]
    for task_id, labels in zip(annotated, sets):
        result = [{"from_name": "groups", "to_name": "image", "type": "choices",
                   "value": {"choices": sorted(labels)}}] if labels else []
        client.annotations.create(id=task_id, result=result)

    state = ProjectState(model_dir, project_id)

    def fitted() -> str | None:
        current = state.current()
        if current is None or current.metrics.get("n_labelled") != N_ANNOTATED:
            return None
        return current.model_version if client.projects.get(project_id).model_version == current.model_version \
            else None

    version = lsb.wait_until(fitted, 420, f"a multi-label model fitted on {N_ANNOTATED} label sets", interval_s=2)
    unlabeled = set(task_ids[N_ANNOTATED:])
    fresh = lsb.wait_until(lambda: predictions_of(version, unlabeled), 120, f"predictions of {version}")
    return {"project_id": project_id, "task_ids": task_ids, "sets": sets, "cold": cold, "fresh": fresh,
            "metrics": state.current().metrics, "unlabeled": unlabeled}


def test_multilabel_project_pre_annotates_retrains_and_moves_the_queue(stack: Stack, fitted: dict) -> None:
    for prediction in fitted["cold"].values():
        texts = [r["value"]["text"][0] for r in prediction["result"] if r["type"] == "textarea"]
        assert len(texts) == 1 and all(label in texts[0] for label in LABELS)
        assert not [r for r in prediction["result"] if r["type"] == "choices"]
    metrics, fresh, unlabeled = fitted["metrics"], fitted["fresh"], fitted["unlabeled"]
    assert metrics["task"] == "multilabel" and metrics["labels"] == list(LABELS)
    ticked = [r for p in fresh.values() for r in p["result"] if r["type"] == "choices"]
    calibrated = [label for label, t in zip(LABELS, metrics["pretick_thresholds"]) if t is not None]
    assert calibrated, f"no label reached the precision target: {metrics['pretick']}"
    assert ticked, "no label was pre-ticked though some have a calibrated threshold"
    for item in ticked:
        assert set(item["value"]["choices"]) <= set(calibrated)
        assert set(item["meta"]["label_scores"]) == set(LABELS)
    # Pre-ticked labels are mostly right (the target is 70% precision out of fold; 8 tasks are a small check).
    truth = dict(zip(fitted["task_ids"], fitted["sets"]))
    hits = [label in truth[task] for task, p in fresh.items() for r in p["result"] if r["type"] == "choices"
            for label in r["value"]["choices"]]
    assert np.mean(hits) >= 0.6

    # The queue moved: Label Studio now serves the new version's first pick, not an annotated or cold-start one.
    next_task = lsb.next_task(stack.label_studio.url, stack.login.token, fitted["project_id"])
    first_pick = min(fresh.values(), key=lambda p: p["score"])["task"]
    assert next_task["id"] == first_pick and next_task["id"] in unlabeled


@pytest.mark.browser
def test_pre_ticked_labels_show_ticked_on_the_labeling_page(stack: Stack, fitted: dict, page) -> None:  # noqa: F811
    task_id, prediction = next((t, p) for t, p in sorted(fitted["fresh"].items())
                               if any(r["type"] == "choices" for r in p["result"]))
    ticked = set(next(r for r in prediction["result"] if r["type"] == "choices")["value"]["choices"])
    page.goto(f"{stack.label_studio.url}/projects/{fitted['project_id']}/data?task={task_id}")
    page.wait_for_selector(".lsf-main-view")
    choice(page, LABELS[0]).wait_for()
    for label in LABELS:
        assert choice(page, label).locator("input").is_checked() == (label in ticked), label
    # Every label's score is on the page too, in the read-only confidence text.
    assert page.locator(".lsf-main-view").get_by_text("Model:", exact=False).first.is_visible()
