import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest

from model.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_GROUPS,
    FASHION_MNIST_ROOT,
    DatasetNotFoundError,
    fashion_mnist_hierarchy,
    load_fashion_mnist,
    to_pil,
)
from model.errors import ModelInputError

needs_files = pytest.mark.skipif(
    not (Path(FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist is not installed (no files under {FASHION_MNIST_ROOT})",
)


@needs_files
def test_test_split_has_the_published_shape_and_balance():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))
    # Published statistic: Fashion-MNIST pixels average about 0.286 of full scale.
    assert 0.27 < images.mean() / 255 < 0.30


@needs_files
def test_train_split_has_the_published_shape_and_balance():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 6000))


@needs_files
def test_footwear_is_wider_than_tall_and_trousers_taller_than_wide():
    # A semantic check that labels line up with images: sneakers are flat, trousers are tall.
    images, labels = load_fashion_mnist("test")

    def mean_width_and_height(label: int) -> tuple[float, float]:
        mask = images[labels == label][:200] > 30
        columns_used = mask.any(axis=1).sum(axis=1)
        rows_used = mask.any(axis=2).sum(axis=1)
        return float(columns_used.mean()), float(rows_used.mean())

    sneaker_width, sneaker_height = mean_width_and_height(FASHION_MNIST_CLASSES.index("Sneaker"))
    trouser_width, trouser_height = mean_width_and_height(FASHION_MNIST_CLASSES.index("Trouser"))
    assert sneaker_height < 0.8 * sneaker_width
    assert trouser_width < 0.8 * trouser_height


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_unknown_split_is_rejected():
    with pytest.raises(ModelInputError, match="validation"):
        load_fashion_mnist("validation")


def _write_idx(path: Path, magic: int, shape: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + payload)


def test_small_synthetic_idx_files_load(tmp_path):
    pixels = np.arange(2 * 28 * 28, dtype=np.uint64).astype(np.uint8).reshape(2, 28, 28)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), pixels.tobytes())
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes([9, 0]))
    images, labels = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(images, pixels)
    np.testing.assert_array_equal(labels, [9, 0])


@pytest.mark.parametrize(
    "magic, shape, payload, message",
    [
        (0x801, (2, 28, 28), bytes(2 * 28 * 28), "magic"),
        (0x803, (2, 28, 28), bytes(100), "declares shape"),
    ],
)
def test_corrupt_idx_files_are_rejected(tmp_path, magic, shape, payload, message):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", magic, shape, payload)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes([1, 2]))
    with pytest.raises(ModelInputError, match=message):
        load_fashion_mnist("test", root=tmp_path)


def test_label_image_count_mismatch_and_bad_labels_are_rejected(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, (2, 28, 28), bytes(2 * 28 * 28))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (3,), bytes([1, 2, 3]))
    with pytest.raises(ModelInputError, match="2 images but"):
        load_fashion_mnist("test", root=tmp_path)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, (2,), bytes([1, 10]))
    with pytest.raises(ModelInputError, match="labels outside"):
        load_fashion_mnist("test", root=tmp_path)


def test_hierarchy_matches_the_groups():
    hierarchy = fashion_mnist_hierarchy()
    assert hierarchy.fine_classes == FASHION_MNIST_CLASSES
    assert hierarchy.coarse_classes == ("tops", "bottoms and dresses", "footwear", "bags")
    for coarse, fines in FASHION_MNIST_GROUPS.items():
        for fine in fines:
            assert hierarchy.parent_name(fine) == coarse
    assert sorted(f for fines in FASHION_MNIST_GROUPS.values() for f in fines) == sorted(FASHION_MNIST_CLASSES)


def test_to_pil_inverts_pads_and_resizes():
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 4:24] = 200  # a light square on black, like a Fashion-MNIST item
    plain = np.asarray(to_pil(image, invert=False, size=56))
    assert plain.shape == (56, 56, 3)
    assert plain[0, 0, 0] == 0 and plain[28, 28, 0] == 200
    inverted = np.asarray(to_pil(image, invert=True, size=56))
    assert inverted[0, 0, 0] == 255 and inverted[28, 28, 0] == 55
    padded = np.asarray(to_pil(image, invert=True, size=56, pad_fraction=0.5))
    # 14 px of white added on each side of 28 px: the square now spans about 20/56 of the width.
    object_columns = (padded[28, :, 0] < 128).sum()
    assert 17 <= object_columns <= 23
    assert padded[28, 5, 0] == 255


@pytest.mark.parametrize(
    "image, kwargs",
    [
        (np.zeros((28, 28, 3), dtype=np.uint8), {"invert": False, "size": 32}),
        (np.zeros((28, 28), dtype=np.float32), {"invert": False, "size": 32}),
        (np.zeros((28, 28), dtype=np.uint8), {"invert": False, "size": 0}),
        (np.zeros((28, 28), dtype=np.uint8), {"invert": False, "size": 32, "pad_fraction": -0.1}),
    ],
)
def test_to_pil_rejects_bad_input(image, kwargs):
    with pytest.raises(ModelInputError):
        to_pil(image, **kwargs)


# --- Fashion-MNIST through the common data set interface -------------------------------------------------------

from model.datasets import DATASET_NAMES, FashionMNISTDataset, ImageDataset, ImageSplit, create_dataset  # noqa: E402


def _tiny_fashion_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 5)):
        pixels = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", 0x803, (n, 28, 28), pixels.tobytes())
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", 0x801, (n,), bytes(rng.integers(0, 10, n).tolist()))
    return tmp_path


def test_create_dataset_fashion_mnist_serves_the_idx_files_in_official_order(tmp_path):
    root = _tiny_fashion_root(tmp_path)
    dataset = create_dataset("fashion-mnist", root=root)
    assert isinstance(dataset, FashionMNISTDataset) and isinstance(dataset, ImageDataset)
    assert dataset.name == "fashion-mnist"
    for split, n in (("train", 7), ("test", 5)):
        images, labels = load_fashion_mnist(split, root=root)
        served = dataset.split(split)
        assert isinstance(served, ImageSplit) and len(served) == n and served.split == split
        assert served.hierarchy is dataset.hierarchy
        assert served.fine_labels.dtype == np.int64
        np.testing.assert_array_equal(served.fine_labels, labels)
        np.testing.assert_array_equal(served.groups, np.arange(n))
        for i in range(n):
            got = served.image(i)
            assert got.mode == "RGB" and got.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(got), np.asarray(to_pil(images[i], invert=True, size=28)))
            # dark on white: the inverted pixel values
            np.testing.assert_array_equal(np.asarray(got)[:, :, 0], 255 - images[i])
    assert dataset.split("train").content_id != dataset.split("test").content_id
    assert dataset.split("test") is dataset.split("test")
    copy = pickle.loads(pickle.dumps(dataset.split("test")))  # splits travel to worker processes
    np.testing.assert_array_equal(np.asarray(copy.image(3)), np.asarray(dataset.split("test").image(3)))
    assert copy.content_id == dataset.split("test").content_id


def test_fashion_mnist_content_id_follows_the_pixels(tmp_path):
    root = _tiny_fashion_root(tmp_path)
    first = create_dataset("fashion-mnist", root=root).split("test").content_id
    assert create_dataset("fashion-mnist", root=root).split("test").content_id == first
    images, labels = load_fashion_mnist("test", root=root)
    images[0, 0, 0] ^= 1
    _write_idx(root / "t10k-images-idx3-ubyte.gz", 0x803, images.shape, images.tobytes())
    assert create_dataset("fashion-mnist", root=root).split("test").content_id != first


def test_fashion_mnist_dataset_rejects_other_splits_and_missing_files(tmp_path):
    with pytest.raises(ModelInputError, match="validation"):
        create_dataset("fashion-mnist", root=_tiny_fashion_root(tmp_path)).split("validation")
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        create_dataset("fashion-mnist", root=tmp_path / "nowhere").split("train")


@needs_files
def test_create_dataset_fashion_mnist_matches_load_fashion_mnist():
    split = create_dataset("fashion-mnist").split("test")
    images, labels = load_fashion_mnist("test")
    np.testing.assert_array_equal(split.fine_labels, labels)
    assert split.hierarchy == fashion_mnist_hierarchy()
    for i in (0, 1, 9999):
        np.testing.assert_array_equal(np.asarray(split.image(i)), np.asarray(to_pil(images[i], invert=True, size=28)))
    head = split.head(100)
    np.testing.assert_array_equal(head.fine_labels, labels[:100])
    np.testing.assert_array_equal(np.asarray(head.image(99)), np.asarray(split.image(99)))


@pytest.mark.parametrize("spec", ["mnist", "cifar10", "", "openclipart-png"])
def test_unknown_dataset_names_list_the_known_ones(spec):
    with pytest.raises(ModelInputError) as raised:
        create_dataset(spec)
    for known in DATASET_NAMES:
        assert known in str(raised.value)


@pytest.mark.parametrize("spec", ["fashion-mnist:/tmp", "openclipart:x"])
def test_datasets_without_arguments_refuse_one(spec):
    with pytest.raises(ModelInputError, match="takes no"):
        create_dataset(spec)


def test_imagefolder_needs_its_folder():
    with pytest.raises(ModelInputError, match="imagefolder:DIR"):
        create_dataset("imagefolder")


def test_dataset_names_are_the_documented_ones():
    assert DATASET_NAMES == ("fashion-mnist", "openclipart", "openclipart-scenes", "imagefolder:DIR")
