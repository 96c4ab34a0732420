"""An on-disk cache of vectors keyed by image content, so no image is embedded (or weakly labeled) twice.

SQLite in WAL mode: any number of readers and one writer at a time, across threads and processes; a writer
that finds the database busy waits (busy_timeout) instead of failing.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from model.errors import ModelInputError

_SQLITE_MAX_VARIABLES = 900  # stay well below SQLite's per-statement parameter limit on old builds
_FLOAT16_MAX = float(np.finfo(np.float16).max)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    dim INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID
"""


def content_key(data: bytes) -> str:
    """The store key of an image: sha256 of its bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def check_namespace(namespace: str) -> None:
    if not isinstance(namespace, str) or not namespace:
        raise ModelInputError(f"namespace must be a non-empty string, got {namespace!r}")


def encode_vectors(vectors: Mapping[str, np.ndarray]) -> list[tuple[str, int, bytes]]:
    """``(key, dim, little-endian float16 bytes)`` per vector, the stored form of every embedding store.

    NaN, inf, values beyond float16's range and keys that are not non-empty strings are refused."""
    rows = []
    for key, vector in vectors.items():
        if not isinstance(key, str) or not key:
            raise ModelInputError(f"store keys must be non-empty strings, got {key!r}")
        array = np.asarray(vector)
        if array.ndim != 1 or array.size == 0:
            raise ModelInputError(f"vector for {key!r} must be 1-D and non-empty, got shape {array.shape}")
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
            raise ModelInputError(f"vector for {key!r} holds NaN, inf or non-numbers")
        if np.any(np.abs(array) > _FLOAT16_MAX):
            raise ModelInputError(f"vector for {key!r} has values beyond float16's range ±{_FLOAT16_MAX:g}")
        rows.append((key, int(array.size), array.astype("<f2").tobytes()))
    return rows


def decode_vector(data: bytes, dim: int, where: str) -> np.ndarray:
    """The float32 vector of stored float16 bytes; ModelInputError naming ``where`` when they are not ``dim`` long."""
    if len(data) != 2 * dim or dim <= 0:
        raise ModelInputError(f"{where} is corrupt ({len(data)} bytes for {dim} float16 values)")
    return np.frombuffer(data, dtype="<f2").astype(np.float32)


class EmbeddingStore:
    """float16 vectors on disk under ``(namespace, key)``; ``get_many`` returns float32.

    A namespace is the producer's stable name (a backbone name, or ``weak:<annotator name>``), so vectors from
    different models never mix. Each thread gets its own connection.
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._connections: dict[threading.Thread, sqlite3.Connection] = {}
        """Each thread's connection, so ``close`` reaches all of them and a finished thread's is closed."""
        self._lock = threading.Lock()
        self._closed = False
        connection = self._connection()
        # WAL is a property of the file: set once, every later connection (any process) uses it.
        connection.execute("PRAGMA journal_mode=WAL")
        with connection:
            connection.execute(_SCHEMA)

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.path)!r})"

    def __enter__(self) -> EmbeddingStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._closed:
            raise ModelInputError(f"{self!r} is closed")
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = sqlite3.connect(
                str(self.path), timeout=self._busy_timeout_ms / 1000, check_same_thread=False, isolation_level=None
            )
            connection.execute(f"PRAGMA busy_timeout={self._busy_timeout_ms}")
            # In WAL mode NORMAL never corrupts the file; a crash can lose only the last commits of a cache.
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            with self._lock:
                # Threads come and go (an index's chunk threads are new for every page): the connections of the
                # finished ones are closed here. Held, they kept about 0.5 MB each: 600 threads that each wrote and
                # read 64 vectors grew a process by 330 MB (a probe, not saved), as many as index 100,000 images.
                for thread in [thread for thread in self._connections if not thread.is_alive()]:
                    self._connections.pop(thread).close()
                self._connections[threading.current_thread()] = connection
        return connection

    def close(self) -> None:
        """Close every connection this object opened (in any thread). Later calls raise."""
        with self._lock:
            self._closed = True
            for connection in self._connections.values():
                connection.close()
            self._connections.clear()

    @staticmethod
    def _check_namespace(namespace: str) -> None:
        check_namespace(namespace)

    def get_many(self, namespace: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
        """Vectors found for ``keys`` (missing keys are simply absent), as float32."""
        self._check_namespace(namespace)
        unique_keys = list(dict.fromkeys(keys))
        found: dict[str, np.ndarray] = {}
        connection = self._connection()
        for start in range(0, len(unique_keys), _SQLITE_MAX_VARIABLES):
            chunk = unique_keys[start : start + _SQLITE_MAX_VARIABLES]
            placeholders = ",".join("?" * len(chunk))
            rows = connection.execute(
                f"SELECT key, dim, data FROM vectors WHERE namespace = ? AND key IN ({placeholders})",
                [namespace, *chunk],
            ).fetchall()
            for key, dim, data in rows:
                found[key] = decode_vector(data, dim, f"{self.path}: stored vector {namespace}/{key}")
        return found

    def put_many(self, namespace: str, vectors: Mapping[str, np.ndarray]) -> None:
        """Store (or replace) vectors in one transaction. NaN, inf and values beyond float16 are refused."""
        self._check_namespace(namespace)
        rows = [(namespace, key, dim, data) for key, dim, data in encode_vectors(vectors)]
        if not rows:
            return
        connection = self._connection()
        # BEGIN IMMEDIATE takes the write lock up front, so concurrent writers queue on busy_timeout
        # instead of failing on a lock upgrade.
        connection.execute("BEGIN IMMEDIATE")
        try:
            connection.executemany(
                "INSERT OR REPLACE INTO vectors (namespace, key, dim, data) VALUES (?, ?, ?, ?)", rows
            )
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def count(self, namespace: str) -> int:
        self._check_namespace(namespace)
        (n,) = self._connection().execute("SELECT COUNT(*) FROM vectors WHERE namespace = ?", [namespace]).fetchone()
        return int(n)

    def namespaces(self) -> list[str]:
        rows = self._connection().execute("SELECT DISTINCT namespace FROM vectors ORDER BY namespace").fetchall()
        return [row[0] for row in rows]
