"""Background jobs: debounced per key, so a burst of webhooks becomes one run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from filelock import FileLock

logger = logging.getLogger(__name__)

JobFinished = Callable[[str, "BaseException | None", float], None]
"""Called after every run with (key, the exception or None, seconds)."""


class JobRunner(Protocol):
    def submit(self, key: str, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the background; submits of one key close together become one run."""

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until nothing is pending or running; False on timeout."""

    def shutdown(self) -> None:
        """Stop accepting work and wait for running jobs."""


@dataclass
class _KeyState:
    fn: Callable[[], None] | None = None
    pending: bool = False
    running: bool = False
    first_submit: float = 0.0
    due: float = 0.0


class ThreadJobRunner:
    """Per-key debounced jobs on a small thread pool.

    A submit makes the key due ``debounce_seconds`` after the latest submit (trailing debounce, capped at
    ``max_delay_seconds`` after the first one so a steady stream still runs). The same key never runs twice at
    once: a submit during a run schedules exactly one more run after it, which sees everything submitted meanwhile.
    The most recent ``fn`` of a key is the one that runs.
    """

    def __init__(
        self,
        debounce_seconds: float,
        max_workers: int = 2,
        max_delay_seconds: float | None = None,
        on_finish: JobFinished | None = None,
    ) -> None:
        if debounce_seconds < 0:
            raise ValueError(f"debounce_seconds must be >= 0, got {debounce_seconds}")
        self.debounce_seconds = float(debounce_seconds)
        self.max_delay_seconds = (
            float(max_delay_seconds) if max_delay_seconds is not None else max(5 * self.debounce_seconds, 1.0)
        )
        self._on_finish = on_finish
        self._states: dict[str, _KeyState] = {}
        self._cond = threading.Condition()
        self._closed = False
        self.runs_started = 0
        self.runs_failed = 0
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="vlm-al-job")
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="vlm-al-job-dispatch", daemon=True)
        self._dispatcher.start()

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise RuntimeError("the job runner is shut down")
            state = self._states.setdefault(key, _KeyState())
            state.fn = fn
            if not state.pending:
                state.pending = True
                state.first_submit = now
            state.due = min(now + self.debounce_seconds, state.first_submit + self.max_delay_seconds)
            self._cond.notify_all()

    def is_busy(self, key: str) -> bool:
        with self._cond:
            state = self._states.get(key)
            return bool(state and (state.pending or state.running))

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
                for key, state in self._states.items():
                    if not state.pending or state.running:
                        continue
                    if state.due <= now:
                        state.pending = False
                        state.running = True
                        self.runs_started += 1
                        fn = state.fn
                        assert fn is not None
                        self._executor.submit(self._run, key, fn)
                    elif next_due is None or state.due < next_due:
                        next_due = state.due
                self._cond.wait(None if next_due is None else max(next_due - now, 0.001))

    def _run(self, key: str, fn: Callable[[], None]) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            fn()
        except Exception as exc:  # a failing job must never kill the worker thread
            error = exc
            logger.exception("background job %s failed", key)
        finally:
            seconds = time.monotonic() - started
            if self._on_finish is not None:
                try:
                    self._on_finish(key, error, seconds)
                except Exception:
                    logger.exception("job finish hook failed for %s", key)
            with self._cond:
                if error is not None:
                    self.runs_failed += 1
                self._states[key].running = False
                self._cond.notify_all()


class InlineJobRunner:
    """Runs every job at once in the caller's thread (scripts and tests that want no concurrency)."""

    def __init__(self) -> None:
        self.runs_started = 0
        self.runs_failed = 0

    def submit(self, key: str, fn: Callable[[], None]) -> None:
        self.runs_started += 1
        try:
            fn()
        except Exception:
            self.runs_failed += 1
            logger.exception("job %s failed", key)

    def wait_idle(self, timeout: float | None = None) -> bool:
        return True

    def shutdown(self) -> None:
        return None


def project_lock(lock_path: Path, timeout: float = -1) -> FileLock:
    """A lock file shared by every process on this machine: two gunicorn workers never fit one project at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_path), timeout=timeout)
