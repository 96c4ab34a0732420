"""Per-project state under MODEL_DIR/projects/<project id>/, plus the image-URL index.

With REDIS_URL the JSON documents and the T history below live in Redis instead, checkpoints are published there
too, and versions/ is only this host's cache of them (backend/shared_store.py): replicas share no disk.
Layout of one project on disk (the embedded default):
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
from typing import Any, Protocol

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


class ProjectRecords(Protocol):
    """Where one project's records live: its small JSON documents (the model pointer, priorities, task list...),
    its T history and its published checkpoints. ``FileProjectRecords`` (files under MODEL_DIR, the embedded
    default) or ``backend.shared_store.RedisProjectRecords`` (REDIS_URL: every replica reads the same records)."""

    shared: bool
    """Whether checkpoints are published for other hosts (then the local versions directory is only a cache)."""

    def document_stamp(self, name: str) -> object:
        """A cheap token that changes whenever the document is rewritten (-1 when there is none)."""

    def read_document(self, name: str) -> tuple[object, dict[str, Any] | None]:
        """``(stamp, parsed JSON object or None)``, read together."""

    def write_document(self, name: str, data: Mapping[str, Any]) -> None:
        """Replace the document atomically: a reader sees the old one or the new one."""

    def append_history(self, line: str) -> None: ...

    def history_lines(self) -> list[str]: ...

    def published_versions(self) -> list[str] | None:
        """Versions whose checkpoint another host can fetch, oldest first; None: the local directory is the record."""

    def publish_checkpoint(self, model_version: str, directory: Path) -> None: ...

    def fetch_checkpoint(self, model_version: str, into: Path) -> bool:
        """Write the published checkpoint's files into the (new, empty) directory ``into``; False if not published."""

    def unpublish(self, model_versions: Iterable[str]) -> None: ...


class FileProjectRecords:
    """Today's layout: one JSON file per document, the T history as JSON lines; checkpoints stay where they are."""

    shared = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.history_path = root / "transition_history.jsonl"

    def path(self, name: str) -> Path:
        return self.root / f"{name}.json"

    def document_stamp(self, name: str) -> object:
        """Identity of the file's current version: atomic replaces give a new inode, so equal mtimes still differ."""
        try:
            stat = self.path(name).stat()
        except FileNotFoundError:
            return -1
        return stat.st_mtime_ns, stat.st_ino, stat.st_size

    def read_document(self, name: str) -> tuple[object, dict[str, Any] | None]:
        stamp = self.document_stamp(name)
        if stamp == -1:
            return stamp, None
        try:
            return stamp, json.loads(self.path(name).read_text())
        except FileNotFoundError:
            return -1, None

    def write_document(self, name: str, data: Mapping[str, Any]) -> None:
        atomic_write_json(self.path(name), dict(data))

    def append_history(self, line: str) -> None:
        """One write of one line, fsynced; a line cut by a crash is never glued to the next record."""
        self.root.mkdir(parents=True, exist_ok=True)
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

    def history_lines(self) -> list[str]:
        if not self.history_path.exists():
            return []
        return self.history_path.read_text(encoding="utf-8", errors="replace").splitlines()

    def published_versions(self) -> list[str] | None:
        return None

    def publish_checkpoint(self, model_version: str, directory: Path) -> None:
        return None  # the versions directory under MODEL_DIR is the record

    def fetch_checkpoint(self, model_version: str, into: Path) -> bool:
        return False

    def unpublish(self, model_versions: Iterable[str]) -> None:
        return None


class ProjectState:
    """One project's state: checkpoints in MODEL_DIR/projects/<id>/versions/ and the rest in its ``records``
    (files beside them by default). Safe to share between threads; several processes may use the same records."""

    def __init__(self, model_dir: Path, project_id: int, records: ProjectRecords | None = None) -> None:
        self.project_id = int(project_id)
        self.root = Path(model_dir) / "projects" / str(self.project_id)
        self.versions_dir = self.root / "versions"
        self.records: ProjectRecords = records if records is not None else FileProjectRecords(self.root)
        self.current_path = self.root / "current.json"
        self.history_path = self.root / "transition_history.jsonl"
        self.lock_path = self.root / "fit.lock"
        self._lock = threading.Lock()
        self._fetch_lock = threading.Lock()
        self._cached: dict[str, tuple[object, Any]] = {}

    def _document(self, name: str, parse: Callable[[dict[str, Any] | None], Any]) -> Any:
        """The parsed document, re-read only when its stamp changed (another process may have written it)."""
        stamp = self.records.document_stamp(name)
        with self._lock:
            cached = self._cached.get(name)
            if cached is not None and cached[0] == stamp:
                return cached[1]
        stamp, data = self.records.read_document(name)
        parsed = parse(data)
        with self._lock:
            self._cached[name] = (stamp, parsed)
        return parsed

    def current(self) -> CurrentModel | None:
        """The served version, re-read only when the pointer changed (another worker may have fitted)."""
        return self._document("current", _parse_current)

    def version_dir(self, model_version: str) -> Path:
        """The local directory of a version's checkpoint. A replica that lacks it fetches it from the shared
        records first (into a temporary directory renamed into place); a version that nobody published is
        simply absent."""
        directory = self._local_version_dir(model_version)
        if self.records.shared and not directory.is_dir():
            with self._fetch_lock:
                if not directory.is_dir():
                    self._fetch(model_version, directory)
        return directory

    def _local_version_dir(self, model_version: str) -> Path:
        if version_number(model_version) is None:
            raise ValueError(f"not a model version of this backend: {model_version!r}")
        return self.versions_dir / model_version

    def _fetch(self, model_version: str, directory: Path) -> None:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp_dir = self.versions_dir / f".fetch-{model_version}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp_dir, ignore_errors=True)
        tmp_dir.mkdir()
        try:
            if not self.records.fetch_checkpoint(model_version, tmp_dir):
                shutil.rmtree(tmp_dir, ignore_errors=True)
                return
            try:
                os.replace(tmp_dir, directory)
            except OSError:  # another process fetched it meanwhile (a non-empty directory is not replaced)
                if not directory.is_dir():
                    raise
                shutil.rmtree(tmp_dir, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        self._drop_unpublished_copies(keep=model_version)

    def _drop_unpublished_copies(self, keep: str) -> None:
        """Local copies of versions pruned from the shared records (by the worker that pruned them)."""
        published = set(self.records.published_versions() or ())
        current = self.current()
        for name in self._local_versions():
            if name != keep and name not in published and (current is None or name != current.model_version):
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)

    def _local_versions(self) -> list[str]:
        if not self.versions_dir.is_dir():
            return []
        numbered = [(version_number(p.name), p.name) for p in self.versions_dir.iterdir() if p.is_dir()]
        return [name for number, name in sorted((n, v) for n, v in numbered if n is not None)]

    def list_versions(self) -> list[str]:
        """Stored versions, oldest first (the published ones when the records are shared)."""
        published = self.records.published_versions()
        return self._local_versions() if published is None else published

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
        """Write the checkpoint into a temporary directory, move it into place, publish it, then swap the pointer.

        A crash at any point leaves the pointer on the previous complete version, and the pointer never names a
        checkpoint that is not published."""
        final_dir = self._local_version_dir(model_version)
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
        self.records.publish_checkpoint(model_version, final_dir)
        current = CurrentModel(
            model_version=model_version, created_at=utc_now(), schema_hash=schema_hash, metrics=dict(metrics or {})
        )
        self.records.write_document("current", asdict(current))
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
        self.records.unpublish(removed)
        local = self._local_versions()
        for name in local if self.records.shared else removed:
            if name not in kept:
                shutil.rmtree(self.versions_dir / name, ignore_errors=True)
        for leftover in self.versions_dir.glob(".tmp-*") if self.versions_dir.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        return removed

    def append_transition(self, record: Mapping[str, Any]) -> None:
        """Append one T estimate. Call it only after ``commit_version`` of the record's version returned, so the
        history never names a version that was not committed. A torn record (a crash mid-write) is skipped by
        ``transition_history``."""
        self.records.append_history(json.dumps({"created_at": utc_now(), **record}, sort_keys=True))

    def transition_history(self) -> list[dict[str, Any]]:
        """One record per committed version, oldest first (torn lines and repeats of a version are skipped)."""
        records: dict[str, dict[str, Any]] = {}
        unnamed: list[dict[str, Any]] = []
        for line in self.records.history_lines():
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
        self.records.write_document(
            "priorities", {"model_version": model_version, "scores": {str(k): float(v) for k, v in scores.items()}}
        )

    def priorities(self) -> tuple[str | None, dict[int, float]]:
        """(model version the scores belong to, task id -> score); empty when none were written."""
        return self._document("priorities", _parse_priorities)

    def pushed_tasks(self, model_version: str) -> set[int]:
        """Task ids whose prediction of ``model_version`` is already in Label Studio."""
        _, data = self.records.read_document("pushed")
        if data is None or data.get("model_version") != model_version:
            return set()
        return {int(t) for t in data.get("task_ids", [])}

    def record_pushed(self, model_version: str, task_ids: Iterable[int], replace: bool = False) -> None:
        ids = set() if replace else self.pushed_tasks(model_version)
        ids.update(int(t) for t in task_ids)
        self.records.write_document("pushed", {"model_version": model_version, "task_ids": sorted(ids)})

    def write_task_list(self, image_key: str, tasks: Iterable[Mapping[str, Any]]) -> None:
        """Keep the task list of an index (ids and image URLs) for the fits until the next index."""
        ids: list[int] = []
        urls: list[str | None] = []
        for task in tasks:
            data = task.get("data")
            url = data.get(image_key) if isinstance(data, Mapping) else None
            ids.append(int(task["id"]))
            urls.append(url if isinstance(url, str) else None)
        self.records.write_document("tasks", {"image_key": image_key, "ids": ids, "urls": urls})

    def task_list(self) -> TaskList | None:
        """The last index's task list (re-read only when another process wrote a new one); None before one."""
        return self._document("tasks", _parse_task_list)

    def versions_in_label_studio(self) -> list[str]:
        """Model versions pushed to Label Studio and not deleted there yet, oldest first."""
        _, data = self.records.read_document("ls_versions")
        return [str(v) for v in (data or {}).get("versions", [])]

    def record_label_studio_versions(self, pushed: Iterable[str] = (), deleted: Iterable[str] = ()) -> list[str]:
        gone = set(deleted)
        versions = [v for v in self.versions_in_label_studio() if v not in gone]
        versions += [v for v in pushed if v not in versions and v not in gone]
        self.records.write_document("ls_versions", {"versions": versions})
        return versions


def _parse_current(data: dict[str, Any] | None) -> CurrentModel | None:
    if data is None:
        return None
    return CurrentModel(
        model_version=str(data["model_version"]),
        created_at=str(data.get("created_at", "")),
        schema_hash=str(data.get("schema_hash", "")),
        metrics=dict(data.get("metrics") or {}),
    )


def _parse_priorities(data: dict[str, Any] | None) -> tuple[str | None, dict[int, float]]:
    if data is None:
        return None, {}
    return data.get("model_version"), {int(k): float(v) for k, v in (data.get("scores") or {}).items()}


def _parse_task_list(data: dict[str, Any] | None) -> TaskList | None:
    if data is None:
        return None
    return TaskList(str(data["image_key"]), np.asarray(data["ids"], dtype=np.int64), list(data["urls"]))


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
