"""Task listings against the real Label Studio: the listing an index asks for (``include``) is what Label Studio
1.23.2 answers with, it sends less for it, and every listing the backend reads keeps the annotations whole."""

from __future__ import annotations

import sys

import pytest

from backend.ls_client import TASK_ONLY_FIELDS_READ, LabelStudioClient, attach_annotations

from .conftest import REPO_ROOT, Stack, make_project

pytestmark = pytest.mark.e2e


def test_label_studio_sends_only_the_fields_a_listing_includes(stack: Stack, tmp_path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))
    sys.modules.pop("task_listing", None)
    import task_listing

    project = make_project(stack, "e2e task listing", 12, seed=5)
    project.annotate(project.task_ids[0])
    measured = task_listing.measure(stack.label_studio.url, stack.login.token, stack.label_studio.process.pid,
                                    project.project_id, rounds=1, images=3)
    listings = measured["listings"]
    assert {listing["tasks"] for listing in listings.values()} == {12}
    assert listings["task_only_include"]["fields"] == sorted(TASK_ONLY_FIELDS_READ)
    assert len(listings["task_only"]["fields"]) > 20  # without include: Label Studio's ~30 fields
    assert listings["task_only"]["bytes"] > 3 * listings["task_only_include"]["bytes"]
    for way in ("serving_images", "serving_images_one_connection"):
        served = measured[way]
        assert served["images"] == 3 and served["bytes"] > 0 and served["label_studio_cpu_ms_per_image"] >= 0
    assert measured["serving_images"]["bytes"] == measured["serving_images_one_connection"]["bytes"]

    # What the backend reads: the annotation with its result, by the listing with annotations and by the index's
    # listing (counts, then the export of annotated tasks).
    client = LabelStudioClient(stack.label_studio.url, stack.login.token, tmp_path, 10_000_000)
    with_annotations = {task["id"]: task for task in client.fetch_tasks(project.project_id)}
    annotation = with_annotations[project.task_ids[0]]["annotations"][0]
    expected = project.annotation_result(project.class_by_task[project.task_ids[0]])
    assert [r["value"] for r in annotation["result"]] == [r["value"] for r in expected]
    listed = [task for page in client.task_pages(project.project_id, annotations=False) for task in page]
    attach_annotations(client, project.project_id, listed)
    assert {task["id"]: [a["result"] for a in task["annotations"]] for task in listed} == {
        task_id: [a["result"] for a in task["annotations"]] for task_id, task in with_annotations.items()}
