"""Where the server keeps what outlives a request: one ``StateStore``, chosen from the config by ``build_state_store``.

* ``FileStateStore`` (the embedded default, no REDIS_URL): files under MODEL_DIR and two SQLite databases, the
  embedding cache (model.embedding_store) and the image-URL index (backend.state.ImageKeyIndex).
* ``RedisStateStore`` (REDIS_URL): the same records in Redis, so web replicas and `vlm-al worker` processes on any
  host, each with its own MODEL_DIR, share them:

  - embeddings and weak answers: a hash per namespace, ``<prefix>:vectors:<namespace>``, field = the image's
    content key, value = its dimension (uint32) then float16 values, as the SQLite store keeps them;
  - the image-URL index: a hash per project, ``<prefix>:image-keys:<project>``, URL -> content key;
  - a project's JSON documents (the model pointer ``current``, ``priorities``, ``pushed``, ``tasks``,
    ``ls_versions``): a hash ``<prefix>:project:<id>:doc:<name>`` of ``stamp`` and ``body``, written in one HSET,
    so a reader sees the old document or the new one; ``stamp`` alone is read to know whether it changed (the
    served pointer costs one HGET per request);
  - the T history: a list ``<prefix>:project:<id>:transitions`` of JSON records;
  - checkpoints: ``<prefix>:project:<id>:checkpoint:<version>``, a hash of ``tar`` (the version directory) and
    its ``sha256``, and the sorted set ``<prefix>:project:<id>:checkpoints`` of published versions. A commit
    stores the checkpoint and its set entry in one transaction, and only then moves the pointer: a pointer never
    names a checkpoint that is not there. Another host fetches a version it lacks into its own MODEL_DIR
    (backend.state.ProjectState.version_dir: checksum checked, unpacked into a temporary directory, renamed).

Redis errors and malformed records raise ``SharedStoreError``, whose message names Redis's address (password
hidden) and the key: a request fails with that in the log, a job fails visibly (RQ retries it), /health says so.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tarfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from backend.config import Config
from backend.state import FileProjectRecords, ImageKeyIndex, ProjectRecords, version_number

KEY_PREFIX = "vlm-al"
"""The prefix of every key, the job keys' too (backend.rq_jobs)."""
HASH_READ_BATCH = 1000
"""Fields read with one HMGET."""
HEALTH_CACHE_SECONDS = 1.0
_DIM = struct.Struct("<I")


class SharedStoreError(RuntimeError):
    """The shared store cannot be reached or holds a record that cannot be read; the message says which."""


class StateStore(Protocol):
    """Where the embedding cache, the image-URL index and every project's records live."""

    model_dir: Path

    def project_records(self, project_id: int) -> ProjectRecords: ...

    def project_ids(self) -> list[int]:
        """Projects that have records (to load their current models at start-up)."""

    def embedding_store(self) -> Any: ...

    def image_index(self) -> Any: ...

    def health(self) -> dict[str, Any]:
        """For /health: which store, and whether it answers."""


def build_state_store(config: Config) -> StateStore:
    """Redis when REDIS_URL is set (every replica and worker reaches the same state), else MODEL_DIR's files."""
    if config.redis_url:
        return RedisStateStore.from_url(config.redis_url, Path(config.model_dir))
    return FileStateStore(Path(config.model_dir))


class FileStateStore:
    """Files and SQLite under one MODEL_DIR: one host, or a volume every replica mounts."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)

    def project_records(self, project_id: int) -> ProjectRecords:
        return FileProjectRecords(self.model_dir / "projects" / str(int(project_id)))

    def project_ids(self) -> list[int]:
        projects_dir = self.model_dir / "projects"
        if not projects_dir.is_dir():
            return []
        return sorted(int(p.name) for p in projects_dir.iterdir() if p.is_dir() and p.name.isdigit())

    def embedding_store(self) -> Any:
        from model.embedding_store import EmbeddingStore

        return EmbeddingStore(self.model_dir / "embeddings.sqlite")

    def image_index(self) -> ImageKeyIndex:
        return ImageKeyIndex(self.model_dir / "image_keys.sqlite")

    def health(self) -> dict[str, Any]:
        return {"backend": "files"}


class RedisStateStore:
    """Every record in one Redis; MODEL_DIR keeps only this host's copies of checkpoints (and caches of exports)."""

    def __init__(self, connection: Any, model_dir: Path, prefix: str = KEY_PREFIX, address: str | None = None) -> None:
        self.redis = connection
        self.model_dir = Path(model_dir)
        self.prefix = prefix
        self.address = address or _address_of(connection)
        self._health: tuple[float, dict[str, Any]] | None = None
        self._health_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, model_dir: Path, prefix: str = KEY_PREFIX) -> RedisStateStore:
        from redis import Redis

        from backend.rq_jobs import _redacted_url

        connection = Redis.from_url(url, health_check_interval=30, socket_timeout=10, socket_connect_timeout=5)
        return cls(connection, model_dir, prefix, _redacted_url(url))

    @contextmanager
    def errors(self, what: str) -> Iterator[None]:
        """Redis's own errors as SharedStoreError naming the store and what was being done."""
        from redis.exceptions import RedisError

        try:
            yield
        except RedisError as exc:
            raise SharedStoreError(f"shared state in Redis at {self.address}: cannot {what}: "
                                   f"{type(exc).__name__}: {exc}") from exc

    def bad_data(self, key: str, problem: str) -> SharedStoreError:
        return SharedStoreError(f"shared state in Redis at {self.address}: {key} {problem}")

    def project_records(self, project_id: int) -> RedisProjectRecords:
        return RedisProjectRecords(self, int(project_id))

    def project_ids(self) -> list[int]:
        with self.errors("list projects"):
            members = self.redis.smembers(f"{self.prefix}:projects")
        return sorted(int(m) for m in members if m.isdigit())

    def embedding_store(self) -> RedisEmbeddingStore:
        return RedisEmbeddingStore(self)

    def image_index(self) -> RedisImageKeyIndex:
        return RedisImageKeyIndex(self)

    def health(self) -> dict[str, Any]:
        with self._health_lock:
            if self._health is not None and time.monotonic() - self._health[0] < HEALTH_CACHE_SECONDS:
                return self._health[1]
        try:
            with self.errors("answer a ping"):
                self.redis.ping()
            state: dict[str, Any] = {"backend": "redis", "reachable": True}
        except SharedStoreError as exc:
            state = {"backend": "redis", "reachable": False, "error": str(exc)[:300]}
        with self._health_lock:
            self._health = (time.monotonic(), state)
        return state


class RedisProjectRecords:
    """One project's documents, T history and checkpoints in Redis (backend.state.ProjectRecords)."""

    shared = True

    def __init__(self, store: RedisStateStore, project_id: int) -> None:
        self.store = store
        self.redis = store.redis
        self.project_id = project_id
        self.base = f"{store.prefix}:project:{project_id}"
        self.history_key = f"{self.base}:transitions"
        self.versions_key = f"{self.base}:checkpoints"

    def document_key(self, name: str) -> str:
        return f"{self.base}:doc:{name}"

    def checkpoint_key(self, model_version: str) -> str:
        return f"{self.base}:checkpoint:{model_version}"

    def document_stamp(self, name: str) -> object:
        with self.store.errors(f"read {self.document_key(name)}"):
            stamp = self.redis.hget(self.document_key(name), "stamp")
        return -1 if stamp is None else stamp

    def read_document(self, name: str) -> tuple[object, dict[str, Any] | None]:
        key = self.document_key(name)
        with self.store.errors(f"read {key}"):
            stamp, body = self.redis.hmget(key, ["stamp", "body"])
        if stamp is None or body is None:
            return -1, None
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self.store.bad_data(key, f"is not JSON ({exc})") from None
        if not isinstance(data, dict):
            raise self.store.bad_data(key, f"holds a JSON {type(data).__name__}, not an object")
        return stamp, data

    def write_document(self, name: str, data: Mapping[str, Any]) -> None:
        key = self.document_key(name)
        body = json.dumps(dict(data), sort_keys=True)
        with self.store.errors(f"write {key}"), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"stamp": uuid.uuid4().hex, "body": body})
            pipe.sadd(f"{self.store.prefix}:projects", self.project_id)
            pipe.execute()

    def append_history(self, line: str) -> None:
        with self.store.errors(f"append to {self.history_key}"):
            self.redis.rpush(self.history_key, line)

    def history_lines(self) -> list[str]:
        with self.store.errors(f"read {self.history_key}"):
            items = self.redis.lrange(self.history_key, 0, -1)
        return [item.decode("utf-8", errors="replace") for item in items]

    def published_versions(self) -> list[str]:
        with self.store.errors(f"read {self.versions_key}"):
            members = self.redis.zrange(self.versions_key, 0, -1)
        names = [m.decode("utf-8", errors="replace") for m in members]
        return [n for n in names if version_number(n) is not None]

    def publish_checkpoint(self, model_version: str, directory: Path) -> None:
        blob = _pack(directory)
        key = self.checkpoint_key(model_version)
        with self.store.errors(f"publish {key}"), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"tar": blob, "sha256": hashlib.sha256(blob).hexdigest()})
            pipe.zadd(self.versions_key, {model_version: version_number(model_version) or 0})
            pipe.sadd(f"{self.store.prefix}:projects", self.project_id)
            pipe.execute()

    def fetch_checkpoint(self, model_version: str, into: Path) -> bool:
        key = self.checkpoint_key(model_version)
        with self.store.errors(f"read {key}"):
            blob, digest = self.redis.hmget(key, ["tar", "sha256"])
        if blob is None:
            return False
        if digest is None or hashlib.sha256(blob).hexdigest() != digest.decode("ascii", errors="replace"):
            raise self.store.bad_data(key, "does not match its sha256 (a corrupt checkpoint)")
        _unpack(blob, into, lambda problem: self.store.bad_data(key, problem))
        return True

    def unpublish(self, model_versions: Iterable[str]) -> None:
        versions = list(model_versions)
        if not versions:
            return
        with self.store.errors(f"remove old checkpoints of project {self.project_id}"), \
                self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.versions_key, *versions)
            pipe.delete(*(self.checkpoint_key(v) for v in versions))
            pipe.execute()


class RedisEmbeddingStore:
    """model.embedding_store.EmbeddingStore's interface over Redis: float16 vectors under (namespace, content key),
    validated and encoded by the same functions; ``get_many`` returns float32."""

    def __init__(self, store: RedisStateStore) -> None:
        self.store = store
        self.redis = store.redis
        self.namespaces_key = f"{store.prefix}:vector-namespaces"

    def __repr__(self) -> str:
        return f"RedisEmbeddingStore({self.store.address!r})"

    def key(self, namespace: str) -> str:
        return f"{self.store.prefix}:vectors:{namespace}"

    def get_many(self, namespace: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        from model.embedding_store import check_namespace, decode_vector

        check_namespace(namespace)
        unique_keys = list(dict.fromkeys(keys))
        hash_key = self.key(namespace)
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(unique_keys), HASH_READ_BATCH):
            chunk = unique_keys[start : start + HASH_READ_BATCH]
            with self.store.errors(f"read {hash_key}"):
                values = self.redis.hmget(hash_key, chunk)
            for key, value in zip(chunk, values):
                if value is None:
                    continue
                where = f"shared state in Redis at {self.store.address}: vector {namespace}/{key}"
                if len(value) < _DIM.size:
                    raise SharedStoreError(f"{where} is corrupt ({len(value)} bytes)")
                (dim,) = _DIM.unpack_from(value)
                try:
                    found[key] = decode_vector(value[_DIM.size :], dim, where)
                except ValueError as exc:  # ModelInputError: the stored bytes are not `dim` float16 values
                    raise SharedStoreError(str(exc)) from None
        return found

    def put_many(self, namespace: str, vectors: Mapping[str, np.ndarray]) -> None:
        """Store (or replace) vectors in one transaction. NaN, inf and values beyond float16 are refused."""
        from model.embedding_store import check_namespace, encode_vectors

        check_namespace(namespace)
        rows = {key: _DIM.pack(dim) + data for key, dim, data in encode_vectors(vectors)}
        if not rows:
            return
        hash_key = self.key(namespace)
        with self.store.errors(f"write {hash_key}"), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(hash_key, mapping=rows)
            pipe.sadd(self.namespaces_key, namespace)
            pipe.execute()

    def count(self, namespace: str) -> int:
        with self.store.errors(f"count {self.key(namespace)}"):
            return int(self.redis.hlen(self.key(namespace)))

    def namespaces(self) -> list[str]:
        with self.store.errors(f"read {self.namespaces_key}"):
            members = self.redis.smembers(self.namespaces_key)
        return sorted(m.decode("utf-8", errors="replace") for m in members)

    def close(self) -> None:
        return None  # the connection belongs to the RedisStateStore


class RedisImageKeyIndex:
    """backend.state.ImageKeyIndex over Redis: (project, image URL) -> content key, a hash per project."""

    def __init__(self, store: RedisStateStore) -> None:
        self.store = store
        self.redis = store.redis

    def key(self, project_id: int) -> str:
        return f"{self.store.prefix}:image-keys:{int(project_id)}"

    def get_many(self, project_id: int, urls: Iterable[str]) -> dict[str, str]:
        unique_urls = list(dict.fromkeys(urls))
        hash_key = self.key(project_id)
        found: dict[str, str] = {}
        for start in range(0, len(unique_urls), HASH_READ_BATCH):
            chunk = unique_urls[start : start + HASH_READ_BATCH]
            with self.store.errors(f"read {hash_key}"):
                values = self.redis.hmget(hash_key, chunk)
            found.update((url, value.decode("ascii", errors="replace")) for url, value in zip(chunk, values)
                         if value is not None)
        return found

    def put_many(self, project_id: int, keys_by_url: Mapping[str, str]) -> None:
        if not keys_by_url:
            return
        hash_key = self.key(project_id)
        with self.store.errors(f"write {hash_key}"):
            self.redis.hset(hash_key, mapping=dict(keys_by_url))


def _pack(directory: Path) -> bytes:
    """The checkpoint directory as an uncompressed tar (safetensors weights barely compress)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(Path(directory).rglob("*")):
            tar.add(path, arcname=path.relative_to(directory).as_posix(), recursive=False)
    return buffer.getvalue()


def _unpack(blob: bytes, into: Path, bad_data: Any) -> None:
    """Regular files and directories only, inside ``into`` (tarfile's ``data`` filter refuses the rest)."""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            members: Sequence[tarfile.TarInfo] = tar.getmembers()
            odd = [m.name for m in members if not (m.isfile() or m.isdir())]
            if odd:
                raise bad_data(f"holds entries that are not files: {odd[:3]}")
            tar.extractall(into, filter="data")
    except tarfile.TarError as exc:  # the data filter's refusals (absolute paths, links out, ...) included
        raise bad_data(f"is not a readable checkpoint archive ({exc})") from None


def _address_of(connection: Any) -> str:
    kwargs = getattr(getattr(connection, "connection_pool", None), "connection_kwargs", {})
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"
