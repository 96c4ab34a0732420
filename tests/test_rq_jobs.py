"""RQJobRunner on a real redis-server (started here on a free 127.0.0.1 port): coalescing across web processes,
the project lock and its expiry, job state, and the image claims replicas share. The jobs run on RQ's own worker
loop (HeartbeatWorker, burst mode) in this process; tests/test_rq_replicas.py runs real processes."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from redis import Redis

from backend import rq_jobs
from backend.rq_jobs import HeartbeatWorker, RedisInflightClaims, RQJobRunner

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian redis-server (scripts/setup.sh)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory) -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            Redis(port=port).ping()
            break
        except Exception:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    yield port
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture
def redis(redis_port) -> Iterator[Redis]:
    connection = Redis(port=redis_port)
    connection.flushall()
    yield connection
    connection.close()


class Recorder:
    def __init__(self, during=None) -> None:
        self.calls: list[tuple[str, int, dict[str, Any]]] = []
        self.during = during

    def __call__(self, kind: str, project_id: int, params: Mapping[str, Any]) -> Any:
        self.calls.append((kind, project_id, dict(params)))
        if self.during is not None:
            self.during(kind, project_id, params)
        if kind == "broken":
            raise ValueError("this job always fails")
        return None


def run_burst(runner: RQJobRunner, monkeypatch) -> None:
    """RQ's worker loop on this process until the queue is empty (what `vlm-al worker --burst` does)."""
    monkeypatch.setattr(rq_jobs, "_WORKER_RUNNER", runner)
    worker = HeartbeatWorker([runner.queue], connection=runner.redis, name=f"test-{time.monotonic_ns()}")
    worker.work(burst=True, with_scheduler=False)


def test_submits_from_two_web_processes_become_one_job_with_one_run(redis, redis_port, monkeypatch):
    web_a, web_b = RQJobRunner(Redis(port=redis_port), 0.2), RQJobRunner(Redis(port=redis_port), 0.2)
    for i in range(30):
        (web_a if i % 2 else web_b).submit("fit", 5)
    assert web_a.queue.count == 1
    assert web_a.jobs_enqueued + web_b.jobs_enqueued == 1
    assert web_a.submits_coalesced + web_b.submits_coalesced == 29
    assert web_a.state()["queued"] == 1
    recorder = Recorder()
    worker_runner = RQJobRunner(redis, 0.2)
    worker_runner.bind(recorder)
    run_burst(worker_runner, monkeypatch)
    assert recorder.calls == [("fit", 5, {})]
    assert not web_a.is_pending("fit", 5)
    assert web_a.wait_idle(timeout=5)
    web_a.submit("fit", 5)  # after the run: a new job
    assert web_a.queue.count == 1
    assert web_b.is_pending("fit", 5) and not web_b.is_pending("push", 5)  # any process sees it


def test_vlm_al_worker_imports_the_fits_libraries_before_it_takes_a_job(redis, monkeypatch):
    """A worker runs the fits in its own process, so their libraries load at its start (see the server's test in
    test_memory_startup.py), not in its first fit."""
    order: list[str] = []
    monkeypatch.setattr(rq_jobs, "import_round_libraries", lambda: order.append("import"))
    monkeypatch.setattr(HeartbeatWorker, "work", lambda self, **kwargs: order.append("work"))
    backend = SimpleNamespace(jobs=RQJobRunner(redis, 0.2))
    config = SimpleNamespace(redis_url="redis://127.0.0.1/0", log_level="INFO")
    assert rq_jobs.run_worker(backend, config, burst=True) == 0
    assert order == ["import", "work"]


def test_a_submit_after_the_job_started_working_enqueues_exactly_one_more(redis, monkeypatch):
    web = RQJobRunner(redis, 0.1)

    def webhooks_during_the_fit(kind, project_id, params):
        if len(recorder.calls) == 1:
            for _ in range(5):
                web.submit("fit", 9)

    recorder = Recorder(webhooks_during_the_fit)
    web.submit("fit", 9)
    worker_runner = RQJobRunner(redis, 0.1)
    worker_runner.bind(recorder)
    run_burst(worker_runner, monkeypatch)
    assert [c[:2] for c in recorder.calls] == [("fit", 9), ("fit", 9)]  # the burst during the run: one more


def test_the_debounce_waits_for_quiet_before_the_job_reads(redis, monkeypatch):
    web = RQJobRunner(redis, 0.5)
    web.submit("fit", 3)
    stop = threading.Event()

    def trickle():
        while not stop.wait(0.1):
            web.submit("fit", 3)

    thread = threading.Thread(target=trickle)
    thread.start()
    started_at: list[float] = []
    recorder = Recorder(lambda kind, project, params: started_at.append(time.monotonic()))
    worker_runner = RQJobRunner(redis, 0.5, max_delay_seconds=1.5)
    worker_runner.bind(recorder)
    began = time.monotonic()
    threading.Timer(1.0, stop.set).start()
    run_burst(worker_runner, monkeypatch)
    thread.join()
    # the trickle stopped at 1.0 s; the job ran after the 1.5 s cap, not between submits 0.1 s apart
    assert started_at[0] - began >= 1.0
    assert len(recorder.calls) <= 2


def test_an_index_job_waits_only_its_short_debounce(redis, monkeypatch):
    web = RQJobRunner(redis, 3.0)
    web.submit("index", 4)
    started_at: list[float] = []
    recorder = Recorder(lambda kind, project, params: started_at.append(time.monotonic()))
    worker_runner = RQJobRunner(redis, 3.0)
    worker_runner.bind(recorder)
    began = time.monotonic()
    run_burst(worker_runner, monkeypatch)
    assert [c[:2] for c in recorder.calls] == [("index", 4)]
    assert started_at[0] - began < 2.0  # not the runner's 3 s


def test_the_project_lock_is_exclusive_across_connections_and_frees_itself_when_its_holder_dies(
        redis, redis_port, monkeypatch):
    monkeypatch.setattr(rq_jobs, "LOCK_TTL_SECONDS", 1)
    a, b = RQJobRunner(Redis(port=redis_port), 0.1), RQJobRunner(Redis(port=redis_port), 0.1)
    held, release = threading.Event(), threading.Event()

    def holder():
        with a.project_lock(4, Path()):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    time.sleep(1.6)  # past the TTL: the holder renews it
    acquired = threading.Event()

    def contender():
        with b.project_lock(4, Path()):
            acquired.set()

    other = threading.Thread(target=contender)
    other.start()
    assert not acquired.wait(0.8)
    release.set()
    thread.join()
    assert acquired.wait(5)
    other.join()
    # a holder that died: its lock is never renewed and expires
    dead = redis.lock(f"{rq_jobs.KEY_PREFIX}:lock:project:4", timeout=1)
    assert dead.acquire(blocking=False)
    started = time.monotonic()
    with b.project_lock(4, Path()):
        waited = time.monotonic() - started
    assert 0.3 < waited < 3.0


def test_a_failing_job_is_retried_once_then_shown_failed_with_its_error(redis, monkeypatch):
    web = RQJobRunner(redis, 0.0)
    web.submit("broken", 2)
    recorder = Recorder()
    worker_runner = RQJobRunner(redis, 0.0)
    worker_runner.bind(recorder)
    run_burst(worker_runner, monkeypatch)
    assert [c[0] for c in recorder.calls] == ["broken", "broken"]  # Retry(max=1)
    state = RQJobRunner(redis, 0.0).state()
    assert state["failed"] == 1 and state["queued"] == 0 and state["running"] == 0
    failure = state["recent_failures"][0]
    assert failure["kind"] == "broken" and failure["project"] == 2 and "always fails" in failure["error"]
    web.submit("broken", 2)  # the marker of the failed job does not block the next submit
    assert web.queue.count == 1


def test_image_claims_are_shared_between_processes(redis, redis_port):
    first, second = RedisInflightClaims(Redis(port=redis_port)), RedisInflightClaims(Redis(port=redis_port))
    urls = [f"/data/upload/{i}.png" for i in range(5)]
    assert first.claim(1, urls[:3]) == set(urls[:3])
    assert second.claim(1, urls) == set(urls[3:])
    assert second.claim(2, urls[:1]) == set(urls[:1])  # per project
    started = time.monotonic()
    threading.Timer(0.4, lambda: first.release(1, urls[:3])).start()
    second.wait(1, urls[:3], timeout=5)
    assert 0.3 < time.monotonic() - started < 3
    assert second.claim(1, urls[:3]) == set(urls[:3])


def test_a_project_connection_shared_by_a_web_process_reaches_a_worker(redis, redis_port):
    web, worker = RQJobRunner(Redis(port=redis_port), 0.1), RQJobRunner(Redis(port=redis_port), 0.1)
    assert worker.shared_connection(8) == (None, None)
    web.share_connection(8, "http://ls.example:8080", "token-0123456789")
    assert worker.shared_connection(8) == ("http://ls.example:8080", "token-0123456789")
    assert not web.in_process
