"""The offline active-learning benchmark behind ``vlm-al simulate``.

A simulated oracle answers every query from the data set's true labels (``model.datasets``: fashion-mnist,
openclipart, imagefolder:DIR); the weak annotator is a real offline one (``semantic``: zero-shot over any class
names; ``imagenet-map``: the hand-written ImageNet map, Fashion-MNIST's groups only) or a simulated VLM whose
coarse answers follow a known, systematic transition matrix. Strategies are compared at equal cost on the fine test accuracy of a model trained on
frozen embeddings, which are computed once and cached on disk.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from model.datasets import ImageSplit
from model.errors import ModelInputError, UnknownClassError
from model.hierarchy import MISSING_LABEL, LabelHierarchy
from model.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from model.learner import BENCHMARK_OURS_SETTINGS, SERVER_SETTINGS, ActiveLearner, LearnerSettings, RoundLabels, RoundModel
from model.split_features import SplitFeatures, cached_split_features

CONDITIONS = ("semantic", "imagenet-map", "simulated")
"""Weak-annotator conditions; imagenet-map exists only where its map covers the coarse classes (Fashion-MNIST)."""
STRATEGY_NAMES = (
    "random",
    "margin",
    "entropy",
    "k-center",
    "isoal-human-coarse",
    "vlm-no-T",
    "vlm-T-reference",
    "ours",
)
DEFAULT_CACHE_DIR = "~/.cache/vlm-al"
DEFAULT_OUT_DIR = "bench/results/simulate"
BACKBONE_SPEC = "efficientnet_lite0"
WEAK_CLASSIFIERS: dict[str, str] = {"semantic": "efficientnet_lite2", "imagenet-map": "efficientnet_lite0"}
"""The ImageNet classifier each real weak annotator reads. The semantic annotator measured better with lite2 on
validation slices of both pools (bench/results/semantic_tuning.json); the map was written for lite0."""
NATIVE_IMAGE_SIZE: dict[str, int] = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_WEAK_PAD: dict[str, float] = {"fashion-mnist": 0.15}
"""White margin around the image for the weak annotator's classifier, by data set (0 elsewhere): Fashion-MNIST's
objects touch the frame, and the ImageNet classifier recognised them far better with room around them."""

SIMULATED_CONFUSION_NEIGHBOURS: dict[str, dict[str, float]] = {
    # Where the simulated VLM's errors go, per true group (shares of the error mass). Plausible look-alikes:
    # long tops vs dresses, boots vs handbags; never uniform noise, so the transition matrix matters.
    "tops": {"bottoms and dresses": 0.7, "bags": 0.3},
    "bottoms and dresses": {"tops": 0.85, "bags": 0.15},
    "footwear": {"bags": 0.8, "bottoms and dresses": 0.2},
    "bags": {"footwear": 0.5, "tops": 0.5},
}


# --------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class SimulationOptions:
    dataset: str = "fashion-mnist"
    split: str = "train"
    pool_size: int = 6000
    test_size: int = 2000
    image_size: int = 112
    weak_image_size: int | None = None
    """Input size of the weak annotator's classifier; None: that classifier's native size."""
    weak_pad: float | None = None
    """None: the data set's default (``DEFAULT_WEAK_PAD``)."""
    hierarchy: str | None = None
    imagenet_map: str | None = None
    """JSON {coarse: [ImageNet classes]} for the imagenet-map condition; None: the packaged Fashion-MNIST map."""
    seeds: int = 5
    rounds: int = 6
    budget: float = 30.0
    seed_per_class: int = 3
    cost_weak: float = 0.02
    cost_human_coarse: float = 0.1
    strategies: tuple[str, ...] = STRATEGY_NAMES
    weak_annotators: tuple[str, ...] = ("semantic", "imagenet-map", "simulated")
    simulated_accuracy: float = 0.85
    cache_dir: str = DEFAULT_CACHE_DIR
    out: str = DEFAULT_OUT_DIR
    threads: int = 2
    data_root: str | None = None
    progress: bool = True

    def validate(self) -> None:
        positive = {
            "pool-size": self.pool_size,
            "test-size": self.test_size,
            "image-size": self.image_size,
            "weak-image-size": 16 if self.weak_image_size is None else self.weak_image_size,
            "seeds": self.seeds,
            "seed-per-class": self.seed_per_class,
            "threads": self.threads,
        }
        for name, value in positive.items():
            if value < 1:
                raise ModelInputError(f"--{name} must be at least 1, got {value}")
        if self.rounds < 0:
            raise ModelInputError(f"--rounds must be >= 0, got {self.rounds}")
        if not self.budget > 0:
            raise ModelInputError(f"--budget must be > 0, got {self.budget}")
        for name, value in (("cost-weak", self.cost_weak), ("cost-human-coarse", self.cost_human_coarse)):
            if not 0 < value <= 1:
                raise ModelInputError(f"--{name} must be in (0, 1], got {value}")
        if self.weak_pad is not None and not 0 <= self.weak_pad <= 1:
            raise ModelInputError(f"--weak-pad must be in [0, 1], got {self.weak_pad}")
        unknown_conditions = [c for c in self.weak_annotators if c not in CONDITIONS]
        if unknown_conditions or not self.weak_annotators:
            raise ModelInputError(f"unknown weak annotators {unknown_conditions}; choose from {list(CONDITIONS)}")
        if not 0 < self.simulated_accuracy <= 1:
            raise ModelInputError(f"--simulated-accuracy must be in (0, 1], got {self.simulated_accuracy}")
        unknown = [s for s in self.strategies if s not in STRATEGY_NAMES]
        if unknown or not self.strategies:
            raise ModelInputError(f"unknown strategies {unknown}; choose from {list(STRATEGY_NAMES)}")
        from model.datasets import DATASET_NAMES

        if self.dataset not in ("fashion-mnist", "openclipart") and not self.dataset.startswith("imagefolder:"):
            raise ModelInputError(f"unknown dataset {self.dataset!r}; supported: {list(DATASET_NAMES)}")
        if self.split not in ("train", "test"):
            raise ModelInputError(f"--split must be train or test, got {self.split!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    defaults = SimulationOptions()
    parser = argparse.ArgumentParser(
        prog="vlm-al simulate",
        description="Offline active-learning benchmark with a simulated oracle and a weak coarse annotator.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset", default=defaults.dataset, help="fashion-mnist, openclipart or imagefolder:DIR (DIR/<coarse>/<fine>/)"
    )
    parser.add_argument(
        "--split",
        default=defaults.split,
        choices=["train", "test"],
        help="split the pool is drawn from; accuracy is measured on the other split",
    )
    parser.add_argument(
        "--pool-size", type=int, default=defaults.pool_size, help="first N images of the split (capped at its size)"
    )
    parser.add_argument(
        "--test-size", type=int, default=defaults.test_size, help="first N images of the other split (capped)"
    )
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="backbone input size in pixels")
    parser.add_argument(
        "--weak-image-size",
        type=int,
        default=None,
        help="input size of the real weak annotators' ImageNet classifier (default: its native size)",
    )
    parser.add_argument(
        "--weak-pad",
        type=float,
        default=None,
        help="white margin around the image for the real weak annotators, as a fraction of its width "
        "(default: 0.15 for fashion-mnist, else 0)",
    )
    parser.add_argument(
        "--hierarchy", default=None, help="JSON map fine class -> coarse class (default: the data set's own)"
    )
    parser.add_argument(
        "--imagenet-map", default=None, help="JSON {coarse: [ImageNet classes]} for imagenet-map (default: Fashion-MNIST's)"
    )
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--budget", type=float, default=defaults.budget, help="label cost per round")
    parser.add_argument("--seed-per-class", type=int, default=defaults.seed_per_class)
    parser.add_argument("--cost-weak", type=float, default=defaults.cost_weak, help="cost of a VLM coarse label")
    parser.add_argument("--cost-human-coarse", type=float, default=defaults.cost_human_coarse)
    parser.add_argument("--strategies", default=",".join(STRATEGY_NAMES), help="comma-separated")
    parser.add_argument(
        "--weak-annotator",
        default="all",
        help="comma-separated of semantic, imagenet-map, simulated; 'all' = every one the data set supports",
    )
    parser.add_argument("--simulated-accuracy", type=float, default=defaults.simulated_accuracy)
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="CPU threads: torch threads for the embedding pass, worker processes for the runs",
    )
    parser.add_argument("--data-root", default=None, help="the data set's folder (default: its Debian package's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> SimulationOptions:
    args = build_arg_parser().parse_args(argv)
    if args.weak_annotator == "all":
        # The hand-written map only knows Fashion-MNIST's groups; with another map file it may be asked for by name.
        weak = CONDITIONS if args.dataset == "fashion-mnist" else ("semantic", "simulated")
    else:
        weak = tuple(c.strip() for c in args.weak_annotator.split(",") if c.strip())
    options = SimulationOptions(
        dataset=args.dataset,
        split=args.split,
        pool_size=args.pool_size,
        test_size=args.test_size,
        image_size=args.image_size,
        weak_image_size=args.weak_image_size,
        weak_pad=args.weak_pad,
        hierarchy=args.hierarchy,
        imagenet_map=args.imagenet_map,
        seeds=args.seeds,
        rounds=args.rounds,
        budget=args.budget,
        seed_per_class=args.seed_per_class,
        cost_weak=args.cost_weak,
        cost_human_coarse=args.cost_human_coarse,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()),
        weak_annotators=weak,
        simulated_accuracy=args.simulated_accuracy,
        cache_dir=args.cache_dir,
        out=args.out,
        threads=args.threads,
        data_root=args.data_root,
        progress=not args.no_progress,
    )
    options.validate()
    return options


# ------------------------------------------------------------------------------------ simulated annotators


def simulated_transition_matrix(hierarchy: LabelHierarchy, accuracy: float) -> np.ndarray:
    """The simulated VLM's known coarse transition matrix: ``accuracy`` on the diagonal of every row.

    The error mass goes to fixed look-alike groups (``SIMULATED_CONFUSION_NEIGHBOURS``) when the hierarchy has
    the default group names; for other hierarchies, to the next group in order (still systematic, not uniform).
    """
    if not 0 < accuracy <= 1:
        raise ModelInputError(f"simulated accuracy must be in (0, 1], got {accuracy}")
    n_coarse = hierarchy.n_coarse
    if n_coarse == 1:
        return np.ones((1, 1))
    matrix = np.zeros((n_coarse, n_coarse))
    use_named = set(hierarchy.coarse_classes) == set(SIMULATED_CONFUSION_NEIGHBOURS)
    for i, name in enumerate(hierarchy.coarse_classes):
        matrix[i, i] = accuracy
        if use_named:
            for neighbour, share in SIMULATED_CONFUSION_NEIGHBOURS[name].items():
                matrix[i, hierarchy.coarse_index(neighbour)] += (1.0 - accuracy) * share
        else:
            matrix[i, (i + 1) % n_coarse] += 1.0 - accuracy
    return matrix


def draw_weak_labels(true_coarse: np.ndarray, transition: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One weak answer per sample, drawn from the row of its true coarse class."""
    true_coarse = np.asarray(true_coarse, dtype=np.int64)
    n_coarse = transition.shape[0]
    if np.any((true_coarse < 0) | (true_coarse >= n_coarse)):
        raise ModelInputError(f"true coarse labels must lie in [0, {n_coarse})")
    cumulative = np.cumsum(transition, axis=1)
    cumulative[:, -1] = 1.0
    draws = rng.random(true_coarse.shape[0])
    return np.minimum((draws[:, None] >= cumulative[true_coarse]).sum(axis=1), n_coarse - 1).astype(np.int64)


def coarse_confusion_counts(true_coarse: np.ndarray, weak_coarse: np.ndarray, n_coarse: int) -> np.ndarray:
    """int64 (C, C+1): row = true coarse class, column = weak answer; the last column counts missing answers."""
    counts = np.zeros((n_coarse, n_coarse + 1), dtype=np.int64)
    answers = np.where(np.asarray(weak_coarse) == MISSING_LABEL, n_coarse, weak_coarse)
    np.add.at(counts, (np.asarray(true_coarse, dtype=np.int64), answers.astype(np.int64)), 1)
    return counts


def draw_seed_set(
    fine_labels: np.ndarray, n_fine: int, per_class: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of ``per_class`` random samples of every fine class (sorted)."""
    fine_labels = np.asarray(fine_labels, dtype=np.int64)
    chosen = []
    for fine in range(n_fine):
        members = np.flatnonzero(fine_labels == fine)
        if members.size < per_class:
            raise ModelInputError(
                f"fine class {fine} has {members.size} samples in the pool, fewer than the seed's {per_class}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------- the oracle


@dataclass
class LabelledPool:
    """What has been bought so far for every pool sample (``MISSING_LABEL`` = not yet)."""

    fine: np.ndarray
    weak_coarse: np.ndarray
    human_coarse: np.ndarray
    weak_asked: np.ndarray
    """bool: the weak annotator was asked (its answer may still be missing: it matched no class)."""

    @classmethod
    def empty(cls, n: int) -> LabelledPool:
        missing = [np.full(n, MISSING_LABEL, dtype=np.int64) for _ in range(3)]
        return cls(*missing, weak_asked=np.zeros(n, dtype=bool))

    def trusted(self) -> np.ndarray:
        """Samples with a human fine label and a weak answer: the pairs that estimate the noise model."""
        return np.flatnonzero((self.fine != MISSING_LABEL) & (self.weak_coarse != MISSING_LABEL))


@dataclass(frozen=True)
class SimulatedOracle:
    """Answers queries from the truth: human fine/coarse labels, and the weak annotator's precomputed answers."""

    true_fine: np.ndarray
    true_coarse: np.ndarray
    weak_answers: np.ndarray
    cost_human_fine: float
    cost_weak: float
    cost_human_coarse: float

    def price(self, pool: LabelledPool, index: int, kind: str) -> float:
        """What ``buy`` would charge: nothing for a label that is already known."""
        if kind == "human_fine":
            return 0.0 if pool.fine[index] != MISSING_LABEL else self.cost_human_fine
        if kind == "weak_coarse":
            return 0.0 if pool.weak_asked[index] else self.cost_weak
        if kind == "human_coarse":
            known = pool.human_coarse[index] != MISSING_LABEL or pool.fine[index] != MISSING_LABEL
            return 0.0 if known else self.cost_human_coarse
        raise ModelInputError(f"unknown label kind {kind!r}")

    def buy(self, pool: LabelledPool, index: int, kind: str) -> float:
        """Record one label in ``pool`` and return what it cost."""
        price = self.price(pool, index, kind)
        if price == 0.0:
            return 0.0
        if kind == "human_fine":
            pool.fine[index] = self.true_fine[index]
        elif kind == "weak_coarse":
            pool.weak_asked[index] = True
            pool.weak_coarse[index] = self.weak_answers[index]
        else:
            pool.human_coarse[index] = self.true_coarse[index]
        return price


# ------------------------------------------------------------------------------------ features and cache


# ------------------------------------------------------------------------------------------------ outputs


@dataclass
class StrategyRun:
    """One strategy under one condition and seed: a point after the seed set and after every round."""

    cost: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    human_fine_labels: list[int] = field(default_factory=list)
    weak_labels: list[int] = field(default_factory=list)
    human_coarse_labels: list[int] = field(default_factory=list)
    final_transition: list[list[float]] | None = None
    seconds: float = 0.0


def summarise_runs(runs: Sequence[StrategyRun]) -> dict:
    """Mean and std over seeds, per round (cost is averaged too: a strategy may leave a few cents unspent)."""
    accuracy = np.array([run.accuracy for run in runs], dtype=np.float64)
    cost = np.array([run.cost for run in runs], dtype=np.float64)
    return {
        "cost": cost.mean(axis=0).round(4).tolist(),
        "accuracy_mean": accuracy.mean(axis=0).round(5).tolist(),
        "accuracy_std": accuracy.std(axis=0).round(5).tolist(),
        "accuracy_per_seed": accuracy.round(5).tolist(),
        "cost_per_seed": cost.round(4).tolist(),
        "labels_per_round_mean": {
            "human_fine": np.mean([run.human_fine_labels for run in runs], axis=0).round(2).tolist(),
            "weak": np.mean([run.weak_labels for run in runs], axis=0).round(2).tolist(),
            "human_coarse": np.mean([run.human_coarse_labels for run in runs], axis=0).round(2).tolist(),
        },
        "seconds_per_seed_mean": round(float(np.mean([run.seconds for run in runs])), 2),
    }


def mean_after_seed(accuracy_per_seed: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over rounds 1..R (round 0 is the seed set, the same for every strategy), over seeds."""
    array = np.asarray(accuracy_per_seed, dtype=np.float64)
    return float(array[:, 1:].mean()) if array.shape[1] > 1 else float(array.mean())


def plot_learning_curves(path: Path, title: str, strategies: dict[str, dict]) -> None:
    """Accuracy vs cumulative cost, mean ± std over seeds, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5.5))
    for name, summary in strategies.items():
        cost = np.asarray(summary["cost"])
        mean = np.asarray(summary["accuracy_mean"]) * 100
        std = np.asarray(summary["accuracy_std"]) * 100
        style = {"linewidth": 2.6, "color": "black"} if name == "ours" else {"linewidth": 1.4}
        (line,) = axes.plot(cost, mean, marker="o", markersize=3, label=name, **style)
        axes.fill_between(cost, mean - std, mean + std, alpha=0.12, color=line.get_color())
    axes.set_xlabel("cumulative label cost (human fine label = 1)")
    axes.set_ylabel("fine test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def targets(condition_results: dict) -> dict:
    """The issue's targets for one condition: ours - random averaged over rounds, ours best at the final budget."""
    strategies = condition_results["strategies"]
    if "ours" not in strategies:
        return {}
    ours = strategies["ours"]
    out: dict = {}
    if "random" in strategies:
        gap = mean_after_seed(ours["accuracy_per_seed"]) - mean_after_seed(strategies["random"]["accuracy_per_seed"])
        out["ours_minus_random_mean_over_rounds"] = round(gap, 5)
        out["ours_beats_random_by_5_points"] = bool(gap >= 0.05)
    others = {n: s["accuracy_mean"][-1] for n, s in strategies.items() if n != "ours"}
    if others:
        best_other = max(others, key=others.get)
        out["best_other_at_final_budget"] = best_other
        out["ours_minus_best_other_at_final_budget"] = round(ours["accuracy_mean"][-1] - others[best_other], 5)
        out["ours_best_at_final_budget"] = bool(ours["accuracy_mean"][-1] > others[best_other])
    return out


def render_markdown(results: dict) -> str:
    config = results["config"]
    lines = [
        f"# `vlm-al simulate`: {config['dataset']} active-learning benchmark",
        "",
        f"Pool: first {config['pool_size']} images of the {config['split']} split; test: first "
        f"{config['test_size']} of the other split. Features: timm efficientnet_lite0 (packaged ImageNet weights) "
        f"at {config['image_size']} px. {config['seeds']} seeds; seed set {config['seed_per_class']} human fine "
        f"labels per class, then {config['rounds']} rounds of budget {config['budget']:g} "
        f"(human fine label 1, VLM coarse label {config['cost_weak']:g}, human coarse label "
        f"{config['cost_human_coarse']:g}). Accuracy is the fine test accuracy, mean ± std over seeds.",
        "",
        "\"Mean over rounds\" averages rounds 1..R (round 0, the seed set, is shared by all strategies). "
        "No test label is used for any choice: ours' settings were chosen on a validation slice of the train "
        "split outside the pool.",
        "",
    ]
    for condition, block in results["conditions"].items():
        weak = block["weak_annotator"]
        lines += [f"## Weak annotator: {condition}", ""]
        if "classifier" in weak:
            lines.append(
                f"Its ImageNet classifier: {weak['classifier']}; the embeddings stay at {config['image_size']} px."
            )
        lines.append(
            f"Weak coarse accuracy on the pool: {weak['coarse_accuracy'] * 100:.1f}% "
            f"(answered {weak['answered_fraction'] * 100:.1f}%)."
        )
        if "estimated_transition_max_abs_error" in weak:
            lines.append(
                f"Transition matrix estimated by ours (final round, mean over seeds) vs the true one (known for the "
                f"simulated VLM; the confusion on the pool for a real annotator): max abs error "
                f"{weak['estimated_transition_max_abs_error']:.3f}."
            )
        lines += ["", "| strategy | final accuracy | mean over rounds | − random (mean over rounds) | final cost |",
                  "|---|---|---|---|---|"]
        strategies = block["strategies"]
        random_mean = mean_after_seed(strategies["random"]["accuracy_per_seed"]) if "random" in strategies else None
        for name, summary in strategies.items():
            mean_rounds = mean_after_seed(summary["accuracy_per_seed"])
            gap = f"{(mean_rounds - random_mean) * 100:+.1f}" if random_mean is not None else "n/a"
            lines.append(
                f"| {name} | {summary['accuracy_mean'][-1] * 100:.1f} ± {summary['accuracy_std'][-1] * 100:.1f} "
                f"| {mean_rounds * 100:.1f} | {gap} | {summary['cost'][-1]:.1f} |"
            )
        checks = block.get("targets", {})
        lines.append("")
        if "ours_beats_random_by_5_points" in checks:
            verdict = "met" if checks["ours_beats_random_by_5_points"] else "**missed**"
            lines.append(
                f"- Target ours ≥ random + 5 points (mean over rounds): {verdict} "
                f"({checks['ours_minus_random_mean_over_rounds'] * 100:+.1f} points)."
            )
        if "ours_best_at_final_budget" in checks:
            verdict = "met" if checks["ours_best_at_final_budget"] else "**missed**"
            lines.append(
                f"- Target ours best at the final budget: {verdict} (best other: "
                f"{checks['best_other_at_final_budget']}, ours − it = "
                f"{checks['ours_minus_best_other_at_final_budget'] * 100:+.1f} points)."
            )
        lines += ["", f"![learning curve]({block['plot']})", ""]
    if "ours_learner_settings" in config:
        lines += [
            f"Ours runs `model.learner.ActiveLearner` with {config['ours_learner_settings']}; these settings were "
            "chosen on a validation slice of the pool's split outside the pool, never on the test split: see "
            "[ours_validation.md](../ours_validation.md). The server runs the same learner; it differs only in "
            f"{config.get('server_differs_in', {})}.",
            "",
        ]
    machine = config["machine"]
    lines.append(
        f"Run: {machine['platform']}, {machine['cpu_count']} CPUs, torch {machine['torch']}, "
        f"{config['threads']} worker threads, wall time {results['wall_seconds']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def load_splits(options: SimulationOptions) -> tuple[ImageSplit, ImageSplit, str]:
    """The pool (first ``pool_size`` images of ``options.split``) and the test set (first ``test_size`` of the
    other split), each capped at the split's size, and the test split's name."""
    from model.datasets import create_dataset

    dataset = create_dataset(options.dataset, root=options.data_root)
    test_split = "test" if options.split == "train" else "train"
    pool, test = dataset.split(options.split), dataset.split(test_split)
    return pool.head(min(options.pool_size, len(pool))), test.head(min(options.test_size, len(test))), test_split


def weak_pad(options: SimulationOptions) -> float:
    return DEFAULT_WEAK_PAD.get(options.dataset, 0.0) if options.weak_pad is None else options.weak_pad


def weak_classifier_input(condition: str, options: SimulationOptions) -> tuple[str, int, float]:
    """(timm model, image size, pad) of the ImageNet classifier a real weak annotator reads."""
    model_name = WEAK_CLASSIFIERS[condition]
    size = options.weak_image_size or NATIVE_IMAGE_SIZE[model_name]
    return model_name, size, weak_pad(options)


def weak_annotator_logits(condition: str, pool_split: ImageSplit, pool: SplitFeatures,
                          options: SimulationOptions) -> np.ndarray:
    """ImageNet logits of the pool as a real weak annotator's classifier sees it: its own model, input size and
    padding, from the embedding pass when those are the embedding pass's."""
    model_name, size, pad = weak_classifier_input(condition, options)
    if (model_name, size, pad) == (BACKBONE_SPEC, options.image_size, 0.0):
        return pool.logits
    return cached_split_features(pool_split, model_name, size, cache_dir=options.cache_dir, pad_fraction=pad,
                                 threads=options.threads, progress=options.progress).logits


# ---------------------------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class BenchmarkData:
    """Everything a run needs, as plain arrays (cheap to send to a worker process)."""

    hierarchy: LabelHierarchy
    pool_embeddings: np.ndarray
    pool_fine: np.ndarray
    test_embeddings: np.ndarray
    test_fine: np.ndarray

    @property
    def pool_coarse(self) -> np.ndarray:
        return self.hierarchy.coarse_of_fine_labels(self.pool_fine)


@dataclass(frozen=True)
class StrategySpec:
    """A named benchmark strategy: the learner's settings, and which weak labels the oracle sells it."""

    settings: LearnerSettings
    weak_source: str | None = None
    """None (human fine labels only), "vlm" or "human-coarse" (ISOAL: a human gives the true coarse label)"""
    expected_improvement: bool = False
    """Measure the expected improvement per label by retraining (always for ISO; an option for ours)."""

    @property
    def measures_improvement(self) -> bool:
        return self.settings.strategy == "iso" or self.expected_improvement


ISO_SHUFFLES = 1
"""Shuffles per expected-improvement estimate (the reference uses 3). Each costs 8 retrainings, and with thousands
of weak labels a retraining takes about a second on one core: one shuffle keeps the default run near 15 minutes."""

_BASELINE = LearnerSettings(variant="fine-only", transition="none", config_candidates={"weak_loss_weight": (1.0,)},
                            strategy="random")
_REFERENCE = replace(_BASELINE, variant="reference", strategy="iso", strategy_options={"n_shuffles": ISO_SHUFFLES})

STRATEGY_SPECS: dict[str, StrategySpec] = {
    "random": StrategySpec(_BASELINE),
    "margin": StrategySpec(replace(_BASELINE, strategy="margin")),
    "entropy": StrategySpec(replace(_BASELINE, strategy="entropy")),
    "k-center": StrategySpec(replace(_BASELINE, strategy="k-center")),
    "isoal-human-coarse": StrategySpec(_REFERENCE, weak_source="human-coarse"),
    "vlm-no-T": StrategySpec(_REFERENCE, weak_source="vlm"),
    "vlm-T-reference": StrategySpec(replace(_REFERENCE, transition="round0"), weak_source="vlm"),
    "ours": StrategySpec(BENCHMARK_OURS_SETTINGS, weak_source="vlm"),
}
"""Ours runs ``model.learner.BENCHMARK_OURS_SETTINGS``; the server runs ``SERVER_SETTINGS``, which differs in the
named settings the results print (``config.server_differs_in``)."""


@dataclass(frozen=True)
class RunJob:
    condition: str
    strategy: str
    seed: int


def seed_rng(seed: int, purpose: str) -> np.random.Generator:
    """Independent, reproducible streams per seed and purpose, so the seed set is the same for all strategies."""
    return np.random.default_rng([seed, sum(ord(ch) * 31**i for i, ch in enumerate(purpose)) % (2**32)])


def simulated_answers(seed: int, data: BenchmarkData, simulated_accuracy: float) -> np.ndarray:
    """The simulated VLM's answers on the pool: drawn through its known transition matrix, one stream per seed."""
    transition = simulated_transition_matrix(data.hierarchy, simulated_accuracy)
    return draw_weak_labels(data.pool_coarse, transition, seed_rng(seed, "simulated-vlm"))


def buy_within_budget(oracle: SimulatedOracle, pool: LabelledPool, selections: Sequence[tuple[int, str]],
                      budget: float, with_weak_on_full: bool) -> float:
    """Buy the selections in order while they fit in ``budget``; return the amount spent.

    With ``with_weak_on_full`` a human fine label also buys the weak annotator's answer on that sample, so it
    becomes a trusted pair for the noise model; that answer is paid for too.
    """
    spent = 0.0
    for index, kind in selections:
        price = oracle.price(pool, index, kind)
        if kind == "human_fine" and with_weak_on_full:
            price += oracle.price(pool, index, "weak_coarse")
        if spent + price > budget + 1e-9:
            continue
        spent += oracle.buy(pool, index, kind)
        if kind == "human_fine" and with_weak_on_full:
            spent += oracle.buy(pool, index, "weak_coarse")
    return spent


def round_labels(spec: StrategySpec, pool: LabelledPool) -> RoundLabels:
    """What the strategy has bought so far, as the learner reads it."""
    return RoundLabels(
        fine=pool.fine,
        weak_coarse=pool.weak_coarse if spec.weak_source == "vlm" else None,
        human_coarse=pool.human_coarse if spec.weak_source == "human-coarse" else None,
    )


def _accuracy(classifier, data: BenchmarkData) -> float:
    predicted = classifier.predict_fine_proba(data.test_embeddings).argmax(axis=1)
    return float(np.mean(predicted == data.test_fine))


def run_strategy(job: RunJob, data: BenchmarkData, weak_answers: np.ndarray, options: SimulationOptions,
                 on_round=None, spec: StrategySpec | None = None) -> StrategyRun:
    """One strategy, one seed: seed set, then ``options.rounds`` rounds of querying, buying and retraining.

    ``spec``: a variant to run under ``job.strategy``'s name (bench/validate_ours.py); by default the named one."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    spec = spec or STRATEGY_SPECS[job.strategy]
    oracle = SimulatedOracle(
        true_fine=data.pool_fine,
        true_coarse=data.pool_coarse,
        weak_answers=weak_answers,
        cost_human_fine=1.0,
        cost_weak=options.cost_weak,
        cost_human_coarse=options.cost_human_coarse,
    )
    uses_vlm = spec.weak_source == "vlm"
    pool = LabelledPool.empty(data.pool_fine.shape[0])
    seed_set = draw_seed_set(data.pool_fine, data.hierarchy.n_fine, options.seed_per_class, seed_rng(job.seed, "seed-set"))
    cost = buy_within_budget(oracle, pool, [(int(i), "human_fine") for i in seed_set], np.inf, uses_vlm)
    query_rng = seed_rng(job.seed, f"query:{job.strategy}")
    run = StrategyRun()
    learner = ActiveLearner(data.hierarchy, data.pool_embeddings.shape[1],
                            replace(spec.settings, seed=job.seed, num_threads=1))
    model = None
    for round_index in range(options.rounds + 1):
        if model is not None:
            selections = select_queries(spec, learner, data, pool, model, options, query_rng)
            spent = buy_within_budget(oracle, pool, selections, options.budget, uses_vlm)
            cost += spent
        model = learner.train(data.pool_embeddings, round_labels(spec, pool))
        transition = model.transition
        run.cost.append(round(cost, 6))
        run.accuracy.append(_accuracy(model.classifier, data))
        run.human_fine_labels.append(int(np.sum(pool.fine != MISSING_LABEL)))
        run.weak_labels.append(int(np.sum(pool.weak_asked)))
        run.human_coarse_labels.append(int(np.sum(pool.human_coarse != MISSING_LABEL)))
        if on_round is not None:
            on_round()
    if transition is not None:
        run.final_transition = np.asarray(transition.matrix).tolist()
    run.seconds = time.perf_counter() - started
    return run


def _run_job_in_worker(job: RunJob, data: BenchmarkData, weak_answers: np.ndarray, options: SimulationOptions,
                       progress_queue) -> tuple[RunJob, StrategyRun]:
    def report() -> None:
        if progress_queue is not None:
            progress_queue.put(1)

    return job, run_strategy(job, data, weak_answers, options, on_round=report)


def run_jobs(jobs: Sequence[RunJob], data: BenchmarkData, answers_by_condition: dict[str, list[np.ndarray]],
             options: SimulationOptions) -> dict[RunJob, StrategyRun]:
    """Run every job, in ``options.threads`` worker processes (one torch thread each) when more than one."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm import tqdm

    total_rounds = len(jobs) * (options.rounds + 1)
    results: dict[RunJob, StrategyRun] = {}
    with tqdm(total=total_rounds, desc="rounds", unit="round", disable=not options.progress) as bar:
        if options.threads == 1:
            for job in jobs:
                weak = answers_by_condition[job.condition][job.seed]
                results[job] = run_strategy(job, data, weak, options, on_round=lambda: bar.update(1))
            return results
        # spawn, not fork: the parent has already run torch, whose thread pools do not survive a fork.
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(options.threads, mp_context=context) as executor:
            queue = manager.Queue()
            pending = {
                executor.submit(
                    _run_job_in_worker, job, data, answers_by_condition[job.condition][job.seed], options, queue
                )
                for job in jobs
            }
            while pending:
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.update(queue.get())
                for future in done:
                    job, run = future.result()
                    results[job] = run
            while not queue.empty():
                bar.update(queue.get())
    return results


def weak_annotator_report(true_coarse: np.ndarray, answers: Sequence[np.ndarray], hierarchy: LabelHierarchy) -> dict:
    """Coarse accuracy and confusion of the weak answers on the pool (summed over seeds when they differ)."""
    counts = sum(coarse_confusion_counts(true_coarse, a, hierarchy.n_coarse) for a in answers)
    answered = counts[:, : hierarchy.n_coarse].sum()
    return {
        "coarse_accuracy": round(float(np.trace(counts[:, : hierarchy.n_coarse]) / counts.sum()), 5),
        "coarse_accuracy_when_answered": round(float(np.trace(counts[:, : hierarchy.n_coarse]) / max(answered, 1)), 5),
        "answered_fraction": round(float(answered / counts.sum()), 5),
        "fine_accuracy": None,
        "fine_accuracy_note": "the weak annotator answers coarse groups only; it implies no fine label",
        "coarse_classes": list(hierarchy.coarse_classes),
        "coarse_confusion_counts": counts.tolist(),
        "coarse_confusion_columns": [*hierarchy.coarse_classes, "no answer"],
    }


def load_hierarchy(path: str | None, dataset_hierarchy: LabelHierarchy) -> LabelHierarchy:
    """The data set's own hierarchy, or a JSON file {fine: coarse} that regroups the data set's fine classes."""
    if path is None:
        return dataset_hierarchy
    return LabelHierarchy.from_json_file(path, fine_classes=dataset_hierarchy.fine_classes)


class _LogitsOnly:
    """Stands in for the classifier of an annotator that is only given logits computed beforehand."""

    num_classes = 1000

    def __init__(self, name: str) -> None:
        self.name = name

    def classify_logits(self, images):  # pragma: no cover - the benchmark never gives this annotator images
        raise ModelInputError("the benchmark's weak annotators read cached logits only")


def imagenet_map_answers(logits: np.ndarray, hierarchy: LabelHierarchy, map_file: str | None) -> np.ndarray:
    """The hand-written ImageNet-to-group map (the packaged Fashion-MNIST one unless ``map_file``) on cached logits.

    Coarse classes the map does not name are an error that names them: the map cannot answer for them."""
    from importlib import resources

    from model.weak.classifier_label_map import ClassifierLabelMap, load_imagenet_map

    packaged = resources.files("model") / "data" / "fashion_mnist_imagenet_map.json"
    advice = "pass --imagenet-map FILE for this grouping, or use --weak-annotator semantic, which reads any class names"
    with resources.as_file(packaged) as default_path:
        path = Path(map_file) if map_file else default_path
        try:
            imagenet_to_coarse = load_imagenet_map(path, hierarchy.coarse_classes)
        except UnknownClassError as exc:
            raise ModelInputError(f"{exc}; {advice}") from exc
    unmapped = sorted(set(hierarchy.coarse_classes) - set(imagenet_to_coarse.values()))
    if unmapped:
        raise ModelInputError(f"the ImageNet map {path.name} names no ImageNet class for the coarse classes {unmapped}; {advice}")
    annotator = ClassifierLabelMap(_LogitsOnly("cached-logits"), imagenet_to_coarse, hierarchy.coarse_classes)
    return annotator.annotate_logits(logits).coarse_index


def semantic_answers(logits: np.ndarray, hierarchy: LabelHierarchy, options: SimulationOptions) -> np.ndarray:
    """The semantic zero-shot annotator, with the server's default settings, on cached logits."""
    from model.weak.semantic_zeroshot import SemanticZeroShot
    from model.weak.text_encoder import packaged_minilm

    cache_dir = Path(options.cache_dir).expanduser() / "text-encoders"
    annotator = SemanticZeroShot(_LogitsOnly(WEAK_CLASSIFIERS["semantic"]), packaged_minilm(cache_dir), hierarchy,
                                 label_cache_dir=cache_dir)
    return annotator.annotate_logits(logits).coarse_index


REAL_ANNOTATORS = {
    "semantic": semantic_answers,
    "imagenet-map": lambda logits, hierarchy, options: imagenet_map_answers(logits, hierarchy, options.imagenet_map),
}
"""Real weak annotators by condition: ``(pool logits, hierarchy, options) -> coarse answers``."""


def dataset_folder_name(dataset: str) -> str:
    """The results folder of a data set: its name, or ``imagefolder-<folder name>``."""
    if dataset.startswith("imagefolder:"):
        return "imagefolder-" + re.sub(r"[^A-Za-z0-9._-]+", "_", Path(dataset.split(":", 1)[1]).name or "root")
    return dataset


def machine_description() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    """``vlm-al simulate``: returns 0, or 2 with a message on stderr for bad options or missing data."""
    try:
        return _simulate(parse_options(argv))
    except ModelInputError as exc:
        print(f"vlm-al simulate: {exc}", file=sys.stderr)
        return 2


def _simulate(options: SimulationOptions) -> int:
    started = time.perf_counter()
    pool_split, test_split_images, test_split = load_splits(options)
    hierarchy = load_hierarchy(options.hierarchy, pool_split.hierarchy)
    pool = cached_split_features(pool_split, BACKBONE_SPEC, options.image_size, cache_dir=options.cache_dir,
                                 threads=options.threads, progress=options.progress)
    test = cached_split_features(test_split_images, BACKBONE_SPEC, options.image_size, cache_dir=options.cache_dir,
                                 threads=options.threads, progress=options.progress)
    data = BenchmarkData(hierarchy, pool.embeddings, pool.fine_labels, test.embeddings, test.fine_labels)

    answers_by_condition: dict[str, list[np.ndarray]] = {}
    for condition in options.weak_annotators:
        if condition in REAL_ANNOTATORS:
            logits = weak_annotator_logits(condition, pool_split, pool, options)
            answers = REAL_ANNOTATORS[condition](logits, hierarchy, options)
            answers_by_condition[condition] = [answers] * options.seeds
        else:
            answers_by_condition[condition] = [
                simulated_answers(seed, data, options.simulated_accuracy) for seed in range(options.seeds)
            ]
    # The slowest strategies first, so the two workers do not end with one long job each.
    slow_first = sorted(options.strategies, key=lambda name: STRATEGY_NAMES.index(name), reverse=True)
    jobs = [
        RunJob(condition, strategy, seed)
        for strategy in slow_first
        for condition in options.weak_annotators
        for seed in range(options.seeds)
    ]
    runs = run_jobs(jobs, data, answers_by_condition, options)

    out = Path(options.out) / dataset_folder_name(options.dataset)
    conditions: dict[str, dict] = {}
    for condition in options.weak_annotators:
        real = condition in REAL_ANNOTATORS
        answers = answers_by_condition[condition][:1] if real else answers_by_condition[condition]
        weak = weak_annotator_report(data.pool_coarse, answers, hierarchy)
        if real:
            model_name, size, pad = weak_classifier_input(condition, options)
            weak["classifier"] = f"timm:{model_name}:imagenet-package:{size}px, pad {pad:g}"
            # A real annotator's true T is its confusion on the pool, row-normalised (rows: true coarse class).
            counts = np.asarray(weak["coarse_confusion_counts"], dtype=np.float64)[:, : hierarchy.n_coarse]
            true_transition = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        else:
            true_transition = simulated_transition_matrix(hierarchy, options.simulated_accuracy)
        weak["true_transition_matrix"] = true_transition.round(4).tolist()
        finals = [runs[RunJob(condition, "ours", s)].final_transition for s in range(options.seeds)
                  if "ours" in options.strategies]
        if finals:
            estimated = np.mean(np.asarray(finals), axis=0)
            weak["estimated_transition_matrix_ours_final_mean"] = estimated.round(4).tolist()
            weak["estimated_transition_max_abs_error"] = round(float(np.abs(estimated - true_transition).max()), 4)
        strategies = {
            name: summarise_runs([runs[RunJob(condition, name, s)] for s in range(options.seeds)])
            for name in options.strategies
        }
        plot_name = f"learning_curve_{condition}.png"
        block = {"weak_annotator": weak, "strategies": strategies, "plot": plot_name}
        block["targets"] = targets(block)
        plot_learning_curves(out / plot_name, f"{options.dataset}, weak annotator: {condition}", strategies)
        conditions[condition] = block

    config = dict(asdict(options))
    config["strategies"] = list(options.strategies)
    config["weak_annotators"] = list(options.weak_annotators)
    config["pool_size"], config["test_size"] = len(pool_split), len(test_split_images)
    config["test_split"] = test_split
    config["hierarchy_classes"] = hierarchy.to_dict()
    config["backbone"] = f"timm:{BACKBONE_SPEC}:imagenet-package"
    config["ours_learner_settings"] = BENCHMARK_OURS_SETTINGS.to_dict()
    server = SERVER_SETTINGS.to_dict()
    config["server_differs_in"] = {k: {"server": v, "benchmark": config["ours_learner_settings"][k]}
                                   for k, v in server.items() if v != config["ours_learner_settings"][k]}
    config["machine"] = machine_description()
    results = {"config": config, "conditions": conditions, "wall_seconds": round(time.perf_counter() - started, 1)}
    # The layout: each condition at the top level, next to the config block.
    document = {**conditions, "config": config, "wall_seconds": results["wall_seconds"]}
    atomic_write_json(out / "results.json", document)
    atomic_write_text(out / "results.md", render_markdown(results))
    print(render_markdown(results))
    return 0


VALIDATION_SHARE = 1.0 / 3.0
"""Share of the human fine labels held out (per class) to score ISO's retrainings; never test labels."""


def validation_split(fine_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """bool (n,): a stratified third of the full-labelled samples (at least one per class with two or more)."""
    held_out = np.zeros(fine_labels.shape[0], dtype=bool)
    for label in np.unique(fine_labels[fine_labels != MISSING_LABEL]):
        members = rng.permutation(np.flatnonzero(fine_labels == label))
        if members.size >= 2:
            held_out[members[: max(1, int(round(members.size * VALIDATION_SHARE)))]] = True
    return held_out


def make_train_and_evaluate(spec: StrategySpec, data: BenchmarkData, pool: LabelledPool,
                            transition: np.ndarray | None, config, held_out: np.ndarray):
    """ISO's ``train_and_evaluate``: train on the given full and weak samples minus the held-out ones, score the
    fine accuracy on the held-out human fine labels."""
    from model.finegrained import FineGrainedClassifier

    validation = np.flatnonzero(held_out)
    true_coarse = data.hierarchy.coarse_of_fine_labels(pool.fine)
    weak_source = pool.weak_coarse if spec.weak_source == "vlm" else pool.human_coarse

    def train_and_evaluate(full_indices: np.ndarray, weak_indices: np.ndarray) -> float:
        full_indices = np.asarray(full_indices, dtype=np.int64)
        weak_indices = np.asarray(weak_indices, dtype=np.int64)
        full_indices = full_indices[~held_out[full_indices]]
        weak_indices = weak_indices[~held_out[weak_indices]]
        if full_indices.size == 0:
            return 0.0
        fine = np.full(pool.fine.shape[0], MISSING_LABEL, dtype=np.int64)
        fine[full_indices] = pool.fine[full_indices]
        coarse = np.full(pool.fine.shape[0], MISSING_LABEL, dtype=np.int64)
        # A full sample standing in for a weak one gives its true coarse label (ISO, before any weak label).
        coarse[weak_indices] = np.where(
            weak_source[weak_indices] != MISSING_LABEL, weak_source[weak_indices], true_coarse[weak_indices]
        )
        as_weak = coarse if spec.weak_source == "vlm" else None
        as_human_coarse = coarse if spec.weak_source == "human-coarse" else None
        classifier = FineGrainedClassifier(data.hierarchy, data.pool_embeddings.shape[1], config).fit(
            data.pool_embeddings, fine, as_weak, coarse_transition_matrix=transition,
            human_coarse_labels=as_human_coarse,
        )
        predicted = classifier.predict_fine_proba(data.pool_embeddings[validation]).argmax(axis=1)
        return float(np.mean(predicted == pool.fine[validation]))

    return train_and_evaluate


def select_queries(spec: StrategySpec, learner: ActiveLearner, data: BenchmarkData, pool: LabelledPool,
                   model: RoundModel, options: SimulationOptions,
                   rng: np.random.Generator) -> list[tuple[int, str]]:
    """Ask the learner's strategy for one round's labels: ``[(pool index, "human_fine" | "weak_coarse" |
    "human_coarse")]``."""
    from model.query import LabelCosts, LabelKind

    human_coarse = spec.weak_source == "human-coarse"
    costs = LabelCosts(human_fine=1.0, weak_coarse=options.cost_human_coarse if human_coarse else options.cost_weak)
    train_and_evaluate = None
    if spec.measures_improvement:
        held_out = validation_split(pool.fine, rng)
        transition = None if model.transition is None else model.transition.matrix
        train_and_evaluate = make_train_and_evaluate(spec, data, pool, transition, model.training_config, held_out)
    state = learner.pool_state(
        data.pool_embeddings, round_labels(spec, pool), model,
        weak_kind=LabelKind.HUMAN_COARSE if human_coarse else LabelKind.VLM_COARSE,
        train_and_evaluate=train_and_evaluate,
    )
    kinds = {LabelKind.HUMAN_FINE: "human_fine", LabelKind.VLM_COARSE: "weak_coarse",
             LabelKind.HUMAN_COARSE: "human_coarse"}
    return [(s.index, kinds[s.kind]) for s in learner.query(state, options.budget, costs, rng)]
