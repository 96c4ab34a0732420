"""HTTP layer: every endpoint, JSON errors for bad input, basic auth, secrets kept out of logs."""

from __future__ import annotations

import base64
import logging

import pytest

from backend.app import create_app
from conftest import API_KEY, PROJECT_ID

IMAGE_ONLY_CONFIG = '<View><Image name="image" value="$image"/></View>'
CONTROL_WITHOUT_IMAGE = '<View><Text name="text" value="$text"/><Choices name="c" toName="text">' \
                        '<Choice value="A"/><Choice value="B"/></Choices></View>'


@pytest.fixture
def app_parts(fake_ls, make_config, make_backend):
    parts = make_backend(make_config(push_predictions=False))
    return create_app(parts.backend.config, parts.backend), parts


@pytest.fixture
def client(app_parts):
    return app_parts[0].test_client()


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_health_and_root(client):
    for path in ("/health", "/"):
        response = client.get(path)
        assert response.status_code == 200
        body = response.get_json()
        assert body["status"] == "UP" and body["model_class"] == "MLBackend"
        assert body["embedding"]["runtime"] == "torch" and body["embedding"]["device"] == "cpu"


def test_setup_answers_the_current_version(client, fake_ls):
    response = client.post("/setup", json={"project": f"{PROJECT_ID}.1795294297", "schema": fake_ls.label_config,
                                           "hostname": fake_ls.url, "access_token": API_KEY})
    assert response.status_code == 200 and response.get_json() == {"model_version": "vlm-al-v0"}


def test_versions_and_metrics(client):
    assert client.get("/versions").get_json() == {"versions": []}
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert b"vlm_al_embeddings_computed_total" in response.data
    client.get("/health")
    assert b'vlm_al_request_seconds_count{endpoint="/health"}' in client.get("/metrics").data


@pytest.mark.parametrize(
    ("path", "payload", "needle"),
    [
        ("/setup", b"{not json", "valid JSON"),
        ("/setup", b"[1, 2]", "JSON object"),
        ("/setup", b'{"schema": "<View/>"}', "'project'"),
        ("/setup", b'{"project": "abc"}', "project"),
        ("/setup", b'{"project": true}', "project"),
        ("/setup", b'{"project": "1.2", "schema": 5}', "'schema'"),
        ("/predict", b'{"project": "1.2"}', "'tasks'"),
        ("/predict", b'{"tasks": {"id": 1}}', "list"),
        ("/predict", b'{"tasks": [5]}', "object"),
        ("/predict", b'{"tasks": [{"data": {}}]}', "integer 'id'"),
        ("/predict", b'{"tasks": [{"id": true, "data": {}}]}', "integer 'id'"),
        ("/predict", b'{"tasks": [{"id": "1", "data": {}}]}', "integer 'id'"),
        ("/predict", b'{"tasks": [{"id": 1}]}', "'data'"),
        ("/predict", b'{"tasks": [{"id": 1, "data": {}}], "label_config": 3}', "'label_config'"),
        ("/predict", b'{"tasks": [{"id": 1, "data": {}}]}', "label_config"),
        ("/webhook", b'{"project": {"id": 1}}', "action"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED"}', "project"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": "x"}}', "project"),
        ("/train", b'{"annotations": []}', "'project'"),
        ("/train", b'{"project": "1.2", "annotations": "all"}', "list"),
    ],
)
def test_bad_input_is_a_400_json_and_the_server_stays_up(client, path, payload, needle):
    response = client.post(path, data=payload, content_type="application/json")
    assert response.status_code == 400, response.data
    body = response.get_json()
    assert body["error"] == "bad_request" and needle in body["message"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("config", "needle"),
    [(IMAGE_ONLY_CONFIG, "Choices"), (CONTROL_WITHOUT_IMAGE, "Image"), ("<View", "XML"), ("", "empty")],
)
def test_unsupported_label_configs_are_refused_with_the_reason(client, config, needle):
    for path, body in (("/setup", {"project": "1.2", "schema": config}),
                       ("/predict", {"project": "1.2", "label_config": config,
                                     "tasks": [{"id": 1, "data": {"image": "/data/x.png"}}]})):
        response = client.post(path, json=body)
        assert response.status_code in (400, 422), response.data
        assert needle.lower() in response.get_json()["message"].lower()
    assert client.get("/health").status_code == 200


def test_unknown_webhook_action_is_ignored_with_a_200(client):
    response = client.post("/webhook", json={"action": "LABEL_LINK_CREATED", "project": {"id": 1}})
    assert response.status_code == 200
    assert response.get_json()["status"] == "ignored" and "LABEL_LINK_CREATED" in response.get_json()["message"]


def test_unknown_route_and_method_are_json(client):
    assert client.get("/nope").get_json()["error"] == "not_found"
    response = client.get("/predict")
    assert response.status_code == 405 and response.is_json


def test_body_too_large_is_a_413_json(fake_ls, make_config, make_backend):
    parts = make_backend(make_config(max_request_bytes=2048, push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    response = client.post("/predict", data=b'{"tasks": [' + b"1," * 5000 + b"1]}", content_type="application/json")
    assert response.status_code == 413 and response.is_json
    assert client.get("/health").status_code == 200


def test_basic_auth_covers_everything_but_health(fake_ls, make_config, make_backend):
    parts = make_backend(make_config(basic_auth_user="labeler", basic_auth_pass="s3cret-pass", push_predictions=False))
    client = create_app(parts.backend.config, parts.backend).test_client()
    assert client.get("/health").status_code == 200
    assert client.get("/").status_code == 200
    setup = {"project": "1.2", "schema": fake_ls.label_config}
    requests = [("post", "/setup", setup), ("post", "/predict", {"tasks": []}), ("get", "/versions", None),
                ("get", "/metrics", None), ("post", "/webhook", {"action": "X", "project": {"id": 1}}),
                ("post", "/train", {"project": "1.2"})]
    for method, path, body in requests:
        for headers in ({}, basic("labeler", "wrong"), basic("someone", "s3cret-pass")):
            response = getattr(client, method)(path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
            assert response.is_json and "Basic" in response.headers["WWW-Authenticate"]
    response = client.post("/setup", json=setup, headers=basic("labeler", "s3cret-pass"))
    assert response.status_code == 200
    assert client.get("/versions", headers=basic("labeler", "s3cret-pass")).status_code == 200


def test_secrets_never_reach_the_logs(fake_ls, make_config, make_backend, caplog):
    setup_token = "setup-token-abcdef0123456789"
    parts = make_backend(make_config(push_predictions=False))
    with caplog.at_level(logging.DEBUG):
        client = create_app(parts.backend.config, parts.backend).test_client()
        client.post("/setup", json={"project": "7.1", "schema": fake_ls.label_config, "hostname": fake_ls.url,
                                    "access_token": setup_token})
        # the server fetches with its key; errors that echo a secret are redacted
        logging.getLogger("backend.ls_client").error("request with Token %s failed", API_KEY)
        logging.getLogger("label_studio_sdk").warning("echo %s", setup_token)
        client.post("/predict", json={"project": "7.1", "label_config": fake_ls.label_config,
                                      "tasks": [{"id": 1, "data": {"image": "/data/local-files/?d=x/none.png"}}]})
    assert API_KEY not in caplog.text and setup_token not in caplog.text
    assert "[REDACTED]" in caplog.text
    assert any("none.png" in r.getMessage() for r in caplog.records)  # errors are still logged


def test_cli_parses_serve_and_refuses_unknown_commands(capsys):
    from backend.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0 and "--port" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["launch"])
    assert exit_info.value.code == 2


@pytest.mark.e2e
def test_vlm_al_serve_runs_gunicorn_and_answers_health(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MODEL_DIR": str(tmp_path), "WEAK_ANNOTATOR": "none", "IMAGE_SIZE": "64",
           "BASIC_AUTH_USER": "u", "BASIC_AUTH_PASS": "secret-pass-1"}
    server = subprocess.Popen([sys.executable, "-m", "backend.cli", "serve", "--port", str(port)], env=env)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                response = requests.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except (requests.ConnectionError, requests.Timeout):  # the worker is still loading the models
                assert server.poll() is None, "vlm-al serve exited"
                time.sleep(0.5)
        assert response.json()["status"] == "UP"
        assert requests.get(f"http://127.0.0.1:{port}/versions", timeout=5).status_code == 401
        assert requests.get(f"http://127.0.0.1:{port}/versions", auth=("u", "secret-pass-1"), timeout=5).json() == {
            "versions": []}
    finally:
        server.terminate()
        server.wait(timeout=30)
