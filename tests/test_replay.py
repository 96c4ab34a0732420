"""The replay's own logic, without servers: options, resuming finished runs, retries, the summary and targets."""

from __future__ import annotations

import pytest
import requests

from harness import replay as rp
from model.errors import ModelInputError


def test_options_are_checked():
    with pytest.raises(ModelInputError, match="pool-size"):
        rp.ReplayOptions(pool_size=20, labels_per_checkpoint=10, checkpoints=3).validate()
    with pytest.raises(ModelInputError, match="unknown"):
        rp.ReplayOptions(annotators=("clip",)).validate()
    with pytest.raises(ModelInputError):
        rp.ReplayOptions(coarse_only_probability=1.0).validate()
    assert rp.ReplayOptions(labels_per_checkpoint=5, checkpoints=3).labels == [5, 10, 15]


def test_parse_options_reads_lists():
    options = rp.parse_options(["--annotators", "simulated", "--strategies", "uniform,uncertainty", "--seeds", "2"])
    assert options.annotators == ("simulated",) and options.strategies == ("uniform", "uncertainty")
    with pytest.raises(SystemExit):
        rp.parse_options(["--checkpoints", "0"])


def test_a_work_dir_keeps_its_finished_runs_for_the_same_options_only(tmp_path):
    options = rp.ReplayOptions(pool_size=40, labels_per_checkpoint=5, checkpoints=2)
    rp.check_same_options(tmp_path, options)
    rp.check_same_options(tmp_path, options)  # the same replay again: fine
    with pytest.raises(ModelInputError, match="pool_size"):
        rp.check_same_options(tmp_path, rp.ReplayOptions(pool_size=50, labels_per_checkpoint=5, checkpoints=2))
    record = rp.RunRecord("simulated", "uniform", 1, project_id=7,
                          checkpoints=[rp.Checkpoint(5, 0.4, "vlm-al-v1", 3.2), rp.Checkpoint(10, 0.5, "vlm-al-v2", 2.1)],
                          pretick_shown=3, pretick_wrong=1, served_fine_labels=9, served_coarse_only=1)
    rp.append_finished_run(tmp_path, record)
    assert rp.load_finished_runs(tmp_path) == {("simulated", "uniform", 1): record}


def test_transient_errors_are_retried_and_others_are_not(monkeypatch):
    monkeypatch.setattr(rp.time, "sleep", lambda seconds: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise requests.ReadTimeout("slow Label Studio")
        return "served"

    assert rp.retried(flaky, "GET next task") == "served" and len(calls) == 3
    with pytest.raises(requests.ConnectionError):
        rp.retried(lambda: (_ for _ in ()).throw(requests.ConnectionError("down")), "x", attempts=2)
    with pytest.raises(KeyError):
        rp.retried(lambda: {}["missing"], "a bug is not retried")


def test_summary_and_targets():
    options = rp.ReplayOptions(labels_per_checkpoint=10, checkpoints=2)
    runs = [rp.RunRecord("simulated", "uncertainty", seed, 1,
                         [rp.Checkpoint(10, 0.5 + 0.1 * seed, "v1", 2.0), rp.Checkpoint(20, 0.7, "v2", 4.0)],
                         pretick_shown=10, pretick_wrong=seed) for seed in range(2)]
    curve = rp.summarise(runs, options)
    assert curve["labels"] == [10, 20]
    assert curve["accuracy_mean"] == [0.55, 0.7] and curve["accuracy_std"] == [0.05, 0.0]
    assert curve["wrong_pretick_share"] == 0.05 and curve["seconds_to_reordered_queue"] == [2.0, 4.0]
    block = {"uncertainty": curve,
             "uniform": {"labels": [10, 20], "accuracy_mean": [0.4, 0.6]},
             "offline_ours": {"labels": [10, 18], "accuracy_mean": [0.6, 0.68]}}
    targets = rp.targets(block, "simulated")
    # Offline ours at 20 labels is flat beyond its last point (0.68): gaps -5 and +2 points.
    assert targets["uncertainty_minus_offline_ours_points"] == [-5.0, 2.0]
    assert targets["within_2_points_of_offline_ours"] is False
    assert targets["uncertainty_minus_uniform_points_mean_over_checkpoints"] == 12.5
    assert targets["beats_uniform_by_5_points"] is True
    assert targets["wrong_pretick_share_at_most_10_percent"] is True
