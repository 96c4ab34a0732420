"""Availability: deadlines, streaming byte caps, per-project download pools, slow clients, the /predict budget."""

from __future__ import annotations

import socket
import threading
import time

import requests

from .conftest import DOWNLOAD_TIMEOUT_S, MAX_IMAGE_BYTES, PREDICT_DEADLINE_S


def _setup(backend, fake_ls, project):
    assert backend.setup(project, fake_ls).status_code == 200


def test_a_trickling_image_server_is_cut_at_the_download_deadline(backend, fake_ls):
    _setup(backend, fake_ls, 301)
    started = time.monotonic()
    response = backend.predict(301, ["/data/local-files/?d=trickle-301"])
    elapsed = time.monotonic() - started
    assert response.status_code == 422 and "deadline" in response.json()["message"]
    assert elapsed < DOWNLOAD_TIMEOUT_S + 2.0


def test_a_declared_huge_image_is_refused_before_its_body_is_read(backend, fake_ls):
    _setup(backend, fake_ls, 302)
    response = backend.predict(302, ["/data/local-files/?d=huge-declared"])
    assert response.status_code == 422 and "MAX_IMAGE_BYTES" in response.json()["message"]
    time.sleep(0.3)
    assert fake_ls.bytes_sent.get("huge-declared", 0) <= 4 * 1024 * 1024  # socket buffers, not 1 GB


def test_a_streamed_huge_image_is_cut_at_the_byte_cap(backend, fake_ls):
    _setup(backend, fake_ls, 303)
    response = backend.predict(303, ["/data/local-files/?d=huge-streamed"])
    assert response.status_code == 422 and "MAX_IMAGE_BYTES" in response.json()["message"]
    time.sleep(0.3)
    assert fake_ls.bytes_sent.get("huge-streamed", 0) < MAX_IMAGE_BYTES + 8 * 1024 * 1024  # not 50 MiB


def test_slow_images_of_one_project_do_not_block_another_project(backend, fake_ls):
    _setup(backend, fake_ls, 304)
    _setup(backend, fake_ls, 305)
    slow = threading.Thread(target=backend.predict, args=(304, [f"/data/local-files/?d=trickle-304-{i}"
                                                                for i in range(12)]))
    slow.start()
    time.sleep(0.3)
    started = time.monotonic()
    response = backend.predict(305, ["/data/local-files/?d=ok-305.png"])
    assert response.status_code == 200 and time.monotonic() - started < 1.5
    slow.join(timeout=60)


def test_predict_answers_within_its_deadline_and_finishes_in_the_background(backend, fake_ls):
    _setup(backend, fake_ls, 306)
    urls = [f"/data/local-files/?d=slow-306-{i}" for i in range(6)] + ["/data/local-files/?d=ok-306.png"]
    started = time.monotonic()
    response = backend.predict(306, urls, timeout=PREDICT_DEADLINE_S + 20)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed < PREDICT_DEADLINE_S + 2.0
    results = response.json()["results"]
    assert len(results) == len(urls) and all(r["result"] == [] for r in results[:6])
    assert all("score" not in r for r in results[:4])  # not ready: empty, and no score to move the queue


def _slow_clients(backend, n: int, payload: bytes) -> list[socket.socket]:
    host, port = backend.url.removeprefix("http://").split(":")
    socks = []
    for _ in range(n):
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(payload)
        socks.append(sock)
    return socks


def _health_times(backend, n: int = 5) -> list[float]:
    times = []
    for _ in range(n):
        started = time.monotonic()
        assert requests.get(backend.url + "/health", timeout=1.0).status_code == 200
        times.append(time.monotonic() - started)
    return times


def test_sixteen_slow_request_bodies_do_not_starve_health(backend):
    socks = _slow_clients(backend, 16, b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                       b"Content-Length: 100000\r\n\r\n{\"pro")
    try:
        time.sleep(0.3)
        assert max(_health_times(backend)) < 1.0
    finally:
        for sock in socks:
            sock.close()


def test_sixteen_slow_request_heads_do_not_starve_health(backend):
    socks = _slow_clients(backend, 16, b"POST /setup HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    try:
        time.sleep(0.3)
        assert max(_health_times(backend)) < 1.0
    finally:
        for sock in socks:
            sock.close()


def test_a_stalled_request_gets_408_after_the_read_timeout(backend):
    sock = _slow_clients(backend, 1, b"POST /setup HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")[0]
    try:
        answer = sock.recv(200)
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        sock.close()
