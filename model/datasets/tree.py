"""What the folder-based data sets (openclipart, imagefolder) share: listing image files, reading headers,
dropping duplicates, grouping variants and the group-aware train/test split."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.datasets.base import (
    DatasetImageError,
    check_split_name,
    DatasetLayoutError,
    ImageSplit,
    is_test_group,
    load_image_file,
    order_key,
    read_image_size,
    short_digest,
    variant_group_key,
)
from model.hierarchy import LabelHierarchy

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
"""File name endings (compared case-insensitively) that count as images."""

DECODE_VERSION = "decode-v2"
"""Part of every content_id: bump it when the decoding (compositing, resizing) changes."""

SKIP_OVER_PIXEL_CAP = "over pixel cap"
SKIP_UNREADABLE = "unreadable"
SKIP_DUPLICATE = "duplicate"
SKIP_IN_TWO_CLASSES = "in two classes"


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def is_image_name(name: str) -> bool:
    return not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden files and folders ignored, symlinked files followed,
    symlinked folders not), in a sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(Path(dirpath) / f for f in sorted(filenames) if is_image_name(f))
    return found


@dataclass(frozen=True)
class TreeImage:
    """One usable image file: where it was found, its fine class, and what identifies its contents."""

    path: Path
    relpath: str
    fine: str
    size_bytes: int
    mtime_ns: int


@dataclass(frozen=True)
class _Probe:
    real: str
    size_bytes: int
    mtime_ns: int
    skip: str | None


class TreeScanner:
    """Reads each file's header once (to skip unreadable files and files over the pixel cap) and finds files
    that are the same image: one file reached through symlinks, or byte-identical copies."""

    def __init__(self, root: Path, max_pixels: int) -> None:
        self.root = root
        self.max_pixels = max_pixels
        self._probes: dict[Path, _Probe] = {}
        self._content: dict[str, str] = {}

    def probe(self, path: Path) -> _Probe:
        if path not in self._probes:
            try:
                real = os.path.realpath(path)
                stat = os.stat(real)
                width, height = read_image_size(real)
                skip = SKIP_OVER_PIXEL_CAP if width * height > self.max_pixels else None
                probe = _Probe(real, stat.st_size, stat.st_mtime_ns, skip)
            except (OSError, DatasetImageError):
                probe = _Probe(str(path), 0, 0, SKIP_UNREADABLE)
            self._probes[path] = probe
        return self._probes[path]

    def _content_hash(self, real: str) -> str:
        if real not in self._content:
            digest = hashlib.sha256()
            with open(real, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            self._content[real] = digest.hexdigest()
        return self._content[real]

    def usable(self, files_by_fine: Mapping[str, Sequence[Path]]) -> tuple[dict[str, list[TreeImage]], Counter[str]]:
        """The usable images of every fine class, and how many files were skipped for which reason.

        A file (or an identical copy of it) that several fine classes hold has no single true label: it is
        dropped from all of them. Within one class, only the first of identical files is kept.
        """
        skipped: Counter[str] = Counter()
        candidates: list[tuple[str, Path, _Probe]] = []
        for fine, files in files_by_fine.items():
            for path in files:
                probe = self.probe(path)
                if probe.skip is not None:
                    skipped[probe.skip] += 1
                else:
                    candidates.append((fine, path, probe))
        # Identity: the real path, or the content hash where another file has the same size.
        reals_by_size: dict[int, set[str]] = {}
        for _, _, probe in candidates:
            reals_by_size.setdefault(probe.size_bytes, set()).add(probe.real)
        identity: dict[str, str] = {}
        for size, reals in reals_by_size.items():
            for real in reals:
                identity[real] = "sha256:" + self._content_hash(real) if len(reals) > 1 else real
        fines_by_identity: dict[str, set[str]] = {}
        for fine, _, probe in candidates:
            fines_by_identity.setdefault(identity[probe.real], set()).add(fine)
        usable: dict[str, list[TreeImage]] = {fine: [] for fine in files_by_fine}
        seen: set[str] = set()
        for fine, path, probe in candidates:
            key = identity[probe.real]
            if len(fines_by_identity[key]) > 1:
                skipped[SKIP_IN_TWO_CLASSES] += 1
                continue
            if key in seen:
                skipped[SKIP_DUPLICATE] += 1
                continue
            seen.add(key)
            usable[fine].append(
                TreeImage(path, path.relative_to(self.root).as_posix(), fine, probe.size_bytes, probe.mtime_ns)
            )
        return usable, skipped


class PathLoader:
    """Loads image ``i`` from ``paths[i]`` (RGB on white, longest side at most ``max_side``)."""

    def __init__(self, paths: Sequence[Path], max_side: int, max_pixels: int) -> None:
        self.paths: tuple[Path, ...] = tuple(paths)
        self.max_side = max_side
        self.max_pixels = max_pixels

    def __call__(self, index: int) -> Image.Image:
        return load_image_file(self.paths[index], max_side=self.max_side, max_pixels=self.max_pixels)


def build_splits(
    *,
    dataset: str,
    kind: str,
    root: Path,
    hierarchy: LabelHierarchy,
    images_by_fine: Mapping[str, Sequence[TreeImage]],
    max_side: int,
    max_pixels: int,
) -> dict[str, ImageSplit]:
    """Both splits: whole variant groups go to test with probability TEST_FRACTION (a hash of the group key),
    and each split is in a fixed pseudo-random order (a seeded hash of the relative path).

    Group keys are global (not per folder): the same drawing often sits in several folders (symlinks, copies,
    or the same card in four decks), and a global key keeps all of them on one side.
    """
    items = [(image, hierarchy.fine_index(fine)) for fine in hierarchy.fine_classes for image in images_by_fine[fine]]
    keys = [variant_group_key(image.path.name) for image, _ in items]
    group_ids = {key: i for i, key in enumerate(sorted(set(keys)))}
    preprocessing = f"{DECODE_VERSION} max_side={max_side} max_pixels={max_pixels}"
    header = f"{kind}\n{preprocessing}\n{json.dumps(hierarchy.to_dict(), sort_keys=True)}\n"
    splits: dict[str, ImageSplit] = {}
    for split in ("train", "test"):
        chosen = [
            (image, label, key) for (image, label), key in zip(items, keys) if is_test_group(key) == (split == "test")
        ]
        if not chosen:
            raise DatasetLayoutError(
                f"{dataset}: the {split} split is empty ({len(items)} images in {len(group_ids)} variant groups under "
                f"{root}); add images with other names (whole variant groups go to one split)"
            )
        chosen.sort(key=lambda entry: order_key(entry[0].relpath))
        digest = hashlib.sha256(f"{header}{split}\n".encode())
        for image, label, key in chosen:
            digest.update(f"{image.relpath}\t{image.size_bytes}\t{image.mtime_ns}\t{label}\t{key}\n".encode())
        splits[split] = ImageSplit(
            dataset=dataset,
            split=split,
            hierarchy=hierarchy,
            fine_labels=np.array([label for _, label, _ in chosen], dtype=np.int64),
            groups=np.array([group_ids[key] for _, _, key in chosen], dtype=np.int64),
            content_id=short_digest(digest.hexdigest()),
            loader=PathLoader([image.path for image, _, _ in chosen], max_side, max_pixels),
        )
    return splits


def group_key_of(split: ImageSplit, index: int) -> str:
    """The variant group key of image ``index`` of a folder-based split (for reports and tests)."""
    loader = split.loader
    if not isinstance(loader, PathLoader):
        raise DatasetLayoutError(f"{split.dataset} {split.split} is not a folder-based split")
    return variant_group_key(loader.paths[index].name)


class TreeDataset:
    """What a folder-tree data set keeps once it has chosen its images: its splits, served by name."""

    name: str
    root: Path
    hierarchy: LabelHierarchy
    _splits: dict[str, ImageSplit]

    def _build_splits(self, kind: str, images_by_fine: Mapping[str, Sequence[TreeImage]], max_side: int,
                      max_pixels: int) -> None:
        self._splits = build_splits(dataset=self.name, kind=kind, root=self.root, hierarchy=self.hierarchy,
                                    images_by_fine=images_by_fine, max_side=max_side, max_pixels=max_pixels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, {self.hierarchy.n_fine} fine / "
                f"{self.hierarchy.n_coarse} coarse classes)")

    def split(self, name: str) -> ImageSplit:
        return self._splits[check_split_name(name)]
