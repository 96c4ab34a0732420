"""imagefolder:DIR on trees built in tmp_path: a good layout loads, each bad layout names its problem."""

import os
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.datasets import (
    DatasetLayoutError,
    DatasetNotFoundError,
    ImageFolderDataset,
    create_dataset,
    variant_group_key,
)
from model.datasets.tree import PathLoader
from model.errors import ModelInputError

_counter = iter(range(1_000_000))


def _word(i: int) -> str:
    """A name without digits (a trailing number would be read as a variant number)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return letters[i // 26 % 26] + letters[i % 26] + "ing"


def _png(path: Path, size=(12, 10), mode="RGBA", transparent_left=False) -> Path:
    """A small image with unique contents (so that no two generated files are duplicates)."""
    n = next(_counter)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    channels = {"RGBA": 4, "RGB": 3, "L": 1}[mode]
    pixels = np.full((size[1], size[0], channels), 90, dtype=np.uint8)
    patch = rng.integers(0, 256, (min(4, size[1]), min(4, size[0]), channels), dtype=np.uint8)
    pixels[-patch.shape[0]:, -patch.shape[1]:] = patch  # noise in a corner: no two files alike
    if mode == "RGBA":
        pixels[..., 3] = 255
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
    if transparent_left:
        image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))
    formats = {".jpg": "JPEG", ".jpeg": "JPEG", ".gif": "GIF", ".bmp": "BMP", ".webp": "WEBP"}
    fmt = formats.get(path.suffix.lower(), "PNG")
    if fmt in ("JPEG", "BMP") and image.mode == "RGBA":
        image = image.convert("RGB")
    image.save(path, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return path


def _good_tree(root: Path) -> Path:
    """animals/{big_cats, dogs}, vehicles/{cars, boats}: numbered variants, several formats, transparency."""
    for i in range(6):
        for v in (1, 2):
            _png(root / "animals" / "big_cats" / f"lion{i}_{v:02d}.png", transparent_left=True)
    for i in range(8):
        _png(root / "animals" / "dogs" / f"dog_{i}_author-{1}.PNG")
        _png(root / "animals" / "dogs" / "puppies" / f"puppy{i}.jpg", mode="RGB")
    for i in range(10):
        _png(root / "vehicles" / "cars" / f"car{i}_bw_x_01.png")
        _png(root / "vehicles" / "cars" / f"car{i}_x_02.gif", mode="L")
    for i in range(7):
        _png(root / "vehicles" / "boats" / f"boat {i}.webp", mode="RGB")
    _png(root / "vehicles" / "boats" / "big.png", size=(1200, 300), transparent_left=True)
    _png(root / "vehicles" / "boats" / ".hidden.png")
    _png(root / ".cache" / "x" / "y.png")
    (root / "README.txt").write_text("not an image")
    (root / "vehicles" / "boats" / "notes.txt").write_text("not an image")
    return root


def _all_paths(dataset):
    return {s: list(dataset.split(s).loader.paths) for s in ("train", "test")}


def test_a_good_tree_loads_with_readable_class_names(tmp_path):
    dataset = create_dataset(f"imagefolder:{_good_tree(tmp_path / 'data')}")
    assert isinstance(dataset, ImageFolderDataset)
    assert dataset.name == f"imagefolder:{(tmp_path / 'data').resolve()}"
    h = dataset.hierarchy
    assert h.coarse_classes == ("animals", "vehicles")
    assert h.fine_classes == ("big cats", "dogs", "boats", "cars")
    assert h.children("vehicles") == ("boats", "cars")
    train, test = dataset.split("train"), dataset.split("test")
    assert train.hierarchy is test.hierarchy is h
    assert len(train) + len(test) == 12 + 16 + 20 + 8  # hidden files, text files, .cache ignored
    assert dataset.skipped == {}
    paths = _all_paths(dataset)
    names = {p.name for s in paths.values() for p in s}
    assert "puppy3.jpg" in names and "dog_0_author-1.PNG" in names and ".hidden.png" not in names
    for split in (train, test):
        for i, path in enumerate(split.loader.paths):
            expected = {"big_cats": "big cats"}.get(path.parent.name, path.parent.name)
            if path.parent.name == "puppies":
                expected = "dogs"
            assert h.fine_classes[split.fine_labels[i]] == expected


def test_images_are_rgb_white_where_transparent_and_shrunk(tmp_path):
    dataset = ImageFolderDataset(_good_tree(tmp_path), max_side=300)
    for split in (dataset.split("train"), dataset.split("test")):
        for i, path in enumerate(split.loader.paths):
            image = split.image(i)
            assert image.mode == "RGB" and max(image.size) <= 300
            if path.name == "big.png":
                assert image.size == (300, 75)
                assert image.getpixel((10, 30)) == (255, 255, 255)
            if path.name.startswith("lion"):
                assert image.getpixel((0, 0)) == (255, 255, 255)  # alpha 0 -> white
                assert image.getpixel((image.size[0] - 2, 0)) != (255, 255, 255)


def test_variants_never_straddle_the_split_and_share_group_ids(tmp_path):
    root = tmp_path / "many"
    for c in ("a", "b"):
        for f in ("x", "y"):
            for i in range(40):
                for v in range(1 + i % 3):
                    _png(root / c / f"{c}{f}" / f"{c}{f}_drawing{i}_{v:02d}.png", size=(4, 4))
    dataset = ImageFolderDataset(root)
    keys_by_split = defaultdict(set)
    group_of_key: dict[str, int] = {}
    for name in ("train", "test"):
        split = dataset.split(name)
        for i, path in enumerate(split.loader.paths):
            key = variant_group_key(path.name)
            keys_by_split[name].add(key)
            assert group_of_key.setdefault(key, int(split.groups[i])) == split.groups[i]
    assert not keys_by_split["train"] & keys_by_split["test"]
    assert not set(dataset.split("train").groups) & set(dataset.split("test").groups)
    assert len(group_of_key) == 160 and len(set(group_of_key.values())) == 160
    # about 30% of the groups go to test
    assert 0.18 < len(keys_by_split["test"]) / 160 < 0.42


def test_the_order_is_shuffled_so_head_covers_the_classes(tmp_path):
    root = tmp_path / "order"
    for c in ("a", "b", "c"):
        for f in ("1", "2"):
            for i in range(30):
                _png(root / c / f"{c}{f}" / f"img_{c}{f}_{_word(i)}.png", size=(4, 4))
    train = ImageFolderDataset(root).split("train")
    head = train.head(24)
    assert len(set(head.fine_labels.tolist())) >= 5
    assert train.fine_labels.tolist() != sorted(train.fine_labels.tolist())


def test_loading_is_deterministic_and_content_id_tracks_the_files(tmp_path):
    root = _good_tree(tmp_path / "d")
    first, second = ImageFolderDataset(root), ImageFolderDataset(root)
    for name in ("train", "test"):
        a, b = first.split(name), second.split(name)
        assert a.content_id == b.content_id
        np.testing.assert_array_equal(a.fine_labels, b.fine_labels)
        np.testing.assert_array_equal(a.groups, b.groups)
        assert a.loader.paths == b.loader.paths
    assert first.split("train").content_id != first.split("test").content_id
    assert ImageFolderDataset(root, max_side=128).split("train").content_id != first.split("train").content_id
    before = {n: first.split(n).content_id for n in ("train", "test")}
    _png(root / "animals" / "dogs" / "new_dog_99.png")
    after = ImageFolderDataset(root)
    changed = [n for n in ("train", "test") if after.split(n).content_id != before[n]]
    assert len(changed) == 1  # the split that got the new file, and only it


def test_files_over_the_pixel_cap_and_unreadable_files_are_skipped_and_counted(tmp_path):
    root = _good_tree(tmp_path)
    (root / "animals" / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    dataset = ImageFolderDataset(root, max_pixels=100_000)  # big.png is 1200 x 300 = 360,000
    assert dataset.skipped == {"over pixel cap": 1, "unreadable": 1}
    names = {p.name for s in _all_paths(dataset).values() for p in s}
    assert "big.png" not in names and "broken.png" not in names
    assert "big.png" in {p.name for s in _all_paths(ImageFolderDataset(root)).values() for p in s}


def test_a_truncated_file_fails_on_load_naming_it(tmp_path):
    root = _good_tree(tmp_path)
    target = root / "vehicles" / "boats" / "zz_truncated.png"
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(target)
    target.write_bytes(target.read_bytes()[:1500])
    dataset = ImageFolderDataset(root)
    for name in ("train", "test"):
        split = dataset.split(name)
        for i, path in enumerate(split.loader.paths):
            if path.name == "zz_truncated.png":
                with pytest.raises(ModelInputError, match="zz_truncated.png"):
                    split.image(i)
                return
    pytest.fail("the truncated file (its header is intact) should be listed")


def test_the_same_file_in_two_classes_is_dropped_from_both(tmp_path):
    root = _good_tree(tmp_path)
    shared = _png(root / "animals" / "dogs" / "shared_dog.png")
    os.symlink(shared, root / "vehicles" / "cars" / "shared_link.png")
    (root / "vehicles" / "boats" / "copy.png").write_bytes(shared.read_bytes())
    again = _png(root / "vehicles" / "boats" / "twice_a.png")
    (root / "vehicles" / "boats" / "twice_b.png").write_bytes(again.read_bytes())
    dataset = ImageFolderDataset(root)
    assert dataset.skipped == {"in two classes": 3, "duplicate": 1}
    names = [p.name for s in _all_paths(dataset).values() for p in s]
    assert not {"shared_dog.png", "shared_link.png", "copy.png"} & set(names)
    assert ("twice_a.png" in names) != ("twice_b.png" in names)


def _layout(root: Path, spec: dict[str, dict[str, int]]) -> Path:
    for coarse, fines in spec.items():
        (root / coarse).mkdir(parents=True, exist_ok=True)
        for fine, n in fines.items():
            (root / coarse / fine).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _png(root / coarse / fine / f"{coarse}{fine}_{_word(i)}.png", size=(4, 4))
    return root


GOOD = {"a": {"a1": 5, "a2": 5}, "b": {"b1": 5}}


def _break(root: Path, how: str) -> tuple[str, Path]:
    """Build a tree broken in one way; return a text the error must contain, and the path it must name."""
    if how == "missing":
        return "does not exist", root / "nope"
    if how == "not a directory":
        (root / "file").write_text("x")
        return "not a directory", root / "file"
    if how == "image under DIR":
        _layout(root, GOOD)
        _png(root / "stray.png")
        return "stray.png", root
    if how == "image under coarse":
        _layout(root, GOOD)
        _png(root / "b" / "stray.JPG", mode="RGB")
        return "stray.JPG", root / "b"
    if how == "coarse without fine":
        _layout(root, GOOD)
        (root / "c").mkdir()
        return "holds no fine class folders", root / "c"
    if how == "one coarse":
        _layout(root, {"a": {"a1": 5, "a2": 5}})
        return "at least 2", root
    if how == "no coarse":
        return "holds 0 coarse", root
    if how == "fine name twice":
        _layout(root, {"a": {"same": 5, "a2": 5}, "b": {"same": 5}})
        return "'same' appears twice", root / "b" / "same"
    if how == "fine name twice after underscores":
        _layout(root, {"a": {"big_cat": 5}, "b": {"big cat": 5}})
        return "'big cat' appears twice", root / "a" / "big_cat"
    if how == "fine without images":
        _layout(root, {**GOOD, "b": {"b1": 5, "b2": 0}})
        (root / "b" / "b2" / "readme.md").write_text("x")
        return "without images", root / "b" / "b2"
    if how == "fine with one image":
        _layout(root, {**GOOD, "b": {"b1": 5, "lonely": 1}})
        return "at least 2 usable images", root / "b" / "lonely"
    if how == "fine with one usable image":
        _layout(root, {**GOOD, "b": {"b1": 5, "b2": 1}})
        (root / "b" / "b2" / "bad.png").write_bytes(b"nope")
        return "'unreadable': 1", root / "b" / "b2"
    if how == "empty split":
        for coarse in ("a", "b"):
            for fine in ("1", "2"):
                for i in range(3):
                    _png(root / coarse / f"{coarse}{fine}" / f"same_{i}.png", size=(4, 4))
        return "split is empty", root
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "missing",
        "not a directory",
        "image under DIR",
        "image under coarse",
        "coarse without fine",
        "one coarse",
        "no coarse",
        "fine name twice",
        "fine name twice after underscores",
        "fine without images",
        "fine with one image",
        "fine with one usable image",
        "empty split",
    ],
)
def test_bad_layouts_name_their_problem_and_path(tmp_path, how):
    root = (tmp_path / "data").resolve()
    root.mkdir()
    expected, named = _break(root, how)
    target = {"missing": root / "nope", "not a directory": root / "file"}.get(how, root)
    error = DatasetNotFoundError if how == "missing" else DatasetLayoutError
    with pytest.raises(error) as raised:
        create_dataset(f"imagefolder:{target}")
    assert isinstance(raised.value, ModelInputError)
    assert expected in str(raised.value)
    assert str(named) in str(raised.value)


def test_root_keyword_and_spec_agree(tmp_path):
    root = _layout(tmp_path / "data", GOOD)
    assert create_dataset("imagefolder", root=root).hierarchy.n_fine == 3
    assert create_dataset(f"imagefolder:{root}", root=root).hierarchy.n_coarse == 2
    with pytest.raises(ModelInputError, match="two different folders"):
        create_dataset(f"imagefolder:{root}", root=tmp_path)


def test_split_names_are_checked(tmp_path):
    dataset = ImageFolderDataset(_layout(tmp_path / "data", GOOD))
    with pytest.raises(ModelInputError, match="val"):
        dataset.split("val")


def test_path_loader_keeps_paths_not_pixels(tmp_path):
    dataset = ImageFolderDataset(_good_tree(tmp_path))
    loader = dataset.split("train").loader
    assert isinstance(loader, PathLoader)
    assert all(isinstance(p, Path) for p in loader.paths)
    assert not any(isinstance(v, (Image.Image, np.ndarray)) for v in vars(loader).values())
    split = dataset.split("test")
    copy = pickle.loads(pickle.dumps(split))
    assert copy.content_id == split.content_id and len(copy) == len(split)
    np.testing.assert_array_equal(np.asarray(copy.image(0)), np.asarray(split.image(0)))
