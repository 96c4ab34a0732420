"""Every malformed request gets a 4xx JSON message naming the problem, with no path, stack trace or secret."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests

from .conftest import MAX_REQUEST_BYTES, TOKEN, label_config

BIG = 2**63
CHECKOUT = str(Path(__file__).resolve().parents[2])
"""Where the code runs from: no response may reveal it."""


def _check(response: requests.Response, backend, status: int | tuple[int, ...] = 400, needle: str | None = None):
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    body = response.json()
    assert isinstance(body.get("message"), str) and body["message"]
    for secret in (str(backend.model_dir), "Traceback", TOKEN, CHECKOUT, "site-packages"):
        assert secret not in response.text
    if needle:
        assert needle.lower() in body["message"].lower(), body


BODIES = [
    ("/setup", b"[" * 100_000 + b"]" * 100_000, "nested"),
    ("/setup", b'{"a":' * 70 + b"1" + b"}" * 70, "nested"),
    ("/predict", b'{"tasks": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
    ("/setup", b'{"project": ' + str(BIG).encode() + b"}", "project id"),
    ("/setup", b'{"project": "' + b"9" * 40 + b'.1"}', "project"),
    ("/setup", b'{"project": "' + "\u0661\u0662".encode() + b'.1"}', "project"),
    ("/setup", b'{"project": "\xc2\xb2"}', "project"),
    ("/setup", b'{"project": -1}', "project id"),
    ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": ' + str(BIG * 4).encode() + b"}}",
     "project id"),
    ("/predict", b'{"project": "1.1", "tasks": [{"id": ' + str(BIG).encode() + b', "data": {}}]}', "'id'"),
    ("/setup", b'{"project": NaN}', "not json"),
    ("/setup", b'{"project": 1, "x": Infinity}', "not json"),
    ("/setup", b'{"project": "\xff\xfe"}', "utf-8"),
    ("/setup", b"\xff\xfe\xfd", None),
    ("/setup", b"", "empty"),
    ("/setup", b"[1, 2]", "object"),
    ("/setup", b'{"project": ' + b"9" * 5000 + b"}", "json"),
    ("/setup", b'{"project": 1, "hostname": "javascript:alert(1)"}', "hostname"),
    ("/setup", b'{"project": 1, "hostname": "http://user:pw@127.0.0.1:1/"}', "hostname"),
    ("/setup", b'{"project": 1, "hostname": "http://127.0.0.1:99999"}', "hostname"),
    ("/setup", b'{"project": 1, "access_token": "abc\\r\\nX-Evil: 1"}', "access_token"),
    ("/setup", '{"project": 1, "access_token": "t\u00f6ken-123456"}'.encode(), "access_token"),
    ("/setup", b'{"project": 1, "access_token": "' + b"a" * 5000 + b'"}', "access_token"),
    ("/webhook", b'{"action": "' + b"A" * 5000 + b'", "project": 1}', "action"),
    ("/webhook", b'{"action": "ANNOTATION_CREATED\\u0000", "project": 1}', "action"),
    ("/predict", b'{"project": "1.1", "tasks": [{"id": 1, "data": {}}], "label_config": "<View><Image name=\\"i\\" '
                 b'value=\\"$image\\"/></View>"}', "label config"),
    ("/train", b'{"project": "' + b"1" * 30 + b'"}', "project"),
]


@pytest.mark.parametrize(("path", "data", "needle"), BODIES, ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BODIES)])
def test_malformed_body_is_a_4xx(path, data, needle, backend):
    _check(backend.post(path, data=data), backend, (400, 413, 422), needle)


def test_nested_xml_label_config_is_a_422(backend):
    xml = "<View>" + "<View>" * 5000 + "</View>" * 5000 + "</View>"
    _check(backend.post("/predict", {"project": "1.1", "tasks": [{"id": 1, "data": {"image": "/x"}}],
                                     "label_config": xml}), backend, (400, 422))


def test_billion_laughs_label_config_is_a_422(backend):
    xml = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
           "<View><Text name='t' value='&lol2;'/></View>")
    _check(backend.post("/setup", {"project": 5, "schema": xml}), backend, (400, 422))


def test_version_query_with_an_overflowing_project_is_a_400(backend):
    _check(requests.get(backend.url + "/versions", params={"project": "9" * 25}, timeout=10), backend, 400, "project")


def test_unknown_path_and_wrong_method_are_json(backend):
    _check(requests.get(backend.url + "/nope", timeout=10), backend, 404)
    _check(requests.get(backend.url + "/setup", timeout=10), backend, 405)


def test_content_length_over_the_limit_is_a_413(backend):
    _check(backend.post("/setup", data=b"x" * (MAX_REQUEST_BYTES + 10)), backend, 413, "MAX_REQUEST_BYTES")


def _raw(backend, payload: bytes, timeout: float = 10.0) -> bytes:
    host, port = backend.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(payload)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
            data = b"".join(chunks)
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = [l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
                if not length or len(body) >= int(length[0].split(b":")[1]):
                    break
        return b"".join(chunks)


def test_a_chunked_body_over_the_limit_is_a_413_not_truncated(backend):
    chunk = b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n"
    head = b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = _raw(backend, head + chunk * (MAX_REQUEST_BYTES // 65536 + 2) + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_a_small_chunked_body_is_parsed(backend):
    body = b'{"project": "abc"}'
    head = b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = _raw(backend, head + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"project" in answer


def test_non_ascii_authorization_bytes_are_not_a_500(backend, auth_backend):
    for server in (backend, auth_backend):
        head = (b"POST /setup HTTP/1.1\r\nHost: x\r\nAuthorization: Basic \xff\xfe\xe9t\xc3\xa9\r\n"
                b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        answer = _raw(server, head)
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 401")), answer[:200]


def test_garbage_basic_credentials_are_a_401(auth_backend):
    response = requests.post(auth_backend.url + "/setup", json={}, headers={"Authorization": "Basic !!!%%%"},
                             timeout=10)
    _check(response, auth_backend, 401)


def test_setup_with_a_fine_body_still_works(backend, fake_ls):
    assert backend.post("/setup", {"project": 3, "schema": label_config()}).status_code == 200


def test_a_malformed_request_line_or_header_is_a_json_4xx(backend):
    for payload in (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
                    b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}"):
        answer = _raw(backend, payload)
        assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), answer[:200]
        assert b"application/json" in answer.split(b"\r\n\r\n", 1)[0], answer[:300]
