"""Per-project state files and the URL -> content key index."""

from __future__ import annotations

import json
import threading

import pytest

from backend.state import ImageKeyIndex, ProjectState, model_version_name, version_number


def write_marker(text):
    def write(directory):
        (directory / "weights.bin").write_text(text)

    return write


def test_no_state_means_no_current_model(tmp_path):
    state = ProjectState(tmp_path, 3)
    assert state.current() is None
    assert state.list_versions() == []
    assert state.next_version() == "vlm-al-v1"
    assert state.priorities() == (None, {})


def test_commit_writes_the_checkpoint_then_the_pointer(tmp_path):
    state = ProjectState(tmp_path, 3)
    current = state.commit_version("vlm-al-v1", write_marker("one"), "abc", {"n_fine": 4})
    assert current.model_version == "vlm-al-v1"
    assert (tmp_path / "projects" / "3" / "versions" / "vlm-al-v1" / "weights.bin").read_text() == "one"
    data = json.loads((tmp_path / "projects" / "3" / "current.json").read_text())
    assert data["model_version"] == "vlm-al-v1" and data["schema_hash"] == "abc" and data["metrics"] == {"n_fine": 4}
    assert ProjectState(tmp_path, 3).current() == current  # a second process sees it
    assert state.next_version() == "vlm-al-v2"


def test_a_failed_write_leaves_the_previous_version_current(tmp_path):
    state = ProjectState(tmp_path, 3)
    state.commit_version("vlm-al-v1", write_marker("one"), "abc")

    def crash(directory):
        (directory / "weights.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        state.commit_version("vlm-al-v2", crash, "abc")
    assert state.current().model_version == "vlm-al-v1"
    assert state.list_versions() == ["vlm-al-v1"]
    assert not list(state.versions_dir.glob(".tmp-*"))


def test_pointer_changes_made_elsewhere_are_seen(tmp_path):
    reader, writer = ProjectState(tmp_path, 3), ProjectState(tmp_path, 3)
    writer.commit_version("vlm-al-v1", write_marker("one"), "abc")
    assert reader.current().model_version == "vlm-al-v1"
    writer.commit_version("vlm-al-v2", write_marker("two"), "abc")
    assert reader.current().model_version == "vlm-al-v2"


def test_prune_keeps_the_newest_and_never_the_current(tmp_path):
    state = ProjectState(tmp_path, 3)
    for n in range(1, 6):
        state.commit_version(model_version_name(n), write_marker(str(n)), "h")
    assert state.prune_versions(2) == ["vlm-al-v1", "vlm-al-v2", "vlm-al-v3"]
    assert state.list_versions() == ["vlm-al-v4", "vlm-al-v5"]
    # point back at v4 (e.g. a rollback) and prune to one: v4 stays as the current one
    (state.current_path).write_text(json.dumps({"model_version": "vlm-al-v4", "created_at": "", "schema_hash": "h"}))
    assert state.prune_versions(1) == []
    assert set(state.list_versions()) == {"vlm-al-v4", "vlm-al-v5"}
    with pytest.raises(ValueError):
        state.prune_versions(0)


def test_version_names():
    assert version_number("vlm-al-v12") == 12
    assert version_number("backend-title") is None
    with pytest.raises(ValueError):
        ProjectState("/nonexistent", 1).version_dir("../../etc")


def test_transition_history_appends_one_line_per_fit(tmp_path):
    state = ProjectState(tmp_path, 3)
    state.append_transition({"model_version": "vlm-al-v1", "matrix": [[1.0, 0.0], [0.0, 1.0]], "n_trusted": 4})
    state.append_transition({"model_version": "vlm-al-v2", "matrix": [[0.9, 0.1], [0.2, 0.8]], "n_trusted": 9})
    history = state.transition_history()
    assert [h["model_version"] for h in history] == ["vlm-al-v1", "vlm-al-v2"]
    assert history[1]["n_trusted"] == 9 and "created_at" in history[1]


def test_priorities_and_pushed_tasks_round_trip(tmp_path):
    state = ProjectState(tmp_path, 3)
    state.write_priorities("vlm-al-v2", {5: 0.25, 7: 0.5})
    assert state.priorities() == ("vlm-al-v2", {5: 0.25, 7: 0.5})
    state.record_pushed("vlm-al-v2", [5])
    state.record_pushed("vlm-al-v2", [7])
    assert state.pushed_tasks("vlm-al-v2") == {5, 7}
    assert state.pushed_tasks("vlm-al-v3") == set()
    state.record_pushed("vlm-al-v3", [9], replace=True)
    assert state.pushed_tasks("vlm-al-v3") == {9} and state.pushed_tasks("vlm-al-v2") == set()


def test_image_key_index_is_per_project_and_shared_between_threads(tmp_path):
    index = ImageKeyIndex(tmp_path / "image_keys.sqlite")
    index.put_many(1, {"/data/a.png": "k1", "/data/b.png": "k2"})
    index.put_many(2, {"/data/a.png": "other"})
    assert index.get_many(1, ["/data/a.png", "/data/b.png", "/data/c.png"]) == {"/data/a.png": "k1", "/data/b.png": "k2"}
    assert index.get_many(2, ["/data/a.png"]) == {"/data/a.png": "other"}
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(index.get_many(1, ["/data/b.png"])))
    thread.start()
    thread.join()
    assert seen == {"/data/b.png": "k2"}
    urls = [f"/data/{i}.png" for i in range(1200)]
    index.put_many(1, {u: f"key{i}" for i, u in enumerate(urls)})
    assert len(index.get_many(1, urls)) == 1200
    assert ImageKeyIndex(tmp_path / "image_keys.sqlite").get_many(1, ["/data/a.png"]) == {"/data/a.png": "k1"}
