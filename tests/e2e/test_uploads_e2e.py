"""Images uploaded to a real Label Studio: the backend reads them from Label Studio's upload folder on this host
(UPLOADED_FILES_ROOT) and gets the bytes Label Studio serves at the task's URL."""

from __future__ import annotations

import pytest
import requests

from backend.label_config import recommended_label_config
from backend.ls_client import LabelStudioClient, MountedFiles
from harness import ls_bootstrap as lsb
from model.datasets import fashion_mnist_hierarchy

from .conftest import Stack

pytestmark = pytest.mark.e2e


def test_uploaded_images_are_read_from_label_studios_upload_folder(stack: Stack, tmp_path) -> None:
    project_id = lsb.create_project(stack.client(), "e2e uploads", recommended_label_config(fashion_mnist_hierarchy()))
    images = lsb.write_fashion_mnist_pngs(tmp_path / "upload", 3, size=32, seed=11)
    uploaded = {path.name: path.read_bytes() for path in images.paths}
    response = requests.post(
        f"{stack.label_studio.url}/api/projects/{project_id}/import",
        headers={"Authorization": f"Token {stack.login.token}"},
        files=[(name, (name, data, "image/png")) for name, data in uploaded.items()],  # one form field each
        timeout=60,
    )
    assert response.status_code == 201, response.text[:300]

    through_label_studio = LabelStudioClient(stack.label_studio.url, stack.login.token, tmp_path, 10_000_000)
    uploads = MountedFiles(uploads_root=stack.label_studio.data_dir / "media" / "upload")
    from_disk = LabelStudioClient(stack.label_studio.url, stack.login.token, tmp_path, 10_000_000, mounted=uploads)
    tasks = through_label_studio.fetch_tasks(project_id)
    assert len(tasks) == len(uploaded)
    for task in tasks:
        url = next(value for value in task["data"].values() if isinstance(value, str))
        assert url.startswith(f"/data/upload/{project_id}/"), url  # Label Studio's name: "<8 hex>-<file name>"
        original = next(data for name, data in uploaded.items() if url.endswith("-" + name))
        assert uploads.read(url, 10_000_000) == original  # found on disk, so never asked of Label Studio
        assert from_disk.download_image(url, task_id=task["id"]) == original
        assert through_label_studio.download_image(url, task_id=task["id"]) == original
