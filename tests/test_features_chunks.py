"""Indexing in chunks with downloads overlapping compute, and image work shared between /predict and the index job
(FeatureExtractor against the fake Label Studio over real HTTP)."""

from __future__ import annotations

import threading
import time

import numpy as np
from conftest import PROJECT_ID, counter_value

from backend import features as features_module
from backend.features import LocalInflightClaims
from backend.ls_client import LabelStudioClient

FINES = ["T-shirt", "Shirt", "Sneaker", "Boot"]


def add_tasks(fake_ls, n: int) -> None:
    for task_id in range(1, n + 1):
        fake_ls.add_task(task_id, FINES[(task_id - 1) % 4])


class Timeline:
    """When each download and each embedding call ran (monotonic seconds), from any thread."""

    def __init__(self) -> None:
        self.downloads: list[float] = []
        self.embeds: list[tuple[float, float]] = []
        self.lock = threading.Lock()


def instrument(monkeypatch, parts, timeline: Timeline, embed_seconds: float) -> None:
    real_download = LabelStudioClient.download_image
    real_embed = parts.backbone.embed

    def download(self, url, task_id=None):
        with timeline.lock:
            timeline.downloads.append(time.monotonic())
        return real_download(self, url, task_id=task_id)

    def embed(images):
        began = time.monotonic()
        time.sleep(embed_seconds)  # a backbone slow enough to see what happens meanwhile
        out = real_embed(images)
        with timeline.lock:
            timeline.embeds.append((began, time.monotonic()))
        return out

    monkeypatch.setattr(LabelStudioClient, "download_image", download)
    monkeypatch.setattr(parts.backbone, "embed", embed)


def test_indexing_works_in_chunks_and_downloads_while_it_computes(fake_ls, make_config, make_backend, monkeypatch):
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    add_tasks(fake_ls, 48)
    parts = make_backend(make_config(push_predictions=False))
    timeline = Timeline()
    instrument(monkeypatch, parts, timeline, embed_seconds=0.15)
    parts.backend.run_index(PROJECT_ID)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 48
    assert len(fake_ls.downloads) == 48
    assert len(timeline.embeds) == 6  # one call per chunk of 8
    # overlap: some image was downloaded while an earlier chunk was being embedded
    overlapped = [t for t in timeline.downloads if any(start < t < end for start, end in timeline.embeds)]
    assert overlapped, "no download ran during an embedding call"
    # and the work is not done all-downloads-first: the first embedding starts before the last download
    assert min(start for start, _ in timeline.embeds) < max(timeline.downloads)


def test_predict_during_indexing_never_embeds_an_image_twice(fake_ls, make_config, make_backend, monkeypatch):
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    add_tasks(fake_ls, 40)
    parts = make_backend(make_config(push_predictions=False))
    instrument(monkeypatch, parts, Timeline(), embed_seconds=0.05)
    labeling = parts.backend.labeling(fake_ls.label_config)
    errors: list[BaseException] = []

    def index() -> None:
        try:
            parts.backend.run_index(PROJECT_ID)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    thread = threading.Thread(target=index)
    thread.start()
    # /predict's own worker path, on tasks the index job is working on at the same time
    predicted = parts.backend.extractor.features(PROJECT_ID, fake_ls.tasks[10:30], labeling)
    thread.join(timeout=60)
    assert not errors
    assert not predicted.pending and not predicted.errors
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 40
    assert len(fake_ls.downloads) == 40


def test_local_claims_wait_for_the_holder():
    claims = LocalInflightClaims()
    assert claims.claim(1, ["a", "b"]) == {"a", "b"}
    assert claims.claim(1, ["b", "c"]) == {"c"}
    assert claims.claim(2, ["a"]) == {"a"}
    threading.Timer(0.2, lambda: claims.release(1, ["a", "b"])).start()
    started = time.monotonic()
    claims.wait(1, ["a", "b"], timeout=5)
    assert 0.1 < time.monotonic() - started < 3
    claims.wait(1, ["c"], timeout=0.1)  # held by this caller: gives up at the timeout


def test_a_whole_project_read_is_kept_and_the_next_reads_only_new_vectors(fake_ls, make_config, make_backend,
                                                                          monkeypatch):
    """A fit reads every task's vectors; the next fit of the project reads from the store only what is new."""
    monkeypatch.setattr(features_module, "RESIDENT_MIN_ROWS", 16)
    add_tasks(fake_ls, 24)
    parts = make_backend(make_config(push_predictions=False))
    backend = parts.backend
    backend.run_index(PROJECT_ID)
    labeling = backend.labeling(fake_ls.label_config)
    store = backend.extractor.store
    asked: list[str] = []
    real_get_many = store.get_many

    def counting_get_many(namespace, keys):
        keys = list(keys)
        asked.extend(keys)
        return real_get_many(namespace, keys)

    monkeypatch.setattr(store, "get_many", counting_get_many)
    first = backend.extractor.features(PROJECT_ID, fake_ls.tasks, labeling)
    assert asked == [] and len(first.usable_positions()) == 24  # the index's read was kept
    fake_ls.add_task(25, FINES[0])
    fake_ls.add_task(26, FINES[1])
    tasks = fake_ls.tasks
    second = backend.extractor.features(PROJECT_ID, tasks, labeling)
    assert len(second.usable_positions()) == 26
    new_keys = {second.keys[24], second.keys[25]}
    assert set(asked) <= new_keys  # the store was read for the two new images only (they were just computed)
    assert second.pool_embeddings(list(range(26))).shape == (26, first.pool_embeddings([0]).shape[1])
    fresh = real_get_many(backend.backbone.name, [second.keys[0], second.keys[25]])
    np.testing.assert_array_equal(second.embedding_matrix([0, 25]), np.stack([fresh[second.keys[0]],
                                                                               fresh[second.keys[25]]]))
    asked.clear()
    third = backend.extractor.features(PROJECT_ID, tasks, labeling)
    assert asked == [] and third.pool_embeddings(list(range(26))).base is not None  # a view of the kept matrix
