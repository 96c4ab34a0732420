"""Start-up: a MODEL_DIR that cannot be used is one clear error naming the path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO_ROOT, free_port


def _serve(model_dir: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MODEL_DIR": model_dir, "WEAK_ANNOTATOR": "none"}
    return subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(free_port())], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_model_dir_under_a_file_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = _serve(str(blocker / "model_dir"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(blocker / "model_dir") in lines[0] and "cannot be created" in lines[0]


def test_a_read_only_model_dir_is_one_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/vlm-al-model-dir"  # root ignores file modes; /proc refuses everyone
    else:
        target = str(tmp_path / "ro")
        os.mkdir(target, 0o500)
    result = _serve(target)
    assert result.returncode == 2
    assert target in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("name,value", [("LABEL_STUDIO_URL", "localhost:8080"), ("MAX_IMAGE_BYTES", "lots")])
def test_a_bad_setting_is_one_clear_error(tmp_path, name, value):
    env = {**os.environ, "MODEL_DIR": str(tmp_path / "m"), name: value}
    result = subprocess.run([sys.executable, "-m", "backend.cli", "serve", "--port", str(free_port())],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and name in result.stderr and "Traceback" not in result.stderr


def test_plain_gunicorn_with_an_unusable_model_dir_stops_with_one_clear_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    env = {**os.environ, "MODEL_DIR": str(blocker / "m"), "WEAK_ANNOTATOR": "none"}
    result = subprocess.run([sys.executable, "-m", "gunicorn", "backend.wsgi:app", "--bind",
                             f"127.0.0.1:{free_port()}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert f"MODEL_DIR {blocker / 'm'} cannot be created" in result.stderr and "Traceback" not in result.stderr
