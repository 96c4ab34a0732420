"""Spatial feature maps: shapes, agreement with the pooled embedding, and the float16 cache."""

import numpy as np
import pytest
from PIL import Image

from model.embeddings import TimmBackbone
from model.errors import ModelInputError
from model.spatial_features import (
    FeaturePyramid,
    cached_feature_pyramid,
    cached_spatial_features,
    image_feature_pyramid,
    image_spatial_features,
    spatial_cache_path,
    spatial_extractor,
)


class TinySplit:
    """A split of generated images (stripes whose colour moves with the index)."""

    dataset, split = "tiny", "train"

    def __init__(self, n: int, content_id: str = "0123abcd") -> None:
        self.n, self.content_id, self.loaded = n, content_id, 0

    def __len__(self) -> int:
        return self.n

    def image(self, index: int) -> Image.Image:
        self.loaded += 1
        pixels = np.zeros((64, 64, 3), dtype=np.uint8)
        pixels[:, : 8 + 4 * index] = (200, 30 * index % 255, 40)
        return Image.fromarray(pixels)


def test_map_is_the_backbones_and_pools_to_its_embedding():
    images = TinySplit(3)
    batch = [images.image(i) for i in range(3)]
    maps = image_spatial_features(batch)
    assert maps.dtype == np.float16 and maps.shape == (3, 7, 7, 1280)
    # efficientnet_lite0's head is a global average pool: the map's mean is the pooled embedding
    pooled = TimmBackbone("efficientnet_lite0").embed(batch)
    assert np.allclose(maps.astype(np.float32).mean(axis=(1, 2)), pooled, atol=2e-2)
    assert spatial_extractor(image_size=160)(batch[:1]).shape == (1, 5, 5, 1280)
    with pytest.raises(ModelInputError):
        image_spatial_features([])


def test_cache_is_written_once_and_keyed_by_content(tmp_path):
    split = TinySplit(5)
    first = np.array(cached_spatial_features(split, cache_dir=tmp_path))  # a copy: the file is damaged below
    assert first.shape == (5, 7, 7, 1280) and first.dtype == np.float16
    assert split.loaded == 5
    path = spatial_cache_path(tmp_path, split, "spatial:timm:efficientnet_lite0:imagenet-package:224px")
    assert path.is_file() and path.parent.name == "features"
    again = cached_spatial_features(split, cache_dir=tmp_path)
    assert split.loaded == 5 and np.array_equal(again, first)
    changed = TinySplit(5, content_id="ffff0000")
    cached_spatial_features(changed, cache_dir=tmp_path)
    assert changed.loaded == 5  # another content id is computed, not read from the first file
    path.write_bytes(b"damaged")
    repaired = cached_spatial_features(split, cache_dir=tmp_path)
    assert split.loaded == 10 and np.array_equal(repaired, first)


def test_pyramid_adds_the_finer_stages_and_shares_the_coarse_cache(tmp_path):
    split = TinySplit(4)
    images = [split.image(i) for i in range(4)]
    pyramid = image_feature_pyramid(images)
    assert pyramid.coarse.shape == (4, 7, 7, 1280) and pyramid.coarse.dtype == np.float16
    assert [d.shape for d in pyramid.details] == [(4, 28, 28, 40), (4, 14, 14, 112)]
    # the coarse stage is the plain spatial map, from the same forward pass
    assert np.allclose(pyramid.coarse.astype(np.float32), image_spatial_features(images).astype(np.float32),
                       atol=1e-2)
    assert not spatial_extractor()._detail_modules()[0]._forward_hooks  # the hooks are removed after the pass
    # finer stages tell the stripes' edges apart: the stride-8 map differs across the edge
    fine = pyramid.details[0][0].astype(np.float32)
    assert np.abs(fine[:, 2] - fine[:, 12]).mean() > 0.1
    split.loaded = 0
    cached = cached_feature_pyramid(split, cache_dir=tmp_path)
    assert split.loaded == 4 and len(cached) == 4
    assert np.allclose(cached.details[1].astype(np.float32), pyramid.details[1].astype(np.float32), atol=1e-2)
    # the coarse file is the one cached_spatial_features reads: no second pass for it
    assert np.array_equal(cached_spatial_features(split, cache_dir=tmp_path), cached.coarse) and split.loaded == 4
    assert len(cached_feature_pyramid(split, cache_dir=tmp_path)) == 4 and split.loaded == 4
    assert len(pyramid.take(np.array([3, 1]))) == 2
    with pytest.raises(ModelInputError):
        FeaturePyramid(pyramid.coarse, (pyramid.details[0][:2],))
