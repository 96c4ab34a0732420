"""openclipart-scenes: layouts, labels and alpha-channel masks on the real Debian drawings."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import OPENCLIPART_ROOT, create_dataset
from model.datasets.composite import (
    MAX_OBJECTS,
    MIN_FILL,
    MIN_OBJECTS,
    CompositeSceneDataset,
    _drawing_rgba,
    drawing_fill,
    render_background,
)
from model.errors import ModelInputError

pytestmark = pytest.mark.skipif(
    not Path(OPENCLIPART_ROOT, "animals", "birds").is_dir(),
    reason=f"Debian package openclipart-png is not installed (no {OPENCLIPART_ROOT})",
)


@pytest.fixture(scope="module")
def scenes():
    return CompositeSceneDataset(n_train=60, n_test=30)


def test_registered_and_shaped():
    dataset = create_dataset("openclipart-scenes")
    train = dataset.split("train")
    assert len(dataset.label_names) == 8 and len(train) == 1200 and len(dataset.split("test")) == 400
    assert train.label_sets.dtype == bool and train.label_sets.shape == (1200, 8)
    counts = train.label_sets.sum(axis=1)
    assert counts.min() >= MIN_OBJECTS and counts.max() <= MAX_OBJECTS
    # no label is rare: every one is in at least a quarter as many scenes as the most frequent
    per_label = train.label_sets.sum(axis=0)
    assert per_label.min() > per_label.max() / 4
    with pytest.raises(ModelInputError, match="takes no"):
        create_dataset("openclipart-scenes:3")


def test_masks_come_from_alpha_and_match_the_label_sets(scenes):
    split = scenes.split("train")
    for index in range(20):
        image, mask = split.image(index), split.mask(index)
        assert image.mode == "RGB" and image.size == (224, 224)
        assert mask.dtype == np.uint8 and mask.shape == (224, 224)
        present = set((np.unique(mask)[np.unique(mask) > 0] - 1).tolist())
        assert present == set(np.flatnonzero(split.label_sets[index]).tolist())
        # every object's pixels lie inside its box; the mask's labelled pixels lie inside the union of boxes
        union = np.zeros_like(mask, dtype=bool)
        for placed in split.layout(index).objects:
            left, top, width, height = placed.box
            assert 0 <= left and left + width <= 224 and 0 <= top and top + height <= 224
            union[top : top + height, left : left + width] = True
        assert not (mask[~union] > 0).any()
        assert (mask > 0).mean() > 0.03  # objects are drawn, not lost to the alpha threshold


def test_later_objects_occlude_earlier_ones(scenes):
    split = scenes.split("train")
    for index in range(len(split)):
        objects = split.layout(index).objects
        mask = split.mask(index)
        last = objects[-1]
        left, top, width, height = last.box
        alpha = np.asarray(_drawing_rgba(last.path).resize((width, height), Image.Resampling.LANCZOS))[..., 3]
        region = mask[top : top + height, left : left + width]
        assert (region[alpha >= 128] == last.label + 1).all()


def test_deterministic_and_seeded(scenes):
    again = CompositeSceneDataset(n_train=60, n_test=30)
    other_seed = CompositeSceneDataset(n_train=60, n_test=30, seed=1)
    assert again.split("train").content_id == scenes.split("train").content_id
    assert np.array_equal(np.asarray(again.split("train").image(3)), np.asarray(scenes.split("train").image(3)))
    assert np.array_equal(again.split("test").mask(5), scenes.split("test").mask(5))
    assert other_seed.split("train").content_id != scenes.split("train").content_id
    assert not np.array_equal(other_seed.split("train").label_sets, scenes.split("train").label_sets)
    assert scenes.split("train").content_id != scenes.split("test").content_id
    head = scenes.split("train").head(10)
    assert len(head) == 10 and head.content_id != scenes.split("train").content_id
    assert np.array_equal(head.mask(4), scenes.split("train").mask(4))


def test_drawing_variants_stay_on_one_side():
    from model.datasets.base import variant_group_key

    dataset = CompositeSceneDataset(n_train=300, n_test=150)
    keys = {
        name: {variant_group_key(o.path.name) for i in range(len(s)) for o in s.layout(i).objects}
        for name, s in (("train", dataset.split("train")), ("test", dataset.split("test")))
    }
    assert keys["train"] and keys["test"] and not keys["train"] & keys["test"]
    used = {o.path for i in range(len(dataset.split("train"))) for o in dataset.split("train").layout(i).objects}
    assert all(drawing_fill(path) >= MIN_FILL for path in used)


def test_backgrounds_without_gnome_backgrounds(tmp_path):
    dataset = CompositeSceneDataset(n_train=20, n_test=10, backgrounds_root=tmp_path / "none")
    kinds = {dataset.split("train").layout(i).background for i in range(20)}
    assert kinds <= {"plain", "noise"} and len(kinds) == 2
    plain = np.asarray(render_background("plain", 4, 64))
    noise = np.asarray(render_background("noise", 4, 64))
    assert plain.shape == noise.shape == (64, 64, 3)
    assert len(np.unique(plain.reshape(-1, 3), axis=0)) == 1 and noise.std() > 5


def test_bad_arguments():
    with pytest.raises(ModelInputError):
        CompositeSceneDataset(canvas=8)
    with pytest.raises(ModelInputError):
        CompositeSceneDataset(n_train=0)
    split = CompositeSceneDataset(n_train=5, n_test=5).split("train")
    with pytest.raises(ModelInputError, match="out of range"):
        split.image(5)
    with pytest.raises(ModelInputError, match="unknown split"):
        CompositeSceneDataset(n_train=5, n_test=5).split("validation")
