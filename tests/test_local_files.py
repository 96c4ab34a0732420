"""Local Files images read from LOCAL_FILES_DOCUMENT_ROOT, and uploaded images from UPLOADED_FILES_ROOT, on this host
instead of through Label Studio, each confined to its folder."""

from __future__ import annotations

import os

import pytest
from conftest import PROJECT_ID, counter_value

from backend.fetch import FetchRefused, ImageFetchError
from backend.ls_client import MountedFiles


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "root"
    (folder / "birds").mkdir(parents=True)
    (folder / "birds" / "a b.png").write_bytes(b"image bytes")
    (tmp_path / "secret.txt").write_bytes(b"not for you")
    return folder.resolve()


def test_a_local_files_url_is_read_from_the_root(root):
    mounted = MountedFiles(local_files_root=root)
    assert mounted.read("/data/local-files/?d=birds/a%20b.png", 100) == b"image bytes"
    assert mounted.read("/data/local-files/?d=/birds/a%20b.png", 100) == b"image bytes"
    assert mounted.read("/data/local-files/?d=birds/missing.png", 100) is None  # Label Studio may have it
    assert mounted.read("/data/upload/1/a.png", 100) is None  # an upload, and no uploads folder is mounted
    assert mounted.read("/data/local-files/", 100) is None


def test_an_uploaded_files_url_is_read_from_the_uploads_folder(root):
    """Label Studio serves ``/data/upload/<project>/<file>`` from MEDIA_ROOT/upload, matching the decoded path."""
    mounted = MountedFiles(uploads_root=root)
    assert mounted.read("/data/upload/birds/a%20b.png", 100) == b"image bytes"
    assert mounted.read("/data/upload/birds/a b.png", 100) == b"image bytes"
    assert mounted.read("/data/upload/birds/missing.png", 100) is None
    assert mounted.read("/data/upload/", 100) is None
    assert mounted.read("/data/local-files/?d=birds/a%20b.png", 100) is None  # no Local Files root mounted
    assert mounted.read("/data/uploads/birds/a%20b.png", 100) is None  # not Label Studio's upload route
    both = MountedFiles(local_files_root=root / "birds", uploads_root=root)
    assert both.read("/data/local-files/?d=a%20b.png", 100) == both.read("/data/upload/birds/a%20b.png", 100)


@pytest.mark.parametrize(("setting", "mounted_as", "target"), [
    ("LOCAL_FILES_DOCUMENT_ROOT", "local_files_root", "/data/local-files/?d={path}"),
    ("UPLOADED_FILES_ROOT", "uploads_root", "/data/upload/{path}"),
])
def test_paths_outside_the_folder_and_oversized_files_are_refused(root, setting, mounted_as, target):
    mounted = MountedFiles(**{mounted_as: root})
    for outside in ("../secret.txt", "birds/../../secret.txt", "birds/%2E%2E/%2E%2E/secret.txt"):  # decoded once
        with pytest.raises(FetchRefused, match=f"outside {setting}"):
            mounted.read(target.format(path=outside), 100)
    link = root / "birds" / f"link-{mounted_as}.png"
    os.symlink(root.parent / "secret.txt", link)
    with pytest.raises(FetchRefused, match=f"outside {setting}"):
        mounted.read(target.format(path=f"birds/{link.name}"), 100)
    with pytest.raises(FetchRefused):
        mounted.read(target.format(path="birds/a%00.png"), 100)
    with pytest.raises(ImageFetchError, match="larger than MAX_IMAGE_BYTES"):
        mounted.read(target.format(path="birds/a%20b.png"), 5)


def test_indexing_reads_local_files_from_disk_and_embeds_the_same_images(fake_ls, make_config, make_backend,
                                                                          tmp_path):
    for task_id in range(1, 7):
        fake_ls.add_task(task_id, ["T-shirt", "Boot"][task_id % 2])
    root = tmp_path / "documents"
    (root / "fashion").mkdir(parents=True)
    for name, data in fake_ls.files.items():
        (root / "fashion" / name).write_bytes(data)
    (root / "fashion" / "img6.png").unlink()  # not on this host: downloaded from Label Studio
    parts = make_backend(make_config(push_predictions=False, local_files_document_root=root,
                                     uploaded_files_root=tmp_path / "unused"))
    parts.backend.run_index(PROJECT_ID)
    assert fake_ls.downloads == ["img6.png"]
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 6
    from_disk = parts.backend.extractor.features(PROJECT_ID, fake_ls.tasks, parts.backend.labeling(
        fake_ls.label_config), fetch=False)
    from model.embedding_store import content_key

    assert from_disk.keys == [content_key(fake_ls.files[f"img{i}.png"]) for i in range(1, 7)]


def test_indexing_reads_uploaded_images_from_disk_and_downloads_only_what_is_missing(fake_ls, make_config,
                                                                                       make_backend, tmp_path):
    for task_id in range(1, 7):
        fake_ls.add_task(task_id, ["T-shirt", "Boot"][task_id % 2], uploaded=task_id != 1)
    uploads = tmp_path / "media" / "upload"
    (uploads / str(PROJECT_ID)).mkdir(parents=True)
    for name, data in fake_ls.files.items():
        (uploads / str(PROJECT_ID) / name).write_bytes(data)
    (uploads / str(PROJECT_ID) / "img6.png").unlink()  # not on this host: downloaded from Label Studio
    parts = make_backend(make_config(push_predictions=False, uploaded_files_root=uploads))
    parts.backend.run_index(PROJECT_ID)
    # task 1 is a Local Files URL, and no Local Files root is mounted
    assert sorted(fake_ls.downloads) == ["img1.png", "img6.png"]
    assert counter_value(parts.backend, "vlm_al_embeddings_computed_total") == 6
