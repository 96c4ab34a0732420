"""The data set interface: a split is a list of lazily loaded images with fine labels and variant groups.

Every data set gives two splits, "train" and "test", that share one ``LabelHierarchy``. An ``ImageSplit`` keeps
labels and group ids in memory and loads one image at a time through its loader (paths, not pixels, are kept
for the folder-based data sets), so a pool of thousands of images costs little memory.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy
from model.images import to_rgb_on_white

SPLIT_NAMES: tuple[str, ...] = ("train", "test")

DEFAULT_MAX_SIDE = 512
"""Images are shrunk (aspect kept) so that their longest side is at most this many pixels."""

DEFAULT_MAX_PIXELS = 25_000_000
"""Files whose header declares more pixels than this are skipped before any pixel is decoded. Some clip-art
PNGs are enormous (the Debian openclipart-png package holds renderings of 169 MP and one of 623 MP): decoding
one costs seconds and gigabytes only to be shrunk to 512 px afterwards."""

ImageLoader = Callable[[int], Image.Image]
"""Loads the image at one index of a split (already RGB and shrunk)."""


class DatasetNotFoundError(ModelInputError):
    """The data set's files are not where they were looked for."""


class DatasetLayoutError(ModelInputError):
    """The data set's files are there but not laid out as the loader needs (or too few remain)."""


class DatasetImageError(ModelInputError):
    """One image file of a data set cannot be used (unreadable, or over the pixel cap)."""


@dataclass(frozen=True, eq=False)
class ImageSplit:
    """One split of a data set: ``fine_labels[i]`` and ``groups[i]`` describe image ``i``.

    ``groups``: images that are variants of one drawing share a group id; a group never appears in both
    splits of a data set. ``content_id`` is a short hex digest of the split's exact contents (files, labels
    and preprocessing), usable as a cache key.
    """

    dataset: str
    split: str
    hierarchy: LabelHierarchy
    fine_labels: np.ndarray
    groups: np.ndarray
    content_id: str
    loader: ImageLoader | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.split not in SPLIT_NAMES:
            raise ModelInputError(f"unknown split {self.split!r}; use one of {list(SPLIT_NAMES)}")
        labels = np.asarray(self.fine_labels)
        if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
            raise ModelInputError(f"fine_labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
        labels = labels.astype(np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= self.hierarchy.n_fine):
            raise ModelInputError(f"fine_labels must lie in [0, {self.hierarchy.n_fine})")
        groups = np.asarray(self.groups)
        if groups.shape != labels.shape or (groups.size and not np.issubdtype(groups.dtype, np.integer)):
            raise ModelInputError(f"groups must be an integer array of shape {labels.shape}, got {groups.shape}")
        groups = groups.astype(np.int64)
        for array in (labels, groups):
            array.setflags(write=False)
        object.__setattr__(self, "fine_labels", labels)
        object.__setattr__(self, "groups", groups)

    def __len__(self) -> int:
        return int(self.fine_labels.shape[0])

    def __repr__(self) -> str:
        return f"ImageSplit({self.dataset!r}, {self.split!r}, n={len(self)}, content_id={self.content_id!r})"

    @property
    def coarse_labels(self) -> np.ndarray:
        """int64 (n,): the coarse class index of every image."""
        return self.hierarchy.parent_array[self.fine_labels]

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as RGB (transparency composited onto white), longest side at most the data set's
        ``max_side``."""
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise ModelInputError(f"image index must be an integer, got {type(index).__name__}")
        if not 0 <= int(index) < len(self):
            raise ModelInputError(f"image index {index} is out of range for {self.dataset} {self.split} "
                                  f"({len(self)} images)")
        if self.loader is None:
            raise ModelInputError(f"{self.dataset} {self.split} has no image loader")
        return self.loader(int(index))

    def images(self, indices: Sequence[int]) -> list[Image.Image]:
        return [self.image(i) for i in indices]

    def head(self, n: int) -> ImageSplit:
        """The first ``n`` images (the split's order is already shuffled where the data set needs it)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ModelInputError(f"head(n) needs a non-negative integer, got {n!r}")
        if n > len(self):
            raise ModelInputError(f"head({n}) asks for more images than {self.dataset} {self.split} holds "
                                  f"({len(self)})")
        if n == len(self):
            return self
        return ImageSplit(
            dataset=self.dataset,
            split=self.split,
            hierarchy=self.hierarchy,
            fine_labels=self.fine_labels[:n],
            groups=self.groups[:n],
            content_id=short_digest(f"{self.content_id}\nhead {int(n)}"),
            loader=self.loader,  # the first n indices mean the same images
        )


@runtime_checkable
class ImageDataset(Protocol):
    """A data set with a fine->coarse hierarchy and two splits, "train" and "test"."""

    name: str
    hierarchy: LabelHierarchy

    def split(self, name: str) -> ImageSplit: ...


def check_split_name(name: object) -> str:
    if name not in SPLIT_NAMES:
        raise ModelInputError(f"unknown split {name!r}; use one of {list(SPLIT_NAMES)}")
    return str(name)


def short_digest(text: str | bytes) -> str:
    """16 hex digits of SHA-256: the form of every ``content_id``."""
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()[:16]


# --- variant groups and the group-aware split ------------------------------------------------------------------

_BW_TOKEN = re.compile(r"(?<![a-z0-9])bw(?![a-z0-9])")
_SEPARATORS = re.compile(r"[_\-\s.]+")
_TRAILING_NUMBER = re.compile(r"\s*\d+[a-z]?$")
_TRAILING_LETTER = re.compile(r"\s[a-z]$")

TEST_FRACTION = 0.3
"""Share of variant groups that go to the test split."""

_SPLIT_SALT = "vlm-al-split-v1"
_ORDER_SALT = "vlm-al-order-v1"


def variant_group_key(filename: str) -> str:
    """The name of the drawing a file is a variant of: the lower-cased stem, separators ("_", "-", ".") as
    spaces, a black-and-white marker ("bw" as a word) dropped, and one trailing variant marker removed.

    A variant marker is a trailing number, attached or not, with an optional letter (``name_01``, ``name-2``,
    ``name3``, ``name_01r``), or else a single letter after a separator (``name_r``, ``name_s``: openclipart's
    renditions). So ``bus1_bw_jarno_01.png``, ``bus1_jarno_02.png`` and ``bus1_jarno_.png`` all get the key
    ``"bus1 jarno"``. A series numbered like variants (``smiley001`` .. ``smiley120``) becomes one group; that
    errs on the safe side: look-alike drawings stay on one side of the split.
    """
    stem = Path(filename).stem.lower().strip()
    key = _SEPARATORS.sub(" ", _BW_TOKEN.sub(" ", stem)).strip()
    stripped = _TRAILING_NUMBER.sub("", key)
    if stripped == key:
        stripped = _TRAILING_LETTER.sub("", key)
    return stripped.strip() or key or stem


def is_test_group(key: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Deterministic: a hash of the group key, read as a number in [0, 1), below ``test_fraction``."""
    value = int.from_bytes(hashlib.sha256(f"{_SPLIT_SALT}:{key}".encode()).digest()[:8], "big")
    return value / 2.0**64 < test_fraction


def order_key(name: str) -> bytes:
    """Sort key of a fixed pseudo-random order (a seeded hash of a stable name), so that the first N images
    of a split are a representative sample of all its classes. Adding a file does not reorder the others."""
    return hashlib.sha256(f"{_ORDER_SALT}:{name}".encode()).digest()


# --- decoding --------------------------------------------------------------------------------------------------

def composite_on_white(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``, transparency composited onto white: the server's decoding rule (model.images)."""
    return to_rgb_on_white(image)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_image_size(path: str | Path) -> tuple[int, int]:
    """Width and height from the file's header; no pixel is decoded. PNG headers are parsed directly (the
    IHDR chunk), so even a 623-megapixel file reports its true size; other formats go through PIL's lazy
    open. Raises DatasetImageError if the file is unreadable."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
    except OSError as exc:
        raise DatasetImageError(f"cannot read {path}: {exc}") from exc
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR":
        width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
        if width > 0 and height > 0:
            return width, height
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return int(image.size[0]), int(image.size[1])
    except Image.DecompressionBombError:
        # PIL refuses to open beyond twice its own limit; report just past that, over any sensible cap.
        return 2 * int(Image.MAX_IMAGE_PIXELS or 0) + 1, 1
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DatasetImageError(f"cannot read the image header of {path}: {exc}") from exc


def load_image_file(path: str | Path, *, max_side: int = DEFAULT_MAX_SIDE,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode one file into RGB (EXIF orientation applied, transparency on white), shrunk so that its longest
    side is at most ``max_side``. The header's pixel count is checked against ``max_pixels`` first."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise DatasetImageError(
                        f"{path} is {width}x{height} = {width * height} pixels; the cap is {max_pixels}"
                    )
                image.load()
                oriented = ImageOps.exif_transpose(image)
                rgb = composite_on_white(oriented if oriented is not None else image)
    except DatasetImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise DatasetImageError(f"{path} is over the pixel cap: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise DatasetImageError(f"cannot decode {path}: {exc}") from exc
    if max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgb


def readable_name(folder_name: str) -> str:
    """A folder name as a class name a text encoder reads as words: underscores become spaces."""
    return " ".join(folder_name.replace("_", " ").split())
