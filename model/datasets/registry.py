"""``create_dataset``: a data set by its name, from a registry of factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from model.datasets.base import ImageDataset
from model.datasets.composite import CompositeSceneDataset
from model.datasets.fashion_mnist import FASHION_MNIST_ROOT, FashionMNISTDataset
from model.datasets.imagefolder import ImageFolderDataset
from model.datasets.openclipart import OPENCLIPART_ROOT, OpenClipartDataset
from model.errors import ModelInputError

DatasetFactory = Callable[[str | None, Path | None], ImageDataset]
"""``factory(argument after the colon or None, root or None)``."""


def _fashion_mnist(argument: str | None, root: Path | None) -> ImageDataset:
    _no_argument("fashion-mnist", argument)
    return FashionMNISTDataset(root if root is not None else FASHION_MNIST_ROOT)


def _openclipart(argument: str | None, root: Path | None) -> ImageDataset:
    _no_argument("openclipart", argument)
    return OpenClipartDataset(root if root is not None else OPENCLIPART_ROOT)


def _openclipart_scenes(argument: str | None, root: Path | None) -> ImageDataset:
    _no_argument("openclipart-scenes", argument)
    return CompositeSceneDataset(root if root is not None else OPENCLIPART_ROOT)  # type: ignore[return-value]


def _imagefolder(argument: str | None, root: Path | None) -> ImageDataset:
    if argument and root is not None and Path(argument).expanduser().resolve() != root.expanduser().resolve():
        raise ModelInputError(f"'imagefolder:{argument}' and root={str(root)!r} name two different folders")
    folder = Path(argument) if argument else root
    if folder is None:
        raise ModelInputError(
            "the imagefolder data set needs its folder: 'imagefolder:DIR' (DIR/<coarse>/<fine>/<images>)"
        )
    return ImageFolderDataset(folder)


def _no_argument(name: str, argument: str | None) -> None:
    if argument is not None:
        raise ModelInputError(
            f"data set {name!r} takes no ':argument' (got {name}:{argument}); use root= for its folder"
        )


DATASET_FACTORIES: dict[str, DatasetFactory] = {
    "fashion-mnist": _fashion_mnist,
    "openclipart": _openclipart,
    "openclipart-scenes": _openclipart_scenes,
    "imagefolder": _imagefolder,
}

DATASET_NAMES: tuple[str, ...] = ("fashion-mnist", "openclipart", "openclipart-scenes", "imagefolder:DIR")
"""The specs ``create_dataset`` understands (DIR stands for a folder)."""


def create_dataset(spec: str, *, root: str | Path | None = None) -> ImageDataset:
    """The data set named by ``spec``: "fashion-mnist" (root: the IDX folder), "openclipart" (root: the PNG
    folder, default /usr/share/openclipart/png), "openclipart-scenes" (2-4 openclipart drawings composited on one
    canvas, with masks: a ``CompositeSceneDataset``, not a single-label ``ImageDataset``) or "imagefolder:DIR"
    (DIR/<coarse>/<fine>/<images>)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelInputError(f"a data set name is needed; known: {list(DATASET_NAMES)}")
    name, colon, argument = spec.strip().partition(":")
    factory = DATASET_FACTORIES.get(name.strip().lower())
    if factory is None:
        raise ModelInputError(f"unknown data set {spec!r}; known: {list(DATASET_NAMES)}")
    return factory(argument if colon else None, Path(root) if root is not None else None)
