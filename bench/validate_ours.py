"""How ours' query settings were chosen: the benchmark's runs, scored on a validation slice of the train split.

The pool is the benchmark's (the first 6000 train images); accuracy is measured on train images 50000..52000,
which lie outside the pool, instead of the test split, so no test label takes part in any choice.

    python bench/validate_ours.py \
        '{"random": 0, "v": {"query_options": {"human_share": 0.7}, "config_candidates": {"weak_loss_weight": [0.2, 1]}}}' \
        simulated,imagenet-map 0,1,2,3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

import model.simulate as simulate
from model.datasets import ImageSplit
from model.datasets.base import short_digest
from model.simulate.options import DEFAULT_CACHE_DIR
from model.split_features import cached_split_features


def window(split: ImageSplit, start: int, stop: int) -> ImageSplit:
    """Images ``start..stop`` of a split, as a split of their own (the validation slice outside the pool)."""
    if not 0 <= start < stop <= len(split):
        raise SystemExit(f"--validation {start}:{stop} lies outside the {len(split)} images of the split")
    return ImageSplit(
        dataset=split.dataset, split=split.split, hierarchy=split.hierarchy,
        fine_labels=split.fine_labels[start:stop], groups=split.groups[start:stop],
        content_id=short_digest(f"{split.content_id}\nwindow {start}:{stop}"),
        loader=lambda i: split.image(start + i),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", help='JSON: {name: 0} runs a benchmark strategy; {name: {...}} a variant of ours')
    parser.add_argument("conditions", help="comma-separated weak-annotator conditions")
    parser.add_argument("seeds", help="comma-separated seeds")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    parser.add_argument("--validation", default="50000:52000", help="train images used for scoring")
    parser.add_argument("--pool-size", type=int, default=simulate.SimulationOptions.pool_size)
    args = parser.parse_args()
    start, stop = (int(x) for x in args.validation.split(":"))
    options = simulate.SimulationOptions(progress=False, threads=1, cache_dir=args.cache_dir,
                                         pool_size=args.pool_size)
    pool_split, _, _ = simulate.load_splits(options)
    full_split = simulate.load_splits(dataclasses.replace(options, pool_size=stop))[0]
    hierarchy = pool_split.hierarchy
    features = {
        name: cached_split_features(split, simulate.BACKBONE_SPEC, options.image_size, cache_dir=args.cache_dir)
        for name, split in (("pool", pool_split), ("validation", window(full_split, start, stop)))
    }
    pool, validation = features["pool"], features["validation"]
    data = simulate.BenchmarkData(hierarchy, pool.embeddings, pool.fine_labels, validation.embeddings,
                                  validation.fine_labels)
    conditions = args.conditions.split(",")
    real_answers = {}
    for condition in conditions:
        if condition in simulate.REAL_ANNOTATORS:
            logits = simulate.weak_annotator_logits(condition, pool_split, pool, options)
            real_answers[condition] = simulate.REAL_ANNOTATORS[condition](logits, hierarchy, options)
            print(f"{condition} coarse accuracy on the pool: {np.mean(real_answers[condition] == data.pool_coarse):.4f}")
    seeds = [int(s) for s in args.seeds.split(",")]
    ours = simulate.STRATEGY_SPECS["ours"]
    for name, variant in json.loads(args.variants).items():
        spec = simulate.STRATEGY_SPECS.get(name, ours)
        if isinstance(variant, dict):
            # "query_options": ours' strategy options; "config_candidates": its training settings, cross-validated
            # on the human labels when several.
            settings = dataclasses.replace(
                ours.settings,
                strategy_options={**ours.settings.strategy_options, **variant.get("query_options", {})},
                config_candidates={k: tuple(v) for k, v in variant.get(
                    "config_candidates", ours.settings.config_candidates).items()},
            )
            # "learner": other LearnerSettings fields (e.g. pseudo_label_confidence).
            settings = dataclasses.replace(settings, **variant.get("learner", {}))
            spec = dataclasses.replace(ours, settings=settings,
                                       expected_improvement=bool(variant.get("expected_improvement", False)))
        for condition in conditions:
            started = time.time()
            runs = []
            for seed in seeds:
                answers = real_answers.get(condition)
                if answers is None:
                    answers = simulate.simulated_answers(seed, data, options.simulated_accuracy)
                runs.append(simulate.run_strategy(simulate.RunJob(condition, name, seed), data, answers, options,
                                                  spec=spec))
            accuracy = np.array([run.accuracy for run in runs]) * 100
            print(
                f"{name:24s} {condition:13s} mean over rounds {accuracy[:, 1:].mean():.2f} final "
                f"{accuracy[:, -1].mean():.2f} | curve {' '.join(f'{a:.1f}' for a in accuracy.mean(axis=0))} | "
                f"human {np.mean([r.human_fine_labels[-1] for r in runs]):.0f} "
                f"weak {np.mean([r.weak_labels[-1] for r in runs]):.0f} | {time.time() - started:.0f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
