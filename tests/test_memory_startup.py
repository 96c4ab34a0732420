"""What a server process loads at start-up: triton (torch's compiler backend) stays out of it, and torch still trains
and ONNX Runtime still runs (fresh interpreters, since imports are once per process)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model.round_libraries import ROUND_MODULES

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from backend.memory import keep_triton_out
kept_out = keep_triton_out() if {keep_out!r} else False
import numpy as np, timm, torch  # timm imports torchvision, which imports torch._dynamo
from model.finegrained import FineGrainedClassifier
from model.hierarchy import LabelHierarchy
hierarchy = LabelHierarchy.from_parent_map({{"a": "x", "b": "x", "c": "y", "d": "y"}})
rng = np.random.default_rng(0)
fine = np.arange(40) % 4
embeddings = (np.eye(8)[fine] + 0.1 * rng.standard_normal((40, 8))).astype(np.float16)  # separable classes
classifier = FineGrainedClassifier(hierarchy, 8).fit(embeddings, fine)
accuracy = float(np.mean(classifier.predict_fine_proba(embeddings).argmax(axis=1) == fine))
maps = open("/proc/self/maps").read()
print(json.dumps({{"kept_out": kept_out, "libtriton": "libtriton" in maps, "accuracy": accuracy}}))
"""


def probe(keep_out: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), keep_out=keep_out)], capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="this torch has no triton to keep out")
def test_triton_is_kept_out_of_a_server_process_and_torch_still_trains():
    without = probe(keep_out=False)
    assert without["libtriton"]  # what a server process used to map: torchvision pulls it in
    kept = probe(keep_out=True)
    assert kept["kept_out"] and not kept["libtriton"]
    assert kept["accuracy"] == without["accuracy"] and kept["accuracy"] > 0.9


SERVER_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from backend.app import create_app
from backend.config import Config
app = create_app(Config.from_env({{"MODEL_DIR": {model_dir!r}, "IMAGE_SIZE": "64"}}))
health = app.test_client().get("/health")
rss_kb = int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
print(json.dumps({{"status": health.status_code,
                   "loaded": [m for m in ("torch", "timm", "torchvision", "transformers", "sklearn", "cleanlab")
                              if m in sys.modules],
                   "rss_mb": rss_kb // 1024}}))
"""


def test_a_classification_server_starts_and_serves_without_torch(tmp_path):
    """The default server (efficientnet_lite0 on ONNX Runtime, the semantic weak annotator on MiniLM) never imports
    torch: the exports are made in child processes, and fitting is numpy. Its fits run in its threads (no REDIS_URL),
    so their libraries load at start-up. Two starts: exporting, then cached."""
    for start in ("first", "cached"):
        out = subprocess.run([sys.executable, "-c", SERVER_PROBE.format(root=str(ROOT), model_dir=str(tmp_path))],
                             capture_output=True, text=True, timeout=600, check=True)
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["status"] == 200, start
        assert report["loaded"] == ["sklearn", "cleanlab"], (start, report)
        assert report["rss_mb"] < 600, (start, report)  # about 900 MB with torch and timm loaded
    assert list((tmp_path / "runtime-cache").glob("*.onnx"))


FIT_IMPORTS_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
from model.round_libraries import ROUND_MODULES, import_round_libraries
if {preload!r}:
    import_round_libraries()
before = set(sys.modules)
import pytest
exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *{tests!r}])
new = set(sys.modules) - before
print(json.dumps({{"exit_code": int(exit_code), "round_modules_imported": [m for m in ROUND_MODULES if m in new],
                   "libraries_imported": sorted(m for m in new if m.split(".")[0] in ("sklearn", "scipy", "cleanlab"))}}))
"""

FITTING_TESTS = ["tests/test_service.py::test_fit_trains_saves_pushes_once_and_moves_the_project_version",
                 "tests/test_assistant_backend.py"]


def fit_imports(preload: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", FIT_IMPORTS_PROBE.format(root=str(ROOT), preload=preload,
                                                                        tests=FITTING_TESTS)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["exit_code"] == 0, out.stdout[-3000:]
    return report


def test_fits_after_import_round_libraries_import_no_library_mid_fit():
    """A server whose threads fit calls import_round_libraries at start-up: its fits (with the assistant's label
    issues, audits and stopping) then import nothing from scikit-learn, SciPy or cleanlab, whose first import held
    the GIL for ~100 ms mid-fit. Without it, those fits import every module the list names (none is extra)."""
    cold = fit_imports(preload=False)
    assert cold["round_modules_imported"] == list(ROUND_MODULES)
    assert fit_imports(preload=True)["libraries_imported"] == []
