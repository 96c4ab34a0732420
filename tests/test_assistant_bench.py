"""bench/assistant.py on a reduced setting (Fashion-MNIST pool of 1,500, the features the simulate benchmark caches;
arrival is timed by the e2e suite instead): its figures are checked against the stated targets and tolerance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.bench


def test_assistant_benchmark_meets_its_targets(tmp_path):
    out = tmp_path / "assistant.json"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "assistant.py"), "--out", str(out), "--no-arrival",
         "--pool-size", "1500", "--target", "0.9", "--auto-labels", "900", "--error-labels", "600",
         "--real-sizes", "50,100,200,300,450,600,800,1000,1250", "--stopping-seeds", "2"],
        check=True, cwd=ROOT, timeout=1200,
    )
    results = json.loads(out.read_text())
    assert set(results) == {"auto_accept", "label_errors", "stopping", "arrival_seconds", "machine"}
    assert set(results["auto_accept"]) == {"target", "audited_precision", "share_auto_accepted"}
    assert set(results["label_errors"]) == {"injected_rate", "k", "precision_at_k", "recall_at_k"}
    assert set(results["stopping"]) == {"suggested_labels", "labels_where_curve_flattens"}
    details = json.loads((tmp_path / results["machine"]["details"]).read_text())
    auto = details["auto_accept"]
    # Something is accepted, and neither the audit nor the truth puts its precision below the target.
    assert auto["share_auto_accepted"] > 0 and auto["audited_precision"] >= auto["target"]
    assert auto["accepted_true_precision"] >= auto["target"]
    errors = results["label_errors"]
    assert errors["injected_rate"] == 0.05 and errors["k"] == 30
    assert errors["precision_at_k"] >= 0.5 and errors["recall_at_k"] >= 0.5
    stopping = details["stopping"]
    assert stopping["relative_error"] <= stopping["tolerance"] == 0.5
    assert results["arrival_seconds"] is None and "load_average_1min_start" in results["machine"]
