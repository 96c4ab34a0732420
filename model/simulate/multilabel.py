"""``vlm-al simulate --task multilabel``: mAP and micro-F1 against label cost on openclipart-scenes.

Every strategy of a seed starts from the same random human label sets; each round buys ``budget`` cost units
(a human label set costs 1, the VLM's per-label answers for one image ``cost_weak``), retrains, and is scored on
the test split's scenes (whose drawings never appear in the pool: ``CompositeSceneDataset`` keeps every drawing on
one side of the split). The VLM is the semantic zero-shot annotator of the server (efficientnet_lite0's ImageNet
head read through the MiniLM label map), scoring every label; its per-label thresholds and 2×2 noise are calibrated
on the human label sets bought so far, never on the test split.

- ``random``, ``uncertainty``: the plain model (the map's mean, human label sets only), random or most uncertain;
- ``ours``: label-specific features, co-occurrence, forward-corrected VLM pseudo-labels, ``multilabel-ours``
  (uncertainty after reading the VLM's answers, diverse batches; a share of the budget buys VLM answers);
- ``ours-no-pseudo``, ``ours-no-cooccurrence``, ``ours-no-label-features``: ours without one of its three ideas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from model.errors import ModelInputError
from model.io import atomic_write_json
from model.multilabel import (
    MultiLabelLearner,
    MultiLabelRoundLabels,
    MultiLabelSettings,
    MultiLabelTrainingConfig,
    calibrate_label_thresholds,
    mean_average_precision,
    micro_f1,
)
from model.query import LabelCosts, LabelKind

STRATEGIES = ("random", "uncertainty", "ours", "ours-no-pseudo", "ours-no-cooccurrence", "ours-no-label-features")
OURS_HUMAN_SHARE = 0.75
"""Ours spends a quarter of each round on VLM answers (at 0.02 a quarter of 8 buys 100 images' answers)."""


def strategy_settings(name: str, epochs: int) -> MultiLabelSettings:
    """The learner settings of a benchmark strategy (see the module docstring)."""
    full = MultiLabelTrainingConfig(epochs=epochs)
    plain = replace(full, label_features=False, cooccurrence=False)
    ours = MultiLabelSettings(training=full, strategy="multilabel-ours",
                              strategy_options={"human_share": OURS_HUMAN_SHARE})
    settings = {
        "random": MultiLabelSettings(training=plain, pseudo_labels=False, strategy="multilabel-random"),
        "uncertainty": MultiLabelSettings(training=plain, pseudo_labels=False, strategy="multilabel-uncertainty"),
        "ours": ours,
        # Without pseudo-labels a VLM answer buys nothing: the whole budget goes to human label sets.
        "ours-no-pseudo": replace(ours, pseudo_labels=False, strategy_options={"human_share": 1.0}),
        "ours-no-cooccurrence": replace(ours, training=replace(full, cooccurrence=False)),
        "ours-no-label-features": replace(ours, training=replace(full, label_features=False)),
    }
    if name not in settings:
        raise ModelInputError(f"unknown multi-label strategy {name!r}; choose from {list(settings)}")
    return settings[name]


@dataclass(frozen=True)
class MultiLabelOptions:
    pool_size: int = 600
    test_size: int = 400
    seeds: int = 5
    initial_sets: int = 8
    rounds: int = 5
    budget: float = 8.0
    cost_weak: float = 0.02
    epochs: int = 100
    strategies: tuple[str, ...] = STRATEGIES
    cache_dir: str = "~/.cache/vlm-al"
    out: str = "bench/results/simulate/multilabel"
    threads: int = 1
    progress: bool = True

    def validate(self) -> None:
        for name in ("pool_size", "test_size", "seeds", "initial_sets", "epochs", "threads"):
            if getattr(self, name) < 1:
                raise ModelInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.rounds < 0 or not self.budget > 0 or not self.cost_weak > 0:
            raise ModelInputError("--rounds must be >= 0, --budget and --cost-weak > 0")
        if self.initial_sets + self.rounds * self.budget > self.pool_size:
            raise ModelInputError("the human label sets bought could exceed the pool")
        for name in self.strategies:
            strategy_settings(name, self.epochs)


def parse_options(argv: Sequence[str]) -> MultiLabelOptions:
    defaults = MultiLabelOptions()
    parser = argparse.ArgumentParser(prog="vlm-al simulate --task multilabel", description=__doc__.split("\n\n")[0])
    for field_name in ("pool_size", "test_size", "seeds", "initial_sets", "rounds", "epochs", "threads"):
        parser.add_argument(f"--{field_name.replace('_', '-')}", type=int, default=getattr(defaults, field_name))
    parser.add_argument("--budget", type=float, default=defaults.budget, help="cost units bought per round")
    parser.add_argument("--cost-weak", type=float, default=defaults.cost_weak)
    parser.add_argument("--strategies", default=",".join(defaults.strategies))
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(list(argv))
    options = MultiLabelOptions(
        pool_size=args.pool_size, test_size=args.test_size, seeds=args.seeds, initial_sets=args.initial_sets,
        rounds=args.rounds, budget=args.budget, cost_weak=args.cost_weak, epochs=args.epochs,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()), cache_dir=args.cache_dir,
        out=args.out, threads=args.threads, progress=not args.no_progress,
    )
    options.validate()
    return options


@dataclass(frozen=True)
class MultiLabelData:
    label_names: tuple[str, ...]
    label_text: np.ndarray
    pool_maps: np.ndarray
    pool_truth: np.ndarray
    pool_weak_scores: np.ndarray
    test_maps: np.ndarray
    test_truth: np.ndarray
    test_weak_scores: np.ndarray


def label_text_embeddings(label_names: Sequence[str], cache_dir: str) -> np.ndarray:
    """Unit MiniLM embeddings of the labels' prompt ensembles (the attention queries' source)."""
    from model.weak.semantic_zeroshot import PROMPT_TEMPLATES, prompt_embedding, readable
    from model.weak.text_encoder import packaged_minilm

    encoder = packaged_minilm(Path(cache_dir).expanduser() / "text-encoders")
    return np.stack([prompt_embedding(encoder, [readable(name)], PROMPT_TEMPLATES) for name in label_names])


def semantic_label_scores(maps: np.ndarray, label_names: Sequence[str], cache_dir: str) -> np.ndarray:
    """The semantic zero-shot annotator's per-label scores, from ImageNet logits read off the cached maps
    (efficientnet's head is global average pooling and one linear layer, so no second forward pass is needed)."""
    import torch

    from model.multilabel.labels import flat_label_hierarchy
    from model.spatial_features import spatial_extractor
    from model.weak.semantic_zeroshot import SemanticZeroShot
    from model.weak.text_encoder import packaged_minilm

    backbone = spatial_extractor("efficientnet_lite0").backbone
    head = backbone.model.get_classifier()
    logits = np.empty((maps.shape[0], 1000), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, maps.shape[0], 256):
            pooled = torch.from_numpy(np.asarray(maps[start : start + 256], dtype=np.float32).mean(axis=(1, 2)))
            logits[start : start + 256] = head(pooled).numpy()
    cache = Path(cache_dir).expanduser() / "text-encoders"
    annotator = SemanticZeroShot(backbone, packaged_minilm(cache), flat_label_hierarchy(label_names),
                                 label_cache_dir=cache)
    return annotator.label_scores_logits(logits)


def load_data(options: MultiLabelOptions) -> MultiLabelData:
    from model.datasets.composite import CompositeSceneDataset
    from model.spatial_features import cached_spatial_features

    dataset = CompositeSceneDataset()  # what create_dataset("openclipart-scenes") builds, with its own type
    train, test = dataset.split("train"), dataset.split("test")
    if options.pool_size > len(train) or options.test_size > len(test):
        raise ModelInputError(f"the scenes hold {len(train)} train and {len(test)} test images")
    pool_maps = np.asarray(cached_spatial_features(train, cache_dir=options.cache_dir, progress=options.progress)
                           [: options.pool_size])
    test_maps = np.asarray(cached_spatial_features(test, cache_dir=options.cache_dir, progress=options.progress)
                           [: options.test_size])
    names = tuple(dataset.label_names)
    return MultiLabelData(
        label_names=names, label_text=label_text_embeddings(names, options.cache_dir),
        pool_maps=pool_maps, pool_truth=np.asarray(train.label_sets[: options.pool_size], dtype=bool),
        pool_weak_scores=semantic_label_scores(pool_maps, names, options.cache_dir),
        test_maps=test_maps, test_truth=np.asarray(test.label_sets[: options.test_size], dtype=bool),
        test_weak_scores=semantic_label_scores(test_maps, names, options.cache_dir),
    )


def run_strategy(name: str, seed: int, data: MultiLabelData, options: MultiLabelOptions,
                 settings: MultiLabelSettings | None = None) -> dict[str, list[float]]:
    """One strategy, one seed: the seed sets, then ``rounds`` rounds of buying and retraining.

    ``settings``: a variant to run under ``name`` (validation sweeps); by default the named strategy's."""
    settings = settings or strategy_settings(name, options.epochs)
    n = data.pool_maps.shape[0]
    learner = MultiLabelLearner(data.label_names, data.label_text, data.pool_maps, settings, seed=seed)
    test_positions = learner.projection.transform(data.test_maps)
    labelled = np.zeros(n, dtype=bool)
    labelled[np.random.default_rng(seed).choice(n, options.initial_sets, replace=False)] = True
    answered = np.zeros(n, dtype=bool)
    rng = np.random.default_rng([seed, 1])
    costs = LabelCosts(human_fine=1.0, weak_coarse=options.cost_weak)
    cost = float(options.initial_sets)
    curve: dict[str, list[float]] = {"cost": [], "map": [], "micro_f1": [], "micro_f1_at_half": []}
    for round_index in range(options.rounds + 1):
        labels = MultiLabelRoundLabels(human_sets=np.where(labelled[:, None], data.pool_truth, False),
                                       labelled=labelled.copy(), weak_scores=data.pool_weak_scores,
                                       weak_answered=answered.copy())
        model = learner.train(labels)
        probabilities = model.classifier.predict_proba_projected(test_positions)
        curve["cost"].append(round(cost, 4))
        curve["map"].append(mean_average_precision(probabilities, data.test_truth))
        curve["micro_f1"].append(micro_f1(calibrated_decisions(model.probabilities, labels, probabilities),
                                          data.test_truth))
        curve["micro_f1_at_half"].append(micro_f1(probabilities >= 0.5, data.test_truth))
        if round_index == options.rounds:
            break
        for selection in learner.query(learner.pool(labels, model), options.budget, costs, rng):
            if selection.kind is LabelKind.HUMAN_FINE:
                labelled[selection.index] = True
                cost += costs.human_fine
            elif settings.pseudo_labels:
                answered[selection.index] = True
                cost += costs.weak_coarse
    return curve


def calibrated_decisions(pool_probabilities: np.ndarray, labels: MultiLabelRoundLabels,
                         probabilities: np.ndarray) -> np.ndarray:
    """Present/absent per label with thresholds calibrated on the human label sets: each label's cut makes the
    pool as often present as the human sets say it is (a per-label cut from human labels, no global 0.5; the
    in-sample F1 cut would be fitted to the training rows' own, overconfident, probabilities)."""
    labelled = np.asarray(labels.labelled, dtype=bool)
    thresholds = calibrate_label_thresholds(pool_probabilities[labelled], np.asarray(labels.human_sets)[labelled],
                                            min_positives=labelled.size + 1, pool_scores=pool_probabilities)
    return thresholds.apply(probabilities)


def summarise(curves: list[dict[str, list[float]]]) -> dict[str, list[float]]:
    summary: dict[str, list[float]] = {"cost": np.mean([c["cost"] for c in curves], axis=0).round(3).tolist()}
    for key in ("map", "micro_f1", "micro_f1_at_half"):
        values = np.array([c[key] for c in curves]) * 100
        summary[f"{key}_mean"] = values.mean(axis=0).round(2).tolist()
        summary[f"{key}_std"] = values.std(axis=0).round(2).tolist()
    return summary


def weak_annotator_quality(data: MultiLabelData) -> dict[str, float]:
    """How good the VLM's per-label scores are on the test split (reported only, never tuned on)."""
    return {"test_map": round(mean_average_precision(data.test_weak_scores, data.test_truth) * 100, 2),
            "test_map_chance": round(float(data.test_truth.mean()) * 100, 2)}


def plot(path: Path, strategies: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 5))
    for name, summary in strategies.items():
        style = {"linewidth": 2.6, "color": "black"} if name == "ours" else {"linewidth": 1.4}
        for axis, key in zip(axes, ("map", "micro_f1")):
            cost, mean, std = (np.asarray(summary[k]) for k in ("cost", f"{key}_mean", f"{key}_std"))
            (line,) = axis.plot(cost, mean, marker="o", markersize=3, label=name, **style)
            axis.fill_between(cost, mean - std, mean + std, alpha=0.12, color=line.get_color())
    for axis, label in zip(axes, ("mAP (%)", "micro-F1, per-label cuts from the human sets (%)")):
        axis.set_xlabel("cumulative label cost (human label set = 1)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("openclipart-scenes, multi-label: mean ± std over seeds")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(options: MultiLabelOptions) -> dict:
    import torch

    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    data = load_data(options)
    curves: dict[str, list[dict[str, list[float]]]] = {name: [] for name in options.strategies}
    for seed in range(options.seeds):
        for name in options.strategies:
            curves[name].append(run_strategy(name, seed, data, options))
            if options.progress:
                print(f"seed {seed} {name}: mAP {np.round(np.array(curves[name][-1]['map']) * 100, 1).tolist()}",
                      file=sys.stderr, flush=True)
    strategies = {name: summarise(runs) for name, runs in curves.items()}
    random_map = np.asarray(strategies["random"]["map_mean"]) if "random" in strategies else None
    gains = {name: round(float(np.mean(np.asarray(s["map_mean"]) - random_map)), 2)
             for name, s in strategies.items()} if random_map is not None else {}
    return {
        "strategies": strategies,
        "map_gain_over_random_averaged_over_rounds": gains,
        "weak_annotator": weak_annotator_quality(data),
        "labels": list(data.label_names),
        "options": asdict(options),
        "settings": {name: strategy_settings(name, options.epochs).to_dict() for name in options.strategies},
        "wall_seconds": round(time.perf_counter() - started, 1),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main(argv: Sequence[str]) -> int:
    options = parse_options(argv)
    results = run(options)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    plot(out / "learning_curves.png", results["strategies"])
    print(json.dumps({"gains_over_random": results["map_gain_over_random_averaged_over_rounds"],
                      "weak_annotator": results["weak_annotator"], "out": str(out)}, indent=2))
    return 0
