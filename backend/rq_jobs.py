"""Jobs on RQ over Redis (REDIS_URL): web processes enqueue, `vlm-al worker` processes run them.

Guarantees across processes and hosts that share one Redis:

* **Coalescing.** A submit records the time in Redis and enqueues a job only if none of that (kind, project) is
  pending (``SET NX``). The job waits until submits have been quiet for FIT_DEBOUNCE_SECONDS (at most five
  times that after the first), takes the project lock, and only then clears the pending marker and reads Label
  Studio. So a burst of webhooks to any number of web replicas is one fit, and it sees every annotation of the
  burst: Label Studio saved each annotation before it sent its webhook, and a webhook that came after the marker
  was cleared enqueues the one next fit.
* **One job per project at a time.** A Redis lock with an expiry (LOCK_TTL_SECONDS), renewed while the job runs;
  a worker killed mid-job stops renewing, and the lock frees itself.
* **No silent loss.** Jobs run in the worker process itself (no fork: torch's thread pools do not survive one),
  which beats a heartbeat every HEARTBEAT_SECONDS while a job runs. A worker killed with kill -9 stops beating;
  after HEARTBEAT_TTL_SECONDS RQ's registry cleanup (run by every worker's maintenance and by /health) retries
  the job once (Retry), then marks it failed, where /health and /metrics show it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from redis import Redis
from redis.exceptions import LockError, LockNotOwnedError
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.worker import WorkerStatus

from backend.jobs import (
    FAILURE_WINDOW_SECONDS,
    JobFinished,
    JobHandler,
    NamedJob,
    debounce_seconds_of,
    job_state_summary,
)
from model.round_libraries import import_round_libraries

logger = logging.getLogger(__name__)

QUEUE_NAME = "vlm-al"
KEY_PREFIX = "vlm-al"
LOCK_TTL_SECONDS = 15
"""A project lock not renewed for this long (its worker died) frees itself."""
HEARTBEAT_SECONDS = 3
HEARTBEAT_TTL_SECONDS = 12
"""A running job whose worker has not beaten for this long is abandoned: retried once, then failed."""
MAINTENANCE_SECONDS = 10
"""How often an idle worker runs RQ's registry cleanup (the finder of abandoned jobs)."""
JOB_TIMEOUT_SECONDS = 6 * 3600
"""A job running longer than this is stopped (a 100k-task index fits well within it)."""
PENDING_TTL_SECONDS = 24 * 3600
MARKER_TTL_SECONDS = 24 * 3600
CLAIM_TTL_SECONDS = 120
"""A claim on a task image whose claimer died frees itself after this long."""
STATE_CACHE_SECONDS = 1.0
"""/health reads the queue at most this often per process."""
FAILURE_TTL_SECONDS = 7 * 24 * 3600
"""A failed job stays in RQ's failed registry (and its error readable) for a week."""
RECENT_FAILED_READ = 10
"""Failed jobs /health reads the errors of (the newest)."""
TERMINAL = {JobStatus.FINISHED.value, JobStatus.FAILED.value, JobStatus.STOPPED.value, JobStatus.CANCELED.value}


def _keys(kind: str, project_id: int) -> tuple[str, str, str]:
    base = f"{KEY_PREFIX}:{kind}:{int(project_id)}"
    return f"{base}:pending", f"{base}:last", f"{base}:first"


class RQJobRunner:
    """The job runner of every process when REDIS_URL is set (web processes only ever call ``submit``)."""

    in_process = False

    def __init__(
        self,
        connection: Redis,
        debounce_seconds: float,
        max_delay_seconds: float | None = None,
        queue_name: str = QUEUE_NAME,
    ) -> None:
        self.redis = connection
        self.debounce_seconds = float(debounce_seconds)
        self.max_delay_seconds = (
            float(max_delay_seconds) if max_delay_seconds is not None else max(5 * self.debounce_seconds, 1.0)
        )
        self.queue = Queue(queue_name, connection=connection)
        self.on_finish: JobFinished | None = None
        self._handler: JobHandler | None = None
        self._held = threading.local()
        self._state_cache: tuple[float, dict[str, Any]] | None = None
        self._state_lock = threading.Lock()
        self.jobs_enqueued = 0
        self.submits_coalesced = 0

    @classmethod
    def from_url(cls, url: str, debounce_seconds: float) -> RQJobRunner:
        return cls(Redis.from_url(url, health_check_interval=30, socket_timeout=10), debounce_seconds)

    def bind(self, handler: JobHandler, on_finish: JobFinished | None = None) -> None:
        self._handler = handler
        self.on_finish = on_finish or self.on_finish

    # --- web side: enqueue only ------------------------------------------------------------------------------

    def submit(self, kind: str, project_id: int, params: Mapping[str, Any] | None = None) -> None:
        job = NamedJob(kind, int(project_id), dict(params or {}))
        pending_key, last_key, first_key = _keys(kind, job.project_id)
        now = time.time()
        with self.redis.pipeline() as pipe:
            pipe.set(last_key, repr(now), ex=MARKER_TTL_SECONDS)
            pipe.set(first_key, repr(now), nx=True, ex=MARKER_TTL_SECONDS)
            pipe.execute()
        job_id = f"{kind}-{job.project_id}-{uuid.uuid4().hex[:12]}"
        if not self.redis.set(pending_key, job_id, nx=True, ex=PENDING_TTL_SECONDS):
            pending = self.redis.get(pending_key)
            status = self.redis.hget(f"rq:job:{pending.decode()}", "status") if pending else None
            if pending and status is not None and status.decode() not in TERMINAL:
                self.submits_coalesced += 1
                return  # the pending job has not read Label Studio yet: it will see this submit's data
            # The pending job is gone or ended without clearing its marker (e.g. it failed before its lock).
            self.redis.set(pending_key, job_id, ex=PENDING_TTL_SECONDS)
        self.queue.enqueue(
            perform_job, job.kind, job.project_id, dict(job.params),
            job_id=job_id, job_timeout=JOB_TIMEOUT_SECONDS, retry=Retry(max=1),
            result_ttl=3600, failure_ttl=FAILURE_TTL_SECONDS, description=f"{job.key}",
        )
        self.jobs_enqueued += 1

    def is_pending(self, kind: str, project_id: int) -> bool:
        """A job of this kind is enqueued (or waiting out its debounce) and has not read Label Studio yet."""
        return bool(self.redis.exists(_keys(kind, project_id)[0]))

    # --- worker side -----------------------------------------------------------------------------------------

    def run(self, kind: str, project_id: int, params: Mapping[str, Any], job_id: str | None) -> Any:
        """Run one dequeued job: wait out the debounce, take the project lock, clear the pending marker, work."""
        if self._handler is None:
            raise RuntimeError("no job handler bound to the runner")
        pending_key, last_key, first_key = _keys(kind, project_id)
        self._debounce(debounce_seconds_of(kind, self.debounce_seconds), last_key, first_key)
        started = time.monotonic()
        error: BaseException | None = None
        try:
            with self.project_lock(project_id, Path()):
                if job_id is None or self.redis.get(pending_key) in (job_id.encode(), None):
                    self.redis.delete(pending_key, first_key)
                return self._handler(kind, int(project_id), params)
        except Exception as exc:
            error = exc
            raise
        finally:
            if self.on_finish is not None:
                try:
                    self.on_finish(kind, error, time.monotonic() - started)
                except Exception:
                    logger.exception("job finish hook failed for %s:%s", kind, project_id)

    def _debounce(self, debounce_seconds: float, last_key: str, first_key: str) -> None:
        while True:
            last, first = self.redis.mget(last_key, first_key)
            now = time.time()
            last_at = float(last) if last else now - debounce_seconds
            first_at = float(first) if first else last_at
            wait = min(last_at + debounce_seconds, first_at + self.max_delay_seconds) - now
            if wait <= 0:
                return
            time.sleep(min(wait, 0.5))

    @contextmanager
    def project_lock(self, project_id: int, lock_path: Path) -> Iterator[None]:
        """The project's Redis lock (re-entrant in one thread: a job's handler takes it again)."""
        held: set[int] = self._held.__dict__.setdefault("projects", set())
        if int(project_id) in held:
            yield
            return
        lock = self.redis.lock(f"{KEY_PREFIX}:lock:project:{int(project_id)}", timeout=LOCK_TTL_SECONDS,
                               sleep=0.1, thread_local=False)
        lock.acquire(blocking=True)
        held.add(int(project_id))
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(lock, stop, project_id), daemon=True,
                                   name=f"vlm-al-lock-{project_id}")
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            held.discard(int(project_id))
            try:
                lock.release()
            except (LockError, LockNotOwnedError):
                logger.error("project %s: the job lock expired before the job ended (a pause over %d s?)",
                             project_id, LOCK_TTL_SECONDS)

    @staticmethod
    def _renew(lock: Any, stop: threading.Event, project_id: int) -> None:
        while not stop.wait(LOCK_TTL_SECONDS / 3):
            try:
                lock.reacquire()
            except (LockError, LockNotOwnedError) as exc:
                logger.error("project %s: could not renew the job lock: %s", project_id, exc)
                return
            except Exception as exc:  # Redis briefly unreachable: try again next period
                logger.warning("project %s: renewing the job lock failed: %s", project_id, exc)

    # --- state, for /health and /metrics -------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._state_lock:
            if self._state_cache is not None and time.monotonic() - self._state_cache[0] < STATE_CACHE_SECONDS:
                return self._state_cache[1]
        state = self._read_state()
        with self._state_lock:
            self._state_cache = (time.monotonic(), state)
        return state

    def _read_state(self) -> dict[str, Any]:
        now = time.time()
        queued_ids = self.queue.get_job_ids()
        # cleanup=True: a job whose worker stopped beating is retried or failed here too, not only by a worker.
        running_ids = StartedJobRegistry(queue=self.queue).get_job_ids(cleanup=True)
        failed_registry = FailedJobRegistry(queue=self.queue)
        failed_ids = failed_registry.get_job_ids(cleanup=False)
        jobs = {j.id: j for j in Job.fetch_many(queued_ids[:1] + running_ids + failed_ids[-RECENT_FAILED_READ:],
                                                connection=self.redis) if j is not None}
        queued_ages = [now - _timestamp(jobs[i].enqueued_at) for i in queued_ids[:1] if i in jobs]
        queued_ages += [0.0] * (len(queued_ids) - len(queued_ages))
        running_ages = [now - _timestamp(jobs[i].started_at) for i in running_ids if i in jobs]
        failures = []
        for job_id in failed_ids[-RECENT_FAILED_READ:]:
            job = jobs.get(job_id)
            if job is None or job.ended_at is None or now - _timestamp(job.ended_at) > FAILURE_WINDOW_SECONDS:
                continue
            result = job.latest_result()
            error = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
            failures.append({
                "kind": job.args[0] if job.args else "?", "project": job.args[1] if len(job.args) > 1 else None,
                "error": (error[0] if error else "failed")[:300],
                "seconds": round(_timestamp(job.ended_at) - _timestamp(job.started_at or job.ended_at), 3),
                "seconds_ago": round(now - _timestamp(job.ended_at), 1),
            })
        summary = job_state_summary("rq", queued_ages, running_ages, failures)
        # The registry scores a failed job by when it expires: ended + FAILURE_TTL_SECONDS.
        summary["failed"] = int(self.redis.zcount(failed_registry.key, now + FAILURE_TTL_SECONDS
                                                  - FAILURE_WINDOW_SECONDS, "+inf"))
        summary["workers"] = len(SimpleWorker.all_keys(queue=self.queue))
        return summary

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until the queue is empty, nothing runs and nothing is pending (tests and benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pending = list(self.redis.scan_iter(f"{KEY_PREFIX}:*:pending", count=1000))
            if (not pending and self.queue.count == 0
                    and not StartedJobRegistry(queue=self.queue).get_job_ids(cleanup=False)):
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def share_connection(self, project_id: int, hostname: str | None, access_token: str | None) -> None:
        """The project's /setup address and token, for the workers (Redis holds them: keep it private)."""
        fields = {"hostname": hostname or "", "access_token": access_token or ""}
        self.redis.hset(f"{KEY_PREFIX}:connection:{int(project_id)}", mapping=fields)

    def shared_connection(self, project_id: int) -> tuple[str | None, str | None]:
        fields = self.redis.hgetall(f"{KEY_PREFIX}:connection:{int(project_id)}")
        hostname = fields.get(b"hostname", b"").decode() or None
        token = fields.get(b"access_token", b"").decode() or None
        return hostname, token

    def inflight_claims(self) -> RedisInflightClaims:
        """Image work shared by every replica on this Redis (/predict and index jobs never embed twice)."""
        return RedisInflightClaims(self.redis)

    def shutdown(self) -> None:
        self.redis.close()


class RedisInflightClaims:
    """Which replica is downloading and embedding which task image (backend.features.InflightClaims), in Redis:
    ``SET NX`` with an expiry per (project, URL), so a claimer that dies frees its URLs within CLAIM_TTL_SECONDS."""

    def __init__(self, connection: Redis) -> None:
        self.redis = connection
        self.owner = f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    @staticmethod
    def _key(project_id: int, url: str) -> str:
        return f"{KEY_PREFIX}:claim:{int(project_id)}:{hashlib.sha1(url.encode()).hexdigest()}"

    def claim(self, project_id: int, urls: Sequence[str]) -> set[str]:
        urls = list(dict.fromkeys(urls))
        with self.redis.pipeline(transaction=False) as pipe:
            for url in urls:
                pipe.set(self._key(project_id, url), self.owner, nx=True, ex=CLAIM_TTL_SECONDS)
            won = pipe.execute()
        return {url for url, ok in zip(urls, won) if ok}

    def release(self, project_id: int, urls: Iterable[str]) -> None:
        keys = [self._key(project_id, u) for u in urls]
        if keys:
            self.redis.delete(*keys)

    def wait(self, project_id: int, urls: Sequence[str], timeout: float) -> None:
        keys = [self._key(project_id, u) for u in dict.fromkeys(urls)]
        deadline = time.monotonic() + timeout
        while keys and time.monotonic() < deadline:
            if not self.redis.exists(*keys):
                return
            time.sleep(0.2)


def _timestamp(value: Any) -> float:
    return value.timestamp() if value is not None else time.time()


# --- the worker process ---------------------------------------------------------------------------------------

_WORKER_RUNNER: RQJobRunner | None = None
"""The runner of this `vlm-al worker` process, bound to its backend (set by ``run_worker``)."""


def perform_job(kind: str, project_id: int, params: Mapping[str, Any]) -> Any:
    """What RQ calls: plain arguments only. Runs on the backend this worker loaded at start-up."""
    from rq import get_current_job

    if _WORKER_RUNNER is None:
        raise RuntimeError("vlm-al jobs run only in `vlm-al worker` (no backend loaded in this process)")
    current = get_current_job()
    result = _WORKER_RUNNER.run(kind, int(project_id), params, current.id if current is not None else None)
    return result if isinstance(result, (str, int, float, type(None))) else None


class HeartbeatWorker(SimpleWorker):
    """RQ's SimpleWorker (the job runs in this process: the loaded models are reused, nothing is forked), plus a
    heartbeat thread while a job runs, so a worker killed mid-job is found within HEARTBEAT_TTL_SECONDS."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception as exc:
                    logger.warning("heartbeat of job %s failed: %s", job.id, exc)

        beater = threading.Thread(target=beat, name="vlm-al-rq-heartbeat", daemon=True)
        beater.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beater.join(timeout=HEARTBEAT_SECONDS + 1)
        self.set_state(WorkerStatus.IDLE)

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return HEARTBEAT_TTL_SECONDS


def run_worker(backend: Any, config: Any, burst: bool = False, name: str | None = None) -> int:
    """`vlm-al worker`: with the backend's models loaded once (``backend``, an MLBackend built by the caller, so
    this module never imports the service), run jobs from the queue until stopped (or empty, ``burst``)."""
    global _WORKER_RUNNER

    if not isinstance(backend.jobs, RQJobRunner):
        raise ValueError("vlm-al worker needs the RQ job runner (REDIS_URL)")
    _WORKER_RUNNER = backend.jobs
    import_round_libraries()  # this process runs the fits: their libraries load now, not in the first one
    worker = HeartbeatWorker(
        [backend.jobs.queue], connection=backend.jobs.redis,
        name=name or f"vlm-al-{os.uname().nodename}-{os.getpid()}",
        job_monitoring_interval=HEARTBEAT_SECONDS, maintenance_interval=MAINTENANCE_SECONDS,
    )
    logger.info("vlm-al worker %s: queue %s on %s", worker.name, QUEUE_NAME, _redacted_url(config.redis_url))
    worker.work(burst=burst, logging_level=config.log_level, with_scheduler=False)
    return 0


def _redacted_url(url: str) -> str:
    """redis://user:password@host -> redis://user:***@host (the log never shows a password)."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
