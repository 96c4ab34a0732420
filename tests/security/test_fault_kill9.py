"""Fault test: kill -9 during fits, 20 times. Each restart serves the last committed model; no file is corrupt;
the T history names only committed versions, each once."""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from backend.state import ProjectState, version_number
from model.finegrained import FineGrainedClassifier

from .conftest import REPO_ROOT

PROJECT_ID = 7  # tests/conftest.PROJECT_ID
KILLS = 20


def _check_files(model_dir: Path) -> str | None:
    """Every file parses; returns the committed version (or None before the first commit)."""
    state = ProjectState(model_dir, PROJECT_ID)
    current = state.current()  # json.loads: raises on a torn pointer
    for path in model_dir.rglob("*.json"):
        if ".tmp" not in path.name and ".tmp-" not in str(path.parent.name):
            json.loads(path.read_text())
    for path in model_dir.glob("*.sqlite"):
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok", path
    if current is None:
        return None
    FineGrainedClassifier.load(state.version_dir(current.model_version))  # the checkpoint is complete
    number = version_number(current.model_version)
    names = []
    if state.history_path.exists():
        for line in state.history_path.read_text().splitlines():
            try:
                names.append(json.loads(line)["model_version"])
            except ValueError:
                continue  # a line torn by the kill is skipped by the reader
    assert len(names) == len(set(names)), f"T history repeats a version: {names}"
    assert all(version_number(n) <= number for n in names), f"T history names an uncommitted version: {names}"
    return current.model_version


def _line(process: subprocess.Popen, timeout: float = 60.0) -> str:
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    try:
        if not selector.select(timeout=timeout):
            raise AssertionError("the fault child said nothing in time")
        return process.stdout.readline().strip()
    finally:
        selector.close()


def test_kill_9_during_fits_keeps_the_last_committed_model(tmp_path):
    rng = random.Random(8)
    model_dir = tmp_path / "model_dir"
    committed: str | None = None
    annotations = 8
    kills_during_fit = 0
    fit_seconds: float | None = None
    started = time.monotonic()
    server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fault_child.py"))], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert _line(server, 120) == "READY"
        for round_ in range(KILLS):
            server.stdin.write(f"run {model_dir} {annotations}\n")
            server.stdin.flush()
            pid_line = _line(server)
            assert pid_line.startswith("PID "), pid_line
            pid = int(pid_line.split()[1])
            serving = _line(server).split()
            expected = committed or "vlm-al-v0"
            assert serving[:2] == ["SERVING", expected], f"round {round_}: restart serves {serving}, last {expected}"
            assert serving[2] == str(committed is not None), "the committed model did not load"
            # The child fits back to back from here on: every kill lands inside some fit, at a random phase. Until
            # a fit has committed, wait for one (it also measures how long a restart's first fit takes here). The
            # child never runs out of fits, so a long sleep only lets more fits commit before the kill.
            fits_seen = 0
            if committed is None or fit_seconds is None:
                fit_started = time.monotonic()
                line = _line(server, 120)
                assert line.startswith("FIT"), line
                fits_seen += 1
                fit_seconds = time.monotonic() - fit_started
            time.sleep(rng.uniform(0.02, 1.5 * fit_seconds))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                said = []
                while (line := _line(server)) != "DONE":
                    said.append(line)
                raise AssertionError(f"round {round_}: the child was gone before the kill; it said {said}") from None
            while (line := _line(server)) != "DONE":
                assert not line.startswith("CRASH"), f"round {round_}: {line}"
                fits_seen += line.startswith("FIT")
            kills_during_fit += 1
            annotations = min(annotations + fits_seen + 1, 50)
            committed = _check_files(model_dir) or committed
    finally:
        server.kill()
        server.wait()
    assert committed is not None, "no fit ever committed"
    assert version_number(committed) >= 3, f"too few fits committed between the kills ({committed})"
    assert kills_during_fit == KILLS
    assert time.monotonic() - started < 240
