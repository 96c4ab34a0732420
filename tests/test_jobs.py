"""ThreadJobRunner with real threads and a short debounce: named jobs (kind, project, plain parameters)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from filelock import Timeout

from backend.jobs import (
    SHORT_DEBOUNCE_SECONDS,
    InlineJobRunner,
    JobStateCollector,
    ThreadJobRunner,
    project_lock,
)
from backend.metrics import BackendMetrics


class Handlers:
    """A job handler that dispatches by kind to test functions and records every call."""

    def __init__(self, **work: Callable[[int, Mapping[str, Any]], Any]) -> None:
        self.work = work
        self.calls: list[tuple[str, int, dict[str, Any]]] = []

    def __call__(self, kind: str, project_id: int, params: Mapping[str, Any]) -> Any:
        self.calls.append((kind, project_id, dict(params)))
        return self.work[kind](project_id, params)


@pytest.fixture
def runner():
    runner = ThreadJobRunner(debounce_seconds=0.1)
    yield runner
    runner.shutdown()


def test_a_burst_of_submits_is_one_run_with_the_latest_parameters(runner):
    handlers = Handlers(fit=lambda project, params: None)
    runner.bind(handlers)
    for i in range(20):
        runner.submit("fit", 1, {"n": i})
    assert runner.wait_idle(timeout=5)
    assert handlers.calls == [("fit", 1, {"n": 19})]  # the latest parameters run, once


def test_a_submit_during_a_run_schedules_exactly_one_more(runner):
    started, release = threading.Event(), threading.Event()

    def fit(project, params):
        if params.get("slow"):
            started.set()
            release.wait(5)

    handlers = Handlers(fit=fit)
    runner.bind(handlers)
    runner.submit("fit", 1, {"slow": True})
    assert started.wait(5)
    for _ in range(5):
        runner.submit("fit", 1)
    time.sleep(0.3)  # past the debounce: still waits for the running job
    assert len(handlers.calls) == 1
    assert runner.state()["running"] == 1 and runner.state()["queued"] == 1
    release.set()
    assert runner.wait_idle(timeout=5)
    assert handlers.calls == [("fit", 1, {"slow": True}), ("fit", 1, {})]


def test_kinds_and_projects_are_independent_and_never_run_concurrently_per_key(runner):
    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    lock = threading.Lock()

    def job(name):
        def run(project, params):
            key = f"{name}:{project}"
            with lock:
                active[key] = active.get(key, 0) + 1
                peak[key] = max(peak.get(key, 0), active[key])
            time.sleep(0.15)
            with lock:
                active[key] -= 1
        return run

    runner.bind(Handlers(fit=job("fit"), index=job("index")))
    for _ in range(3):
        runner.submit("fit", 1)
        runner.submit("index", 1)
        runner.submit("fit", 2)
        time.sleep(0.12)
    assert runner.wait_idle(timeout=10)
    assert peak == {"fit:1": 1, "index:1": 1, "fit:2": 1}
    assert runner.runs_started >= 3


def test_exceptions_are_counted_shown_in_the_state_and_the_worker_survives(runner):
    finished = []

    def broken(project, params):
        raise ValueError("boom")

    runner.bind(Handlers(bad=broken, good=lambda project, params: None),
                lambda kind, error, seconds: finished.append((kind, type(error).__name__ if error else None)))
    runner.submit("bad", 3)
    assert runner.wait_idle(timeout=5)
    runner.submit("good", 3)
    assert runner.wait_idle(timeout=5)
    assert runner.runs_failed == 1
    assert finished == [("bad", "ValueError"), ("good", None)]
    state = runner.state()
    assert state["failed"] == 1 and state["queued"] == 0 and state["running"] == 0
    assert state["recent_failures"][0]["kind"] == "bad" and "boom" in state["recent_failures"][0]["error"]


def test_an_unknown_job_handler_failure_is_a_failed_run_not_a_crash(runner):
    runner.bind(Handlers())  # no kinds: a KeyError inside the handler
    runner.submit("nope", 1)
    assert runner.wait_idle(timeout=5)
    assert runner.runs_failed == 1


def test_job_state_reaches_metrics(runner):
    release = threading.Event()
    runner.bind(Handlers(fit=lambda project, params: release.wait(5)))
    metrics = BackendMetrics()
    metrics.registry.register(JobStateCollector(runner))
    runner.submit("fit", 1)
    deadline = time.monotonic() + 5
    while runner.state()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    assert metrics.registry.get_sample_value("vlm_al_jobs", {"state": "running"}) == 1
    assert metrics.registry.get_sample_value("vlm_al_job_age_seconds", {"state": "running"}) > 0
    release.set()
    assert runner.wait_idle(timeout=5)
    assert metrics.registry.get_sample_value("vlm_al_jobs", {"state": "running"}) == 0


def test_a_steady_stream_still_runs_within_the_max_delay():
    runner = ThreadJobRunner(debounce_seconds=0.1, max_delay_seconds=0.3)
    runs = []
    runner.bind(Handlers(k=lambda project, params: runs.append(time.monotonic())))
    try:
        deadline = time.monotonic() + 0.8
        while time.monotonic() < deadline:
            runner.submit("k", 1)
            time.sleep(0.03)
        assert runner.wait_idle(timeout=5)
        assert len(runs) >= 2
    finally:
        runner.shutdown()


def test_an_index_on_a_quiet_key_starts_at_once_and_a_fit_waits_the_runners_debounce():
    """In one process nothing needs coalescing at connection (the second /setup queues no index), so the index
    starts at once; a fit still waits for quiet."""
    runner = ThreadJobRunner(debounce_seconds=2.0)
    began: dict[str, float] = {}
    handlers = Handlers(index=lambda project, params: began.setdefault("index", time.monotonic()),
                        fit=lambda project, params: began.setdefault("fit", time.monotonic()))
    runner.bind(handlers)
    try:
        submitted = time.monotonic()
        runner.submit("index", 1)
        runner.submit("fit", 1)
        assert runner.wait_idle(timeout=10)
        assert began["index"] - submitted < SHORT_DEBOUNCE_SECONDS["index"] / 2
        assert began["fit"] - submitted >= 2.0
        assert [kind for kind, _, _ in handlers.calls] == ["index", "fit"]
    finally:
        runner.shutdown()


def test_index_submits_during_a_leading_run_make_exactly_one_more_run_after_it():
    """Tasks created while an index lists the project are in no listing yet: one more run must follow, and a burst
    of such submits is that one run, which waits for quiet like any other (not a second leading edge)."""
    runner = ThreadJobRunner(debounce_seconds=0.3)
    release = threading.Event()
    runs: list[tuple[float, dict[str, Any]]] = []

    def index(project: int, params: Mapping[str, Any]) -> None:
        runs.append((time.monotonic(), dict(params)))
        if len(runs) == 1:
            release.wait(5)

    runner.bind(Handlers(index=index))
    try:
        runner.submit("index", 1, {"n": 0})
        deadline = time.monotonic() + 5
        while not runs and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(1, 6):
            runner.submit("index", 1, {"n": i})
        last_submit = time.monotonic()
        assert runner.is_pending("index", 1)
        release.set()
        assert runner.wait_idle(timeout=10)
        assert [params for _, params in runs] == [{"n": 0}, {"n": 5}]
        assert runs[1][0] - last_submit >= 0.3  # the debounce after the last submit, not a leading start
    finally:
        runner.shutdown()


def test_wait_idle_times_out_while_a_job_runs(runner):
    release = threading.Event()
    runner.bind(Handlers(slow=lambda project, params: release.wait(5)))
    runner.submit("slow", 1)
    assert runner.wait_idle(timeout=0.3) is False
    release.set()
    assert runner.wait_idle(timeout=5)


def test_submit_after_shutdown_is_refused():
    runner = ThreadJobRunner(debounce_seconds=0.0)
    runner.shutdown()
    with pytest.raises(RuntimeError):
        runner.submit("k", 1)


def test_inline_runner_runs_at_once_and_counts_failures():
    handlers = Handlers(ok=lambda project, params: None, bad=lambda project, params: 1 / 0)
    runner = InlineJobRunner(handlers)
    runner.submit("ok", 1, {"a": 1})
    runner.submit("bad", 2)
    assert handlers.calls == [("ok", 1, {"a": 1}), ("bad", 2, {})]
    assert runner.runs_started == 2 and runner.runs_failed == 1


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


def test_health_and_metrics_show_the_job_state_of_the_backend(fake_ls, make_config, make_backend):
    from backend.app import create_app

    jobs = ThreadJobRunner(debounce_seconds=5.0)  # the fit stays queued while we look
    parts = make_backend(make_config(), jobs=jobs)
    client = create_app(parts.backend.config, parts.backend).test_client()
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 7}}).status_code == 200
    time.sleep(0.05)
    state = client.get("/health").get_json()["jobs"]
    assert state["runner"] == "threads" and state["queued"] == 1 and state["running"] == 0
    assert state["oldest_queued_seconds"] > 0
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'vlm_al_jobs{state="queued"} 1.0' in metrics


def test_a_submitted_job_is_pending_until_it_starts(runner):
    started, release = threading.Event(), threading.Event()

    def fit(project_id, params):
        started.set()
        release.wait(5)

    runner.bind(Handlers(fit=fit))
    runner.submit("fit", 3)
    assert runner.is_pending("fit", 3) and not runner.is_pending("fit", 4) and not runner.is_pending("push", 3)
    assert started.wait(5)
    assert not runner.is_pending("fit", 3)  # running, no longer waiting
    release.set()
    assert runner.wait_idle(timeout=5)
    assert not InlineJobRunner().is_pending("fit", 3)
