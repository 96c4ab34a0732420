import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from model.embedding_store import EmbeddingStore, content_key
from model.errors import ModelInputError

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_content_key_is_sha256_hex():
    assert content_key(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_key(b"abc") != content_key(b"abd")


def test_round_trip_within_float16_precision(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {f"k{i}": rng.normal(size=37).astype(np.float32) for i in range(50)}
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        store.put_many("timm:x", vectors)
        got = store.get_many("timm:x", list(vectors) + ["absent"])
    assert set(got) == set(vectors)
    for key, vector in vectors.items():
        assert got[key].dtype == np.float32 and got[key].shape == (37,)
        np.testing.assert_allclose(got[key], vector, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(got[key], vector.astype(np.float16).astype(np.float32))


def test_many_keys_cross_the_parameter_chunking(tmp_path):
    vectors = {f"k{i}": np.full(4, i % 100, dtype=np.float32) for i in range(2500)}
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        store.put_many("ns", vectors)
        got = store.get_many("ns", vectors.keys())
        assert store.count("ns") == 2500
    assert len(got) == 2500
    assert all(got[f"k{i}"][0] == i % 100 for i in range(2500))


def test_namespaces_are_separate_and_puts_replace(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        store.put_many("a", {"same": np.ones(3)})
        store.put_many("weak:b", {"same": np.full(5, 2.0)})
        assert store.get_many("a", ["same"])["same"].tolist() == [1.0, 1.0, 1.0]
        assert store.get_many("weak:b", ["same"])["same"].tolist() == [2.0] * 5
        assert store.count("a") == 1 and store.count("weak:b") == 1 and store.count("c") == 0
        store.put_many("a", {"same": np.zeros(3)})
        assert store.get_many("a", ["same"])["same"].tolist() == [0.0, 0.0, 0.0]
        assert store.count("a") == 1
        assert store.namespaces() == ["a", "weak:b"]


def test_reopen_after_close_keeps_vectors_and_uses_wal(tmp_path):
    path = tmp_path / "nested" / "store.sqlite"
    store = EmbeddingStore(path)
    store.put_many("ns", {"k": np.arange(6, dtype=np.float32)})
    store.close()
    with pytest.raises(ModelInputError, match="closed"):
        store.get_many("ns", ["k"])
    reopened = EmbeddingStore(path)
    np.testing.assert_array_equal(reopened.get_many("ns", ["k"])["k"], np.arange(6, dtype=np.float32))
    reopened.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    "vector, message",
    [
        (np.array([1.0, np.nan]), "NaN"),
        (np.array([1.0, np.inf]), "NaN"),
        (np.array([1e6, 0.0]), "float16"),
        (np.zeros((2, 2)), "1-D"),
        (np.zeros(0), "1-D"),
        (np.array(["a", "b"]), "non-numbers"),
    ],
)
def test_bad_vectors_are_refused_and_nothing_is_written(tmp_path, vector, message):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        with pytest.raises(ModelInputError, match=message):
            store.put_many("ns", {"good": np.ones(2), "bad": vector})
        assert store.count("ns") == 0


def test_bad_namespace_and_keys_are_refused(tmp_path):
    with EmbeddingStore(tmp_path / "store.sqlite") as store:
        with pytest.raises(ModelInputError, match="namespace"):
            store.get_many("", ["k"])
        with pytest.raises(ModelInputError, match="keys"):
            store.put_many("ns", {"": np.ones(2)})


def _expected(index: int) -> np.ndarray:
    return np.full(16, index % 997, dtype=np.float32)


def test_threads_read_consistent_vectors_while_one_writes(tmp_path):
    store = EmbeddingStore(tmp_path / "store.sqlite")
    keys = [f"k{i}" for i in range(600)]
    errors: list[BaseException] = []
    writer_done = threading.Event()

    def writer() -> None:
        try:
            for start in range(0, len(keys), 30):
                store.put_many("ns", {k: _expected(i) for i, k in enumerate(keys) if start <= i < start + 30})
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            writer_done.set()

    def reader() -> None:
        try:
            last_count = 0
            while True:
                finished = writer_done.is_set()
                got = store.get_many("ns", keys)
                assert len(got) >= last_count  # committed batches never disappear
                last_count = len(got)
                for key, vector in got.items():
                    np.testing.assert_array_equal(vector, _expected(int(key[1:])))
                if finished:
                    assert last_count == len(keys)
                    return
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    store.close()
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)


def test_processes_read_while_another_process_writes(tmp_path):
    path = tmp_path / "store.sqlite"
    EmbeddingStore(path).close()
    writer_code = textwrap.dedent(
        f"""
        import numpy as np
        from model.embedding_store import EmbeddingStore
        store = EmbeddingStore({str(path)!r})
        for start in range(0, 400, 20):
            store.put_many("ns", {{f"k{{i}}": np.full(16, i % 997, dtype=np.float32) for i in range(start, start + 20)}})
        store.close()
        """
    )
    reader_code = textwrap.dedent(
        f"""
        import numpy as np, time
        from model.embedding_store import EmbeddingStore
        store = EmbeddingStore({str(path)!r})
        keys = [f"k{{i}}" for i in range(400)]
        seen = 0
        deadline = time.time() + 60
        while seen < 400 and time.time() < deadline:
            got = store.get_many("ns", keys)
            assert len(got) >= seen
            seen = len(got)
            for key, vector in got.items():
                assert np.array_equal(vector, np.full(16, int(key[1:]) % 997, dtype=np.float32)), key
        print(seen)
        """
    )
    run = dict(cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    readers = [subprocess.Popen([sys.executable, "-c", reader_code], **run) for _ in range(2)]
    writer = subprocess.Popen([sys.executable, "-c", writer_code], **run)
    # This process reads too, while the others run.
    with EmbeddingStore(path) as store:
        while writer.poll() is None:
            for key, vector in store.get_many("ns", [f"k{i}" for i in range(400)]).items():
                np.testing.assert_array_equal(vector, _expected(int(key[1:])))
    assert writer.wait(timeout=60) == 0, writer.stderr.read()
    for reader in readers:
        out, err = reader.communicate(timeout=60)
        assert reader.returncode == 0, err
        assert out.strip() == "400"


def test_a_finished_threads_connection_is_closed_when_another_thread_connects(tmp_path):
    """An index works each page's chunks on new threads: their connections must not pile up (each held about 0.5 MB
    of sqlite's cache)."""
    store = EmbeddingStore(tmp_path / "store.sqlite")
    opened: list[sqlite3.Connection] = []

    def work(n: int) -> None:
        store.put_many("ns", {f"k{n}": np.full(8, n, dtype=np.float32)})
        assert f"k{n}" in store.get_many("ns", [f"k{n}"])
        opened.append(store._connection())

    for n in range(20):
        thread = threading.Thread(target=work, args=(n,))
        thread.start()
        thread.join()
    assert len(store._connections) <= 2  # this thread's and the last worker's, whose thread had not ended yet
    for connection in opened[:-1]:
        with pytest.raises(sqlite3.ProgrammingError, match="closed"):
            connection.execute("SELECT 1")
    assert len(store.get_many("ns", [f"k{n}" for n in range(20)])) == 20
    store.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        opened[-1].execute("SELECT 1")
