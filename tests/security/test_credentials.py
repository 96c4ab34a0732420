"""Credentials stay with the host they were given for."""

from __future__ import annotations

import time

from backend.ls_client import LabelStudioClientFactory, LabelStudioError

from .conftest import OTHER_TOKEN, TOKEN


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_setup_moving_the_host_without_a_token_drops_the_token(backend, fake_ls, other_ls):
    project = 201
    assert backend.setup(project, fake_ls).status_code == 200
    assert backend.setup(project, other_ls, token=None).status_code == 200
    # an image task now goes to the new host: without a token, nothing is sent there with the old one
    backend.predict(project, ["/data/local-files/?d=ok-201.png"])
    time.sleep(0.5)
    assert all(r["auth"] != f"Token {TOKEN}" for r in other_ls.requests)


def test_setup_moving_the_host_with_its_own_token_uses_that_token(backend, fake_ls, other_ls):
    project = 202
    assert backend.setup(project, fake_ls).status_code == 200
    assert backend.setup(project, other_ls, token=OTHER_TOKEN).status_code == 200
    backend.predict(project, ["/data/local-files/?d=ok-202.png"])
    seen = other_ls.seen("ok-202.png")
    assert seen and all(r["auth"] == f"Token {OTHER_TOKEN}" for r in seen)


def test_the_token_never_leaves_for_a_foreign_absolute_image_url(backend, fake_ls, other_ls):
    project = 203
    assert backend.setup(project, fake_ls).status_code == 200
    backend.predict(project, [f"{other_ls.url}/data/local-files/?d=ok-203.png"])
    assert other_ls.seen("ok-203.png") == []


def test_localhost_and_127_spellings_of_the_label_studio_host_both_get_the_token(backend, fake_ls):
    project = 204
    assert backend.post("/setup", {"project": project, "hostname": f"http://localhost:{fake_ls.port}",
                                   "access_token": TOKEN,
                                   "schema": __import__("tests.security.conftest", fromlist=["x"]).label_config()}
                        ).status_code == 200
    for url in (f"http://127.0.0.1:{fake_ls.port}/data/local-files/?d=ok-204a.png",
                f"http://localhost:{fake_ls.port}/data/local-files/?d=ok-204b.png",
                "/data/local-files/?d=ok-204c.png"):
        response = backend.predict(project, [url])
        assert response.status_code == 200, response.text
    for name in ("ok-204a", "ok-204b", "ok-204c"):
        assert [r["auth"] for r in fake_ls.seen(name)] == [f"Token {TOKEN}"]


def test_an_env_key_without_an_env_url_is_never_sent_to_a_setup_host(tmp_path):
    factory = LabelStudioClientFactory(tmp_path, 1000, default_url=None, default_api_key="env-key-1234567890")
    try:
        factory("http://127.0.0.1:1", None)
        raise AssertionError("a client was built with the env key for a /setup host")
    except LabelStudioError as exc:
        assert "API key" in str(exc)


def test_the_setup_token_is_not_logged(backend):
    assert _wait(lambda: "POST /setup" in backend.log())
    assert TOKEN not in backend.log() and OTHER_TOKEN not in backend.log()


def test_setup_cannot_point_the_api_client_at_a_metadata_address(backend, trap):
    response = backend.post("/setup", {"project": 205, "hostname": "http://169.254.169.254", "access_token": TOKEN,
                                       "schema": __import__("tests.security.conftest", fromlist=["x"]).label_config()})
    assert response.status_code == 200  # /setup answers; the backend never builds a client for that address
    time.sleep(0.5)
    assert "169.254.169.254 (metadata)" in backend.log()
