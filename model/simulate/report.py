"""The benchmark's outputs: per-strategy summaries, targets, learning curves and the Markdown report."""

from __future__ import annotations

import io
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.hierarchy import LabelHierarchy
from model.io import atomic_write_bytes
from model.simulate.oracle import coarse_confusion_counts


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
        style = {"linewidth": 2.6, "color": "black"} if name == "ours" else {"linewidth": 1.4}
        plot_mean_band(axes, summary["cost"], summary["accuracy_mean"], summary["accuracy_std"], name, **style)
    finish_axes(axes, "cumulative label cost (human fine label = 1)", "fine test accuracy (%)", title)
    save_png(figure, path)


def plot_mean_band(axes, x, mean, std, label: str, **style) -> None:
    """One learning curve in percent: the mean over seeds as a line, ± one std as a light band."""
    mean_percent = np.asarray(mean, dtype=np.float64) * 100
    (line,) = axes.plot(np.asarray(x), mean_percent, marker="o", markersize=3, label=label, **style)
    if std is not None:
        band = np.asarray(std, dtype=np.float64) * 100
        axes.fill_between(np.asarray(x), mean_percent - band, mean_percent + band, alpha=0.12,
                          color=line.get_color())


def finish_axes(axes, xlabel: str, ylabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)


def save_png(figure, path: Path) -> None:
    """Write a matplotlib figure as a PNG atomically and close it."""
    import matplotlib.pyplot as plt

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
        best_other = max(others, key=lambda name: others[name])
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


def weak_annotator_report(true_coarse: np.ndarray, answers: Sequence[np.ndarray], hierarchy: LabelHierarchy) -> dict:
    """Coarse accuracy and confusion of the weak answers on the pool (summed over seeds when they differ)."""
    counts = np.sum([coarse_confusion_counts(true_coarse, a, hierarchy.n_coarse) for a in answers], axis=0)
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


def machine_description() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
