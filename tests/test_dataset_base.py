"""The shared pieces of the data set interface: ImageSplit, variant keys, the split hash, decoding."""

import numpy as np
import pytest
from PIL import Image

from model.datasets import (
    DatasetImageError,
    ImageSplit,
    composite_on_white,
    load_image_file,
    variant_group_key,
)
from model.datasets.base import is_test_group, order_key
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy

HIERARCHY = LabelHierarchy.from_parent_map({"cat": "animal", "dog": "animal", "car": "vehicle"})


def _split(n=5, loader=None) -> ImageSplit:
    return ImageSplit(
        dataset="toy",
        split="train",
        hierarchy=HIERARCHY,
        fine_labels=np.arange(n) % 3,
        groups=np.arange(n) // 2,
        content_id="abc",
        loader=loader or (lambda i: Image.new("RGB", (4, 4), (i, i, i))),
    )


def test_split_serves_images_labels_and_coarse_labels():
    split = _split()
    assert len(split) == 5
    np.testing.assert_array_equal(split.coarse_labels, [0, 0, 1, 0, 0])
    assert split.fine_labels.dtype == np.int64 and split.groups.dtype == np.int64
    assert [im.getpixel((0, 0)) for im in split.images([4, 0])] == [(4, 4, 4), (0, 0, 0)]
    assert split.image(np.int64(2)).getpixel((0, 0)) == (2, 2, 2)
    with pytest.raises(ValueError):
        split.fine_labels[0] = 2  # read-only


def test_head_takes_the_first_images_and_gets_its_own_content_id():
    split = _split()
    head = split.head(3)
    assert len(head) == 3 and head.hierarchy is split.hierarchy
    np.testing.assert_array_equal(head.fine_labels, split.fine_labels[:3])
    np.testing.assert_array_equal(head.groups, split.groups[:3])
    assert head.image(2).getpixel((0, 0)) == (2, 2, 2)
    assert head.content_id != split.content_id and head.content_id != split.head(2).content_id
    assert head.content_id == split.head(3).content_id
    assert split.head(5) is split
    assert len(split.head(0)) == 0
    with pytest.raises(ModelInputError, match=r"head\(6\).*\(5\)"):
        split.head(6)
    with pytest.raises(ModelInputError):
        split.head(-1)
    with pytest.raises(ModelInputError, match="out of range"):
        head.image(3)


@pytest.mark.parametrize("index", [-1, 5, 1.0, "0", True])
def test_bad_image_indices_are_rejected(index):
    with pytest.raises(ModelInputError):
        _split().image(index)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"split": "validation"}, "validation"),
        ({"fine_labels": np.array([0, 1, 3])}, r"\[0, 3\)"),
        ({"fine_labels": np.array([0.0, 1.0, 2.0])}, "integer"),
        ({"groups": np.array([0, 1])}, "groups"),
    ],
)
def test_inconsistent_splits_are_rejected(changes, message):
    fields = dict(dataset="toy", split="test", hierarchy=HIERARCHY, fine_labels=np.array([0, 1, 2]),
                  groups=np.array([0, 1, 2]), content_id="x")
    fields.update(changes)
    with pytest.raises(ModelInputError, match=message):
        ImageSplit(**fields)


def test_a_split_without_loader_says_so():
    split = ImageSplit(dataset="toy", split="test", hierarchy=HIERARCHY, fine_labels=np.array([0, 1]),
                       groups=np.array([0, 1]), content_id="x")
    with pytest.raises(ModelInputError, match="no image loader"):
        split.image(0)


@pytest.mark.parametrize(
    "name, key",
    [
        ("hummer_01.png", "hummer"),
        ("hummer_07.png", "hummer"),
        ("name-2.png", "name"),
        ("aircraft_jarno_vasamaa1.png", "aircraft jarno vasamaa"),
        ("aircraft_jarno_vasamaa_.png", "aircraft jarno vasamaa"),
        ("table_tennis_racquets_o_01r.png", "table tennis racquets o"),
        ("orca_matthew_gates_r.png", "orca matthew gates"),
        ("bus1_bw_jarno_vasamaa_01.png", "bus1 jarno vasamaa"),
        ("bus1_jarno_vasamaa_02.png", "bus1 jarno vasamaa"),
        ("Baseball_Cap_BW_ganson.PNG", "baseball cap ganson"),
        ("blueman_306_01.png", "blueman 306"),
        ("bwana_01.png", "bwana"),
        ("car.png", "car"),
        ("01.png", "01"),
    ],
)
def test_variant_group_keys(name, key):
    assert variant_group_key(name) == key


def test_different_drawings_get_different_keys():
    assert variant_group_key("bus1_jarno_01.png") != variant_group_key("bus2_jarno_01.png")
    assert variant_group_key("cat_01.png") != variant_group_key("cats_01.png")


def test_the_split_hash_sends_about_thirty_percent_to_test_and_is_stable():
    keys = [f"drawing {i}" for i in range(4000)]
    share = np.mean([is_test_group(k) for k in keys])
    assert 0.27 < share < 0.33
    assert [is_test_group(k) for k in keys[:50]] == [is_test_group(k) for k in keys[:50]]
    assert not any(is_test_group(k, 0.0) for k in keys[:100]) and all(is_test_group(k, 1.0) for k in keys[:100])
    assert sorted(keys[:10], key=order_key) != keys[:10]  # a shuffle, not the name order


def _pixels(image: Image.Image) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in p) for p in np.asarray(image).reshape(-1, 3)]


def test_composite_on_white_handles_every_kind_of_transparency():
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (0, 0, 0, 0))
    assert _pixels(composite_on_white(rgba)) == [(255, 0, 0), (255, 255, 255)]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert 120 <= composite_on_white(half).getpixel((0, 0))[0] <= 135
    la = Image.new("LA", (1, 1), (0, 0))
    assert composite_on_white(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert _pixels(composite_on_white(palette)) == [(255, 255, 255), (0, 0, 255)]
    wide = Image.fromarray(np.array([[0, 1000]], dtype=np.int32), mode="I")
    assert _pixels(composite_on_white(wide)) == [(0, 0, 0), (255, 255, 255)]
    assert composite_on_white(Image.new("L", (1, 1), 7)).getpixel((0, 0)) == (7, 7, 7)


def test_load_image_file_shrinks_composites_and_caps_pixels(tmp_path):
    path = tmp_path / "wide.png"
    image = Image.new("RGBA", (1000, 400), (0, 0, 255, 255))
    image.paste((0, 0, 0, 0), (0, 0, 100, 400))
    image.save(path)
    loaded = load_image_file(path, max_side=100)
    assert loaded.mode == "RGB" and loaded.size == (100, 40)
    assert loaded.getpixel((2, 20)) == (255, 255, 255) and loaded.getpixel((80, 20)) == (0, 0, 255)
    assert load_image_file(path, max_side=2000).size == (1000, 400)  # never enlarged
    with pytest.raises(DatasetImageError, match=r"wide.png.*400000 pixels; the cap is 1000"):
        load_image_file(path, max_pixels=1000)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DatasetImageError, match="junk.png"):
        load_image_file(tmp_path / "junk.png")
    truncated = tmp_path / "truncated.png"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(DatasetImageError, match="truncated.png"):
        load_image_file(truncated)


def test_read_image_size_reads_headers(tmp_path):
    from model.datasets.base import read_image_size

    for name, mode in (("a.png", "RGBA"), ("b.jpg", "RGB"), ("c.gif", "P"), ("d.bmp", "RGB")):
        Image.new(mode, (37, 11)).save(tmp_path / name)
        assert read_image_size(tmp_path / name) == (37, 11)
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetImageError, match="junk.png"):
        read_image_size(tmp_path / "junk.png")
    with pytest.raises(DatasetImageError, match="missing.png"):
        read_image_size(tmp_path / "missing.png")
