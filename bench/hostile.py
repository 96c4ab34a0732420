"""Run the hostile-input suite (tests/security) against a real `vlm-al serve` and write bench/results/hostile.json.

    .venv/bin/python bench/hostile.py            # -> {"cases": n, "held": h, "failed": f, "by_kind": {...}, ...}

Every case is one pytest test; "held" means the server behaved as the hardening requires. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULT = REPO_ROOT / "bench" / "results" / "hostile.json"


def main() -> int:
    env = {**os.environ, "HOSTILE_RESULTS": str(RESULT)}
    completed = subprocess.run([sys.executable, "-m", "pytest", "tests/security", "-q", "-p", "no:cacheprovider"],
                               cwd=REPO_ROOT, env=env)
    summary = json.loads(RESULT.read_text())
    print(f"hostile cases: {summary['cases']}, held: {summary['held']}, failed: {summary['failed']} -> {RESULT}")
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
