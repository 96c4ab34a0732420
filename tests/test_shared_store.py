"""The Redis state store (backend/shared_store.py) on a real redis-server started here on 127.0.0.1: two
ProjectStates with separate MODEL_DIRs stand for two hosts sharing one Redis."""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from redis import Redis
from test_rq_jobs import free_port, redis, redis_port  # noqa: F401  (the real redis-server fixtures)

from backend.config import Config
from backend.projects import Projects
from backend.shared_store import (
    FileStateStore,
    RedisStateStore,
    SharedStoreError,
    build_state_store,
)
from backend.state import ProjectState
from model.embedding_store import EmbeddingStore
from model.errors import ModelInputError

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian redis-server (scripts/setup.sh)"),
]

PROJECT = 7


def write_checkpoint(text: str):
    def write(directory: Path) -> None:
        (directory / "weights.bin").write_bytes(text.encode() * 1000)
        (directory / "metadata.json").write_text(f'{{"text": "{text}"}}')
        (directory / "extra").mkdir()
        (directory / "extra" / "note.txt").write_text(text)

    return write


def host(redis: Redis, model_dir: Path) -> ProjectState:  # noqa: F811
    """One replica's view: its own MODEL_DIR, the shared Redis."""
    return ProjectState(model_dir, PROJECT, RedisStateStore(redis, model_dir).project_records(PROJECT))


def test_a_checkpoint_committed_on_one_host_is_fetched_by_another(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    assert web.current() is None and web.list_versions() == [] and web.next_version() == "vlm-al-v1"
    committed = worker.commit_version("vlm-al-v1", write_checkpoint("one"), "schema", {"n_fine": 3})
    assert web.current() == committed  # the pointer is in Redis, not in a's MODEL_DIR
    assert web.list_versions() == ["vlm-al-v1"] and web.next_version() == "vlm-al-v2"
    assert not (tmp_path / "b" / "projects" / str(PROJECT) / "versions" / "vlm-al-v1").exists()
    directory = web.version_dir("vlm-al-v1")  # fetched into b's MODEL_DIR
    assert directory == tmp_path / "b" / "projects" / str(PROJECT) / "versions" / "vlm-al-v1"
    for name in ("weights.bin", "metadata.json", "extra/note.txt"):
        assert (directory / name).read_bytes() == (worker.version_dir("vlm-al-v1") / name).read_bytes()
    assert [p.name for p in directory.parent.iterdir()] == ["vlm-al-v1"]  # no temporary directory left
    assert web.version_dir("vlm-al-v404").exists() is False  # never published: simply absent
    assert not (tmp_path / "a" / "projects" / str(PROJECT) / "current.json").exists()


def test_a_reader_never_sees_a_pointer_to_a_missing_checkpoint(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    worker.commit_version("vlm-al-v1", write_checkpoint("v1"), "schema")
    stop = threading.Event()
    seen: list[str] = []
    problems: list[str] = []

    def read() -> None:
        reader = host(redis, tmp_path / "b")
        while not stop.is_set():
            version = reader.current().model_version
            directory = reader.version_dir(version)
            if directory.is_dir():
                text = (directory / "extra" / "note.txt").read_text()
                if text != version.removeprefix("vlm-al-"):
                    problems.append(f"{version} holds {text!r}")
            elif reader.current().model_version == version:  # gone while the pointer names it
                problems.append(f"{version} is missing")
            seen.append(version)

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for number in range(2, 31):
            worker.commit_version(f"vlm-al-v{number}", write_checkpoint(f"v{number}"), "schema")
            worker.prune_versions(keep=2)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert problems == []
    assert len(set(seen)) >= 3, "the reader did not follow the pointer"
    assert web.current().model_version == "vlm-al-v30"


def test_a_failed_publish_leaves_the_pointer_on_the_previous_version(redis, tmp_path):  # noqa: F811
    worker = host(redis, tmp_path / "a")
    worker.commit_version("vlm-al-v1", write_checkpoint("one"), "schema")
    dead = RedisStateStore(Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1), tmp_path / "a")
    unreachable = ProjectState(tmp_path / "a", PROJECT, dead.project_records(PROJECT))
    with pytest.raises(SharedStoreError, match=r"shared state in Redis at 127\.0\.0\.1:\d+/0: cannot publish"):
        unreachable.commit_version("vlm-al-v2", write_checkpoint("two"), "schema")
    assert host(redis, tmp_path / "b").current().model_version == "vlm-al-v1"
    assert worker.list_versions() == ["vlm-al-v1"]
    # the next fit numbers past the unpublished local directory and publishes normally
    worker.commit_version(worker.next_version(), write_checkpoint("two"), "schema")
    assert host(redis, tmp_path / "c").current().model_version == "vlm-al-v2"


def test_pruning_removes_versions_from_redis_and_later_from_other_hosts(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    for number in (1, 2, 3):
        worker.commit_version(f"vlm-al-v{number}", write_checkpoint(str(number)), "schema")
    web.version_dir("vlm-al-v2")
    web.version_dir("vlm-al-v3")
    assert worker.prune_versions(keep=1) == ["vlm-al-v1", "vlm-al-v2"]
    assert web.list_versions() == ["vlm-al-v3"]
    assert not redis.exists(f"vlm-al:project:{PROJECT}:checkpoint:vlm-al-v1", f"vlm-al:project:{PROJECT}:checkpoint:vlm-al-v2")
    assert sorted(p.name for p in (tmp_path / "a" / "projects" / str(PROJECT) / "versions").iterdir()) == ["vlm-al-v3"]
    worker.commit_version("vlm-al-v4", write_checkpoint("4"), "schema")
    web.version_dir("vlm-al-v4")  # a fetch drops the host's copies of versions pruned elsewhere
    assert sorted(p.name for p in (tmp_path / "b" / "projects" / str(PROJECT) / "versions").iterdir()) == [
        "vlm-al-v3", "vlm-al-v4"]


def test_bad_records_in_redis_are_clear_errors(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    worker.commit_version("vlm-al-v1", write_checkpoint("one"), "schema")
    key = f"vlm-al:project:{PROJECT}:checkpoint:vlm-al-v1"
    redis.hset(key, "tar", redis.hget(key, "tar")[:-700] + b"x" * 700)
    with pytest.raises(SharedStoreError, match="does not match its sha256"):
        web.version_dir("vlm-al-v1")
    assert not (tmp_path / "b" / "projects" / str(PROJECT) / "versions" / "vlm-al-v1").exists()
    redis.hset(key, mapping={"tar": b"not a tar", "sha256": hashlib.sha256(b"not a tar").hexdigest()})
    with pytest.raises(SharedStoreError, match="not a readable checkpoint archive"):
        web.version_dir("vlm-al-v1")
    assert [p.name for p in (tmp_path / "b" / "projects" / str(PROJECT) / "versions").iterdir()] == []
    redis.hset(f"vlm-al:project:{PROJECT}:doc:current", mapping={"stamp": "x", "body": "{not json"})
    with pytest.raises(SharedStoreError, match=f"vlm-al:project:{PROJECT}:doc:current is not JSON"):
        web.current()


def test_the_t_history_is_one_redis_list_every_host_reads(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    worker.append_transition({"model_version": "vlm-al-v1", "n_trusted": 1})
    redis.rpush(f"vlm-al:project:{PROJECT}:transitions", '{"model_version": "vlm-al-v')  # a torn record
    host(redis, tmp_path / "c").append_transition({"model_version": "vlm-al-v2", "n_trusted": 2})
    worker.append_transition({"model_version": "vlm-al-v1", "n_trusted": 5})  # a repeat: the committed one wins
    assert [(h["model_version"], h["n_trusted"]) for h in web.transition_history()] == [
        ("vlm-al-v1", 5), ("vlm-al-v2", 2)]
    assert not (tmp_path / "a" / "projects" / str(PROJECT) / "transition_history.jsonl").exists()


def test_documents_are_shared_and_reread_only_when_rewritten(redis, tmp_path):  # noqa: F811
    worker, web = host(redis, tmp_path / "a"), host(redis, tmp_path / "b")
    worker.write_priorities("vlm-al-v1", {3: 0.25, 4: 0.5})
    assert web.priorities() == ("vlm-al-v1", {3: 0.25, 4: 0.5})
    first = web.priorities()
    assert web.priorities() is first  # same stamp: served from memory
    worker.write_task_list("image", [{"id": 1, "data": {"image": "http://x/1.png"}}, {"id": 2, "data": {}}])
    tasks = web.task_list()
    assert tasks.ids.tolist() == [1, 2] and tasks.urls == ["http://x/1.png", None]
    worker.record_pushed("vlm-al-v1", [3])
    web.record_pushed("vlm-al-v1", [4])
    assert worker.pushed_tasks("vlm-al-v1") == {3, 4}
    worker.record_label_studio_versions(pushed=["vlm-al-v1", "vlm-al-v2"])
    assert web.record_label_studio_versions(deleted=["vlm-al-v1"]) == ["vlm-al-v2"]
    assert RedisStateStore(redis, tmp_path).project_ids() == [PROJECT]


def test_embeddings_round_trip_as_the_sqlite_store_gives_them(redis, tmp_path):  # noqa: F811
    store = RedisStateStore(redis, tmp_path).embedding_store()
    sqlite = EmbeddingStore(tmp_path / "e.sqlite")
    rng = np.random.default_rng(0)
    vectors = {f"key{i}": rng.normal(size=1280).astype(np.float32) for i in range(2500)}
    store.put_many("backbone", vectors)
    sqlite.put_many("backbone", vectors)
    keys = [*vectors, "missing"]
    got, expected = store.get_many("backbone", keys), sqlite.get_many("backbone", keys)
    assert set(got) == set(vectors)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], expected[k]) for k in vectors)
    assert np.max(np.abs(got["key0"] - vectors["key0"])) < 2e-3  # float16
    assert RedisStateStore(redis, tmp_path / "other").embedding_store().get_many("weak:x", ["key0"]) == {}
    store.put_many("weak:x", {"key0": np.array([0.25, 0.75])})
    assert store.count("backbone") == 2500 and store.namespaces() == ["backbone", "weak:x"]
    with pytest.raises(ModelInputError, match="NaN"):
        store.put_many("backbone", {"bad": np.array([np.nan, 1.0])})
    redis.hset("vlm-al:vectors:backbone", "key1", b"\x05\x00\x00\x00abc")
    with pytest.raises(SharedStoreError, match="vector backbone/key1 is corrupt"):
        store.get_many("backbone", ["key1"])


def test_the_image_key_index_is_shared(redis, tmp_path):  # noqa: F811
    one = RedisStateStore(redis, tmp_path / "a").image_index()
    two = RedisStateStore(redis, tmp_path / "b").image_index()
    one.put_many(PROJECT, {f"http://ls/{i}.png": f"sha{i}" for i in range(1500)})
    found = two.get_many(PROJECT, [f"http://ls/{i}.png" for i in range(0, 1600, 100)])
    assert found == {f"http://ls/{i}.png": f"sha{i}" for i in range(0, 1500, 100)}
    assert two.get_many(PROJECT + 1, ["http://ls/1.png"]) == {}


def test_the_served_model_follows_the_redis_pointer(redis, tmp_path):  # noqa: F811
    loads: list[Path] = []

    def loader(directory: Path, hierarchy: object) -> SimpleNamespace:
        loads.append(directory)
        return SimpleNamespace(text=(directory / "extra" / "note.txt").read_text(), hierarchy=None)

    web = Projects(tmp_path / "b", classifier_loader=loader, state_store=RedisStateStore(redis, tmp_path / "b"))
    assert web.served_model(PROJECT, None) == (None, "vlm-al-v0")
    worker = host(redis, tmp_path / "a")
    worker.commit_version("vlm-al-v1", write_checkpoint("first"), "schema")
    model, version = web.served_model(PROJECT, None)
    assert (model.text, version) == ("first", "vlm-al-v1")
    assert web.served_model(PROJECT, None)[0] is model and len(loads) == 1  # unchanged pointer: no reload
    worker.commit_version("vlm-al-v2", write_checkpoint("second"), "schema")
    assert web.served_model(PROJECT, None)[0].text == "second"
    assert loads[-1].is_relative_to(tmp_path / "b")
    restarted = Projects(tmp_path / "c", classifier_loader=loader, state_store=RedisStateStore(redis, tmp_path / "c"))
    restarted.warm_start()
    assert restarted.loaded_versions() == {PROJECT: "vlm-al-v2"}


def test_health_and_the_factory(redis, tmp_path, redis_port):  # noqa: F811
    store = build_state_store(Config(model_dir=tmp_path, redis_url=f"redis://:secret-pw@127.0.0.1:{redis_port}/0"))
    assert isinstance(store, RedisStateStore)
    assert store.health() == {"backend": "redis", "reachable": True}
    assert "secret-pw" not in store.address
    assert isinstance(build_state_store(Config(model_dir=tmp_path)), FileStateStore)
    dead = build_state_store(Config(model_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    health = dead.health()
    assert health["reachable"] is False and "cannot answer a ping" in health["error"]
    with pytest.raises(SharedStoreError, match="cannot read vlm-al:project:1:doc:current"):
        ProjectState(tmp_path, 1, dead.project_records(1)).current()
