"""Weak annotators on real images: coarse accuracy per data set, and cost per image beside the embedding pass.

Accuracy is measured on the test splits (Fashion-MNIST: the first 1000 test images; openclipart: its whole test
split), which no setting was tuned on (bench/tune_semantic.py tunes on the train splits). Annotators:

- ``semantic``: the semantic zero-shot annotator as the benchmark runs it (efficientnet_lite2 classifier);
- ``semantic-lite0``: the same annotator as the server runs it by default, reading the ImageNet head of the
  efficientnet_lite0 embedding backbone (one forward pass per image gives both);
- ``imagenet-map``: the hand-written ImageNet-to-group map (Fashion-MNIST's four groups only).

Speed: the same images go through "the embedding pass alone" and "the embedding pass plus the annotator, as the
server runs it", in alternating rounds in one process, so the ratio holds under whatever else loads the machine.

    .venv/bin/python bench/weak_annotators.py          # writes bench/results/weak_annotators.json
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np

from model.datasets import create_dataset
from model.embeddings import IMAGENET_PACKAGE, TimmBackbone, configure_torch_threads
from model.io import atomic_write_json, atomic_write_text
from model.split_features import cached_split_features, pad_image
from model.weak.classifier_label_map import ClassifierLabelMap, load_imagenet_map
from model.weak.semantic_zeroshot import SemanticZeroShot
from model.weak.text_encoder import packaged_minilm

DATASETS = {"fashion-mnist": (1000, 0.15), "openclipart": (None, 0.0)}
"""data set -> (first N test images or all, white margin for the classifier, as in the benchmark)."""
EMBEDDING_BACKBONE = ("efficientnet_lite0", 224)
ANNOTATOR_CLASSIFIERS = {"semantic": ("efficientnet_lite2", 260), "semantic-lite0": EMBEDDING_BACKBONE,
                         "imagenet-map": EMBEDDING_BACKBONE}
SPEED_IMAGES = 64
SPEED_ROUNDS = 5
COST_RATIO_TARGET = 1.15


def build_annotator(name: str, classifier, hierarchy, encoder, cache_dir: Path):
    if name.startswith("semantic"):
        return SemanticZeroShot(classifier, encoder, hierarchy, label_cache_dir=cache_dir)
    packaged = Path(__file__).resolve().parent.parent / "model" / "data" / "fashion_mnist_imagenet_map.json"
    return ClassifierLabelMap(classifier, load_imagenet_map(packaged, hierarchy.coarse_classes),
                              hierarchy.coarse_classes)


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def speed(images, embedding: TimmBackbone, annotator, classifier: TimmBackbone) -> tuple[float, float]:
    """(images/s of the embedding pass plus the annotator as the server runs it, images/s of the embedding pass
    alone): medians over alternating rounds, after one warm-up each."""
    shared = classifier is embedding

    def embedding_alone() -> None:
        embedding.embed(images)

    def with_annotator() -> None:
        if shared:  # one forward pass: the embedding and the ImageNet logits the annotator reads
            _, logits = embedding.embed_and_logits(images)
        else:
            embedding.embed(images)
            logits = classifier.classify_logits(images)
        annotator.annotate_logits(logits)

    embedding_alone(), with_annotator()
    alone, both = [], []
    for _ in range(SPEED_ROUNDS):
        alone.append(timed(embedding_alone))
        both.append(timed(with_annotator))
    return len(images) / float(np.median(both)), len(images) / float(np.median(alone))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default="~/.cache/vlm-al")
    parser.add_argument("--out", default="bench/results/weak_annotators.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cache_dir = Path(args.cache_dir).expanduser()
    configure_torch_threads(args.threads)
    encoder = packaged_minilm(cache_dir / "text-encoders")
    models = {
        spec: TimmBackbone(spec[0], weights=IMAGENET_PACKAGE, image_size=spec[1], batch_size=SPEED_IMAGES)
        for spec in {EMBEDDING_BACKBONE, *ANNOTATOR_CLASSIFIERS.values()}
    }
    results: dict = {}
    load_before = os.getloadavg()
    for dataset, (count, pad) in DATASETS.items():
        split = create_dataset(dataset).split("test")
        split = split.head(min(count, len(split))) if count else split
        hierarchy = split.hierarchy
        speed_images = [pad_image(split.image(i), pad) for i in range(min(SPEED_IMAGES, len(split)))]
        results[dataset] = {}
        for name, spec in ANNOTATOR_CLASSIFIERS.items():
            if name == "imagenet-map" and dataset != "fashion-mnist":
                continue  # the hand-written map names Fashion-MNIST's four groups only
            classifier = models[spec]
            annotator = build_annotator(name, classifier, hierarchy, encoder, cache_dir / "text-encoders")
            logits = cached_split_features(split, spec[0], spec[1], cache_dir=cache_dir, pad_fraction=pad,
                                           threads=args.threads).logits
            answers = annotator.annotate_logits(logits)
            accuracy = float(np.mean(answers.coarse_index == split.coarse_labels))
            with_annotator, alone = speed(speed_images, models[EMBEDDING_BACKBONE], annotator, classifier)
            results[dataset][name] = {
                "coarse_accuracy": round(accuracy, 4),
                "n_coarse": hierarchy.n_coarse,
                "answered": round(float(np.mean(answers.answered)), 4),
                "images_per_s": round(with_annotator, 2),
                "embedding_pass_images_per_s": round(alone, 2),
                "cost_ratio_to_embedding_pass": round(alone / with_annotator, 3),
                "shares_the_embedding_pass": classifier is models[EMBEDDING_BACKBONE],
                "classifier": f"timm:{spec[0]}:imagenet-package:{spec[1]}px",
                "chance": round(1.0 / hierarchy.n_coarse, 4),
                "accuracy_target": round(2.0 / hierarchy.n_coarse, 4),
                "meets_accuracy_target": bool(accuracy >= 2.0 / hierarchy.n_coarse),
                "test_images": len(split),
                "load_average": round(os.getloadavg()[0], 2),
            }
            print(dataset, name, results[dataset][name], flush=True)
    atomic_write_json(args.out, results)
    machine = (
        f"{platform.platform()}, {os.cpu_count()} CPUs, {args.threads} torch threads; load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    lines = ["# Weak annotators on the test splits", "", f"Machine: {machine}. Speeds are medians of alternating "
             "rounds on the same images: compare the ratio, not the absolute figures.", "",
             "| data set | annotator | classifier | coarse accuracy | chance | target (2x chance) | cost / embedding pass |",
             "|---|---|---|---|---|---|---|"]
    for dataset, block in results.items():
        for name, row in block.items():
            lines.append(
                f"| {dataset} ({row['test_images']} test images) | {name} | {row['classifier']} | "
                f"{row['coarse_accuracy'] * 100:.1f}% | {row['chance'] * 100:.0f}% | "
                f"{'met' if row['meets_accuracy_target'] else '**missed**'} | {row['cost_ratio_to_embedding_pass']:.2f}x |"
            )
    atomic_write_text(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
