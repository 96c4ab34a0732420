"""backend.assistant and backend.report through MLBackend against the fake Label Studio (real HTTP): auto-accepted
annotations never become human labels, audits lead the queue blind, arrivals are placed in the current queue, and
the report answers in HTML and JSON behind the same auth."""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import replace

import numpy as np
import pytest
from flask import jsonify, request
from werkzeug.serving import make_server

from backend.app import create_app
from backend.assistant import AUDIT_SCORE_SPAN, Assistant
from backend.config import Config
from backend.label_config import parse_label_config
from backend.state import ProjectState
from backend.jobs import InlineJobRunner
from backend.ls_client import LabelStudioClientFactory
from backend.metrics import BackendMetrics
from backend.service import MLBackend
from conftest import (API_KEY, PROJECT_ID, FakeBackbone, FakeLabelStudio, FakeWeakAnnotator, image_codec,
                      label_config)
from model.embedding_store import EmbeddingStore
from model.images import ImageLimits
from test_service import FINES, add_pool, annotate_some

AUTO_USER = 77


def fit(backend) -> None:
    client = create_app(backend.config, backend).test_client()
    response = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT_ID}})
    assert response.status_code == 200


def auto_annotate(fake_ls, task_id: int, fine: str) -> None:
    fake_ls.annotate(task_id, fine, annotation_id=task_id * 100 + 1)
    task = next(t for t in fake_ls.tasks if t["id"] == task_id)
    task["annotations"][-1]["completed_by"] = AUTO_USER


def test_auto_accepted_annotations_are_not_human_labels_trusted_pairs_or_training_labels(fake_ls, make_config,
                                                                                           make_backend, tmp_path):
    add_pool(fake_ls, 4)
    annotate_some(fake_ls, 2)
    baseline = make_backend(make_config(model_dir=tmp_path / "baseline"))
    fit(baseline.backend)
    expected = ProjectState(baseline.backend.config.model_dir, PROJECT_ID)

    # The same project where auto-accept labeled three more tasks (completed by its user, class unchanged).
    parts = make_backend(make_config(model_dir=tmp_path / "auto"))
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    auto = {9: "T-shirt", 10: "Shirt", 11: "Sneaker"}
    state.root.mkdir(parents=True)
    parts.backend.assistant.save(state, {"auto_user_id": AUTO_USER, "auto_accepted": {
        str(t): {"fine": f, "model_version": "vlm-al-v0"} for t, f in auto.items()}})
    for task_id, fine in auto.items():
        auto_annotate(fake_ls, task_id, fine)
    fit(parts.backend)
    metrics, base_metrics = state.current().metrics, expected.current().metrics
    assert metrics["n_fine"] == base_metrics["n_fine"] == 8
    assert metrics["n_trusted_pairs"] == base_metrics["n_trusted_pairs"]
    assert state.transition_history()[-1]["counts"] == expected.transition_history()[-1]["counts"]
    # What each row trains on (labels, images, config) is the same as without the auto-accepted annotations.
    assert metrics["inputs_digest"] == base_metrics["inputs_digest"]
    ledger = parts.backend.assistant.load(state)["ledger"]
    assert ledger["human_fine"] == 8 and ledger["auto_accepted"] == 3


def test_an_auto_accepted_annotation_a_human_corrected_is_a_human_label(fake_ls, make_config):
    add_pool(fake_ls, 1)
    labeling = parse_label_config(fake_ls.label_config)
    assistant = Assistant(make_config())
    state = ProjectState(assistant.config.model_dir, PROJECT_ID)
    state.root.mkdir(parents=True)
    assistant.save(state, {"auto_user_id": AUTO_USER, "auto_accepted": {"1": {"fine": "T-shirt"},
                                                                         "3": {"fine": "Sneaker"}}})
    auto_annotate(fake_ls, 1, "T-shirt")  # untouched
    auto_annotate(fake_ls, 3, "Boot")  # a reviewer changed the species
    fake_ls.annotate(2, "Shirt")  # a human's own
    view, removed = assistant.human_view(state, labeling, fake_ls.tasks)
    assert removed == {1: "T-shirt"}
    assert [len(t["annotations"]) for t in view] == [0, 1, 1, 0]


def test_pending_audits_lead_the_queue_and_their_prediction_hides_the_fine_guess(fake_ls, make_config,
                                                                                   make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config(fine_confidence_threshold=0.0))
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    state.root.mkdir(parents=True)
    parts.backend.assistant.save(state, {"audits": {"12": {"fine": "Boot", "model_version": "vlm-al-v0",
                                                           "human": None}}})
    fit(parts.backend)
    _, scores = state.priorities()
    assert scores[12] == 0.0 and all(s >= AUDIT_SCORE_SPAN for t, s in scores.items() if t != 12)
    pushed = {p["task"]: p for p in fake_ls.retrieved[-1]}  # the head, as this backend's /predict answered it
    audit_result = {r["from_name"]: r for r in pushed[12]["result"]}
    assert set(audit_result) == {"coarse", "model_confidence"}
    assert audit_result["model_confidence"]["value"]["text"][0].startswith("Audit of auto-accept")
    assert any(r["from_name"].startswith("fine_") for t, p in pushed.items() if t != 12 for r in p["result"])

    # The human labels the audit task: the next fit scores the audit (auto-accept would have said Boot).
    fake_ls.annotate(12, "Boot")
    fit(parts.backend)
    summary = parts.backend.assistant.load(state)["audit_summary"]
    assert summary["per_class"] == {"Boot": {"audited": 1, "correct": 1}} and summary["paused"] == []


def test_tasks_arriving_after_a_fit_are_placed_in_its_queue_without_a_retrain(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config())
    fit(parts.backend)
    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    version, before = state.priorities()
    arrival = parts.backend.assistant.load(state)["arrival"]
    assert arrival["model_version"] == version and arrival["margins"] == sorted(arrival["margins"])
    for task_id, fine in ((40, "Boot"), (41, "T-shirt")):
        fake_ls.add_task(task_id, fine)
    client = create_app(parts.backend.config, parts.backend).test_client()
    client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PROJECT_ID},
                                  "tasks": fake_ls.tasks[-2:]})
    assert state.current().model_version == version  # no retrain
    _, after = state.priorities()
    assert {t: s for t, s in after.items() if t in before} == before
    pushed = {p["task"]: p for p in fake_ls.imports[-1]}
    assert set(pushed) == {40, 41} and {p["model_version"] for p in pushed.values()} == {version}
    for task_id in (40, 41):
        assert min(arrival["scores"]) <= after[task_id] <= max(arrival["scores"])
        assert pushed[task_id]["score"] == after[task_id]


def test_report_html_and_json_behind_basic_auth(fake_ls, make_config, make_backend):
    add_pool(fake_ls, 3)
    annotate_some(fake_ls, 2)
    parts = make_backend(make_config(basic_auth_user="u", basic_auth_pass="p"))
    backend = parts.backend
    client = create_app(backend.config, backend).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    assert client.get(f"/report/{PROJECT_ID}").status_code == 401
    assert client.get(f"/report/{PROJECT_ID}.json").status_code == 401
    missing = client.get(f"/report/{PROJECT_ID}.json", headers=auth)
    assert missing.status_code == 404 and "no fitted model" in missing.get_json()["message"]
    assert client.get("/report/abc.json", headers=auth).status_code == 400
    client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT_ID}}, headers=auth)
    report = client.get(f"/report/{PROJECT_ID}.json", headers=auth).get_json()
    assert report["model_version"] == "vlm-al-v1"
    assert {k: report["ledger"][k] for k in ("human_fine", "human_coarse", "auto_accepted")} == {
        "human_fine": 8, "human_coarse": 0, "auto_accepted": 0}
    assert report["class_balance"]["classes"] == FINES and sum(report["class_balance"]["human"]) == 8
    assert np.allclose(np.sum(report["transition"]["matrix"], axis=1), 1.0)
    assert report["auto_accept"]["enabled"] is False
    json.dumps(report)
    page = client.get(f"/report/{PROJECT_ID}", headers=auth)
    assert page.status_code == 200 and page.mimetype == "text/html"
    text = page.get_data(as_text=True)
    assert text.count("data:image/png;base64,") >= 3 and "Likely label errors" in text


def test_auto_accept_is_off_by_default():
    assert Config().auto_accept_precision == 0.0
    assert Config.from_env({}).auto_accept_precision == 0.0
    assert Config.from_env({"AUTO_ACCEPT_PRECISION": "0.95"}).auto_accept_precision == 0.95


def _backend_for(fake, config: Config) -> MLBackend:
    """MLBackend with conftest's fake models, wired to ``fake`` (as conftest's make_backend does for fake_ls)."""
    config = replace(config, label_studio_url=fake.url, label_studio_api_key=API_KEY)
    return MLBackend(
        config, backbone=FakeBackbone(), weak_annotator=FakeWeakAnnotator(),
        embedding_store=EmbeddingStore(config.model_dir / "embeddings.sqlite"),
        image_codec=image_codec(ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)),
        ls_clients=LabelStudioClientFactory(download_root=config.model_dir / "downloads",
                                            max_image_bytes=config.max_image_bytes, default_url=config.label_studio_url,
                                            default_api_key=config.label_studio_api_key),
        jobs=InlineJobRunner(), metrics=BackendMetrics(),
    )


@pytest.fixture
def fake_ls_with_users():
    """The fake Label Studio plus the users, annotations and Data Manager views endpoints auto-accept uses."""
    fake = FakeLabelStudio(label_config=label_config())
    app = fake.make_app()
    users = [{"id": 1, "email": "admin@example.com", "username": "admin"}]
    views: list[dict] = []
    created: list[dict] = []

    @app.get("/api/users/")
    def list_users():
        return jsonify(users)

    @app.post("/api/users/")
    def create_user():
        body = request.get_json()
        users.append({"id": AUTO_USER, "email": body["email"], "username": body["username"]})
        return jsonify(users[-1]), 201

    @app.post("/api/tasks/<int:task_id>/annotations/")
    def create_annotation(task_id: int):
        body = request.get_json()
        annotation = {"id": 5000 + len(created), "result": body["result"], "completed_by": body["completed_by"],
                      "was_cancelled": False, "ground_truth": False, "updated_at": "2026-01-02T00:00:00Z",
                      "task": task_id}
        created.append(annotation)
        next(t for t in fake.tasks if t["id"] == task_id)["annotations"].append(annotation)
        return jsonify(annotation), 201

    @app.get("/api/dm/views/")
    def list_views():
        return jsonify(views)

    @app.post("/api/dm/views/")
    def create_view():
        views.append({"id": len(views) + 1, **request.get_json()})
        return jsonify(views[-1]), 201

    server = make_server("127.0.0.1", 0, app, threaded=True)
    fake.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.created_annotations = created
    fake.views = views
    yield fake
    server.shutdown()
    thread.join(timeout=5)


def test_auto_accept_through_fits_labels_with_the_dedicated_user_and_audits_the_rest(fake_ls_with_users, make_config):
    fake = fake_ls_with_users
    add_pool(fake, 30)  # 120 tasks of 4 easy classes
    annotate_some(fake, 25)  # 100 human labels: 25 out-of-fold hits per class
    config = make_config(auto_accept_precision=0.85, auto_accept_audit_share=0.25,
                         auto_accept_user="auto@example.com")
    backend = _backend_for(fake, config)
    fit(backend)
    state = ProjectState(config.model_dir, PROJECT_ID)
    record = backend.assistant.load(state)
    accepted = {int(t): a["fine"] for t, a in record["auto_accepted"].items()}
    audits = {int(t): a for t, a in record["audits"].items()}
    assert accepted and audits and not set(accepted) & set(audits)
    assert record["auto_user_id"] == AUTO_USER
    assert {a["completed_by"] for a in fake.created_annotations} == {AUTO_USER}
    assert {a["task"] for a in fake.created_annotations} == set(accepted)
    truth = {t["id"]: FINES[(t["id"] - 1) % 4] for t in fake.tasks}
    assert all(fine == truth[t] for t, fine in accepted.items())  # the colours make every class easy
    _, scores = state.priorities()
    assert max(scores[t] for t in audits) < min(s for t, s in scores.items() if t not in audits)
    # The next fit (the annotations' webhooks) sees nothing new: auto-accepted labels are no human labels.
    version = state.current().model_version
    fit(backend)
    assert state.current().model_version == version and state.current().metrics["n_fine"] == 100
    record = backend.assistant.load(state)
    assert record["ledger"]["auto_accepted"] == len(accepted)
    # 100 human labels: the learning curve ran as its own job (3 folds, twice) and the suggestion reads it.
    assert record["curve"]["n_labels"] == 100 and record["curve"]["n_held_out"] == 200
    assert record["stopping"]["suggestion"]["n_labels"] == 100 and record["stopping"]["suggestion"]["text"]
