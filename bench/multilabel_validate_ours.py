"""Ours' settings for ``vlm-al simulate --task multilabel``, chosen on the train split only: pool = openclipart-scenes
train scenes 600-999, evaluation = train scenes 1000-1199 (the benchmark's pool is scenes 0-599 and its test is the
test split). 3 seeds, the benchmark's rounds and budget. Writes bench/results/simulate/multilabel/ours_validation.json.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch

from model.datasets import create_dataset
from model.io import atomic_write_json
from model.simulate.multilabel import (
    MultiLabelData,
    MultiLabelOptions,
    label_text_embeddings,
    run_strategy,
    semantic_label_scores,
    strategy_settings,
    summarise,
)
from model.spatial_features import cached_spatial_features

OUT = "bench/results/simulate/multilabel/ours_validation.json"


def main() -> None:
    torch.set_num_threads(1)
    dataset = create_dataset("openclipart-scenes")
    train = dataset.split("train")
    maps = np.asarray(cached_spatial_features(train))
    truth = np.asarray(train.label_sets, dtype=bool)
    names = tuple(dataset.label_names)
    scores = semantic_label_scores(maps[600:1200], names, "~/.cache/vlm-al")
    data = MultiLabelData(names, label_text_embeddings(names, "~/.cache/vlm-al"), maps[600:1000], truth[600:1000],
                          scores[:400], maps[1000:1200], truth[1000:1200], scores[400:])
    options = MultiLabelOptions(pool_size=400, test_size=200, seeds=3)
    ours = strategy_settings("ours", options.epochs)
    variants = {
        "random": strategy_settings("random", options.epochs),
        "ours": ours,
        "ours-weak1.0": replace(ours, training=replace(ours.training, weak_loss_weight=1.0)),
        "ours-share0.5": replace(ours, strategy_options={"human_share": 0.5}),
        "ours-weak1.0-share0.5": replace(ours, training=replace(ours.training, weak_loss_weight=1.0),
                                         strategy_options={"human_share": 0.5}),
    }
    out: dict[str, object] = {}
    for name, settings in variants.items():
        summary = summarise([run_strategy(name, seed, data, options, settings) for seed in range(options.seeds)])
        out[name] = {"map_mean": summary["map_mean"], "map_mean_over_rounds": round(float(np.mean(summary["map_mean"])), 2)}
        print(name, out[name], flush=True)
    out["load_average"] = [round(v, 2) for v in os.getloadavg()]
    atomic_write_json(OUT, out)


if __name__ == "__main__":
    main()
