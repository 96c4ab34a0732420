"""Image data sets behind one interface, and the Fashion-MNIST helpers.

``create_dataset(spec)`` gives an ``ImageDataset`` (``name``, ``hierarchy``, ``split("train" | "test")``); a split
is an ``ImageSplit``: fine labels, variant groups and lazily loaded RGB images. Specs: see ``DATASET_NAMES``.
"""

from model.datasets.base import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_SIDE,
    TEST_FRACTION,
    DatasetImageError,
    DatasetLayoutError,
    DatasetNotFoundError,
    ImageDataset,
    ImageSplit,
    composite_on_white,
    load_image_file,
    variant_group_key,
)
from model.datasets.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_GROUPS,
    FASHION_MNIST_ROOT,
    FashionMNISTDataset,
    fashion_mnist_hierarchy,
    load_fashion_mnist,
    to_pil,
)
from model.datasets.imagefolder import ImageFolderDataset
from model.datasets.openclipart import OPENCLIPART_ROOT, OpenClipartDataset
from model.datasets.registry import DATASET_NAMES, create_dataset

__all__ = [
    "DATASET_NAMES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_SIDE",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_GROUPS",
    "FASHION_MNIST_ROOT",
    "OPENCLIPART_ROOT",
    "TEST_FRACTION",
    "DatasetImageError",
    "DatasetLayoutError",
    "DatasetNotFoundError",
    "FashionMNISTDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageSplit",
    "OpenClipartDataset",
    "composite_on_white",
    "create_dataset",
    "fashion_mnist_hierarchy",
    "load_fashion_mnist",
    "load_image_file",
    "to_pil",
    "variant_group_key",
]
