"""The offline benchmark: simulated weak annotator, seed set, oracle cost accounting, outputs; a reduced run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.datasets import fashion_mnist_hierarchy
from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.simulate import (
    LabelledPool,
    SimulatedOracle,
    buy_within_budget,
    coarse_confusion_counts,
    draw_seed_set,
    draw_weak_labels,
    parse_options,
    seed_rng,
    simulated_transition_matrix,
)


def test_simulated_transition_is_systematic_with_the_configured_accuracy():
    hierarchy = fashion_mnist_hierarchy()
    matrix = simulated_transition_matrix(hierarchy, 0.85)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(matrix), 0.85)
    tops, bottoms = hierarchy.coarse_index("tops"), hierarchy.coarse_index("bottoms and dresses")
    footwear, bags = hierarchy.coarse_index("footwear"), hierarchy.coarse_index("bags")
    # Confusions go to look-alikes, not uniformly: footwear is never called a top.
    assert matrix[tops, bottoms] > matrix[tops, bags] > 0
    assert matrix[footwear, tops] == 0 and matrix[footwear, bags] > 0


def test_simulated_transition_for_another_hierarchy_sends_errors_to_the_next_group():
    hierarchy = LabelHierarchy.from_groups({"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]})
    matrix = simulated_transition_matrix(hierarchy, 0.7)
    np.testing.assert_allclose(matrix, [[0.7, 0.3, 0], [0, 0.7, 0.3], [0.3, 0, 0.7]])
    with pytest.raises(ModelInputError):
        simulated_transition_matrix(hierarchy, 0.0)


def test_simulated_weak_labels_follow_the_transition_matrix():
    hierarchy = fashion_mnist_hierarchy()
    matrix = simulated_transition_matrix(hierarchy, 0.85)
    true_coarse = np.repeat(np.arange(hierarchy.n_coarse), 20_000)
    answers = draw_weak_labels(true_coarse, matrix, np.random.default_rng(0))
    counts = coarse_confusion_counts(true_coarse, answers, hierarchy.n_coarse)
    assert counts[:, -1].sum() == 0  # the simulated VLM always answers
    empirical = counts[:, :-1] / counts[:, :-1].sum(axis=1, keepdims=True)
    np.testing.assert_allclose(empirical, matrix, atol=0.01)
    # Same seed, same answers; another seed, other answers.
    again = draw_weak_labels(true_coarse, matrix, np.random.default_rng(0))
    other = draw_weak_labels(true_coarse, matrix, np.random.default_rng(1))
    assert np.array_equal(answers, again) and not np.array_equal(answers, other)


def test_seed_set_has_the_asked_number_per_class_and_depends_only_on_the_seed():
    labels = np.random.default_rng(3).integers(0, 10, size=600)
    first = draw_seed_set(labels, 10, 3, seed_rng(4, "seed-set"))
    second = draw_seed_set(labels, 10, 3, seed_rng(4, "seed-set"))
    other_seed = draw_seed_set(labels, 10, 3, seed_rng(5, "seed-set"))
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other_seed)
    assert np.bincount(labels[first], minlength=10).tolist() == [3] * 10
    assert len(set(first.tolist())) == 30


def test_seed_set_rejects_a_class_with_too_few_samples():
    labels = np.array([0, 0, 0, 1, 1])
    with pytest.raises(ModelInputError, match="fine class 1"):
        draw_seed_set(labels, 2, 3, np.random.default_rng(0))


def _oracle(n: int = 50) -> SimulatedOracle:
    fine = np.arange(n) % 10
    coarse = fashion_mnist_hierarchy().coarse_of_fine_labels(fine)
    weak = coarse.copy()
    weak[0] = MISSING_LABEL  # the annotator matched no class for sample 0
    return SimulatedOracle(fine, coarse, weak, cost_human_fine=1.0, cost_weak=0.02, cost_human_coarse=0.1)


def test_oracle_charges_each_label_once_and_records_the_truth():
    oracle = _oracle()
    pool = LabelledPool.empty(50)
    assert oracle.buy(pool, 3, "human_fine") == 1.0
    assert oracle.buy(pool, 3, "human_fine") == 0.0
    assert pool.fine[3] == 3
    assert oracle.buy(pool, 0, "weak_coarse") == 0.02
    assert oracle.buy(pool, 0, "weak_coarse") == 0.0  # asked once, even though it gave no answer
    assert pool.weak_coarse[0] == MISSING_LABEL and pool.weak_asked[0]
    assert oracle.buy(pool, 4, "human_coarse") == 0.1 and pool.human_coarse[4] == oracle.true_coarse[4]
    assert oracle.buy(pool, 3, "human_coarse") == 0.0  # its fine label already says the coarse one
    with pytest.raises(ModelInputError):
        oracle.buy(pool, 5, "guess")


def test_buying_stays_within_the_budget_and_pays_the_weak_answer_of_full_labels():
    oracle = _oracle()
    pool = LabelledPool.empty(50)
    selections = [(i, "weak_coarse") for i in range(10, 20)] + [(i, "human_fine") for i in range(20, 30)]
    spent = buy_within_budget(oracle, pool, selections, budget=3.0, with_weak_on_full=True)
    # 10 weak (0.2) + 2 full with their weak answers (2.04) fit; a third full label would exceed 3.
    assert spent == pytest.approx(2.24)
    assert np.sum(pool.fine != MISSING_LABEL) == 2
    assert pool.weak_asked[20] and pool.weak_asked[21] and not pool.weak_asked[22]
    assert spent <= 3.0


def test_options_parse_and_reject_bad_values():
    options = parse_options(["--strategies", "random,ours", "--weak-annotator", "simulated", "--seeds", "2"])
    assert options.strategies == ("random", "ours") and options.weak_annotators == ("simulated",)
    assert parse_options([]).weak_annotators == ("semantic", "imagenet-map", "simulated")
    # The hand-written map knows Fashion-MNIST's groups only: other data sets default to the other two.
    assert parse_options(["--dataset", "openclipart"]).weak_annotators == ("semantic", "simulated")
    with pytest.raises(ModelInputError, match="unknown weak annotators"):
        parse_options(["--weak-annotator", "semantic,oracle"])
    with pytest.raises(ModelInputError, match="unknown dataset"):
        parse_options(["--dataset", "cifar"])
    with pytest.raises(ModelInputError, match="unknown strategies"):
        parse_options(["--strategies", "random,best"])
    with pytest.raises(ModelInputError, match="budget"):
        parse_options(["--budget", "0"])
    defaults = parse_options([])
    assert (defaults.weak_image_size, defaults.weak_pad) == (None, None)
    assert parse_options(["--weak-image-size", "112", "--weak-pad", "0"]).weak_pad == 0.0
    with pytest.raises(ModelInputError, match="weak-pad"):
        parse_options(["--weak-pad", "1.5"])


def test_each_real_weak_annotator_reads_its_own_classifier_input():
    from model.simulate import weak_classifier_input

    fashion = parse_options([])
    # The map was written for lite0 at 224 px; the semantic annotator measured best with lite2 at its 260 px.
    assert weak_classifier_input("imagenet-map", fashion) == ("efficientnet_lite0", 224, 0.15)
    assert weak_classifier_input("semantic", fashion) == ("efficientnet_lite2", 260, 0.15)
    clipart = parse_options(["--dataset", "openclipart", "--weak-image-size", "300"])
    assert weak_classifier_input("semantic", clipart) == ("efficientnet_lite2", 300, 0.0)


def test_weak_annotator_reuses_the_embedding_pass_only_when_it_sees_the_same_image(tmp_path):
    from model.datasets import create_dataset
    from model.simulate import SplitFeatures, weak_annotator_logits

    split = create_dataset("fashion-mnist").split("train").head(3)
    pool = SplitFeatures(np.zeros((3, 4), np.float32), np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(3))
    same = parse_options(["--image-size", "224", "--weak-pad", "0", "--pool-size", "3"])
    assert weak_annotator_logits("imagenet-map", split, pool, same) is pool.logits
    # Other preprocessing needs its own pass, cached by content: real ImageNet logits, not the embedding pass's.
    other = parse_options(["--pool-size", "3", "--cache-dir", str(tmp_path), "--no-progress"])
    logits = weak_annotator_logits("imagenet-map", split, pool, other)
    assert logits.shape == (3, 1000) and any(tmp_path.rglob("*.npz"))


def test_the_imagenet_map_refuses_a_grouping_it_has_no_classes_for():
    from model.datasets import create_dataset
    from model.simulate import imagenet_map_answers

    hierarchy = create_dataset("openclipart").hierarchy
    with pytest.raises(ModelInputError, match=r"coarse classes not in .*--weak-annotator semantic"):
        imagenet_map_answers(np.zeros((2, 1000), np.float32), hierarchy, None)


def test_main_rejects_bad_options_and_reads_a_hierarchy_file(tmp_path, capsys):
    from model.datasets import FASHION_MNIST_CLASSES
    from model.simulate import load_hierarchy, main

    assert main(["--budget", "0"]) == 2
    assert "--budget must be > 0" in capsys.readouterr().err
    path = tmp_path / "map.json"
    path.write_text(json.dumps({name: ("shoes" if name in ("Sandal", "Sneaker", "Ankle boot") else "other")
                                for name in FASHION_MNIST_CLASSES}))
    hierarchy = load_hierarchy(str(path), fashion_mnist_hierarchy())
    assert hierarchy.fine_classes == FASHION_MNIST_CLASSES and hierarchy.n_coarse == 2
    path.write_text(json.dumps({"Sandal": "shoes"}))
    assert main(["--hierarchy", str(path)]) == 2
    assert "without a parent" in capsys.readouterr().err


def _summary(per_seed: list[list[float]]) -> dict:
    from model.simulate import StrategyRun, summarise_runs

    runs = [
        StrategyRun(cost=[30.0 * (r + 1) for r in range(len(acc))], accuracy=acc, human_fine_labels=[0] * len(acc),
                    weak_labels=[0] * len(acc), human_coarse_labels=[0] * len(acc))
        for acc in per_seed
    ]
    return summarise_runs(runs)


def test_targets_and_markdown_say_when_a_target_is_missed(tmp_path):
    from model.simulate import plot_learning_curves, render_markdown, targets

    strategies = {
        "random": _summary([[0.6, 0.70, 0.74], [0.6, 0.72, 0.76]]),
        "margin": _summary([[0.6, 0.71, 0.80], [0.6, 0.73, 0.80]]),
        "ours": _summary([[0.6, 0.74, 0.78], [0.6, 0.76, 0.78]]),
    }
    block = {"weak_annotator": {"coarse_accuracy": 0.85, "answered_fraction": 1.0}, "strategies": strategies,
             "plot": "curve.png"}
    block["targets"] = targets(block)
    # Mean over rounds 1..2: ours 0.765, random 0.73 -> +3.5 points (< 5); margin is better at the final budget.
    assert block["targets"]["ours_minus_random_mean_over_rounds"] == pytest.approx(0.035)
    assert block["targets"]["ours_beats_random_by_5_points"] is False
    assert block["targets"]["best_other_at_final_budget"] == "margin"
    assert block["targets"]["ours_best_at_final_budget"] is False
    assert strategies["ours"]["accuracy_std"][1] == pytest.approx(0.01)
    config = {"dataset": "fashion-mnist", "pool_size": 100, "split": "train", "test_size": 50, "image_size": 112, "seeds": 2,
              "seed_per_class": 3, "rounds": 2, "budget": 30.0, "cost_weak": 0.02, "cost_human_coarse": 0.1,
              "threads": 1, "machine": {"platform": "test", "cpu_count": 1, "torch": "x"}}
    text = render_markdown({"config": config, "conditions": {"simulated": block}, "wall_seconds": 1.0})
    assert "| ours | 78.0 ± 0.0 | 76.5 | +3.5 | 90.0 |" in text
    assert text.count("**missed**") == 2
    plot_learning_curves(tmp_path / "curve.png", "fashion-mnist, weak annotator: simulated", strategies)
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.bench
def test_reduced_benchmark_ours_beats_random(tmp_path):
    from model.simulate import main, mean_after_seed

    out = tmp_path / "out"
    argv = [
        "--pool-size", "1500", "--test-size", "1000", "--seeds", "2", "--rounds", "3",
        "--strategies", "random,ours", "--weak-annotator", "simulated",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "fashion-mnist" / "results.json").read_text())
    strategies = results["simulated"]["strategies"]
    for summary in strategies.values():
        assert len(summary["accuracy_mean"]) == 4 and len(summary["accuracy_per_seed"]) == 2
        steps = np.diff(summary["cost"])
        assert np.all(steps <= 30.0 + 1e-9) and np.all(steps > 20.0)
    ours = mean_after_seed(strategies["ours"]["accuracy_per_seed"])
    random = mean_after_seed(strategies["random"]["accuracy_per_seed"])
    assert ours > random, f"ours {ours:.4f} vs random {random:.4f}"
    assert (out / "fashion-mnist" / "learning_curve_simulated.png").is_file()
    assert (out / "fashion-mnist" / "results.md").is_file()
    # The rerun reads the embedding cache instead of running the backbone again.
    assert any((tmp_path / "cache").rglob("*.npz"))


@pytest.mark.bench
def test_reduced_benchmark_on_openclipart_with_the_semantic_annotator(tmp_path):
    """A data set other than Fashion-MNIST, its own hierarchy, and the real semantic annotator: the report holds
    the annotator's accuracy (well above chance), its true T (the pool confusion) and ours' estimate of it."""
    from model.simulate import main

    out = tmp_path / "out"
    argv = [
        "--dataset", "openclipart", "--pool-size", "300", "--test-size", "120", "--seeds", "1", "--rounds", "1",
        "--budget", "20", "--seed-per-class", "2", "--strategies", "random,ours", "--weak-annotator", "semantic",
        "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress",
    ]
    assert main(argv) == 0
    results = json.loads((out / "openclipart" / "results.json").read_text())
    weak = results["semantic"]["weak_annotator"]
    n_coarse = len(weak["coarse_classes"])
    assert weak["coarse_accuracy"] > 1.5 / n_coarse
    true_t = np.asarray(weak["true_transition_matrix"])
    assert true_t.shape == (n_coarse, n_coarse)
    np.testing.assert_allclose(true_t.sum(axis=1), 1.0, atol=1e-3)
    assert np.asarray(weak["estimated_transition_matrix_ours_final_mean"]).shape == (n_coarse, n_coarse)
    assert results["config"]["dataset"] == "openclipart" and results["config"]["pool_size"] == 300


def _write_imagefolder(root, per_fine: int = 8) -> None:
    """root/<coarse>/<fine>/<images>: coloured shapes, each fine class its own colour, numbered variants."""
    from PIL import Image, ImageDraw

    colours = {("warm", "red"): (220, 30, 30), ("warm", "orange"): (240, 140, 20),
               ("cool", "blue"): (30, 60, 220), ("cool", "green"): (30, 170, 60)}
    for (coarse, fine), colour in colours.items():
        folder = root / coarse / fine
        folder.mkdir(parents=True)
        for i in range(per_fine):
            image = Image.new("RGB", (48, 48), (255, 255, 255))
            ImageDraw.Draw(image).ellipse((4 + i, 4, 40, 40 - i), fill=colour)
            image.save(folder / f"shape{i // 2}_{i % 2 + 1:02d}.png")


def test_simulate_runs_on_an_imagefolder_and_names_a_malformed_one(tmp_path, capsys):
    from model.simulate import main

    data = tmp_path / "data"
    _write_imagefolder(data)
    out = tmp_path / "out"
    argv = ["--dataset", f"imagefolder:{data}", "--pool-size", "100", "--test-size", "100", "--image-size", "32",
            "--seeds", "1", "--rounds", "1", "--budget", "2", "--seed-per-class", "1", "--strategies",
            "random,margin", "--weak-annotator", "simulated", "--threads", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "imagefolder-data" / "results.json").read_text())
    assert results["config"]["hierarchy_classes"]["coarse_classes"] == ["cool", "warm"]
    assert set(results["simulated"]["strategies"]) == {"random", "margin"}
    capsys.readouterr()
    (data / "stray.png").write_bytes(b"x")  # an image directly under DIR: not <coarse>/<fine>/<image>
    assert main(argv) == 2
    assert "stray.png" in capsys.readouterr().err
