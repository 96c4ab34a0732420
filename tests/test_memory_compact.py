"""What the backend keeps per task stays compact: after indexing N tasks through the fake Label Studio (real HTTP),
the features of every task (embedding, weak answer, content key) and the task list cost a few KB per task, measured
with tracemalloc, not one Python object per vector."""

from __future__ import annotations

import gc
import io
import tracemalloc

import numpy as np
from conftest import PROJECT_ID, FakeBackbone
from PIL import Image

import model.finegrained
import model.query
from backend.features import PackedVectors
from backend.state import ProjectState

N_TASKS = 400
DIM = 1280  # efficientnet_lite0's embedding
FINES = ["T-shirt", "Shirt", "Sneaker", "Boot"]


class WideBackbone(FakeBackbone):
    """The fake colour embedding spread over 1,280 dimensions, the size of the real backbone's."""

    name = "fake-wide-backbone"
    dim = DIM

    def embed(self, images):
        colour = super().embed(images)
        return np.repeat(colour, DIM // colour.shape[1] + 1, axis=1)[:, :DIM]


def unique_png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def held_bytes(build):
    """(result, bytes still allocated after ``build()`` returned, the result kept alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = build()
        gc.collect()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_features_and_task_list_cost_a_few_kb_per_task(fake_ls, make_config, make_backend):
    for task_id in range(1, N_TASKS + 1):
        fake_ls.add_task(task_id, FINES[task_id % 4], image=unique_png(task_id))
    parts = make_backend(make_config(push_predictions=False))
    parts.backend.extractor.backbone = WideBackbone()
    parts.backend.run_index(PROJECT_ID)

    state = ProjectState(parts.backend.config.model_dir, PROJECT_ID)
    task_list, task_list_bytes = held_bytes(state.task_list)
    assert task_list.ids.tolist() == list(range(1, N_TASKS + 1))
    tasks = task_list.tasks_with(())
    labeling = parts.backend.labeling(fake_ls.label_config)
    features, feature_bytes = held_bytes(
        lambda: parts.backend.extractor.features(PROJECT_ID, tasks, labeling, fetch=False))

    assert not features.pending and len(features.usable_positions()) == N_TASKS
    assert isinstance(features.embeddings, PackedVectors)
    float16_row = DIM * 2
    # one float16 row, the content key and two dict entries per task: about 2.9 KB; a float32 array per task in a
    # dict (what the extractor used to keep) would be 5.2 KB on its own
    assert feature_bytes / N_TASKS < 1.3 * float16_row, feature_bytes / N_TASKS
    assert task_list_bytes / N_TASKS < 200, task_list_bytes / N_TASKS
    # the packed rows read back as the store's float32 values
    stored = parts.store.get_many(WideBackbone.name, [features.keys[0]])
    assert np.array_equal(features.embedding_matrix([0])[0], stored[features.keys[0]])


def test_packed_vectors_grow_replace_and_read_back_float16_values():
    packed = PackedVectors(capacity=1)
    rng = np.random.default_rng(0)
    vectors = {f"k{i}": rng.standard_normal(5).astype(np.float32) for i in range(9)}
    packed.update(vectors)
    packed.update({"k3": np.ones(5, dtype=np.float32)})
    assert len(packed) == 9 and "k3" in packed and "missing" not in packed
    assert np.array_equal(packed["k0"], vectors["k0"].astype(np.float16).astype(np.float32))
    assert np.array_equal(packed["k3"], np.ones(5, dtype=np.float32))
    rows = packed.rows(["k8", "k3", "k0"])
    assert rows.dtype == np.float32 and rows.shape == (3, 5)
    assert np.array_equal(rows[0], vectors["k8"].astype(np.float16).astype(np.float32))


def test_a_selection_reads_its_source_and_adds_new_vectors_to_it():
    source = PackedVectors(capacity=2)
    rng = np.random.default_rng(2)
    vectors = {f"k{i}": rng.standard_normal(3).astype(np.float32) for i in range(3)}
    source.update(vectors)
    selection = source.select(["k2", "k0"])
    assert list(selection) == ["k2", "k0"] and "k1" not in selection
    assert np.shares_memory(selection.half_row("k2"), source.half_row("k2"))
    for i in range(3, 40):  # the source grows (1.5x at a time) under the selection
        selection.update({f"k{i}": np.full(3, i, dtype=np.float32)})
    assert len(source) == 40 and len(selection) == 39
    np.testing.assert_array_equal(source["k39"], np.full(3, 39, dtype=np.float32))
    np.testing.assert_array_equal(selection.rows(["k0", "k39"]), source.rows(["k0", "k39"]))
    assert source.nbytes() <= 1.5 * 40 * 3 * 2


def test_a_task_listing_keeps_only_the_fields_the_backend_reads(fake_ls, make_config, make_backend):
    fake_ls.add_task(1, "Shirt")
    fake_ls.annotate(1, "Shirt")
    assert {"predictions", "project"} <= set(fake_ls.tasks[0])  # what Label Studio sends besides
    parts = make_backend(make_config())
    tasks = parts.backend._client(PROJECT_ID).fetch_tasks(PROJECT_ID)
    assert set(tasks[0]) == {"id", "data", "annotations"}
    assert tasks[0]["annotations"][0]["result"] == fake_ls.tasks[0]["annotations"][0]["result"]


def traced_peak(run):
    """(result, peak bytes allocated above the start while ``run()`` ran) under tracemalloc (numpy arrays count)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = run()
        return result, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_fit_trains_from_the_float16_rows_without_a_float32_copy_of_the_project(fake_ls, make_config,
                                                                                  make_backend, monkeypatch):
    n_tasks = 1200
    for task_id in range(1, n_tasks + 1):
        fake_ls.add_task(task_id, FINES[task_id % 4], image=unique_png(task_id))
    parts = make_backend(make_config(push_predictions=False))
    parts.backend.extractor.backbone = WideBackbone()
    parts.backend.run_index(PROJECT_ID)
    for task_id in range(1, 13):
        fake_ls.annotate(task_id, FINES[task_id % 4])
    assert parts.backend.run_fit(PROJECT_ID) == "vlm-al-v1"  # the first fit imports what fits use (cleanlab, ...)
    fake_ls.annotate(13, FINES[13 % 4])
    monkeypatch.setattr(model.finegrained, "ROW_CHUNK", 100)  # chunks well below the project, as at 100k tasks
    monkeypatch.setattr(model.query, "ROW_CHUNK", 100)
    version, peak = traced_peak(lambda: parts.backend.run_fit(PROJECT_ID))
    assert version == "vlm-al-v2"
    float32_copy = n_tasks * DIM * 4
    # the packed float16 rows (half a copy), the classifier's own normalised float32 training rows (every task: the
    # VLM labels the unlabelled ones) and small chunks; the fit used to hold a float32 copy of every embedding too
    assert peak < 2.0 * float32_copy, peak / float32_copy


def test_packed_half_rows_are_a_view_of_the_project_rows_in_order():
    packed = PackedVectors(capacity=4)
    rng = np.random.default_rng(1)
    packed.update({f"k{i}": rng.standard_normal(3).astype(np.float32) for i in range(4)})
    whole = packed.half_rows(["k0", "k1", "k2"])
    assert whole.dtype == np.float16 and np.shares_memory(whole, packed.half_rows(["k0"]))
    reordered = packed.half_rows(["k2", "k0"])
    assert not np.shares_memory(reordered, whole)
    assert np.array_equal(reordered.astype(np.float32), packed.rows(["k2", "k0"]))


def test_a_classifier_trains_without_a_float32_copy_of_its_training_rows(monkeypatch):
    from model.finegrained import FineGrainedClassifier, TrainingConfig
    from model.hierarchy import MISSING_LABEL, LabelHierarchy

    hierarchy = LabelHierarchy.from_parent_map({"a": "x", "b": "x", "c": "y", "d": "y"})
    rng = np.random.default_rng(0)
    n, dim = 20_000, 128
    pool = rng.standard_normal((n, dim)).astype(np.float16)
    fine = np.full(n, MISSING_LABEL, dtype=np.int64)
    fine[:40] = np.arange(40) % 4
    weak = rng.integers(0, 2, n)  # every other row has only the VLM's coarse answer
    monkeypatch.setattr(model.finegrained, "ROW_CHUNK", 1000)
    config = TrainingConfig(epochs=30, batch_size=512)  # 30 steps visit 15,360 of the 19,960 weak rows
    classifier, peak = traced_peak(lambda: FineGrainedClassifier(hierarchy, dim, config).fit(pool, fine, weak))
    float32_copy = n * dim * 4
    # 30 steps see each weak row once at most, so each step normalises the rows it reaches; a float32 copy of the
    # rows the steps visit (what the classifier kept until now) was 0.77 of a copy of every row. What is left is the
    # label arrays (about ten int64 arrays of n) and one chunk. tracemalloc sees every numpy buffer (numpy's 130 KB
    # casting buffer for float64 sums included).
    assert peak < 0.25 * float32_copy, peak / float32_copy
    rows = pool.astype(np.float64)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    # the centre is still the mean of every row
    assert np.allclose(classifier._fitted_parameters()["feature_mean"], rows.mean(axis=0), atol=1e-6)
    assert classifier.predict_fine_proba(pool[:5]).shape == (5, 4)
