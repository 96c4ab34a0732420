"""``model/`` is a typed library: mypy checks it on every test run (settings in pyproject.toml's [tool.mypy])."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_model_package_type_checks():
    completed = subprocess.run([sys.executable, "-m", "mypy", "model"], cwd=REPO_ROOT, capture_output=True,
                               text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-6000:] + completed.stderr[-2000:]
