"""``vlm-al simulate --task segmentation``: mIoU against the number of human masks on openclipart-scenes.

Setting (Belharbi et al.'s): every pool image has its image-level labels (cheap); an oracle draws a few masks
(the scene's true mask). Strategies, each at the same numbers of human masks:

- ``cam-only``: CAM pseudo-masks of the test images (for their predicted labels); the masks drawn so far only
  choose the CAM threshold;
- ``human-only-random`` / ``human-only-active``: the segmentation head trained on human masks alone;
- ``ours-random`` / ``ours-active``: the head on human masks plus confidence-weighted pseudo-masks of every
  other pool image (a foreground head trained on the human masks, with the CAMs' labels), with pixel-level
  self-learning.

Active runs pick masks with ``mask-uncertainty`` (pseudo-mask entropy, head-vs-pseudo-mask disagreement and
boundary uncertainty, diversified by k-means++). Every strategy of a seed starts from the same random masks. The
scored split's true masks are scored at full resolution. Settings are chosen with ``--evaluate-on validation``
(train scenes after the pool), never on the test split.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from model.errors import ModelInputError
from model.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:  # the pyramid's module imports torch; this module's CLI parsing must not
    from model.spatial_features import FeaturePyramid

STRATEGIES = ("cam-only", "human-only-random", "human-only-active", "ours-random", "ours-active")
ACTIVE_STRATEGY = "mask-uncertainty"


@dataclass(frozen=True)
class SegmentationOptions:
    pool_size: int = 600
    test_size: int = 200
    seeds: int = 5
    initial_masks: int = 4
    masks_per_round: int = 4
    rounds: int = 4
    strategies: tuple[str, ...] = STRATEGIES
    cache_dir: str = "~/.cache/vlm-al"
    out: str = "bench/results/simulate/segmentation"
    data_root: str | None = None
    threads: int = 1
    """Torch threads. One: the head's small convolutions ran 13x slower with two threads on 2 busy cores."""
    progress: bool = True
    head_steps: int = 80
    """Adam steps per head fit (``HeadSettings.steps``); fewer only for quick plumbing runs."""
    evaluate_on: str = "test"
    """``test``: the test split's first ``test_size`` scenes (the reported figures); ``validation``: train scenes
    after the pool (for choosing settings: never tune on the test split)."""

    def validate(self) -> None:
        for name in ("pool_size", "test_size", "seeds", "initial_masks", "masks_per_round", "threads", "head_steps"):
            if getattr(self, name) < 1:
                raise ModelInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.rounds < 0:
            raise ModelInputError(f"--rounds must be >= 0, got {self.rounds}")
        if self.initial_masks + self.rounds * self.masks_per_round > self.pool_size:
            raise ModelInputError("the masks bought exceed the pool")
        if self.evaluate_on not in ("test", "validation"):
            raise ModelInputError(f"--evaluate-on must be test or validation, got {self.evaluate_on!r}")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ModelInputError(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")


def parse_segmentation_options(argv: Sequence[str]) -> SegmentationOptions:
    defaults = SegmentationOptions()
    parser = argparse.ArgumentParser(prog="vlm-al simulate --task segmentation",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=defaults.pool_size, help="first N train scenes")
    parser.add_argument("--test-size", type=int, default=defaults.test_size, help="first N test scenes")
    parser.add_argument("--seeds", type=int, default=defaults.seeds)
    parser.add_argument("--initial-masks", type=int, default=defaults.initial_masks, help="random masks to start")
    parser.add_argument("--masks-per-round", type=int, default=defaults.masks_per_round)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    parser.add_argument("--cache-dir", default=defaults.cache_dir)
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--data-root", default=None, help="openclipart PNG folder (default: the Debian package's)")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--head-steps", type=int, default=defaults.head_steps, help="Adam steps per head fit")
    parser.add_argument("--evaluate-on", choices=("test", "validation"), default=defaults.evaluate_on,
                        help="validation: score train scenes after the pool (for tuning), not the test split")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(list(argv))
    options = SegmentationOptions(
        pool_size=args.pool_size, test_size=args.test_size, seeds=args.seeds, initial_masks=args.initial_masks,
        masks_per_round=args.masks_per_round, rounds=args.rounds,
        strategies=tuple(s.strip() for s in args.strategies.split(",") if s.strip()), cache_dir=args.cache_dir,
        out=args.out, data_root=args.data_root, threads=args.threads, progress=not args.no_progress,
        head_steps=args.head_steps, evaluate_on=args.evaluate_on,
    )
    options.validate()
    return options


def cached_masks(split, side: int, cache_dir: str | Path) -> np.ndarray:
    """uint8 (n, side, side): the split's true masks (rendered once at full size and cached by content id),
    resized by nearest neighbour."""
    from model.segmentation import resize_masks

    path = Path(cache_dir).expanduser() / "masks" / f"{split.dataset}-{split.split}-{split.content_id}.npz"
    masks = None
    try:
        with np.load(path) as data:
            masks = data["masks"]
        if masks.shape[0] != len(split):
            masks = None
    except (OSError, KeyError, ValueError):
        pass
    if masks is None:
        masks = np.stack([split.mask(i) for i in range(len(split))])
        buffer = io.BytesIO()
        np.savez_compressed(buffer, masks=masks)
        atomic_write_bytes(path, buffer.getvalue())
    return masks if masks.shape[-1] == side else resize_masks(masks, side)


@dataclass
class SceneData:
    label_names: tuple[str, ...]
    pool_features: FeaturePyramid
    pool_labels: np.ndarray
    pool_masks: np.ndarray
    """uint8 (n, TRAIN_SIDE, TRAIN_SIDE): the oracle's masks."""
    test_features: FeaturePyramid
    test_masks: np.ndarray
    """uint8 (n, canvas, canvas): the truth that is scored."""


def load_scene_data(options: SegmentationOptions) -> SceneData:
    from model.datasets.composite import CompositeSceneDataset
    from model.datasets.openclipart import OPENCLIPART_ROOT
    from model.segmentation import TRAIN_SIDE
    from model.spatial_features import cached_feature_pyramid

    dataset = CompositeSceneDataset(options.data_root or OPENCLIPART_ROOT)
    train = dataset.split("train")
    pool_size = min(options.pool_size, len(train))
    # Pyramids of a whole split are cached once (other benchmarks read the coarse maps too); runs take slices.
    train_features = cached_feature_pyramid(train, cache_dir=options.cache_dir, progress=options.progress)
    if options.evaluate_on == "validation":
        scored, scored_features, first = train, train_features, pool_size
        if first >= len(train):
            raise ModelInputError("no train scenes are left after the pool for a validation slice")
    else:
        scored = dataset.split("test")
        scored_features = cached_feature_pyramid(scored, cache_dir=options.cache_dir, progress=options.progress)
        first = 0
    rows = slice(first, min(first + options.test_size, len(scored)))
    scored_masks = cached_masks(scored.head(rows.stop), dataset.canvas, options.cache_dir)[rows]
    return SceneData(
        label_names=dataset.label_names,
        pool_features=train_features.take(slice(0, pool_size)).astype(np.float16),
        pool_labels=np.asarray(train.label_sets[:pool_size]),
        pool_masks=cached_masks(train.head(pool_size), TRAIN_SIDE, options.cache_dir),
        test_features=scored_features.take(rows).astype(np.float16),
        test_masks=scored_masks,
    )


def run_seed(data: SceneData, options: SegmentationOptions, seed: int) -> dict[str, list[float]]:
    """mIoU per strategy after the initial masks and after every round, for one seed."""
    from model.query import LabelCosts
    from model.segmentation import (
        CamClassifier,
        HeadSettings,
        HypercolumnProjection,
        ProjectedPool,
        SegmentationModel,
        SegmentationSettings,
        create_mask_strategy,
        mask_scores,
        mean_iou,
    )

    n_pool, n_classes = len(data.pool_features), len(data.label_names) + 1
    side = data.test_masks.shape[-1]
    known = np.ones(n_pool, dtype=bool)
    # What no mask changes is fitted once per seed and shared: the CAM classifier (all image labels are known)
    # and the hypercolumn projection of the pool's cells.
    classifier = CamClassifier(len(data.label_names)).fit(data.pool_features.coarse, data.pool_labels)
    pool_maps = ProjectedPool(data.pool_features,
                              HypercolumnProjection.fit(data.pool_features, HeadSettings().components, seed=seed))
    initial = np.random.default_rng(seed).choice(n_pool, options.initial_masks, replace=False)
    results: dict[str, list[float]] = {}
    if "cam-only" in options.strategies:
        results["cam-only"] = _cam_only_curve(data, options, classifier, initial, seed)
    for name in options.strategies:
        if name == "cam-only":
            continue
        rng = np.random.default_rng([seed, STRATEGIES.index(name)])
        use_pseudo = name.startswith("ours")
        active = name.endswith("active")
        settings = SegmentationSettings(use_pseudo=use_pseudo,
                                        head=replace(HeadSettings(), seed=seed, steps=options.head_steps))
        strategy = create_mask_strategy(ACTIVE_STRATEGY if active else "mask-random")
        human = list(initial)
        curve = []
        for round_index in range(options.rounds + 1):
            model = SegmentationModel(data.label_names, settings).fit(
                data.pool_features, data.pool_labels, known, np.asarray(human), data.pool_masks[human],
                classifier=classifier, pool_maps=pool_maps)
            predicted = model.predict(data.test_features, side)
            curve.append(mean_iou(predicted, data.test_masks, n_classes))
            if round_index == options.rounds:
                break
            unlabelled = np.setdiff1d(np.arange(n_pool), human)
            scores = mask_scores(model, data.pool_features, unlabelled)
            picked = strategy.query(scores, float(options.masks_per_round), LabelCosts(), rng)
            human.extend(selection.index for selection in picked)
        results[name] = curve
    return results


def _cam_only_curve(data: SceneData, options: SegmentationOptions, classifier, initial: np.ndarray,
                    seed: int) -> list[float]:
    """CAM alone: the test images' CAMs for their predicted labels; the masks (bought at random) only choose
    the threshold, on the pool."""
    from model.segmentation import SegmentationModel, cam_masks, mean_iou
    from model.segmentation.cam import choose_threshold

    side = data.test_masks.shape[-1]
    pool_cams = classifier.activation_maps(data.pool_features.coarse)
    test_cams = classifier.activation_maps(data.test_features.coarse)
    present = SegmentationModel(data.label_names).predicted_labels(classifier, data.test_features.coarse)
    rng = np.random.default_rng([seed, STRATEGIES.index("cam-only")])
    order = np.concatenate([initial, rng.permutation(np.setdiff1d(np.arange(len(pool_cams)), initial))])
    curve = []
    for round_index in range(options.rounds + 1):
        human = order[: options.initial_masks + round_index * options.masks_per_round]
        threshold = choose_threshold(pool_cams[human], data.pool_labels[human], data.pool_masks[human])
        curve.append(mean_iou(cam_masks(test_cams, present, side, threshold).masks, data.test_masks,
                              len(data.label_names) + 1))
    return curve


def run_segmentation(argv: Sequence[str]) -> int:
    options = parse_segmentation_options(argv)
    import torch

    torch.set_num_threads(options.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()
    data = load_scene_data(options)
    per_seed: dict[str, list[list[float]]] = {name: [] for name in options.strategies}
    for seed in range(options.seeds):
        seed_started = time.perf_counter()
        for name, curve in run_seed(data, options, seed).items():
            per_seed[name].append(curve)
        if options.progress:
            print(f"seed {seed}: {time.perf_counter() - seed_started:.0f} s", file=sys.stderr, flush=True)
    masks = [options.initial_masks + r * options.masks_per_round for r in range(options.rounds + 1)]
    strategies = {
        name: {
            "masks": masks,
            "miou_mean": np.mean(curves, axis=0).round(4).tolist(),
            "miou_std": np.std(curves, axis=0).round(4).tolist(),
        }
        for name, curves in per_seed.items()
    }
    out = Path(options.out)
    atomic_write_json(out / "results.json", {"strategies": strategies})
    run = {
        "options": asdict(options),
        "miou_per_seed": {name: np.round(curves, 4).tolist() for name, curves in per_seed.items()},
        "targets": segmentation_targets(per_seed),
        "pool_size": len(data.pool_features),
        "test_size": len(data.test_features),
        "labels": list(data.label_names),
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    atomic_write_json(out / "run.json", run)
    plot_miou(out / "miou.png", strategies)
    atomic_write_text(out / "results.md", render_markdown(strategies, run))
    print(render_markdown(strategies, run))
    return 0


def main(argv: Sequence[str]) -> int:
    return run_segmentation(argv)


def segmentation_targets(per_seed: dict[str, list[list[float]]]) -> dict:
    """The issue's targets: ours vs the head on human masks alone (at least 5 points, averaged over rounds) and
    vs CAM alone, for random and active selection."""
    means = {name: float(np.mean(curves)) for name, curves in per_seed.items()}
    out: dict = {"mean_miou_over_rounds": {name: round(value, 4) for name, value in means.items()}}
    for selection in ("random", "active"):
        ours, human = means.get(f"ours-{selection}"), means.get(f"human-only-{selection}")
        if ours is not None and human is not None:
            out[f"ours_minus_human_only_{selection}"] = round(ours - human, 4)
            out[f"ours_beats_human_only_{selection}_by_5_points"] = bool(ours - human >= 0.05)
        if ours is not None and "cam-only" in means:
            out[f"ours_{selection}_beats_cam_only"] = bool(ours > means["cam-only"])
    return out


def plot_miou(path: Path, strategies: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    for name, summary in strategies.items():
        masks = np.asarray(summary["masks"])
        mean, std = np.asarray(summary["miou_mean"]) * 100, np.asarray(summary["miou_std"]) * 100
        style = {"linewidth": 2.4} if name.startswith("ours") else {"linewidth": 1.3, "linestyle": "--"}
        (line,) = axes.plot(masks, mean, marker="o", markersize=3, label=name, **style)
        axes.fill_between(masks, mean - std, mean + std, alpha=0.12, color=line.get_color())
    axes.set_xlabel("human masks")
    axes.set_ylabel("test mIoU (%)")
    axes.set_title("openclipart-scenes segmentation")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def render_markdown(strategies: dict[str, dict], run: dict) -> str:
    masks = next(iter(strategies.values()))["masks"]
    scored = "train scenes after the pool" if run["options"]["evaluate_on"] == "validation" else "test split"
    lines = ["# Segmentation benchmark (openclipart-scenes)", "",
             (f"Pool {run['pool_size']} scenes, {run['test_size']} scored ({scored}), {run['options']['seeds']} "
              f"seeds; load average before/after {run['load_average_before']} / {run['load_average_after']}; "
              f"{run['wall_seconds']} s."), "",
             "| strategy | " + " | ".join(f"{m} masks" for m in masks) + " |",
             "|---|" + "---|" * len(masks)]
    for name, summary in strategies.items():
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" for m, s in zip(summary["miou_mean"], summary["miou_std"])]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Targets: `" + json.dumps(run["targets"]) + "`", ""]
    return "\n".join(lines)
