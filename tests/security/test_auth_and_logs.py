"""Basic auth: webhooks keep working (Label Studio's webhook gets the credentials); refusals and requests are logged."""

from __future__ import annotations

import time

import requests

from .conftest import BASIC_PASS, BASIC_USER, TOKEN


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_a_webhook_without_credentials_is_refused_and_logged(auth_backend):
    response = requests.post(auth_backend.url + "/webhook", json={"action": "ANNOTATION_CREATED", "project": 1},
                             timeout=10)
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    assert _wait(lambda: "refused POST /webhook" in auth_backend.log())
    assert _wait(lambda: "POST /webhook 401" in auth_backend.log())


def test_setup_gives_label_studios_webhook_the_credentials(auth_backend, fake_ls):
    host = auth_backend.url.removeprefix("http://")
    with fake_ls.lock:
        fake_ls.webhooks[:] = [{"id": 1, "url": f"http://{host}/webhook", "headers": {}, "project": 401},
                               {"id": 2, "url": "http://elsewhere.invalid:9/webhook", "headers": {}, "project": 401}]
    response = auth_backend.setup(401, fake_ls)
    assert response.status_code == 200, response.text
    assert _wait(lambda: fake_ls.webhooks[0]["headers"].get("Authorization", "").startswith("Basic "))
    assert fake_ls.webhooks[1]["headers"] == {}  # another service's webhook is left alone
    header = {"Authorization": fake_ls.webhooks[0]["headers"]["Authorization"]}
    response = requests.post(auth_backend.url + "/webhook", json={"action": "PROJECT_UPDATED", "project": 401},
                             headers=header, timeout=10)
    assert response.status_code == 200


def test_the_basic_password_never_appears_in_the_log(auth_backend):
    requests.post(auth_backend.url + "/setup", json={}, auth=(BASIC_USER, BASIC_PASS + "x"), timeout=10)
    assert _wait(lambda: "POST /setup 401" in auth_backend.log())
    assert BASIC_PASS not in auth_backend.log() and TOKEN not in auth_backend.log()


def test_every_request_is_logged_with_method_path_status_and_milliseconds(backend):
    requests.get(backend.url + "/health?secret=abc", timeout=5)
    assert _wait(lambda: "GET /health 200" in backend.log())
    line = next(l for l in backend.log().splitlines() if "GET /health 200" in l)
    assert line.rstrip().endswith(" ms") and "secret=abc" not in line
