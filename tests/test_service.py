"""MLBackend against a fake Label Studio over real HTTP: predict, index, fit, push, restart."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from backend.app import create_app
from backend.jobs import ThreadJobRunner
from backend.state import COLD_START_VERSION, ProjectState
from conftest import API_KEY, PROJECT_ID, counter_value, png_bytes

FINES = ["T-shirt", "Shirt", "Sneaker", "Boot"]


def add_pool(fake_ls, n_per_class: int = 3) -> None:
    task_id = 1
    for _ in range(n_per_class):
        for fine in FINES:
            fake_ls.add_task(task_id, fine)
            task_id += 1


def predict_body(fake_ls, task_ids=None):
    tasks = [t for t in fake_ls.tasks if task_ids is None or t["id"] in task_ids]
    return {"tasks": tasks, "project": f"{PROJECT_ID}.1795294297", "label_config": fake_ls.label_config,
            "params": {"login": None, "password": None, "context": None}}


def setup_body(fake_ls):
    return {"project": f"{PROJECT_ID}.1795294297", "schema": fake_ls.label_config, "hostname": fake_ls.url,
            "access_token": API_KEY, "extra_params": None}


def test_predict_gives_coarse_preannotation_with_scores_and_no_fine_without_model(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 1)
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/predict", json=predict_body(fake_ls))
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model_version"] == COLD_START_VERSION
    results = body["results"]
    assert len(results) == 4
    expected_coarse = ["Top", "Top", "Shoe", "Shoe"]
    for prediction, coarse in zip(results, expected_coarse):
        assert prediction["model_version"] == COLD_START_VERSION
        assert 0.0 <= prediction["score"] <= 1.0
        choices = [r for r in prediction["result"] if r["type"] == "choices"]  # then the confidence text
        assert len(choices) == 1  # no fine model yet: coarse only
        region = choices[0]
        assert region["from_name"] == "coarse" and region["to_name"] == "image"
        assert region["value"] == {"choices": [coarse]}
        assert region["score"] == pytest.approx(0.8, abs=1e-3)


def test_repeated_predict_computes_no_new_embeddings_and_no_downloads(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 2)
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    first = client.post("/predict", json=predict_body(fake_ls))
    assert first.status_code == 200
    computed = counter_value(parts.backend, "vlm_al_embeddings_computed_total")
    assert computed == 8
    # This weak annotator shares no pass with the backbone: two models, 8 images each.
    forward = "vlm_al_model_forward_images_total"
    assert counter_value(parts.backend, forward, model=parts.backbone.name) == 8
    assert counter_value(parts.backend, forward, model=parts.weak.name) == 8
    downloads = len(fake_ls.downloads)
    second = client.post("/predict", json=predict_body(fake_ls))
    assert second.status_code == 200
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == computed
    assert parts.backbone.images_embedded == 8 and parts.weak.images_annotated == 8
    assert len(fake_ls.downloads) == downloads
    assert second.get_json()["results"] == first.get_json()["results"]


def test_identical_images_under_two_urls_are_embedded_once(fake_ls, make_config, make_backend):
    same = png_bytes((220, 40, 30), jitter=5)
    fake_ls.add_task(1, "T-shirt", image=same)
    fake_ls.add_task(2, "T-shirt", image=same)
    parts = make_backend(make_config(push_predictions=False))
    results = parts.backend.predict(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    assert [r["result"][0]["value"]["choices"] for r in results] == [["Top"], ["Top"]]
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 1


def test_unreadable_missing_and_foreign_images_give_empty_predictions_in_order(fake_ls, make_config, make_backend):
    fake_ls.add_task(1, "Boot")
    fake_ls.add_task(2, "Shirt", image=b"this is not an image")
    fake_ls.add_task(3, "Sneaker")
    tasks = [dict(t) for t in fake_ls.tasks]
    tasks.append({"id": 4, "data": {"image": "http://evil.example.com/x.png"}})
    tasks.append({"id": 5, "data": {"text": "no image key"}})
    tasks.append({"id": 6, "data": {"image": "/data/local-files/?d=fashion/missing.png"}})
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    body = predict_body(fake_ls)
    body["tasks"] = tasks
    response = client.post("/predict", json=body)
    assert response.status_code == 200, response.get_json()
    results = response.get_json()["results"]
    assert [bool(r["result"]) for r in results] == [True, False, True, False, False, False]
    assert results[0]["result"][0]["value"]["choices"] == ["Shoe"]
    assert results[2]["result"][0]["value"]["choices"] == ["Shoe"]
    assert all("model_version" in r and 0.0 <= r["score"] <= 1.0 for r in results)
    assert counter_value(parts.backend, "vlm_al_image_errors_total") == 4
    assert "evil.example.com" not in " ".join(fake_ls.downloads)
    # the server stays up
    assert client.get("/health").status_code == 200


def test_a_batch_where_every_image_fails_is_a_422(fake_ls, make_config, make_backend):
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    body = predict_body(fake_ls)
    body["tasks"] = [{"id": 1, "data": {"image": "http://elsewhere.example.org/a.png"}}]
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    assert "elsewhere.example.org" in response.get_json()["message"]


def test_image_over_the_byte_limit_is_refused(fake_ls, make_config, make_backend):
    fake_ls.add_task(1, "Boot")
    fake_ls.add_task(2, "Boot", image=png_bytes((30, 200, 220), size=256, jitter=1))
    parts = make_backend(make_config(push_predictions=False, max_image_bytes=5000))
    results = parts.backend.predict(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    assert results[0]["result"] and results[1]["result"] == []


def test_setup_queues_indexing_and_cold_start_pushes_diverse_first_picks(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    parts = make_backend(make_config())
    client = create_app(parts.backend.config, parts.backend).test_client()
    started = time.perf_counter()
    response = client.post("/setup", json=setup_body(fake_ls))
    assert response.status_code == 200
    assert response.get_json() == {"model_version": COLD_START_VERSION}
    # InlineJobRunner ran indexing inside the call; a ThreadJobRunner would return at once (see the burst test)
    assert time.perf_counter() - started < 30
    assert len(fake_ls.imports) == 1
    pushed = fake_ls.imports[0]
    assert sorted(p["task"] for p in pushed) == sorted(t["id"] for t in fake_ls.tasks)
    assert {p["model_version"] for p in pushed} == {COLD_START_VERSION}
    scores = sorted(p["score"] for p in pushed)
    assert sum(s < 0.05 for s in scores) == 3  # QUERY_BATCH_SIZE diverse picks first
    assert fake_ls.patches[-1] == {"model_version": COLD_START_VERSION}
    # embeddings were cached by indexing: predict afterwards computes none
    computed = counter_value(parts.backend, "vlm_al_embeddings_computed_total")
    assert computed == 12
    response = client.post("/predict", json=predict_body(fake_ls))
    assert response.status_code == 200
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == computed
    by_task = {p["task"]: p["score"] for p in pushed}
    for task, prediction in zip(fake_ls.tasks, response.get_json()["results"]):
        assert prediction["score"] == pytest.approx(by_task[task["id"]])
    # a second /setup does not push the same version again
    client.post("/setup", json=setup_body(fake_ls))
    assert len(fake_ls.imports) == 1


def test_a_setup_during_a_running_index_queues_no_second_index(fake_ls, make_config, make_backend, monkeypatch):
    """Label Studio calls /setup before most reads (an annotator opening a task): during a long index that must
    not queue a second index of the whole project."""
    add_pool(fake_ls, 3)
    jobs = ThreadJobRunner(debounce_seconds=0.0)
    parts = make_backend(make_config(push_predictions=False), jobs=jobs)
    client = create_app(parts.backend.config, parts.backend).test_client()
    indexing, release = threading.Event(), threading.Event()
    runs: list[int] = []
    real_run_index, real_features = parts.backend.run_index, parts.backend.extractor.features

    def run_index(project_id):
        runs.append(project_id)
        return real_run_index(project_id)

    def features(*args, **kwargs):
        indexing.set()
        assert release.wait(10)
        return real_features(*args, **kwargs)

    monkeypatch.setattr(parts.backend, "run_index", run_index)
    monkeypatch.setattr(parts.backend.extractor, "features", features)
    try:
        assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200
        assert indexing.wait(10)
        assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200  # while the index runs
        release.set()
        assert jobs.wait_idle(timeout=30)
        assert runs == [PROJECT_ID]
        assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 12
    finally:
        release.set()
        jobs.shutdown()


def test_a_failed_index_is_queued_again_by_the_next_setup(fake_ls, make_config, make_backend, monkeypatch):
    add_pool(fake_ls, 3)
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    real_features = parts.backend.extractor.features
    calls: list[int] = []

    def features_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError("the disk is full")
        return real_features(*args, **kwargs)

    monkeypatch.setattr(parts.backend.extractor, "features", features_failing_once)
    assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200  # the inline index fails
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 0
    assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 12


def annotate_some(fake_ls, per_class: int = 2) -> set[int]:
    done: set[int] = set()
    seen = {f: 0 for f in FINES}
    for task in fake_ls.tasks:
        fine = FINES[(task["id"] - 1) % 4]
        if seen[fine] < per_class:
            fake_ls.annotate(task["id"], fine)
            seen[fine] += 1
            done.add(task["id"])
    return done


def test_fit_trains_saves_pushes_once_and_moves_the_project_version(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    labeled = annotate_some(fake_ls, 2)
    parts = make_backend(make_config())
    backend = parts.backend
    client = create_app(backend.config, backend).test_client()
    response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": PROJECT_ID},
                                             "annotation": {"id": 1}, "task": {"id": 1}})
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    state = ProjectState(backend.config.model_dir, PROJECT_ID)
    current = state.current()
    assert current is not None and current.model_version == "vlm-al-v1"
    assert (state.version_dir("vlm-al-v1") / "metadata.json").exists()
    assert current.metrics["n_fine"] == 8
    history = state.transition_history()
    assert len(history) == 1 and np.allclose(np.sum(history[0]["matrix"], axis=1), 1.0)
    # the head of the queue (every unlabeled task here) in one "Retrieve predictions" action: Label Studio asked
    # this backend's /predict, which the new version answered with its queue scores; then the PATCH
    assert fake_ls.imports == [] and len(fake_ls.retrieved) == 1
    pushed = fake_ls.retrieved[0]
    unlabeled = {t["id"] for t in fake_ls.tasks} - labeled
    assert {p["task"] for p in pushed} == unlabeled
    assert {p["model_version"] for p in pushed} == {"vlm-al-v1"}
    priorities_version, queue = state.priorities()
    assert priorities_version == "vlm-al-v1" and all(p["score"] == pytest.approx(queue[p["task"]]) for p in pushed)
    assert fake_ls.patches[-1] == {"model_version": "vlm-al-v1"}
    assert fake_ls.requests.index("POST /api/dm/actions/") < fake_ls.requests.index(f"PATCH /api/projects/{PROJECT_ID}/")
    # the fine suggestion now appears, in the fine control of the VLM's group
    response = backend.predict_response(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    results, version = response.predictions, response.model_version
    assert version == "vlm-al-v1"
    for task, prediction in zip(fake_ls.tasks, results):
        names = [r["from_name"] for r in prediction["result"] if r["type"] == "choices"]
        assert names[0] == "coarse" and len(names) == 2 and names[1] in ("fine_top", "fine_shoe")
        assert all(0.0 <= r["score"] <= 1.0 for r in prediction["result"] if r["type"] == "choices")
    # /setup reports the same version the project was moved to
    assert client.post("/setup", json=setup_body(fake_ls)).get_json() == {"model_version": "vlm-al-v1"}
    assert client.get(f"/versions?project={PROJECT_ID}").get_json() == {"versions": ["vlm-al-v1"]}
    health = client.get("/health").get_json()
    assert health["model_version"] == "vlm-al-v1" and health["model_versions"] == {str(PROJECT_ID): "vlm-al-v1"}


def test_fine_suggestion_respects_the_confidence_threshold(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config(fine_confidence_threshold=1.0, push_predictions=False))
    parts.backend.run_fit(PROJECT_ID)
    response = parts.backend.predict_response(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    results, version = response.predictions, response.model_version
    assert version == "vlm-al-v1"
    # nothing reaches probability 1.0: the coarse choice only (and the confidence text)
    assert all([r["type"] for r in p["result"]] == ["choices", "textarea"] for p in results)


def test_a_head_label_studio_did_not_retrieve_is_imported_and_a_short_count_logged(fake_ls, make_config,
                                                                                  make_backend, caplog):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    fake_ls.drop_predictions = 2
    parts = make_backend(make_config())
    fake_ls.ml_url = None  # the project has no connected model that answers Label Studio's action
    with caplog.at_level("WARNING"):
        assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v1"
    assert fake_ls.retrieved == [[]] and len(fake_ls.imports) == 1 and len(fake_ls.imports[0]) == 8
    assert any("did not retrieve the head of vlm-al-v1: it saved no prediction" in r.getMessage()
               for r in caplog.records)
    assert any("created 6 of 8 predictions" in r.getMessage() for r in caplog.records)
    assert fake_ls.patches[-1] == {"model_version": "vlm-al-v1"}


def test_a_refused_retrieve_action_imports_the_head(fake_ls, make_config, make_backend, caplog):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    parts = make_backend(make_config())
    fake_ls.refuse_actions = True
    with caplog.at_level("WARNING"):
        assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v1"
    assert fake_ls.retrieved == [] and [len(batch) for batch in fake_ls.imports] == [8]
    assert any("did not retrieve the head of vlm-al-v1" in r.getMessage() and "403" in r.getMessage()
               for r in caplog.records)
    assert fake_ls.project_model_version == "vlm-al-v1"


def test_restart_serves_the_last_model_at_once(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    config = make_config(push_predictions=False)
    first = make_backend(config)
    first.backend.run_fit(PROJECT_ID)
    before = first.backend.predict(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)

    second = make_backend(config)
    second.backend.warm_start()
    client = create_app(second.backend.config, second.backend).test_client()
    assert client.post("/setup", json={"project": f"{PROJECT_ID}.1", "schema": fake_ls.label_config}).get_json() == {
        "model_version": "vlm-al-v1"
    }
    after = client.post("/predict", json=predict_body(fake_ls)).get_json()["results"]
    assert [[r["value"] for r in p["result"]] for p in after] == [[r["value"] for r in p["result"]] for p in before]


def test_fit_that_dies_half_way_keeps_the_previous_version(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config(push_predictions=False))
    parts.backend.run_fit(PROJECT_ID)
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)

    def broken_save(directory):
        (directory / "weights.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        state.commit_version("vlm-al-v2", broken_save, "hash")
    assert state.current().model_version == "vlm-al-v1"
    assert state.list_versions() == ["vlm-al-v1"]
    response = parts.backend.predict_response(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    results, version = response.predictions, response.model_version
    assert version == "vlm-al-v1" and [r["type"] for r in results[0]["result"]] == ["choices", "choices", "textarea"]


def test_old_versions_are_pruned_locally_and_in_label_studio(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    parts = make_backend(make_config(keep_model_versions=2, prune_label_studio_every=3))
    for fit in range(4):
        fake_ls.annotate(5 + fit, FINES[(5 + fit - 1) % 4])  # something new each time, else no new version
        parts.backend.run_fit(PROJECT_ID)
        if fit < 3:
            assert fake_ls.deleted_versions == []  # Label Studio's versions are deleted rarely, in bulk
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    assert state.current().model_version == "vlm-al-v4"
    assert state.list_versions() == ["vlm-al-v3", "vlm-al-v4"]
    assert sorted(fake_ls.deleted_versions) == ["vlm-al-v1", "vlm-al-v2", "vlm-al-v3"]
    assert state.versions_in_label_studio() == ["vlm-al-v4"]


def test_webhook_burst_becomes_one_fit_that_sees_every_annotation(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    jobs = ThreadJobRunner(debounce_seconds=0.3)
    parts = make_backend(make_config(), jobs=jobs)
    client = create_app(parts.backend.config, parts.backend).test_client()
    for task in fake_ls.tasks[4:9]:  # annotations keep arriving during the burst
        fake_ls.annotate(task["id"], FINES[(task["id"] - 1) % 4])
        started = time.perf_counter()
        response = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": PROJECT_ID},
                                                 "annotation": {"id": task["id"]}, "task": {"id": task["id"]}})
        assert response.status_code == 200
        assert time.perf_counter() - started < 0.2  # only enqueued
    assert jobs.wait_idle(timeout=60)
    assert counter_value(parts.backend, "vlm_al_fits_total", outcome="trained") == 1
    current = ProjectState(parts.backend.config.model_dir, PROJECT_ID).current()
    assert current.model_version == "vlm-al-v1" and current.metrics["n_fine"] == 9
    assert len(fake_ls.retrieved) == 1 and fake_ls.imports == []  # one fit, one head: every unlabeled task here


def test_start_training_and_legacy_train_queue_a_fit(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT_ID}})
    assert response.status_code == 200
    assert parts.backend.current_model_version(PROJECT_ID) == "vlm-al-v1"
    fake_ls.annotate(12, FINES[(12 - 1) % 4])
    response = client.post("/train", json={"annotations": [fake_ls.tasks[0]], "project": f"{PROJECT_ID}.123",
                                           "label_config": fake_ls.label_config})
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert parts.backend.current_model_version(PROJECT_ID) == "vlm-al-v2"


def test_no_fine_label_means_no_model(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 1)
    parts = make_backend(make_config(push_predictions=False))
    assert parts.backend.run_fit(PROJECT_ID) is None
    assert parts.backend.current_model_version(PROJECT_ID) == COLD_START_VERSION
    assert counter_value(parts.backend, "vlm_al_fits_total", outcome="skipped") == 1


def test_tasks_created_webhook_indexes_new_tasks(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 1)
    parts = make_backend(make_config())
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PROJECT_ID},
                                             "tasks": fake_ls.tasks})
    assert response.status_code == 200 and response.get_json()["status"] == "queued"
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 4
    fake_ls.add_task(99, "Boot")
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PROJECT_ID},
                                  "tasks": [fake_ls.tasks[-1]]})
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 5
    assert [p["task"] for p in fake_ls.imports[-1]] == [99]  # only the new task is pushed


def test_project_updated_reparses_a_changed_config(fake_ls, make_config, make_backend):
    parts = make_backend(make_config(push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    new_config = fake_ls.label_config.replace('value="Boot"', 'value="Sandal"')
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED",
                                             "project": {"id": PROJECT_ID, "label_config": new_config}})
    assert response.status_code == 200
    assert response.get_json()["label_config_changed"] is True and response.get_json()["usable"] is True
    assert parts.backend.jobs.runs_started == 1  # a fit for the new classes
    response = client.post("/webhook", json={"action": "PROJECT_UPDATED",
                                             "project": {"id": PROJECT_ID, "label_config": "<View></View>"}})
    assert response.status_code == 200 and response.get_json()["usable"] is False


@pytest.fixture(scope="module")
def real_components(tmp_path_factory):
    """The shipped default: efficientnet_lite0 with its packaged ImageNet weights + the semantic zero-shot annotator
    (its ImageNet head is the backbone's own)."""
    from backend.config import Config
    from backend.components import build_components

    return build_components(Config(model_dir=tmp_path_factory.mktemp("real"), image_size=64))


def test_real_backbone_and_weak_annotator_end_to_end_through_predict(fake_ls, make_config, real_components):
    from backend.label_config import RECOMMENDED_FASHION_MNIST_CONFIG
    from backend.ls_client import LabelStudioClientFactory
    from backend.metrics import BackendMetrics
    from backend.service import MLBackend
    from model.datasets import FASHION_MNIST_GROUPS, load_fashion_mnist, to_pil
    import io

    images, _ = load_fashion_mnist("test")
    fake_ls.label_config = RECOMMENDED_FASHION_MNIST_CONFIG.read_text()
    for i in range(6):
        buffer = io.BytesIO()
        to_pil(images[i], invert=True, size=64).save(buffer, format="PNG")
        fake_ls.add_task(i + 1, None, image=buffer.getvalue())
    config = make_config(push_predictions=False, image_size=64, label_studio_url=fake_ls.url,
                         label_studio_api_key=API_KEY)
    backend = MLBackend(
        config, backbone=real_components.backbone, weak_annotator=real_components.weak_annotator,
        weak_annotator_factory=real_components.weak_annotator_factory,
        embedding_store=real_components.embedding_store, image_codec=real_components.image_codec,
        ls_clients=LabelStudioClientFactory(config.model_dir / "downloads", config.max_image_bytes, fake_ls.url,
                                            API_KEY),
        metrics=BackendMetrics(),
    )
    try:
        client = create_app(config, backend).test_client()
        body = predict_body(fake_ls)
        response = client.post("/predict", json=body)
        assert response.status_code == 200, response.get_json()
        results = response.get_json()["results"]
        assert len(results) == 6
        for prediction in results:
            coarse = prediction["result"][0]
            assert coarse["from_name"] == "coarse" and coarse["value"]["choices"][0] in FASHION_MNIST_GROUPS
            assert 0.0 <= coarse["score"] <= 1.0 and 0.0 <= prediction["score"] <= 1.0
        assert counter_value(backend, "vlm_al_embeddings_computed_total") == 6
        assert counter_value(backend, "vlm_al_weak_labels_computed_total") == 6
        # One forward pass per image gave both the embedding and the weak label: 6 images through one model.
        forward = "vlm_al_model_forward_images_total"
        assert counter_value(backend, forward, model=real_components.backbone.name) == 6
        exposition = client.get("/metrics").get_data(as_text=True)
        assert [line for line in exposition.splitlines() if line.startswith(forward + "{")] == [
            f'{forward}{{model="{real_components.backbone.name}"}} 6.0'
        ]
        again = client.post("/predict", json=body)
        assert again.get_json()["results"] == results
        assert counter_value(backend, "vlm_al_embeddings_computed_total") == 6
        assert counter_value(backend, forward, model=real_components.backbone.name) == 6
    finally:
        backend.jobs.shutdown()


def test_transition_matrix_is_reestimated_from_fine_labels_and_hand_set_coarse_labels(fake_ls, make_config,
                                                                                     make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)  # tasks 1-4: fine labels, VLM right on all of them
    parts = make_backend(make_config(push_predictions=False))
    parts.backend.run_fit(PROJECT_ID)
    # task 5 is a red "T-shirt" image (the VLM says Top); an annotator sets the coarse choice to Shoe by hand
    fake_ls.tasks[4]["annotations"].append({"id": 555, "was_cancelled": False, "updated_at": "2026-01-02T00:00:00Z",
                                            "result": [{"from_name": "coarse", "to_name": "image", "type": "choices",
                                                        "value": {"choices": ["Shoe"]}, "origin": "manual"}]})
    parts.backend.run_fit(PROJECT_ID)
    first, second = ProjectState(parts.backend.config.model_dir, PROJECT_ID).transition_history()
    top, shoe = 0, 1
    assert first["counts"] == [[2, 0], [0, 2]] and first["n_trusted"] == 4
    assert second["counts"] == [[2, 0], [1, 2]] and second["n_trusted"] == 5
    assert second["matrix"][shoe][top] > first["matrix"][shoe][top]
    current = ProjectState(parts.backend.config.model_dir, PROJECT_ID).current()
    assert current.model_version == "vlm-al-v2" and current.metrics["n_human_coarse"] == 1


def test_label_studio_client_pages_through_every_task(fake_ls, tmp_path):
    from backend.ls_client import TASK_PAGE_SIZE, LabelStudioClient

    for task_id in range(1, TASK_PAGE_SIZE + 3):
        fake_ls.tasks.append({"id": task_id, "data": {"image": f"/data/local-files/?d=x/{task_id}.png"},
                              "annotations": []})
    client = LabelStudioClient(fake_ls.url, API_KEY, tmp_path / "downloads", max_image_bytes=1000)
    tasks = client.fetch_tasks(PROJECT_ID)
    assert [t["id"] for t in tasks] == list(range(1, TASK_PAGE_SIZE + 3))
    assert all(h == f"Token {API_KEY}" for h in fake_ls.auth_headers)


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("/data/local-files/?d=a/b.png", True),
        ("/data/upload/3/abc-b.png", True),
        ("upload/3/abc-b.png", True),
        ("s3://bucket/key.png", True),
        ("http://127.0.0.1:8080/data/local-files/?d=a.png", True),
        ("http://localhost:8080/data/local-files/?d=a.png", True),
        ("http://127.0.0.1:9999/a.png", False),
        ("https://example.com/a.png", False),
        ("//example.com/a.png", False),
        ("file:///etc/passwd", False),
        ("", False),
        (None, False),
    ],
)
def test_only_label_studio_image_urls_are_fetched(url, accepted):
    from backend.ls_client import ImageFetchError, check_image_url

    if accepted:
        assert check_image_url(url, "http://127.0.0.1:8080") == url
    else:
        with pytest.raises(ImageFetchError):
            check_image_url(url, "http://127.0.0.1:8080")


# --- weak annotators built from each project's own classes ---------------------------------------------------------

BIRD_GROUPS = {"Raptor": ["Eagle", "Hawk"], "Songbird": ["Robin", "Finch"]}


class PromptedFakeAnnotator:
    """A text-prompted 'VLM': asked to choose among the classes it was built with; reddish images get the first.

    Its name does not change with the classes (like OpenAICompatibleVLM's), so only the cache namespace keeps the
    answers for two class sets apart."""

    name = "fake-prompted-vlm"
    cost_per_label = 0.02

    def __init__(self, coarse_classes) -> None:
        self.coarse_classes = tuple(coarse_classes)
        self.prompt = "Which one of these categories is it? " + "; ".join(self.coarse_classes)
        self.images_annotated = 0

    def annotate(self, images):
        from conftest import FakeWeakLabels

        self.images_annotated += len(images)
        rows = [[0.8, 0.2] if np.asarray(im, dtype=np.float32)[..., 0].mean() > 128 else [0.2, 0.8] for im in images]
        p = np.asarray(rows, dtype=np.float32)
        return FakeWeakLabels(p.argmax(axis=1).astype(np.int64), p)


def test_two_projects_get_weak_annotators_prompted_with_their_own_classes(fake_ls, make_config, make_backend):
    from backend.label_config import recommended_label_config
    from model.hierarchy import LabelHierarchy

    fake_ls.add_task(1, "T-shirt")
    fake_ls.add_task(2, "Boot")
    built: list[PromptedFakeAnnotator] = []

    def factory(hierarchy):
        built.append(PromptedFakeAnnotator(hierarchy.coarse_classes))
        return built[-1]

    parts = make_backend(make_config(push_predictions=False), weak_annotator_factory=factory)
    clothing_config = fake_ls.label_config
    bird_config = recommended_label_config(LabelHierarchy.from_groups(BIRD_GROUPS))
    clothing = parts.backend.predict(fake_ls.tasks, project=f"{PROJECT_ID}.1", label_config=clothing_config)
    birds = parts.backend.predict(fake_ls.tasks, project=PROJECT_ID + 1, label_config=bird_config)
    again = parts.backend.predict(fake_ls.tasks, project=PROJECT_ID + 1, label_config=bird_config)

    assert [a.coarse_classes for a in built] == [("Top", "Shoe"), ("Raptor", "Songbird")]
    assert "Top; Shoe" in built[0].prompt and "Raptor" not in built[0].prompt
    assert "Raptor; Songbird" in built[1].prompt and "Top" not in built[1].prompt
    assert [p["result"][0]["value"]["choices"] for p in clothing] == [["Top"], ["Shoe"]]
    assert [p["result"][0]["value"]["choices"] for p in birds] == [["Raptor"], ["Songbird"]]
    assert again == birds
    # the same images: embedded once, but asked once per class set (never answered from the other set's cache)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 2
    assert counter_value(parts.backend, "vlm_al_weak_labels_computed_total") == 4
    assert [a.images_annotated for a in built] == [2, 2]


def test_open_clip_factory_prompts_each_hierarchy_with_its_own_names_over_one_model():
    from backend.components import OpenClipZeroShotFactory
    from backend.features import WeakAnnotators, weak_namespace
    from model.embeddings import OpenClipImageBackbone
    from model.hierarchy import LabelHierarchy
    from test_weak_annotators import TINY_OPEN_CLIP

    clip = OpenClipImageBackbone("ViT-S-32", pretrained=None, model_overrides=TINY_OPEN_CLIP)
    annotators = WeakAnnotators(factory=OpenClipZeroShotFactory(clip, cost_per_label=0.01))
    clothing_hierarchy = LabelHierarchy.from_groups({"Top": ["T-shirt", "Shirt"], "Shoe": ["Sneaker", "Boot"]})
    bird_hierarchy = LabelHierarchy.from_groups(BIRD_GROUPS)
    clothing = annotators.for_hierarchy(clothing_hierarchy)
    birds = annotators.for_hierarchy(bird_hierarchy)
    assert annotators.for_hierarchy(LabelHierarchy.from_groups(BIRD_GROUPS)) is birds  # cached by hierarchy
    assert clothing.backbone is clip and birds.backbone is clip  # the heavy model is loaded once
    assert clothing.coarse_classes == ("Top", "Shoe") and birds.coarse_classes == ("Raptor", "Songbird")
    assert "a photo of a Raptor." in birds.prompts_for("Raptor")
    assert not np.allclose(clothing.class_text_embeddings, birds.class_text_embeddings)
    assert weak_namespace(clothing) != weak_namespace(birds)


def test_vlm_factory_asks_for_the_projects_classes_and_caches_them_apart():
    from backend.components import OpenAICompatibleVLMFactory
    from backend.features import weak_namespace
    from model.hierarchy import LabelHierarchy

    factory = OpenAICompatibleVLMFactory("http://127.0.0.1:9", "secret-key", "tiny-vlm", cost_per_label=0.02)
    clothing = factory(LabelHierarchy.from_groups({"Top": ["T-shirt", "Shirt"], "Shoe": ["Sneaker", "Boot"]}))
    birds = factory(LabelHierarchy.from_groups(BIRD_GROUPS))
    assert "Raptor; Songbird" in birds.prompt and "Top" not in birds.prompt
    assert "Top; Shoe" in clothing.prompt
    assert clothing.name == birds.name and weak_namespace(clothing) != weak_namespace(birds)
    assert "secret-key" not in repr(factory)


def test_open_clip_backbone_is_shared_only_when_model_and_weights_match(tmp_path):
    import hashlib
    from types import SimpleNamespace

    from backend.components import _same_open_clip_weights

    tagged = SimpleNamespace(model_name="ViT-B-32", weights_id="laion2b_s34b_b79k")
    assert _same_open_clip_weights(tagged, "ViT-B-32", "laion2b_s34b_b79k")
    assert not _same_open_clip_weights(tagged, "ViT-B-32", "openai")
    assert not _same_open_clip_weights(tagged, "ViT-B-16", "laion2b_s34b_b79k")
    checkpoint = tmp_path / "clip.safetensors"
    checkpoint.write_bytes(b"weights")
    from_file = SimpleNamespace(model_name="ViT-B-32",
                                weights_id=f"file-{hashlib.sha256(b'weights').hexdigest()[:12]}")
    assert _same_open_clip_weights(from_file, "ViT-B-32", str(checkpoint))
    assert not _same_open_clip_weights(tagged, "ViT-B-32", str(checkpoint))
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"other weights")
    assert not _same_open_clip_weights(from_file, "ViT-B-32", str(other))
    random_weights = SimpleNamespace(model_name="ViT-B-32", weights_id="random-seed0")
    assert _same_open_clip_weights(random_weights, "ViT-B-32", None)
    assert not _same_open_clip_weights(random_weights, "ViT-B-32", "openai")


def test_classes_the_weak_annotator_cannot_use_are_a_422_naming_the_problem(fake_ls, make_config, make_backend):
    from model.errors import ModelInputError

    def factory(hierarchy):
        raise ModelInputError(f"coarse classes are not distinguishable in text answers: {hierarchy.coarse_classes}")

    fake_ls.add_task(1, "Boot")
    parts = make_backend(make_config(push_predictions=False), weak_annotator_factory=factory)
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/predict", json=predict_body(fake_ls))
    assert response.status_code == 422
    body = response.get_json()
    assert body["error"] == "unsupported_label_config" and "not distinguishable" in body["message"]


def test_a_retrain_with_nothing_new_keeps_the_version_and_pushes_nothing(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 1)
    parts = make_backend(make_config(keep_model_versions=1))
    assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v1"
    imports, patches = len(fake_ls.imports), len(fake_ls.patches)
    client = create_app(parts.backend.config, parts.backend).test_client()
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT_ID}}).status_code == 200
    assert parts.backend.current_model_version(PROJECT_ID) == "vlm-al-v1"
    assert (len(fake_ls.imports), len(fake_ls.patches)) == (imports, patches)
    assert fake_ls.deleted_versions == []
    history = ProjectState(parts.backend.config.model_dir, PROJECT_ID).transition_history()
    assert [h["model_version"] for h in history] == ["vlm-al-v1"]
    fake_ls.annotate(6, FINES[(6 - 1) % 4])
    assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v2"


THREE_LEVEL_TAXONOMY = """
<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="tree" toName="image">
    <Choice value="Tiere">
      <Choice value="Vögel"><Choice value="Amsel"/><Choice value="Möwe"/></Choice>
      <Choice value="Säugetiere"><Choice value="Katze"/><Choice value="Pferd"/></Choice>
    </Choice>
    <Choice value="Fahrzeuge">
      <Choice value="Raumfahrt"><Choice value="Rakete"/></Choice>
      <Choice value="Straße"><Choice value="Auto"/><Choice value="Fahrrad"/></Choice>
    </Choice>
    <Choice value="Getränke">
      <Choice value="Heiß"><Choice value="Kaffee"/><Choice value="Tee"/></Choice>
    </Choice>
  </Taxonomy>
</View>
"""


def test_the_default_weak_annotator_answers_a_three_level_taxonomy_of_any_class_names(fake_ls, make_config,
                                                                                    real_components):
    """The failure this default fixes: a project whose classes are not the ImageNet map's got no cold-start
    pre-annotation. With the semantic annotator every task gets a coarse choice from the project's own names."""
    import io

    from skimage import data as skimage_data

    from backend.ls_client import LabelStudioClientFactory
    from backend.metrics import BackendMetrics
    from backend.service import MLBackend
    from PIL import Image

    fake_ls.label_config = THREE_LEVEL_TAXONOMY
    photos = [skimage_data.chelsea(), skimage_data.rocket(), skimage_data.coffee()]
    for task_id, photo in enumerate(photos, start=1):
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, format="PNG")
        fake_ls.add_task(task_id, None, image=buffer.getvalue())
    config = make_config(push_predictions=False, image_size=64, label_studio_url=fake_ls.url,
                         label_studio_api_key=API_KEY)
    backend = MLBackend(
        config, backbone=real_components.backbone, weak_annotator=None,
        weak_annotator_factory=real_components.weak_annotator_factory,
        embedding_store=real_components.embedding_store, image_codec=real_components.image_codec,
        ls_clients=LabelStudioClientFactory(config.model_dir / "downloads", config.max_image_bytes, fake_ls.url,
                                            API_KEY),
        metrics=BackendMetrics(),
    )
    try:
        response = create_app(config, backend).test_client().post("/predict", json=predict_body(fake_ls))
        assert response.status_code == 200, response.get_json()
        results = response.get_json()["results"]
        assert len(results) == 3
        for prediction in results:
            assert prediction["result"], "every task gets the weak annotator's coarse choice"
            region = prediction["result"][0]
            assert region["from_name"] == "tree" and region["type"] == "taxonomy"
            assert region["value"]["taxonomy"][0][0] in ("Tiere", "Fahrzeuge", "Getränke")
        assert counter_value(backend, "vlm_al_weak_labels_computed_total") == 3
    finally:
        backend.jobs.shutdown()


def test_fine_suggestions_are_pre_ticked_only_where_their_out_of_fold_precision_reaches_the_target(
        fake_ls, make_config, make_backend):
    """Few labels: no threshold reaches SUGGESTION_PRECISION, so only the coarse choice is pre-filled. Many
    clearly separated labels: the calibrated threshold admits the confident suggestions, and they are right."""
    add_pool(fake_ls, 12)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config(suggestion_precision=0.9, push_predictions=False))
    assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v1"
    fitted = ProjectState(parts.backend.config.model_dir, PROJECT_ID).current().metrics
    assert fitted["suggestion"]["threshold"] is None and fitted["suggestion"]["n_validation"] == 8
    assert len(fitted["coarse_precision"]) == 2 and all(0 < p <= 1 for p in fitted["coarse_precision"])
    response = parts.backend.predict_response(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    for prediction in response.predictions:
        choices = [r for r in prediction["result"] if r["type"] == "choices"]
        assert [r["from_name"] for r in choices] == ["coarse"]  # no fine pre-tick without evidence
        assert any(abs(choices[0]["score"] - p) < 1e-6 for p in fitted["coarse_precision"])

    annotate_some(fake_ls, 10)  # 40 human labels, each colour its own class
    assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v2"
    fitted = ProjectState(parts.backend.config.model_dir, PROJECT_ID).current().metrics
    threshold = fitted["suggestion"]["threshold"]
    assert threshold is not None and fitted["suggestion"]["bound_at_threshold"] >= 0.9
    response = parts.backend.predict_response(fake_ls.tasks, project=PROJECT_ID, label_config=fake_ls.label_config)
    ticked = 0
    for task, prediction in zip(fake_ls.tasks, response.predictions):
        fine = [r for r in prediction["result"] if r["type"] == "choices" and r["from_name"] != "coarse"]
        if fine:
            ticked += 1
            assert fine[0]["score"] >= threshold - 1e-6
            assert fine[0]["value"]["choices"] == [FINES[(task["id"] - 1) % 4]]
    assert ticked > 0
