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
from pathlib import Path

import numpy as np

import model.simulate as simulate


def validation_features(cache_dir: str, start: int, stop: int, image_size: int) -> simulate.SplitFeatures:
    from model.datasets import load_fashion_mnist
    from model.embeddings import IMAGENET_PACKAGE, TimmBackbone

    path = Path(cache_dir).expanduser() / "simulate" / f"validation-train-{start}-{stop}-{image_size}px.npz"
    cached = simulate.read_feature_cache(path)
    if cached is not None:
        return cached
    images, labels = load_fashion_mnist("train")
    backbone = TimmBackbone(simulate.BACKBONE_SPEC, weights=IMAGENET_PACKAGE, image_size=image_size)
    features = simulate.compute_split_features(images[start:stop], labels[start:stop], backbone, True, False, "val")
    simulate.write_feature_cache(path, features)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", help='JSON: {name: 0} runs a benchmark strategy; {name: {...}} a variant of ours')
    parser.add_argument("conditions", help="comma-separated weak-annotator conditions")
    parser.add_argument("seeds", help="comma-separated seeds")
    parser.add_argument("--cache-dir", default=simulate.DEFAULT_CACHE_DIR)
    parser.add_argument("--validation", default="50000:52000", help="train images used for scoring")
    args = parser.parse_args()
    start, stop = (int(x) for x in args.validation.split(":"))
    options = simulate.SimulationOptions(progress=False, threads=1, cache_dir=args.cache_dir)
    hierarchy = simulate.load_hierarchy(None)
    pool = simulate.load_split_features("train", options.pool_size, options.image_size, args.cache_dir, None, 1, False)
    validation = validation_features(args.cache_dir, start, stop, options.image_size)
    data = simulate.BenchmarkData(hierarchy, pool.embeddings, pool.fine_labels, validation.embeddings,
                                  validation.fine_labels)
    conditions = args.conditions.split(",")
    imagenet_answers = None
    if "imagenet-map" in conditions:
        logits = simulate.weak_annotator_logits(pool, options)
        imagenet_answers = simulate.imagenet_map_answers(logits, hierarchy, options.weak_image_size)
        print(f"imagenet-map coarse accuracy on the pool: {np.mean(imagenet_answers == data.pool_coarse):.4f}")
    seeds = [int(s) for s in args.seeds.split(",")]
    default_candidates = dict(simulate.OURS_CONFIG_CANDIDATES)
    for name, variant in json.loads(args.variants).items():
        # "config_candidates": ours' training settings, cross-validated on the human labels when several.
        simulate.OURS_CONFIG_CANDIDATES = (
            variant.get("config_candidates", default_candidates) if isinstance(variant, dict) else default_candidates
        )
        if isinstance(variant, dict):
            query_options = dict(simulate.OURS_QUERY_OPTIONS)
            query_options.update(variant.get("query_options", {}))
            simulate.STRATEGY_SPECS[name] = dataclasses.replace(
                simulate.STRATEGY_SPECS["ours"],
                query_options=tuple(query_options.items()),
                expected_improvement=bool(variant.get("expected_improvement", False)),
            )
        for condition in conditions:
            started = time.time()
            runs = []
            for seed in seeds:
                answers = simulate.weak_answers_for(condition, seed, data, imagenet_answers, options.simulated_accuracy)
                runs.append(simulate.run_strategy(simulate.RunJob(condition, name, seed), data, answers, options))
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
