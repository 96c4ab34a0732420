"""Per-project state on disk under MODEL_DIR/projects/<project id>/, plus the shared image-URL index.

Layout of one project:
  current.json               pointer to the served version (written last, atomically)
  versions/<model_version>/  classifier checkpoint
  transition_history.jsonl   one coarse transition matrix estimate per fit
  priorities.json            task id -> queue score of the current version
  pushed.json                task ids that hold a prediction of the current version in Label Studio
  tasks.json                 the task list of the last index (ids and image URLs), so a fit lists no tasks
  ls_versions.json           model versions pushed to Label Studio and not deleted there yet
  fit.lock                   cross-process lock held while fitting
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from model.io import atomic_write_json

VERSION_PREFIX = "vlm-al-v"
COLD_START_VERSION = f"{VERSION_PREFIX}0"
_VERSION_RE = re.compile(rf"^{re.escape(VERSION_PREFIX)}(\d+)$")


def version_number(model_version: str) -> int | None:
    match = _VERSION_RE.match(model_version)
    return int(match.group(1)) if match else None


def model_version_name(number: int) -> str:
    return f"{VERSION_PREFIX}{number}"


@dataclass(frozen=True)
class TaskList:
    """A project's tasks as of its last index: ids (int64) and image URLs, not one dict per task."""

    image_key: str
    ids: np.ndarray
    urls: list[str | None]

    def tasks_with(self, annotated: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Every task to fit on: the annotated ones as Label Studio exported them (tasks created since the index
        included), the others as ``{"id", "data": {image_key: url}}`` built here."""
        by_id = {int(t["id"]): t for t in annotated if isinstance(t.get("id"), int)}
        tasks: list[dict[str, Any]] = []
        for task_id, url in zip(self.ids.tolist(), self.urls):
            exported = by_id.pop(task_id, None)
            tasks.append(dict(exported) if exported is not None else {"id": task_id, "data": {self.image_key: url}})
        tasks.extend(dict(t) for t in by_id.values())
        return tasks


class ModelDirError(RuntimeError):
    """MODEL_DIR cannot be used; the message names the path and the cause."""


def check_model_dir(model_dir: Path) -> Path:
    """Create MODEL_DIR if needed and prove it is writable (a probe file is written and removed).

    Raises ModelDirError naming the path and the cause, so a read-only or missing directory is one clear
    start-up error instead of a bare SQLite message from deep inside the first request."""
    path = Path(model_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelDirError(f"MODEL_DIR {path} cannot be created: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ModelDirError(f"MODEL_DIR {path} is not a directory")
    probe = path / f".write-probe-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"ok")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise ModelDirError(f"MODEL_DIR {path} is not writable: {exc.strerror or exc}") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return path


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CurrentModel:
    model_version: str
    created_at: str
    schema_hash: str
    metrics: dict[str, Any] = field(default_factory=dict)


class ProjectState:
    """Files of one project. Safe to share between threads; several processes may use the same directory."""

    def __init__(self, model_dir: Path, project_id: int) -> None:
        self.project_id = int(project_id)
        self.root = Path(model_dir) / "projects" / str(self.project_id)
        self.versions_dir = self.root / "versions"
        self.current_path = self.root / "current.json"
        self.history_path = self.root / "transition_history.jsonl"
        self.priorities_path = self.root / "priorities.json"
        self.pushed_path = self.root / "pushed.json"
        self.lock_path = self.root / "fit.lock"
        self.tasks_path = self.root / "tasks.json"
        self.ls_versions_path = self.root / "ls_versions.json"
        self._tasks_cache: tuple[object, TaskList | None] | None = None
        self._lock = threading.Lock()
        self._current_cache: tuple[object, CurrentModel | None] | None = None
        self._priorities_cache: tuple[object, str | None, dict[int, float]] | None = None

    def _mtime(self, path: Path) -> tuple[int, int, int] | int:
        """Identity of the file's current version: atomic replaces give a new inode, so equal mtimes still differ."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            return -1
        return stat.st_mtime_ns, stat.st_ino, stat.st_size

    def current(self) -> CurrentModel | None:
        """The served version, re-read only when the pointer file changed (another worker may have fitted)."""
        mtime = self._mtime(self.current_path)
        with self._lock:
            if self._current_cache is not None and self._current_cache[0] == mtime:
                return self._current_cache[1]
        current: CurrentModel | None = None
        if mtime != -1:
            data = json.loads(self.current_path.read_text())
            current = CurrentModel(
                model_version=str(data["model_version"]),
                created_at=str(data.get("created_at", "")),
                schema_hash=str(data.get("schema_hash", "")),
                metrics=dict(data.get("metrics") or {}),
            )
        with self._lock:
            self._current_cache = (mtime, current)
        return current

    def version_dir(self, model_version: str) -> Path:
        if version_number(model_version) is None:
            raise ValueError(f"not a model version of this backend: {model_version!r}")
        return self.versions_dir / model_version

    def list_versions(self) -> list[str]:
        """Stored versions, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        numbered = [(version_number(p.name), p.name) for p in self.versions_dir.iterdir() if p.is_dir()]
        return [name for number, name in sorted((n, v) for n, v in numbered if n is not None)]

    def next_version(self) -> str:
        numbers = [version_number(v) or 0 for v in self.list_versions()]
        current = self.current()
        if current is not None:
            numbers.append(version_number(current.model_version) or 0)
        return model_version_name(max(numbers, default=0) + 1)

    def commit_version(
        self,
        model_version: str,
        write_checkpoint: Callable[[Path], None],
        schema_hash: str,
        metrics: Mapping[str, Any] | None = None,
    ) -> CurrentModel:
        """Write the checkpoint into a temporary directory, move it into place, then swap the pointer.

        A crash at any point leaves current.json on the previous complete version."""
        final_dir = self.version_dir(model_version)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.versions_dir / f".tmp-{model_version}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        try:
            write_checkpoint(tmp_dir)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(tmp_dir, final_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        current = CurrentModel(
            model_version=model_version, created_at=utc_now(), schema_hash=schema_hash, metrics=dict(metrics or {})
        )
        atomic_write_json(self.current_path, asdict(current))
        return current

    def prune_versions(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` stored versions; never the current one. Returns what was removed."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        current = self.current()
        versions = self.list_versions()
        kept = set(versions[-keep:])
        if current is not None:
            kept.add(current.model_version)
        removed = [v for v in versions if v not in kept]
        for name in removed:
            shutil.rmtree(self.versions_dir / name, ignore_errors=True)
        for leftover in self.versions_dir.glob(".tmp-*") if self.versions_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        return removed

    def append_transition(self, record: Mapping[str, Any]) -> None:
        """Append one T estimate. Call it only after ``commit_version`` of the record's version returned, so the
        history never names a version that was not committed. One write of one line, fsynced; a line cut by a
        crash is skipped by ``transition_history`` and never glued to the next record."""
        self.root.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"created_at": utc_now(), **record}, sort_keys=True)
        with open(self.history_path, "ab") as handle:
            prefix = b""
            if handle.tell() > 0:
                with open(self.history_path, "rb") as reader:
                    reader.seek(-1, os.SEEK_END)
                    if reader.read(1) != b"\n":
                        prefix = b"\n"  # a torn last line from a crash: start on a fresh line
            handle.write(prefix + line.encode("utf-8") + b"\n")
            handle.flush()
            os.fsync(handle.fileno())

    def transition_history(self) -> list[dict[str, Any]]:
        """One record per committed version, oldest first (torn lines and repeats of a version are skipped)."""
        if not self.history_path.exists():
            return []
        records: dict[str, dict[str, Any]] = {}
        unnamed: list[dict[str, Any]] = []
        for line in self.history_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            version = record.get("model_version")
            if isinstance(version, str):
                records[version] = record  # a repeat (from an old crash) is the one that was committed
            else:
                unnamed.append(record)
        return unnamed + sorted(records.values(), key=lambda r: version_number(str(r["model_version"])) or 0)

    def write_priorities(self, model_version: str, scores: Mapping[int, float]) -> None:
        atomic_write_json(
            self.priorities_path,
            {"model_version": model_version, "scores": {str(k): float(v) for k, v in scores.items()}},
        )

    def priorities(self) -> tuple[str | None, dict[int, float]]:
        """(model version the scores belong to, task id -> score); empty when none were written."""
        mtime = self._mtime(self.priorities_path)
        with self._lock:
            if self._priorities_cache is not None and self._priorities_cache[0] == mtime:
                return self._priorities_cache[1], self._priorities_cache[2]
        version: str | None = None
        scores: dict[int, float] = {}
        if mtime != -1:
            data = json.loads(self.priorities_path.read_text())
            version = data.get("model_version")
            scores = {int(k): float(v) for k, v in (data.get("scores") or {}).items()}
        with self._lock:
            self._priorities_cache = (mtime, version, scores)
        return version, scores

    def pushed_tasks(self, model_version: str) -> set[int]:
        """Task ids whose prediction of ``model_version`` is already in Label Studio."""
        if not self.pushed_path.exists():
            return set()
        data = json.loads(self.pushed_path.read_text())
        if data.get("model_version") != model_version:
            return set()
        return {int(t) for t in data.get("task_ids", [])}

    def record_pushed(self, model_version: str, task_ids: Iterable[int], replace: bool = False) -> None:
        ids = set() if replace else self.pushed_tasks(model_version)
        ids.update(int(t) for t in task_ids)
        atomic_write_json(self.pushed_path, {"model_version": model_version, "task_ids": sorted(ids)})


    def write_task_list(self, image_key: str, tasks: Iterable[Mapping[str, Any]]) -> None:
        """Keep the task list of an index (ids and image URLs) for the fits until the next index."""
        ids: list[int] = []
        urls: list[str | None] = []
        for task in tasks:
            data = task.get("data")
            url = data.get(image_key) if isinstance(data, Mapping) else None
            ids.append(int(task["id"]))
            urls.append(url if isinstance(url, str) else None)
        atomic_write_json(self.tasks_path, {"image_key": image_key, "ids": ids, "urls": urls})

    def task_list(self) -> TaskList | None:
        """The last index's task list (re-read only when another process wrote a new one); None before one."""
        mtime = self._mtime(self.tasks_path)
        with self._lock:
            if self._tasks_cache is not None and self._tasks_cache[0] == mtime:
                return self._tasks_cache[1]
        task_list = None
        if mtime != -1:
            data = json.loads(self.tasks_path.read_text())
            task_list = TaskList(str(data["image_key"]), np.asarray(data["ids"], dtype=np.int64), list(data["urls"]))
        with self._lock:
            self._tasks_cache = (mtime, task_list)
        return task_list

    def versions_in_label_studio(self) -> list[str]:
        """Model versions pushed to Label Studio and not deleted there yet, oldest first."""
        if not self.ls_versions_path.exists():
            return []
        return [str(v) for v in json.loads(self.ls_versions_path.read_text()).get("versions", [])]

    def record_label_studio_versions(self, pushed: Iterable[str] = (), deleted: Iterable[str] = ()) -> list[str]:
        gone = set(deleted)
        versions = [v for v in self.versions_in_label_studio() if v not in gone]
        versions += [v for v in pushed if v not in versions and v not in gone]
        atomic_write_json(self.ls_versions_path, {"versions": versions})
        return versions


class ImageKeyIndex:
    """(project, task image URL) -> content key of the image bytes, so cached predictions never re-download.

    A small SQLite table (WAL mode, one connection per thread) next to the embedding store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connection() as conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS image_keys ("
                " project INTEGER NOT NULL, url TEXT NOT NULL, content_key TEXT NOT NULL,"
                " PRIMARY KEY (project, url))"
            )

    def _connection(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def get_many(self, project_id: int, urls: Iterable[str]) -> dict[str, str]:
        urls = list(dict.fromkeys(urls))
        found: dict[str, str] = {}
        conn = self._connection()
        for start in range(0, len(urls), 500):
            chunk = urls[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(
                f"SELECT url, content_key FROM image_keys WHERE project = ? AND url IN ({marks})",
                [int(project_id), *chunk],
            )
            found.update(rows.fetchall())
        return found

    def put_many(self, project_id: int, keys_by_url: Mapping[str, str]) -> None:
        if not keys_by_url:
            return
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO image_keys (project, url, content_key) VALUES (?, ?, ?)",
                [(int(project_id), url, key) for url, key in keys_by_url.items()],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
