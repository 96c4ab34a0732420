"""Local Files images read from LOCAL_FILES_DOCUMENT_ROOT on this host instead of through Label Studio, confined to
that folder."""

from __future__ import annotations

import os

import pytest
from conftest import PROJECT_ID, counter_value

from backend.fetch import FetchRefused, ImageFetchError
from backend.ls_client import read_local_file


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    (folder / "birds").mkdir(parents=True)
    (folder / "birds" / "a b.png").write_bytes(b"image bytes")
    (tmp_path / "secret.txt").write_bytes(b"not for you")
    return folder.resolve()


def test_a_local_files_url_is_read_from_the_root(root):
    assert read_local_file(root, "/data/local-files/?d=birds/a%20b.png", 100) == b"image bytes"
    assert read_local_file(root, "/data/local-files/?d=/birds/a%20b.png", 100) == b"image bytes"
    assert read_local_file(root, "/data/local-files/?d=birds/missing.png", 100) is None  # Label Studio may have it
    assert read_local_file(root, "/data/upload/1/a.png", 100) is None  # not a Local Files URL
    assert read_local_file(root, "/data/local-files/", 100) is None


def test_paths_outside_the_root_and_oversized_files_are_refused(root):
    with pytest.raises(FetchRefused, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        read_local_file(root, "/data/local-files/?d=../secret.txt", 100)
    with pytest.raises(FetchRefused, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        read_local_file(root, "/data/local-files/?d=birds/../../secret.txt", 100)
    os.symlink(root.parent / "secret.txt", root / "birds" / "link.png")
    with pytest.raises(FetchRefused, match="outside LOCAL_FILES_DOCUMENT_ROOT"):
        read_local_file(root, "/data/local-files/?d=birds/link.png", 100)
    with pytest.raises(FetchRefused):
        read_local_file(root, "/data/local-files/?d=birds/a%00.png", 100)
    with pytest.raises(ImageFetchError, match="larger than MAX_IMAGE_BYTES"):
        read_local_file(root, "/data/local-files/?d=birds/a%20b.png", 5)


def test_indexing_reads_local_files_from_disk_and_embeds_the_same_images(fake_ls, make_config, make_backend,
                                                                          tmp_path):
    for task_id in range(1, 7):
        fake_ls.add_task(task_id, ["T-shirt", "Boot"][task_id % 2])
    root = tmp_path / "documents"
    (root / "fashion").mkdir(parents=True)
    for name, data in fake_ls.files.items():
        (root / "fashion" / name).write_bytes(data)
    (root / "fashion" / "img6.png").unlink()  # not on this host: downloaded from Label Studio
    parts = make_backend(make_config(push_predictions=False, local_files_document_root=root))
    parts.backend.run_index(PROJECT_ID)
    assert fake_ls.downloads == ["img6.png"]
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 6
    from_disk = parts.backend.extractor.features(PROJECT_ID, fake_ls.tasks, parts.backend.labeling(
        fake_ls.label_config), fetch=False)
    from model.embedding_store import content_key

    assert from_disk.keys == [content_key(fake_ls.files[f"img{i}.png"]) for i in range(1, 7)]
