"""openclipart: the chosen hierarchy on the real Debian files, and the size rules on a generated tree."""

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import (
    OPENCLIPART_ROOT,
    DatasetLayoutError,
    DatasetNotFoundError,
    OpenClipartDataset,
    create_dataset,
)
from model.datasets.base import DEFAULT_MAX_PIXELS, read_image_size, variant_group_key
from model.datasets.openclipart import (
    MIN_FINE_PER_COARSE,
    MIN_IMAGES_PER_FINE,
    OPENCLIPART_EXCLUDED_FOLDERS,
    OPENCLIPART_FOLDERS,
)
from model.datasets.tree import TreeScanner

needs_openclipart = pytest.mark.skipif(
    not Path(OPENCLIPART_ROOT, "animals", "birds").is_dir(),
    reason=f"Debian package openclipart-png is not installed (no {OPENCLIPART_ROOT})",
)
HUGE = "transportation/roadsigns/stop_sign_right_font_mig_.png"  # 623 megapixels
MATEYA = "food/fruit/banana_mateya_01.png"  # 169 megapixels, in a chosen folder


@pytest.fixture(scope="module")
def clipart():
    return create_dataset("openclipart")


def _paths(dataset, split):
    return [p.relative_to(dataset.root).as_posix() for p in dataset.split(split).loader.paths]


@needs_openclipart
def test_the_hierarchy_keeps_the_documented_rules(clipart):
    h = clipart.hierarchy
    assert isinstance(clipart, OpenClipartDataset) and clipart.name == "openclipart"
    counts = np.bincount(np.concatenate([clipart.split(s).fine_labels for s in ("train", "test")]), minlength=h.n_fine)
    assert counts.min() >= MIN_IMAGES_PER_FINE
    for coarse in h.coarse_classes:
        assert len(h.children(coarse)) >= MIN_FINE_PER_COARSE
    assert h.n_coarse >= 4 and h.n_fine >= 10
    for name in h.fine_classes + h.coarse_classes:
        assert "_" not in name and name == name.strip() and name.lower() == name
    assert {"animals", "food"} <= set(h.coarse_classes)
    assert {"birds", "fruit", "mammals"} <= set(h.fine_classes)
    for folder in clipart.folders:
        coarse = folder.split("/")[0]
        assert folder not in OPENCLIPART_EXCLUDED_FOLDERS and coarse not in OPENCLIPART_EXCLUDED_FOLDERS
        assert folder.split("/")[1] in OPENCLIPART_FOLDERS[coarse]
    for split in ("train", "test"):
        for path in _paths(clipart, split):
            top, second = path.split("/")[:2]
            assert f"{top}/{second}" in clipart.folders
            assert not any(path.startswith(excluded + "/") for excluded in OPENCLIPART_EXCLUDED_FOLDERS)


@needs_openclipart
def test_the_size_rules_remove_small_classes(clipart):
    # Real numbers from the package: dinosaurs has 15 files, furniture 10 (so buildings keeps one fine class).
    assert "dinosaurs" not in clipart.hierarchy.fine_classes
    assert "buildings" not in clipart.hierarchy.coarse_classes and "homes" not in clipart.hierarchy.fine_classes


@needs_openclipart
def test_labels_follow_the_folders(clipart):
    for split in ("train", "test"):
        data = clipart.split(split)
        for path, label in zip(_paths(clipart, split), data.fine_labels):
            top, second = path.split("/")[:2]
            assert clipart.folders[f"{top}/{second}"] == clipart.hierarchy.fine_classes[label]


@needs_openclipart
def test_no_group_is_on_both_sides_of_the_split(clipart):
    train, test = clipart.split("train"), clipart.split("test")
    assert not set(train.groups.tolist()) & set(test.groups.tolist())
    train_keys = {variant_group_key(p.name) for p in train.loader.paths}
    test_keys = {variant_group_key(p.name) for p in test.loader.paths}
    assert not train_keys & test_keys
    assert 0.2 < len(test) / (len(train) + len(test)) < 0.4
    # numbered variants exist and stay together (e.g. hummer_01 .. hummer_07)
    sizes = Counter(train.groups.tolist()) + Counter(test.groups.tolist())
    assert max(sizes.values()) >= 5
    # and every fine class is seen on both sides
    assert set(train.fine_labels.tolist()) == set(test.fine_labels.tolist()) == set(range(clipart.hierarchy.n_fine))


@needs_openclipart
def test_images_are_rgb_shrunk_and_white_where_alpha_was_zero(clipart):
    train = clipart.split("train")
    checked = Counter()
    for i, path in enumerate(train.loader.paths[:120]):
        with Image.open(path) as original:
            mode, size = original.mode, original.size
            if max(size) > 512 or mode not in ("RGBA", "LA", "P"):
                continue
            alpha = np.asarray(original.convert("RGBA"))[..., 3]
        if not (alpha == 0).any() or checked[mode] >= 3:
            continue
        image = train.image(i)
        assert image.mode == "RGB" and image.size == size
        pixels = np.asarray(image)
        assert (pixels[alpha == 0] == 255).all(), path
        assert (pixels[alpha == 255] < 250).any(), path  # the drawing itself is not washed out
        checked[mode] += 1
    assert checked["RGBA"] >= 1 and checked["P"] + checked["LA"] >= 1, checked
    big = next(i for i, p in enumerate(train.loader.paths) if max(read_image_size(p)) > 600)
    assert max(train.image(big).size) == 512


@needs_openclipart
def test_files_over_the_pixel_cap_are_skipped_from_their_header(clipart):
    width, height = read_image_size(Path(OPENCLIPART_ROOT, HUGE))
    assert width * height > 600_000_000  # the 623 MP stop sign: its header is read, nothing decoded
    started = time.perf_counter()
    scanner = TreeScanner(Path(OPENCLIPART_ROOT), DEFAULT_MAX_PIXELS)
    assert scanner.probe(Path(OPENCLIPART_ROOT, HUGE)).skip == "over pixel cap"
    assert time.perf_counter() - started < 1.0
    width, height = read_image_size(Path(OPENCLIPART_ROOT, MATEYA))
    assert width * height > DEFAULT_MAX_PIXELS
    assert clipart.skipped["over pixel cap"] >= 5
    listed = set(_paths(clipart, "train")) | set(_paths(clipart, "test"))
    assert MATEYA not in listed
    for path in clipart.split("train").loader.paths + clipart.split("test").loader.paths:
        w, h = read_image_size(path)
        assert w * h <= DEFAULT_MAX_PIXELS
    # the cap, nothing else, keeps it out: with a higher cap the file is listed (and only its header was read)
    generous = OpenClipartDataset(max_pixels=200_000_000)
    assert MATEYA in set(_paths(generous, "train")) | set(_paths(generous, "test"))
    assert generous.skipped.get("over pixel cap", 0) == 0


@needs_openclipart
def test_head_covers_several_coarse_classes(clipart):
    for split in ("train", "test"):
        head = clipart.split(split).head(40)
        assert len(set(head.coarse_labels.tolist())) >= 4
        assert len(set(head.fine_labels.tolist())) >= 8


@needs_openclipart
def test_loading_is_deterministic_and_fast(clipart):
    started = time.perf_counter()
    again = OpenClipartDataset()
    assert time.perf_counter() - started < 15
    assert again.hierarchy == clipart.hierarchy and again.skipped == clipart.skipped
    for split in ("train", "test"):
        a, b = clipart.split(split), again.split(split)
        assert a.content_id == b.content_id
        np.testing.assert_array_equal(a.fine_labels, b.fine_labels)
        np.testing.assert_array_equal(a.groups, b.groups)
        assert a.loader.paths == b.loader.paths
    assert OpenClipartDataset(max_side=256).split("test").content_id != clipart.split("test").content_id


# --- the rules on a generated tree (runs without the Debian package) -------------------------------------------


def _tree(root: Path, counts: dict[str, int]) -> Path:
    rng = np.random.default_rng(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    for folder, n in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (6, 6, 4), dtype=np.uint8)
            pixels[..., 3] = 255
            name = f"{folder.replace('/', '_')}_{letters[i // 26]}{letters[i % 26]}thing.png"
            Image.fromarray(pixels, mode="RGBA").save(root / folder / name)
    return root


def test_generated_tree_keeps_only_classes_that_pass_the_size_rules(tmp_path):
    root = _tree(tmp_path, {
        "animals/birds": 21, "animals/bugs": 20, "animals/mammals/bears": 20,  # deeper folders count for mammals
        "food/fruit": 20, "food/desserts": 19, "food/beverages": 25,
        "buildings/homes": 30,  # alone once furniture is missing: buildings goes
        "shapes/stars": 50, "people/smilies": 40,  # excluded folders
        "unsorted/x": 30,
    })
    _tree(tmp_path, {"animals": 0})
    Image.new("RGBA", (6, 6)).save(root / "animals" / "top_level_file.png")  # in no fine folder: unused
    dataset = OpenClipartDataset(root)
    h = dataset.hierarchy
    assert h.coarse_classes == ("animals", "food")
    assert h.fine_classes == ("birds", "bugs", "mammals", "beverages", "fruit")
    assert sorted(dataset.folders) == [
        "animals/birds", "animals/bugs", "animals/mammals", "food/beverages", "food/fruit"
    ]
    total = sum(len(dataset.split(s)) for s in ("train", "test"))
    assert total == 21 + 20 + 20 + 25 + 20


def test_a_picture_in_two_classes_leaves_both_and_can_sink_a_class(tmp_path):
    root = _tree(tmp_path, {"animals/birds": 21, "animals/bugs": 20, "food/fruit": 20, "food/beverages": 20})
    bird = sorted((root / "animals" / "birds").iterdir())[0]
    (root / "food" / "fruit" / "a_bird_in_fruit.png").symlink_to(bird)
    dataset = OpenClipartDataset(root)
    assert dataset.skipped == {"in two classes": 2}
    assert dataset.hierarchy.fine_classes == ("birds", "bugs", "beverages", "fruit")
    bugs = sorted((root / "animals" / "bugs").iterdir())[0]
    (root / "food" / "beverages" / "copy.png").write_bytes(bugs.read_bytes())  # bugs drops to 19, animals to 1
    with pytest.raises(DatasetLayoutError, match="fewer than 2 coarse classes"):
        OpenClipartDataset(root)


def test_a_missing_root_names_the_package(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="openclipart-png"):
        create_dataset("openclipart", root=tmp_path / "nowhere")
