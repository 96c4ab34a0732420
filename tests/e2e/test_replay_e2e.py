"""A reduced ``vlm-al replay`` against the real Label Studio: a small pool, two checkpoints, both samplings.

It checks the plumbing the full replay's figures rest on: the annotator takes what ``/next/`` serves, the
backend (WEAK_ANNOTATOR=simulated) retrains from the webhooks, every checkpoint's model saw exactly the labels
submitted, and the results file has the layout checks read.
"""

from __future__ import annotations

import json

import pytest

from backend.state import ProjectState
from harness.replay import ReplayOptions, replay, write_results

pytestmark = pytest.mark.e2e


def test_reduced_replay_through_label_studio(stack, tmp_path) -> None:
    options = ReplayOptions(pool_size=40, test_size=100, seeds=1, labels_per_checkpoint=6, checkpoints=2,
                            annotators=("simulated",), coarse_only_probability=0.25, fit_timeout_s=240.0)
    results = replay(options, stack.label_studio, tmp_path / "work")
    write_results(results, tmp_path / "out")

    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (tmp_path / "out" / "learning_curves.png").stat().st_size > 1000
    assert saved["dataset"] == "fashion-mnist" and saved["seeds"] == 1
    block = saved["annotators"]["simulated"]
    assert set(block["offline_ours"]) >= {"labels", "accuracy_mean"}
    for strategy in ("uncertainty", "uniform"):
        curve = block[strategy]
        assert curve["labels"] == [6, 12]
        assert len(curve["accuracy_mean"]) == len(curve["accuracy_std"]) == 2
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy_mean"])
        assert curve["tasks_served"] == 12
        assert 0.0 <= curve["wrong_pretick_share"] <= 1.0
        assert all(0.0 < s < options.fit_timeout_s for s in curve["seconds_to_reordered_queue"])
    # The simulated VLM answers through T with 85% on the diagonal: far above chance on 40 images.
    assert block["weak_annotator"]["coarse_accuracy"] > 0.6
    assert set(block["targets"]) >= {"within_2_points_of_offline_ours", "beats_uniform_by_5_points",
                                     "wrong_pretick_share_at_most_10_percent"}

    # Each checkpoint is a new model version that saw every label submitted up to it (fine or coarse-only).
    model_dir = tmp_path / "work" / "model-dir-simulated"
    for run in saved["runs"]:
        versions = [c["model_version"] for c in run["checkpoints"]]
        assert len(set(versions)) == 2
        for checkpoint in run["checkpoints"]:
            state = ProjectState(model_dir, run["project"])
            assert state.version_dir(checkpoint["model_version"]).is_dir()
        final = ProjectState(model_dir, run["project"]).current()
        assert final.model_version == versions[-1]
        assert final.metrics["n_fine"] + final.metrics.get("n_human_coarse", 0) == 12
    # The annotator's labels are in Label Studio: one annotation per served task, none twice.
    client = stack.client()
    for run in saved["runs"]:
        annotated = [t for t in client.tasks.list(project=run["project"]) if t.total_annotations]
        assert len(annotated) == 12
