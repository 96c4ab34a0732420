"""The benchmark's data: the pool and test splits, their features, the hierarchy, and the real weak annotators' answers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.datasets import ImageSplit
from model.errors import ModelInputError, UnknownClassError
from model.hierarchy import LabelHierarchy
from model.split_features import SplitFeatures, cached_split_features
from model.simulate.options import SimulationOptions


BACKBONE_SPEC = "efficientnet_lite0"
WEAK_CLASSIFIERS: dict[str, str] = {"semantic": "efficientnet_lite2", "imagenet-map": "efficientnet_lite0"}
"""The ImageNet classifier each real weak annotator reads. The semantic annotator measured better with lite2 on
validation slices of both pools (bench/results/semantic_tuning.json); the map was written for lite0."""
NATIVE_IMAGE_SIZE: dict[str, int] = {"efficientnet_lite0": 224, "efficientnet_lite1": 240, "efficientnet_lite2": 260}
DEFAULT_WEAK_PAD: dict[str, float] = {"fashion-mnist": 0.15}
"""White margin around the image for the weak annotator's classifier, by data set (0 elsewhere): Fashion-MNIST's
objects touch the frame, and the ImageNet classifier recognised them far better with room around them."""


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
