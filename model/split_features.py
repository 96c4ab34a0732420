"""Embeddings and ImageNet logits of a data set split, from one forward pass per image, cached on disk.

The benchmarks (``vlm-al simulate``, bench/weak_annotators.py, bench/tune_semantic.py) read frozen features of
the same images many times; the cache is keyed by the split's content id, the backbone's name and the
preprocessing, so a changed data set, model or padding never reuses stale vectors.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.datasets import ImageSplit
from model.errors import ModelInputError
from model.io import atomic_write_bytes


@dataclass(frozen=True)
class SplitFeatures:
    """Per image of a split: backbone embeddings, ImageNet logits and fine labels."""

    embeddings: np.ndarray
    logits: np.ndarray
    fine_labels: np.ndarray

    def head(self, n: int) -> SplitFeatures:
        return SplitFeatures(self.embeddings[:n], self.logits[:n], self.fine_labels[:n])


def pad_image(image: Image.Image, fraction: float) -> Image.Image:
    """Add a white margin of ``fraction`` of the longest side on every side (objects that touch the frame are
    recognised far better by an ImageNet classifier with some room around them)."""
    if not 0.0 <= fraction <= 1.0:
        raise ModelInputError(f"pad fraction must be in [0, 1], got {fraction}")
    if fraction == 0:
        return image
    margin = int(round(fraction * max(image.size)))
    canvas = Image.new("RGB", (image.width + 2 * margin, image.height + 2 * margin), (255, 255, 255))
    canvas.paste(image.convert("RGB"), (margin, margin))
    return canvas


def compute_split_features(
    split: ImageSplit,
    backbone,
    *,
    pad_fraction: float = 0.0,
    progress: bool = False,
    chunk_size: int = 256,
) -> SplitFeatures:
    """Embeddings and logits of every image of ``split`` (``backbone.embed_and_logits``, chunk by chunk)."""
    from tqdm import tqdm

    embeddings, logits = [], []
    description = f"embedding {split.dataset} {split.split} ({backbone.name})"
    with tqdm(total=len(split), desc=description, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(split), chunk_size):
            indices = range(start, min(start + chunk_size, len(split)))
            chunk = [pad_image(split.image(i), pad_fraction) for i in indices]
            chunk_embeddings, chunk_logits = backbone.embed_and_logits(chunk)
            embeddings.append(chunk_embeddings)
            logits.append(chunk_logits)
            bar.update(len(chunk))
    if not embeddings:
        raise ModelInputError(f"{split.dataset} {split.split} holds no images")
    return SplitFeatures(
        embeddings=np.concatenate(embeddings).astype(np.float32),
        logits=np.concatenate(logits).astype(np.float32),
        fine_labels=np.asarray(split.fine_labels, dtype=np.int64),
    )


def feature_cache_path(cache_dir: str | Path, split: ImageSplit, backbone_name: str, pad_fraction: float) -> Path:
    key = f"{split.dataset}-{split.split}-{split.content_id}-pad{pad_fraction:g}-{backbone_name}"
    return Path(cache_dir).expanduser() / "features" / (re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".npz")


def read_feature_cache(path: Path) -> SplitFeatures | None:
    try:
        with np.load(path) as data:
            features = SplitFeatures(
                embeddings=data["embeddings"].astype(np.float32),
                logits=data["logits"].astype(np.float32),
                fine_labels=data["fine_labels"].astype(np.int64),
            )
    except (OSError, KeyError, ValueError):
        return None  # a missing or damaged cache is recomputed
    n = features.fine_labels.shape[0]
    if features.embeddings.shape[0] != n or features.logits.shape[0] != n:
        return None
    return features


def write_feature_cache(path: Path, features: SplitFeatures) -> None:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        embeddings=features.embeddings.astype(np.float32),
        logits=features.logits.astype(np.float32),
        fine_labels=features.fine_labels.astype(np.int64),
    )
    atomic_write_bytes(path, buffer.getvalue())


def cached_split_features(
    split: ImageSplit,
    model_name: str,
    image_size: int,
    *,
    cache_dir: str | Path,
    pad_fraction: float = 0.0,
    threads: int = 1,
    progress: bool = False,
) -> SplitFeatures:
    """``compute_split_features`` with timm's ``model_name`` and its packaged ImageNet weights, through the cache."""
    from model.embeddings import IMAGENET_PACKAGE, TimmBackbone, configure_torch_threads

    backbone_name = f"timm:{model_name}:{IMAGENET_PACKAGE}:{image_size}px"
    path = feature_cache_path(cache_dir, split, backbone_name, pad_fraction)
    cached = read_feature_cache(path)
    if cached is not None and np.array_equal(cached.fine_labels, split.fine_labels):
        return cached
    configure_torch_threads(threads)
    backbone = TimmBackbone(model_name, weights=IMAGENET_PACKAGE, image_size=image_size)
    features = compute_split_features(split, backbone, pad_fraction=pad_fraction, progress=progress)
    write_feature_cache(path, features)
    return features
