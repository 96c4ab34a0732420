"""Background jobs: named (kind, project id, plain parameters), debounced per (kind, project).

A job is never a function: it is a name and plain arguments, so the same job runs on this module's in-process
runners or on RQ workers over Redis (backend/rq_jobs.py). The backend binds one handler,
``handler(kind, project_id, params)``, that does the work of every kind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from filelock import FileLock
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

JobHandler = Callable[[str, int, Mapping[str, Any]], Any]
"""Does the work of a job: (kind, project id, parameters)."""
JobFinished = Callable[[str, "BaseException | None", float], None]
"""Called after every run with (kind, the exception or None, seconds)."""

JOB_STATES = ("queued", "running", "failed")

SHORT_DEBOUNCE_SECONDS: Mapping[str, float] = {"index": 0.5}
"""Kinds debounced for at most this long, not the runner's debounce (sized for a burst of annotation webhooks).
Label Studio calls /setup twice when a backend is connected, about 0.1 s apart (the first call queues the
index): a longer wait only delays the first embeddings and the cold-start queue. On RQ the two calls may reach
two web replicas, which share no memory of the first: this short wait is what makes them one index there."""

LEADING_EDGE_KINDS = frozenset({"index"})
"""Kinds an in-process runner starts at once when their key is quiet (neither queued nor running); submits while
one is queued join it, and submits while it runs make exactly one more run after it. In one process the second
/setup of a connection queues no index (the backend marks the config indexed when it queues one), so the index
has nothing to wait for: the 0.5 s it waited was a twentieth of a 2,000-task index that reads local files (11.5 s,
173.9 images/s at 6188cbc in bench/results/indexing_steps.json)."""


def debounce_seconds_of(kind: str, debounce_seconds: float) -> float:
    """How long a submit of ``kind`` waits for quiet on a runner whose debounce is ``debounce_seconds``."""
    return min(debounce_seconds, SHORT_DEBOUNCE_SECONDS.get(kind, debounce_seconds))


@dataclass(frozen=True)
class NamedJob:
    """What a queue holds: plain data only."""

    kind: str
    project_id: int
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Jobs of one key are debounced together and never run at the same time."""
        return f"{self.kind}:{self.project_id}"


class JobRunner(Protocol):
    in_process: bool
    """Whether jobs run in this process (threads) rather than in `vlm-al worker` processes (RQ)."""

    def bind(self, handler: JobHandler, on_finish: JobFinished | None = None) -> None:
        """The function that runs every job (the backend's ``run_job``), and one told how each run ended."""

    def submit(self, kind: str, project_id: int, params: Mapping[str, Any] | None = None) -> None:
        """Run the job in the background; submits of one (kind, project) close together become one run."""

    @contextmanager
    def project_lock(self, project_id: int, lock_path: Path) -> Iterator[None]:
        """Held while a job reads Label Studio and writes the project's model: one at a time per project."""

    def state(self) -> dict[str, Any]:
        """Jobs by state with their ages in seconds, for /health and /metrics (cheap: /health has 1 s)."""

    def inflight_claims(self) -> Any:
        """Claims on task images shared by every process this runner spans (None: this process's own)."""

    def share_connection(self, project_id: int, hostname: str | None, access_token: str | None) -> None:
        """Make a project's Label Studio address and token (from /setup) reachable by the job workers."""

    def shared_connection(self, project_id: int) -> tuple[str | None, str | None]:
        """(hostname, access token) a web process shared for the project; (None, None) if none."""

    def is_pending(self, kind: str, project_id: int) -> bool:
        """Whether a job of this kind for the project is submitted and has not started yet."""

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; False on timeout."""

    def shutdown(self) -> None:
        """Stop accepting work and wait for running jobs."""


def project_lock(lock_path: Path, timeout: float = -1) -> FileLock:
    """A lock file shared by every process on this machine: two gunicorn workers never fit one project at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path), timeout=timeout)


class _ThreadHeldLocks:
    """The project lock files of this process, re-entrant per thread: a job that runs another job inline (the
    push after a fit, under InlineJobRunner) does not wait for itself."""

    def __init__(self) -> None:
        self._held = threading.local()

    @contextmanager
    def hold(self, lock_path: Path) -> Iterator[None]:
        held: set[str] = self._held.__dict__.setdefault("paths", set())
        key = str(lock_path)
        if key in held:
            yield
            return
        with project_lock(lock_path):
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)


@dataclass
class _KeyState:
    job: NamedJob | None = None
    pending: bool = False
    running: bool = False
    first_submit: float = 0.0
    due: float = 0.0
    started: float = 0.0


@dataclass
class _Failure:
    kind: str
    project_id: int
    error: str
    seconds: float
    at: float


RECENT_FAILURES = 20
"""Failed runs an in-process runner remembers for /health."""
FAILURE_WINDOW_SECONDS = 3600.0
"""/health and /metrics count the failures of the last hour."""


class ThreadJobRunner:
    """Per-(kind, project) debounced jobs on a small thread pool: the default, without REDIS_URL.

    A submit makes the key due ``debounce_seconds`` after the latest submit (trailing debounce, capped at
    ``max_delay_seconds`` after the first one so a steady stream still runs), except the first submit of a
    LEADING_EDGE_KINDS job on a quiet key, which is due at once. The same key never runs twice at once: a submit
    during a run schedules exactly one more run after it, which sees everything submitted meanwhile. The most
    recent parameters of a key are the ones that run.
    """

    in_process = True

    def __init__(
        self,
        debounce_seconds: float,
        max_workers: int = 2,
        max_delay_seconds: float | None = None,
        on_finish: JobFinished | None = None,
        handler: JobHandler | None = None,
    ) -> None:
        if debounce_seconds < 0:
            raise ValueError(f"debounce_seconds must be >= 0, got {debounce_seconds}")
        self.debounce_seconds = float(debounce_seconds)
        self.max_delay_seconds = (
            float(max_delay_seconds) if max_delay_seconds is not None else max(5 * self.debounce_seconds, 1.0)
        )
        self.on_finish = on_finish
        self._handler = handler
        self._locks = _ThreadHeldLocks()
        self._states: dict[str, _KeyState] = {}
        self._failures: list[_Failure] = []
        self._cond = threading.Condition()
        self._closed = False
        self.runs_started = 0
        self.runs_failed = 0
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vlm-al-job")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="vlm-al-job-dispatch", daemon=True)
        self._dispatcher.start()

    def bind(self, handler: JobHandler, on_finish: JobFinished | None = None) -> None:
        self._handler = handler
        self.on_finish = on_finish or self.on_finish

    def submit(self, kind: str, project_id: int, params: Mapping[str, Any] | None = None) -> None:
        job = NamedJob(kind, int(project_id), dict(params or {}))
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("the job runner is shut down")
            state = self._states.setdefault(job.key, _KeyState())
            state.job = job
            fresh = not state.pending
            if fresh:
                state.pending = True
                state.first_submit = now
            if fresh and kind in LEADING_EDGE_KINDS and not state.running:
                state.due = now
            elif fresh or state.running or state.due > now:  # a due run not yet dispatched keeps its start
                state.due = min(now + debounce_seconds_of(kind, self.debounce_seconds),
                                state.first_submit + self.max_delay_seconds)
            self._cond.notify_all()

    @contextmanager
    def project_lock(self, project_id: int, lock_path: Path) -> Iterator[None]:
        with self._locks.hold(lock_path):
            yield

    def inflight_claims(self) -> None:
        return None  # one process: backend.features.LocalInflightClaims

    def is_pending(self, kind: str, project_id: int) -> bool:
        with self._cond:
            state = self._states.get(NamedJob(kind, int(project_id)).key)
            return bool(state and state.pending)

    def state(self) -> dict[str, Any]:
        now = time.monotonic()
        with self._cond:
            queued = [now - s.first_submit for s in self._states.values() if s.pending]
            running = [now - s.started for s in self._states.values() if s.running]
            failures = [f for f in self._failures if now - f.at <= FAILURE_WINDOW_SECONDS]
        return job_state_summary("threads", queued, running, [
            {"kind": f.kind, "project": f.project_id, "error": f.error, "seconds": round(f.seconds, 3),
             "seconds_ago": round(now - f.at, 1)} for f in failures
        ])

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(s.pending or s.running for s in self._states.values()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def shutdown(self, wait: bool = True) -> None:
        with self._cond:
            self._closed = True
            for state in self._states.values():
                state.pending = False
            self._cond.notify_all()
        self._dispatcher.join(timeout=5)
        self._executor.shutdown(wait=wait, cancel_futures=True)

    def _dispatch_loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                next_due: float | None = None
                for state in self._states.values():
                    if not state.pending or state.running:
                        continue
                    if state.due <= now:
                        state.pending = False
                        state.running = True
                        state.started = now
                        self.runs_started += 1
                        assert state.job is not None
                        self._executor.submit(self._run, state.job)
                    elif next_due is None or state.due < next_due:
                        next_due = state.due
                self._cond.wait(None if next_due is None else max(next_due - now, 0.001))

    def _run(self, job: NamedJob) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            if self._handler is None:
                raise RuntimeError("no job handler bound to the runner")
            self._handler(job.kind, job.project_id, job.params)
        except Exception as exc:  # a failing job must never kill the worker thread
            error = exc
            logger.exception("background job %s failed", job.key)
        finally:
            seconds = time.monotonic() - started
            if self.on_finish is not None:
                try:
                    self.on_finish(job.kind, error, seconds)
                except Exception:
                    logger.exception("job finish hook failed for %s", job.key)
            with self._cond:
                if error is not None:
                    self.runs_failed += 1
                    self._failures.append(_Failure(job.kind, job.project_id, f"{type(error).__name__}: {error}"[:300],
                                                   seconds, time.monotonic()))
                    del self._failures[:-RECENT_FAILURES]
                self._states[job.key].running = False
                self._cond.notify_all()


class InlineJobRunner:
    """Runs every job at once in the caller's thread (scripts and tests that want no concurrency)."""

    in_process = True

    def __init__(self, handler: JobHandler | None = None) -> None:
        self._handler = handler
        self._locks = _ThreadHeldLocks()
        self.on_finish: JobFinished | None = None
        self.runs_started = 0
        self.runs_failed = 0

    def bind(self, handler: JobHandler, on_finish: JobFinished | None = None) -> None:
        self._handler = handler
        self.on_finish = on_finish or self.on_finish

    def submit(self, kind: str, project_id: int, params: Mapping[str, Any] | None = None) -> None:
        self.runs_started += 1
        started = time.monotonic()
        error: BaseException | None = None
        try:
            if self._handler is None:
                raise RuntimeError("no job handler bound to the runner")
            self._handler(kind, int(project_id), dict(params or {}))
        except Exception as exc:
            error = exc
            self.runs_failed += 1
            logger.exception("job %s:%s failed", kind, project_id)
        if self.on_finish is not None:
            self.on_finish(kind, error, time.monotonic() - started)

    @contextmanager
    def project_lock(self, project_id: int, lock_path: Path) -> Iterator[None]:
        with self._locks.hold(lock_path):
            yield

    def state(self) -> dict[str, Any]:
        return job_state_summary("inline", [], [], [])

    def is_pending(self, kind: str, project_id: int) -> bool:
        return False  # every job runs when it is submitted

    def inflight_claims(self) -> None:
        return None

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self) -> None:
        return None


def job_state_summary(
    runner: str, queued_ages: list[float], running_ages: list[float], failed: list[dict[str, Any]]
) -> dict[str, Any]:
    """The one shape of job state in /health, whatever the runner."""
    return {
        "runner": runner,
        "queued": len(queued_ages),
        "running": len(running_ages),
        "failed": len(failed),
        "oldest_queued_seconds": round(max(queued_ages, default=0.0), 3),
        "longest_running_seconds": round(max(running_ages, default=0.0), 3),
        "recent_failures": failed[-5:],
    }


class JobStateCollector:
    """/metrics: ``vlm_al_jobs{state}`` and ``vlm_al_job_age_seconds{state}`` (oldest queued, longest running),
    read from the runner at scrape time."""

    def __init__(self, runner: JobRunner) -> None:
        self._runner = runner

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            state = self._runner.state()
        except Exception as exc:  # e.g. Redis unreachable: the rest of /metrics still answers
            logger.warning("job state unavailable for /metrics: %s", exc)
            return
        counts = GaugeMetricFamily("vlm_al_jobs", "Background jobs by state (failed: in the last hour)",
                                   labels=["state"])
        for name in JOB_STATES:
            counts.add_metric([name], float(state.get(name, 0)))
        ages = GaugeMetricFamily("vlm_al_job_age_seconds",
                                 "Seconds the oldest queued job has waited and the longest running job has run",
                                 labels=["state"])
        ages.add_metric(["queued"], float(state.get("oldest_queued_seconds", 0.0)))
        ages.add_metric(["running"], float(state.get("longest_running_seconds", 0.0)))
        yield counts
        yield ages

    def describe(self) -> list[Any]:
        return []  # collected only at scrape time (the runner may need Redis)
