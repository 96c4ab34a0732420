"""Indexing in chunks with downloads overlapping compute, and image work shared between /predict and the index job
(FeatureExtractor against the fake Label Studio over real HTTP)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image
from conftest import PROJECT_ID, FakeBackbone, counter_value

from backend import features as features_module
from backend.features import LocalInflightClaims
from backend.ls_client import LabelStudioClient
from model.embedding_store import content_key
from model.images import decode_image

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


def paged_backend(fake_ls, make_config, make_backend, monkeypatch, n_tasks: int, page_size: int,
                  embed_seconds: float) -> tuple[object, Timeline]:
    """A backend (no push) over ``n_tasks`` tasks that Label Studio lists ``page_size`` at a time, its backbone
    taking ``embed_seconds`` per call, and the timeline of its downloads and embeddings."""
    from backend import ls_client

    monkeypatch.setattr(ls_client, "TASK_PAGE_SIZE", page_size)
    add_tasks(fake_ls, n_tasks)
    parts = make_backend(make_config(push_predictions=False))
    timeline = Timeline()
    instrument(monkeypatch, parts, timeline, embed_seconds=embed_seconds)
    return parts, timeline


def index_48_tasks_in_chunks_of_8(fake_ls, make_config, make_backend, monkeypatch) -> tuple[object, Timeline]:
    """Index 48 tasks, 8 per chunk, with a backbone that takes 0.15 s per chunk; the backend and its timeline."""
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    add_tasks(fake_ls, 48)
    parts = make_backend(make_config(push_predictions=False))
    timeline = Timeline()
    instrument(monkeypatch, parts, timeline, embed_seconds=0.15)
    parts.backend.run_index(PROJECT_ID)
    return parts, timeline


def test_indexing_works_in_chunks_and_downloads_while_it_computes(fake_ls, make_config, make_backend, monkeypatch):
    parts, timeline = index_48_tasks_in_chunks_of_8(fake_ls, make_config, make_backend, monkeypatch)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 48
    assert len(fake_ls.downloads) == 48
    assert len(timeline.embeds) == 6  # one call per chunk of 8
    # overlap: some image was downloaded while an earlier chunk was being embedded
    overlapped = [t for t in timeline.downloads if any(start < t < end for start, end in timeline.embeds)]
    assert overlapped, "no download ran during an embedding call"
    # and the work is not done all-downloads-first: the first embedding starts before the last download
    assert min(start for start, _ in timeline.embeds) < max(timeline.downloads)


def test_a_chunk_is_decoded_and_preprocessed_while_another_runs_its_forward_pass(fake_ls, make_config, make_backend,
                                                                                   monkeypatch):
    """A backbone with array preprocessing (preprocess_batch + forward_pixels, as both timm runtimes have): the
    forward pass alone holds the compute slot, so the next chunk's preparation overlaps it, and the vectors are the
    ones the image path gives."""
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    add_tasks(fake_ls, 48)
    parts = make_backend(make_config(push_predictions=False))
    backbone = parts.backbone
    prepared: list[tuple[float, float]] = []
    forwards: list[tuple[float, float]] = []
    lock = threading.Lock()

    def preprocess_batch(images):
        began = time.monotonic()
        pixels = np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0
                           for image in images])
        with lock:
            prepared.append((began, time.monotonic()))
        return pixels

    def forward_pixels(pixels, with_logits=False):
        began = time.monotonic()
        time.sleep(0.15)
        with lock:
            forwards.append((began, time.monotonic()))
        return np.concatenate([pixels, 1.0 - pixels], axis=1).astype(np.float32), None

    monkeypatch.setattr(backbone, "preprocess_batch", preprocess_batch, raising=False)
    monkeypatch.setattr(backbone, "forward_pixels", forward_pixels, raising=False)
    parts.backend.run_index(PROJECT_ID)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 48
    assert backbone.images_embedded == 0 and len(forwards) == len(prepared) == 6  # the pixel path, chunk by chunk
    assert any(start < began < end for began, _ in prepared for start, end in forwards), \
        "no chunk was prepared while another ran its forward pass"
    files = list(fake_ls.files.values())
    stored = parts.store.get_many(backbone.name, [content_key(data) for data in files])
    assert len(stored) == 48
    np.testing.assert_allclose(np.stack([stored[content_key(data)] for data in files]),
                               FakeBackbone().embed([decode_image(data) for data in files]), atol=1e-3)


def most_chunks_prepared_at_once(fake_ls, make_config, make_backend, monkeypatch, device: str) -> int:
    """One features() call over 48 tasks in chunks of 8, by a backbone on ``device`` with the pixel path whose
    preprocessing takes 0.1 s a chunk, on a machine of 4 cores: the most chunks that were being prepared at once."""
    import model.runtime

    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    monkeypatch.setattr(model.runtime, "default_threads", lambda: 4)
    monkeypatch.setattr(FakeBackbone, "device", device, raising=False)
    add_tasks(fake_ls, 48)
    parts = make_backend(make_config(push_predictions=False))
    active = [0, 0]  # now, most
    lock = threading.Lock()

    def preprocess_batch(images):
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.1)
        with lock:
            active[0] -= 1
        return np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0 for image in images])

    def forward_pixels(pixels, with_logits=False):
        return np.concatenate([pixels, 1.0 - pixels], axis=1).astype(np.float32), None

    monkeypatch.setattr(parts.backbone, "preprocess_batch", preprocess_batch, raising=False)
    monkeypatch.setattr(parts.backbone, "forward_pixels", forward_pixels, raising=False)
    labeling = parts.backend.labeling(fake_ls.label_config)
    result = parts.backend.extractor.features(PROJECT_ID, fake_ls.tasks, labeling)
    assert not result.errors and not result.pending and result.embedded == 48
    return active[1]


def test_on_a_gpu_every_core_prepares_a_chunk(fake_ls, make_config, make_backend, monkeypatch):
    """On a CPU one chunk is prepared beside the forward pass; on a GPU, whose passes are quick, one per core."""
    assert most_chunks_prepared_at_once(fake_ls, make_config, make_backend, monkeypatch, "cuda") == 4


def test_on_a_cpu_one_chunk_is_prepared_beside_the_forward_pass(fake_ls, make_config, make_backend, monkeypatch):
    assert most_chunks_prepared_at_once(fake_ls, make_config, make_backend, monkeypatch, "cpu") == 2


def large_jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (2000, 1600)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("annotator_reads_images", [False, True])
def test_images_only_the_backbone_reads_are_decoded_at_its_input_scale(fake_ls, make_config, make_backend,
                                                                       monkeypatch, annotator_reads_images):
    """A 2000x1600 JPEG for a 224-pixel backbone is decoded at half scale (1000x800, both sides still >= 448),
    unless the weak annotator reads the decoded images itself (an API VLM sends them at its own size): then in
    full."""
    for task_id, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30)], start=1):
        fake_ls.add_task(task_id, FINES[task_id % 4], image=large_jpeg(colour))
    parts = make_backend(make_config(push_predictions=False))
    backbone, weak = parts.backbone, parts.weak
    sizes: list[tuple[int, int]] = []

    def preprocess_batch(images):
        sizes.extend(image.size for image in images)
        return np.stack([np.asarray(image, dtype=np.float32).reshape(-1, 3).mean(axis=0) / 255.0 for image in images])

    def forward_pixels(pixels, with_logits=False):
        return np.concatenate([pixels, 1.0 - pixels], axis=1).astype(np.float32), None

    monkeypatch.setattr(backbone, "image_size", 224, raising=False)
    monkeypatch.setattr(backbone, "preprocess_batch", preprocess_batch, raising=False)
    monkeypatch.setattr(backbone, "forward_pixels", forward_pixels, raising=False)
    if not annotator_reads_images:  # answers from the backbone's embeddings, as the semantic annotator does
        monkeypatch.setattr(weak, "backbone", backbone, raising=False)
        monkeypatch.setattr(weak, "annotate_embeddings", lambda vectors: weak.annotate(
            [Image.new("RGB", (1, 1), tuple(int(255 * v) for v in row[:3])) for row in vectors]), raising=False)
    parts.backend.run_index(PROJECT_ID)
    assert sizes == [(2000, 1600) if annotator_reads_images else (1000, 800)] * 3
    assert weak.images_annotated == 3
    stored = parts.store.get_many(backbone.name, [content_key(data) for data in fake_ls.files.values()])
    full = FakeBackbone().embed([decode_image(data) for data in fake_ls.files.values()])
    np.testing.assert_allclose(np.stack([stored[content_key(data)] for data in fake_ls.files.values()]), full,
                               atol=0.02)  # the same picture: solid colours survive JPEG's scaled decoding


def test_indexing_embeds_a_page_of_tasks_while_the_next_is_listed(fake_ls, make_config, make_backend, monkeypatch):
    """Label Studio lists a large project slowly: the index embeds each page as it comes, not after the last."""
    parts, timeline = paged_backend(fake_ls, make_config, make_backend, monkeypatch, n_tasks=40, page_size=10,
                                    embed_seconds=0.05)
    listed: list[float] = []
    real_pages = LabelStudioClient.task_pages

    def slow_pages(self, project_id, annotations=True):
        for page in real_pages(self, project_id, annotations):
            time.sleep(0.2)  # a Label Studio that takes its time over each page
            listed.append(time.monotonic())
            yield page

    monkeypatch.setattr(LabelStudioClient, "task_pages", slow_pages)
    parts.backend.run_index(PROJECT_ID)
    assert len(listed) == 4 and counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 40
    first_embedding = min(start for start, _ in timeline.embeds)
    assert first_embedding < listed[-1], "the first page was embedded only after the whole project was listed"
    assert sum(1 for t in listed if t > first_embedding) >= 2  # later pages were listed while pages were embedded
    assert [int(t) for t in parts.backend.state(PROJECT_ID).task_list().ids] == list(range(1, 41))


def test_the_next_page_is_worked_on_while_a_page_runs_its_forward_pass(fake_ls, make_config, make_backend,
                                                                      monkeypatch):
    """Pages of one chunk each: the backbone does not wait at a page's end for the next page to be downloaded and
    decoded. (Each forward pass takes longer than listing a page, even on a loaded machine: the next page is then
    always listed before a forward pass ends.)"""
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 8)
    parts, timeline = paged_backend(fake_ls, make_config, make_backend, monkeypatch, n_tasks=32, page_size=8,
                                    embed_seconds=0.4)
    page_calls: list[float] = []
    real_features = parts.backend.extractor.features

    def features(project_id, tasks, *args, **kwargs):
        with timeline.lock:
            page_calls.append(time.monotonic())
        return real_features(project_id, tasks, *args, **kwargs)

    monkeypatch.setattr(parts.backend.extractor, "features", features)
    parts.backend.run_index(PROJECT_ID)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 32 and len(timeline.embeds) == 4
    # the index's four page calls (and the cache-only pass over every task at the end)
    assert len(page_calls) == 5
    # page k+1 is begun before the k-th forward pass ends (serially it would begin after it)
    forward_ends = sorted(end for _, end in timeline.embeds)
    assert all(page_calls[k] < forward_ends[k - 1] for k in range(1, 4)), \
        f"a page was begun only after the forward passes before it: pages {page_calls[:4]}, ends {forward_ends}"
    most_at_once = max(sum(1 for start, end in timeline.embeds if start <= moment < end)
                       for moment, _ in timeline.embeds)
    assert most_at_once == 1  # two pages in flight, still the backbone's one forward pass at a time
    assert [int(t) for t in parts.backend.state(PROJECT_ID).task_list().ids] == list(range(1, 33))


@pytest.mark.parametrize("concurrent_runs", [1, 2])
def test_as_many_forward_passes_run_at_once_as_the_backbone_wants(fake_ls, make_config, make_backend, monkeypatch,
                                                                   concurrent_runs):
    """A backbone's ``concurrent_runs`` (an ONNX Runtime CPU session: one per core) is how many chunks embed at
    once; without it, one."""
    if concurrent_runs > 1:
        monkeypatch.setattr(FakeBackbone, "concurrent_runs", concurrent_runs, raising=False)
    parts, timeline = index_48_tasks_in_chunks_of_8(fake_ls, make_config, make_backend, monkeypatch)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 48 and len(timeline.embeds) == 6
    most_at_once = max(sum(1 for start, end in timeline.embeds if start <= moment < end)
                       for moment, _ in timeline.embeds)
    assert most_at_once == concurrent_runs


@pytest.mark.parametrize(("n", "largest", "parallel"),
                         [(500, 64, 2), (500, 64, 1), (2000, 64, 4), (48, 64, 2), (10, 64, 2), (1, 64, 2), (0, 64, 2),
                          (48, 8, 2), (7, 3, 2)])
def test_a_guided_split_covers_the_work_once_and_shrinks_towards_the_end(n, largest, parallel):
    bounds = features_module.guided_chunks(n, largest, parallel)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(n))  # every item once, in order
    sizes = [b - a for a, b in bounds]
    assert all(0 < size <= largest for size in sizes)
    assert all(size >= min(features_module.FEATURE_CHUNK_MIN, largest) for size in sizes[:-1])
    assert sizes == sorted(sizes, reverse=True)  # never a large chunk after a small one
    if parallel > 1 and n > parallel * largest and largest > features_module.FEATURE_CHUNK_MIN:
        # the end is cut fine: the last chunk is a few images, not a whole one
        assert sizes[-1] <= features_module.FEATURE_CHUNK_MIN
    if parallel == 1:
        assert sizes[:-1] == [largest] * (len(sizes) - 1)  # one forward pass at a time: nothing to balance


def test_the_last_chunks_of_an_index_with_two_forward_passes_are_smaller(fake_ls, make_config, make_backend,
                                                                         monkeypatch):
    """With two forward passes at once, the end of a page is split finer, so neither waits long for the other."""
    monkeypatch.setattr(FakeBackbone, "concurrent_runs", 2, raising=False)
    monkeypatch.setattr(features_module, "FEATURE_CHUNK", 16)
    add_tasks(fake_ls, 48)
    parts = make_backend(make_config(push_predictions=False))
    sizes: list[int] = []
    real_embed = parts.backbone.embed

    def embed(images):
        sizes.append(len(images))
        return real_embed(images)

    monkeypatch.setattr(parts.backbone, "embed", embed)
    parts.backend.run_index(PROJECT_ID)
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 48
    assert sorted(sizes, reverse=True) == [16, 16, 8, 8]


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


def indexed_with_counted_store_reads(fake_ls, make_config, make_backend, monkeypatch, delay_s: float = 0.0):
    """A backend that indexed 24 tasks (large reads from 16 vectors up), the project's labeling, the (namespace,
    key) pairs each later store read asks for, and the store's own read."""
    monkeypatch.setattr(features_module, "RESIDENT_MIN_ROWS", 16)
    add_tasks(fake_ls, 24)
    backend = make_backend(make_config(push_predictions=False)).backend
    backend.run_index(PROJECT_ID)
    store = backend.extractor.store
    asked: list[tuple[str, str]] = []
    real_get_many = store.get_many

    def counting_get_many(namespace, keys):
        keys = list(keys)
        asked.extend((namespace, key) for key in keys)
        time.sleep(delay_s)
        return real_get_many(namespace, keys)

    monkeypatch.setattr(store, "get_many", counting_get_many)
    return backend, backend.labeling(fake_ls.label_config), asked, real_get_many


def test_a_whole_project_read_is_kept_and_the_next_reads_only_new_vectors(fake_ls, make_config, make_backend,
                                                                          monkeypatch):
    """A fit reads every task's vectors; the next fit of the project reads from the store only what is new."""
    backend, labeling, asked, real_get_many = indexed_with_counted_store_reads(fake_ls, make_config, make_backend,
                                                                               monkeypatch)
    first = backend.extractor.features(PROJECT_ID, fake_ls.tasks, labeling)
    assert asked == [] and len(first.usable_positions()) == 24  # the index's read was kept
    fake_ls.add_task(25, FINES[0])
    fake_ls.add_task(26, FINES[1])
    tasks = fake_ls.tasks
    second = backend.extractor.features(PROJECT_ID, tasks, labeling)
    assert len(second.usable_positions()) == 26
    new_keys = {second.keys[24], second.keys[25]}
    assert {key for _, key in asked} <= new_keys  # the store was read for the two new images only (they were just computed)
    assert second.pool_embeddings(list(range(26))).shape == (26, first.pool_embeddings([0]).shape[1])
    fresh = real_get_many(backend.backbone.name, [second.keys[0], second.keys[25]])
    np.testing.assert_array_equal(second.embedding_matrix([0, 25]), np.stack([fresh[second.keys[0]],
                                                                               fresh[second.keys[25]]]))
    asked.clear()
    third = backend.extractor.features(PROJECT_ID, tasks, labeling)
    assert asked == [] and third.pool_embeddings(list(range(26))).base is not None  # a view of the kept matrix


def test_a_push_of_part_of_the_project_and_the_next_fit_share_the_kept_matrix(fake_ls, make_config, make_backend,
                                                                              monkeypatch):
    """A push reads the tasks it has not pushed, in queue order; a fit reads them all. Both select rows of the one
    kept matrix: neither copies it, and the push's read does not replace what the fit reads next."""
    backend, labeling, asked, _ = indexed_with_counted_store_reads(fake_ls, make_config, make_backend, monkeypatch)
    queue_order = list(reversed(fake_ls.tasks[4:]))
    pushed = backend.extractor.features(PROJECT_ID, queue_order, labeling)
    whole = backend.extractor.features(PROJECT_ID, fake_ls.tasks, labeling)
    assert asked == []
    whole_rows = whole.pool_embeddings(list(range(24)))
    assert whole_rows.base is not None  # a view, not a copy
    pushed_rows = pushed.pool_embeddings(list(range(20)))  # out of the matrix's order: gathered
    assert np.shares_memory(whole_rows, whole.pool_embeddings([0]))
    np.testing.assert_array_equal(pushed_rows, whole_rows[4:][::-1])


def test_large_reads_at_once_read_the_store_once(fake_ls, make_config, make_backend, monkeypatch):
    """A fit and a push that read a project at the same time wait for one read of the store, into one matrix."""
    backend, labeling, asked, _ = indexed_with_counted_store_reads(fake_ls, make_config, make_backend, monkeypatch,
                                                                   delay_s=0.2)
    backend.extractor._resident.clear()  # as after a restart: the vectors are in the store only
    results = []
    readers = [threading.Thread(target=lambda: results.append(
        backend.extractor.features(PROJECT_ID, fake_ls.tasks, labeling))) for _ in range(2)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    backbone_reads = sorted(key for namespace, key in asked if namespace == backend.backbone.name)
    assert len(results) == 2 and backbone_reads == sorted(set(results[0].keys))  # each key read once
    assert np.shares_memory(results[0].pool_embeddings(list(range(24))),
                            results[1].pool_embeddings(list(range(24))))


def test_rows_no_large_read_asks_for_are_dropped(monkeypatch):
    """Vectors of deleted tasks leave the kept matrix once RESIDENT_READS_KEPT large reads went without them."""
    monkeypatch.setattr(features_module, "RESIDENT_READS_KEPT", 3)
    rng = np.random.default_rng(0)
    vectors = {f"k{i}": rng.standard_normal(4).astype(np.float32) for i in range(30)}
    resident = features_module.ResidentVectors(30)
    first = resident.read(list(vectors), lambda batch: {key: vectors[key] for key in batch})
    assert len(first) == 30 and resident.unread_rows() == 0
    kept_keys = [f"k{i}" for i in range(10)]
    for _ in range(3):
        resident.read(kept_keys, lambda batch: pytest.fail("every key is held"))
    assert resident.unread_rows() == 20
    compact = resident.compacted()
    assert list(compact.vectors) == kept_keys and compact.unread_rows() == 0
    np.testing.assert_array_equal(compact.vectors.rows(kept_keys), first.rows(kept_keys))
    np.testing.assert_array_equal(first.rows(["k29"]), [vectors["k29"].astype(np.float16)])  # old selections read on
    compact.read(kept_keys, lambda batch: pytest.fail("every key is held"))
    assert compact.unread_rows() == 0
