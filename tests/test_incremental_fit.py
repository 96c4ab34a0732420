"""A fit reads what changed: the task list kept from indexing plus Label Studio's export of annotated tasks; the head
of the queue is pushed at once and the rest by a background push job (fake Label Studio over real HTTP)."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from conftest import PROJECT_ID

from backend.app import create_app
from backend.state import ProjectState, TaskList

FINES = ["T-shirt", "Shirt", "Sneaker", "Boot"]


def add_tasks(fake_ls, first: int, n: int) -> None:
    for task_id in range(first, first + n):
        fake_ls.add_task(task_id, FINES[(task_id - 1) % 4])


def annotate(fake_ls, task_ids) -> None:
    for task_id in task_ids:
        fake_ls.annotate(task_id, FINES[(task_id - 1) % 4])


def fit_traffic(fake_ls, parts) -> list[str]:
    fake_ls.requests.clear()
    assert parts.backend.run_fit(PROJECT_ID) is not None
    return list(fake_ls.requests)


def test_a_fit_lists_no_tasks_and_its_label_studio_traffic_does_not_grow_with_the_project(
        fake_ls, make_config, make_backend):
    add_tasks(fake_ls, 1, 24)
    parts = make_backend(make_config(push_head_tasks=5))
    parts.backend.run_index(PROJECT_ID)
    annotate(fake_ls, range(1, 9))
    small = fit_traffic(fake_ls, parts)
    assert not [r for r in small if r.startswith("GET /api/tasks")]
    assert small.count(f"GET /api/projects/{PROJECT_ID}/export") == 1
    add_tasks(fake_ls, 25, 96)  # five times the project
    parts.backend.run_index(PROJECT_ID)
    annotate(fake_ls, [9])
    large = fit_traffic(fake_ls, parts)
    assert sorted(large) == sorted(small)
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    current = state.current()
    assert current.metrics["n_fine"] == 9 and current.metrics["n_tasks"] == 120


def test_the_index_lists_tasks_without_annotations_and_reads_them_from_the_export(fake_ls, make_config,
                                                                                  make_backend):
    """Label Studio's task_only listing costs it half the time of fields=all; the annotated tasks' annotations
    come from the export of annotated tasks, so labeled tasks are still not pushed."""
    add_tasks(fake_ls, 1, 12)
    annotate(fake_ls, range(1, 5))
    parts = make_backend(make_config())
    parts.backend.run_index(PROJECT_ID)
    assert set(fake_ls.listed_fields) == {"task_only"}
    # only what is read: Label Studio serialises no other field
    assert set(fake_ls.listed_includes) == {"id,data,total_annotations,cancelled_annotations"}
    assert fake_ls.requests.count(f"GET /api/projects/{PROJECT_ID}/export") == 1
    pushed = [p["task"] for batch in fake_ls.imports + fake_ls.retrieved for p in batch]
    assert sorted(pushed) == list(range(5, 13))


@pytest.mark.parametrize("sparse_fields", [True, False])
def test_a_listing_keeps_only_the_fields_read(fake_ls, make_config, make_backend, sparse_fields):
    """Whether Label Studio honours ``include`` or sends every field, the tasks kept hold only what is read; the
    listing with annotations names no fields, since Label Studio would cut each annotation down to its id."""
    add_tasks(fake_ls, 1, 3)
    annotate(fake_ls, [1])
    fake_ls.sparse_fields = sparse_fields
    client = make_backend(make_config()).backend._client(PROJECT_ID)
    listed = [task for page in client.task_pages(PROJECT_ID, annotations=False) for task in page]
    assert [sorted(task) for task in listed] == [["cancelled_annotations", "data", "id", "total_annotations"]] * 3
    assert [task["total_annotations"] for task in listed] == [1, 0, 0]
    with_annotations = client.fetch_tasks(PROJECT_ID)
    assert [sorted(task) for task in with_annotations] == [["annotations", "data", "id"]] * 3
    assert with_annotations[0]["annotations"] == fake_ls.tasks[0]["annotations"]  # results and all
    assert fake_ls.listed_includes == ["id,data,total_annotations,cancelled_annotations", None]


def test_an_index_without_annotations_asks_for_no_export(fake_ls, make_config, make_backend):
    add_tasks(fake_ls, 1, 12)
    parts = make_backend(make_config())
    parts.backend.run_index(PROJECT_ID)
    assert set(fake_ls.listed_fields) == {"task_only"}
    assert f"GET /api/projects/{PROJECT_ID}/export" not in fake_ls.requests
    assert sorted(p["task"] for batch in fake_ls.imports + fake_ls.retrieved for p in batch) == list(range(1, 13))


def test_the_head_of_the_queue_is_pushed_first_and_the_rest_in_a_push_job(fake_ls, make_config, make_backend):
    add_tasks(fake_ls, 1, 30)
    parts = make_backend(make_config(push_head_tasks=5))
    parts.backend.run_index(PROJECT_ID)
    annotate(fake_ls, range(1, 9))
    fake_ls.imports.clear()
    version = parts.backend.run_fit(PROJECT_ID)
    (head,), (rest,) = fake_ls.retrieved, fake_ls.imports  # the fit's head, then the push job's (run inline here)
    assert len(head) == 5 and len(rest) == 30 - 8 - 5
    assert {p["model_version"] for p in head + rest} == {version}
    assert max(p["score"] for p in head) <= min(p["score"] for p in rest)  # Label Studio serves ascending scores
    assert {p["task"] for p in head + rest} == set(range(9, 31))
    assert fake_ls.project_model_version == version
    # a push job for a version that is no longer current pushes nothing
    annotate(fake_ls, [9])
    parts.backend.run_fit(PROJECT_ID)
    fake_ls.imports.clear()
    assert parts.backend.run_push(PROJECT_ID, version) == 0
    assert fake_ls.imports == []


def test_tasks_deleted_renews_the_task_list(fake_ls, make_config, make_backend):
    add_tasks(fake_ls, 1, 12)
    parts = make_backend(make_config(push_predictions=False))
    parts.backend.run_index(PROJECT_ID)
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    assert state.task_list().ids.tolist() == list(range(1, 13))
    del fake_ls.tasks[:4]
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/webhook", json={"action": "TASKS_DELETED", "project": {"id": PROJECT_ID},
                                             "tasks": [{"id": i} for i in range(1, 5)]})
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert state.task_list().ids.tolist() == list(range(5, 13))


def test_task_list_merges_the_export_and_tasks_created_since():
    task_list = TaskList("image", np.asarray([1, 2, 3], dtype=np.int64), ["/a.png", None, "/c.png"])
    exported = [{"id": 2, "data": {"image": "/b.png"}, "annotations": [{"id": 9}]},
                {"id": 7, "data": {"image": "/new.png"}, "annotations": [{"id": 10}]}]
    tasks = task_list.tasks_with(exported)
    assert [t["id"] for t in tasks] == [1, 2, 3, 7]
    assert tasks[0] == {"id": 1, "data": {"image": "/a.png"}}
    assert tasks[1]["annotations"] == [{"id": 9}] and tasks[3]["data"]["image"] == "/new.png"


def test_pushes_go_in_bounded_batches_head_first_and_a_cut_short_push_resumes(fake_ls, make_config, make_backend):
    add_tasks(fake_ls, 1, 30)
    parts = make_backend(make_config(push_head_tasks=5, push_batch_tasks=4))
    backend = parts.backend
    backend.run_index(PROJECT_ID)
    # the cold start: its head of 5 at once, then the push job; 4 per request, the lowest scores (the first picks)
    # in the first request
    assert [len(batch) for batch in fake_ls.imports] == [4, 1] + [4] * 6 + [1]
    cold = [[p["score"] for p in batch] for batch in fake_ls.imports]
    assert all(max(a) <= min(b) for a, b in itertools.pairwise(cold))
    assert fake_ls.patches == [{"model_version": "vlm-al-v0"}]  # moved once, after the first batch

    annotate(fake_ls, range(1, 9))
    real_client = backend._client
    failing_after = {"imports": 0}

    class CutShort:
        """The project's Label Studio client, whose imports fail (the push job cut short)."""

        def __init__(self, client):
            self._client = client

        def import_predictions(self, project_id, predictions):
            if failing_after["imports"] == 0:
                raise RuntimeError("Label Studio went away")
            failing_after["imports"] -= 1
            return self._client.import_predictions(project_id, predictions)

        def __getattr__(self, name):
            return getattr(self._client, name)

    backend._client = lambda project_id: CutShort(real_client(project_id))
    fake_ls.imports.clear()
    version = backend.run_fit(PROJECT_ID)  # the head (one action) went through; the push job's first import failed
    assert version == ProjectState(backend.config.model_dir, PROJECT_ID).current().model_version
    assert [len(batch) for batch in fake_ls.retrieved] == [5] and fake_ls.imports == []
    assert fake_ls.project_model_version == version
    backend._client = real_client
    assert backend.run_push(PROJECT_ID, version) == 30 - 8 - 5
    head, rest = fake_ls.retrieved, fake_ls.imports
    assert [len(batch) for batch in rest] == [4, 4, 4, 4, 1]
    scores = [[p["score"] for p in batch] for batch in head + rest]
    assert all(max(a) <= min(b) for a, b in itertools.pairwise(scores))
    assert sorted(p["task"] for batch in head + rest for p in batch) == list(range(9, 31))
    assert backend.run_push(PROJECT_ID, version) == 0  # everything pushed: nothing again


def indexed_with_eight_labels(fake_ls, make_config, make_backend):
    """30 tasks indexed (heads of 5, batches of 4), the first 8 labelled: the backend, ready to fit."""
    add_tasks(fake_ls, 1, 30)
    backend = make_backend(make_config(push_head_tasks=5, push_batch_tasks=4)).backend
    backend.run_index(PROJECT_ID)
    annotate(fake_ls, range(1, 9))
    return backend


def hold_back_pushes(backend) -> list:
    """Push jobs are recorded, not run (the inline runner would run them inside the fit's lock); the list of their
    parameters."""
    real_submit, held_back = backend.jobs.submit, []

    def submit(kind, project_id, params=None):
        return held_back.append(params) if kind == "push" else real_submit(kind, project_id, params)

    backend.jobs.submit = submit
    return held_back


def test_the_push_job_holds_no_lock_while_label_studio_imports_and_stops_for_a_newer_version(
        fake_ls, make_config, make_backend):
    backend = indexed_with_eight_labels(fake_ls, make_config, make_backend)
    real_client = backend._client
    newer: list[str | None] = []

    class FitDuringImport:
        """The push job's first import waits for a whole fit made meanwhile (it would deadlock under the lock)."""

        def __init__(self, client):
            self._client = client

        def import_predictions(self, project_id, predictions):
            created = self._client.import_predictions(project_id, predictions)
            if not newer and predictions[0]["model_version"] == "vlm-al-v1":
                annotate(fake_ls, [9])
                fit = threading.Thread(target=lambda: newer.append(backend.run_fit(PROJECT_ID)))
                fit.start()
                fit.join(timeout=60)
                assert not fit.is_alive(), "the fit waited for the push job's lock"
            return created

        def __getattr__(self, name):
            return getattr(self._client, name)

    held_back = hold_back_pushes(backend)
    version = backend.run_fit(PROJECT_ID)
    del backend.jobs.submit
    assert version == "vlm-al-v1" and held_back == [{"model_version": version}]
    backend._client = lambda project_id: FitDuringImport(real_client(project_id))
    backend.run_push(PROJECT_ID, version)  # as the job runner runs it: after the fit, outside its lock
    backend._client = real_client
    assert newer == ["vlm-al-v2"]
    state = ProjectState(backend.config.model_dir, PROJECT_ID)
    assert fake_ls.project_model_version == "vlm-al-v2"  # the old push job never moved it back
    v1_batches = [batch for batch in fake_ls.imports if batch[0]["model_version"] == "vlm-al-v1"]
    assert sum(len(batch) for batch in v1_batches) < 30 - 8  # the v1 push stopped once v2 was served
    v2_tasks = {p["task"] for batch in fake_ls.retrieved + fake_ls.imports if batch[0]["model_version"] == "vlm-al-v2"
                for p in batch}
    assert v2_tasks == set(range(10, 31)) == state.pushed_tasks("vlm-al-v2")


def test_a_push_job_stops_for_a_coming_fit_and_a_fit_without_a_new_version_resumes_it(
        fake_ls, make_config, make_backend):
    backend = indexed_with_eight_labels(fake_ls, make_config, make_backend)
    held_back = hold_back_pushes(backend)
    version = backend.run_fit(PROJECT_ID)
    assert held_back == [{"model_version": version}]
    fake_ls.imports.clear()
    backend.jobs.is_pending = lambda kind, project_id: kind == "fit"  # a webhook's fit is waiting out its debounce
    assert backend.run_push(PROJECT_ID, version) == 0 and fake_ls.imports == []
    del backend.jobs.is_pending, backend.jobs.submit
    assert backend.run_fit(PROJECT_ID) is None  # nothing new: no version, and the stopped push goes on
    assert [len(batch) for batch in fake_ls.imports] == [4, 4, 4, 4, 1]
    assert {p["model_version"] for batch in fake_ls.imports for p in batch} == {version}
