"""ThreadJobRunner with real threads and a short debounce."""

from __future__ import annotations

import threading
import time

import pytest
from filelock import Timeout

from backend.jobs import ThreadJobRunner, project_lock


@pytest.fixture
def runner():
    runner = ThreadJobRunner(debounce_seconds=0.1)
    yield runner
    runner.shutdown()


def test_a_burst_of_submits_is_one_run(runner):
    runs = []
    for i in range(20):
        runner.submit("fit:1", lambda i=i: runs.append(i))
    assert runner.wait_idle(timeout=5)
    assert runs == [19]  # the latest function runs, once


def test_a_submit_during_a_run_schedules_exactly_one_more(runner):
    started, release = threading.Event(), threading.Event()
    runs = []

    def slow():
        runs.append("slow")
        started.set()
        release.wait(5)

    runner.submit("fit:1", slow)
    assert started.wait(5)
    for _ in range(5):
        runner.submit("fit:1", lambda: runs.append("after"))
    time.sleep(0.3)  # past the debounce: still waits for the running job
    assert runs == ["slow"]
    release.set()
    assert runner.wait_idle(timeout=5)
    assert runs == ["slow", "after"]


def test_keys_are_independent_and_never_run_concurrently_per_key(runner):
    active: dict[str, int] = {"a": 0, "b": 0}
    peak: dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()

    def job(key):
        with lock:
            active[key] += 1
            peak[key] = max(peak[key], active[key])
        time.sleep(0.15)
        with lock:
            active[key] -= 1

    for _ in range(3):
        runner.submit("a", lambda: job("a"))
        runner.submit("b", lambda: job("b"))
        time.sleep(0.12)
    assert runner.wait_idle(timeout=10)
    assert peak == {"a": 1, "b": 1}
    assert runner.runs_started >= 2


def test_exceptions_are_counted_and_the_worker_survives(runner):
    finished = []
    runner._on_finish = lambda key, error, seconds: finished.append((key, type(error).__name__ if error else None))

    def broken():
        raise ValueError("boom")

    runner.submit("bad", broken)
    assert runner.wait_idle(timeout=5)
    runner.submit("good", lambda: None)
    assert runner.wait_idle(timeout=5)
    assert runner.runs_failed == 1
    assert finished == [("bad", "ValueError"), ("good", None)]


def test_a_steady_stream_still_runs_within_the_max_delay():
    runner = ThreadJobRunner(debounce_seconds=0.1, max_delay_seconds=0.3)
    runs = []
    try:
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            runner.submit("k", lambda: runs.append(time.monotonic()))
            time.sleep(0.03)
        assert runner.wait_idle(timeout=5)
        assert len(runs) >= 2
    finally:
        runner.shutdown()


def test_wait_idle_times_out_while_a_job_runs(runner):
    release = threading.Event()
    runner.submit("slow", lambda: release.wait(5))
    assert runner.wait_idle(timeout=0.3) is False
    release.set()
    assert runner.wait_idle(timeout=5)


def test_submit_after_shutdown_is_refused():
    runner = ThreadJobRunner(debounce_seconds=0.0)
    runner.shutdown()
    with pytest.raises(RuntimeError):
        runner.submit("k", lambda: None)


def test_project_lock_excludes_a_second_holder(tmp_path):
    path = tmp_path / "projects" / "1" / "fit.lock"
    held = threading.Event()
    release = threading.Event()

    def holder():
        with project_lock(path):
            held.set()
            release.wait(5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(5)
    try:
        with pytest.raises(Timeout):
            with project_lock(path, timeout=0.2):
                pass
    finally:
        release.set()
        thread.join()
    with project_lock(path, timeout=1):
        pass
