"""The models named by the config, loaded once at server start-up (never inside a request)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.config import Config
from backend.features import ImageCodec, WeakAnnotatorFactory
from model.hierarchy import LabelHierarchy


@dataclass
class Components:
    backbone: Any
    weak_annotator: Any
    """A fixed weak annotator (its classes matched to each project's by name), or None."""
    embedding_store: Any
    image_codec: ImageCodec
    weak_annotator_factory: WeakAnnotatorFactory | None = None
    """Builds each project's weak annotator from its own classes; set instead of ``weak_annotator``."""


def build_components(config: Config) -> Components:
    """Load the backbone, the weak annotator (or its heavy model) and the embedding store named by the config."""
    from model.embedding_store import EmbeddingStore, content_key
    from model.embeddings import configure_torch_threads, create_backbone
    from model.images import ImageLimits, decode_image

    if config.torch_threads:
        configure_torch_threads(config.torch_threads)
    backbone = create_backbone(config.backbone, image_size=config.image_size)
    weak_annotator, weak_annotator_factory = build_weak_annotator(config, backbone)
    store = EmbeddingStore(Path(config.model_dir) / "embeddings.sqlite")
    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    return Components(
        backbone=backbone,
        weak_annotator=weak_annotator,
        embedding_store=store,
        image_codec=ImageCodec(content_key=content_key, decode=lambda data: decode_image(data, limits)),
        weak_annotator_factory=weak_annotator_factory,
    )


@dataclass(frozen=True)
class OpenClipZeroShotFactory:
    """Zero-shot prompts with a project's class names over one open_clip model loaded at start-up."""

    clip_backbone: Any
    cost_per_label: float

    @property
    def description(self) -> str:
        return f"zero-shot:{self.clip_backbone.name} (per project classes)"

    def __call__(self, hierarchy: LabelHierarchy) -> Any:
        from model.weak.openclip_zeroshot import OpenClipZeroShot

        return OpenClipZeroShot.from_backbone(self.clip_backbone, hierarchy, cost_per_label=self.cost_per_label)


@dataclass(frozen=True)
class OpenAICompatibleVLMFactory:
    """An OpenAI-compatible VLM asked to choose among a project's coarse class names."""

    base_url: str
    api_key: str | None
    model: str
    cost_per_label: float

    @property
    def description(self) -> str:
        return f"vlm:{self.model} (per project classes)"

    def __call__(self, hierarchy: LabelHierarchy) -> Any:
        from model.weak.openai_compatible import OpenAICompatibleVLM

        return OpenAICompatibleVLM(
            self.base_url, self.api_key, self.model, hierarchy.coarse_classes, cost_per_label=self.cost_per_label
        )

    def __repr__(self) -> str:  # never shows the API key
        return f"OpenAICompatibleVLMFactory(base_url={self.base_url!r}, model={self.model!r})"


def build_weak_annotator(config: Config, backbone: Any) -> tuple[Any, WeakAnnotatorFactory | None]:
    """``(fixed annotator, per-project factory)`` for WEAK_ANNOTATOR, at most one of them set.

    The ImageNet map has its own classes (from its map file); open-vocabulary annotators read each project's class
    names, so only their heavy model is loaded here. The backbone's model is shared where it is the same one."""
    if config.weak_annotator == "none":
        return None, None
    if config.weak_annotator == "imagenet-map":
        from model.embeddings import TimmBackbone
        from model.weak.classifier_label_map import ClassifierLabelMap, load_imagenet_map

        try:
            groups = json.loads(Path(config.imagenet_map_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"IMAGENET_MAP_FILE {config.imagenet_map_file}: {exc}") from exc
        coarse_classes = list(groups)
        classifier = backbone if hasattr(backbone, "classify_logits") else TimmBackbone(
            "efficientnet_lite0", image_size=config.image_size
        )
        mapping = load_imagenet_map(config.imagenet_map_file, coarse_classes)
        return ClassifierLabelMap(classifier, mapping, coarse_classes, cost_per_label=config.cost_weak), None
    if config.weak_annotator == "open-clip":
        from model.embeddings import OpenClipImageBackbone

        if isinstance(backbone, OpenClipImageBackbone) and _same_open_clip_weights(
            backbone, config.open_clip_model, config.open_clip_pretrained
        ):
            clip_backbone = backbone
        else:
            clip_backbone = OpenClipImageBackbone(config.open_clip_model, config.open_clip_pretrained)
        return None, OpenClipZeroShotFactory(clip_backbone, config.cost_weak)
    if config.weak_annotator == "openai":
        return None, OpenAICompatibleVLMFactory(
            config.vlm_api_base_url or "", config.vlm_api_key, config.vlm_api_model or "", config.cost_weak
        )
    raise ValueError(f"unknown WEAK_ANNOTATOR {config.weak_annotator!r}")


def _same_open_clip_weights(backbone: Any, model_name: str, pretrained: str | None) -> bool:
    """Whether ``backbone`` is open_clip ``model_name`` with the weights ``pretrained`` (tag, checkpoint or None)."""
    if getattr(backbone, "model_name", None) != model_name:
        return False
    weights_id = str(getattr(backbone, "weights_id", ""))
    if "+cfg-" in weights_id:  # an architecture override: not the plain model that ``pretrained`` names
        return False
    if pretrained is None or pretrained == "random":
        return weights_id == "random-seed0"  # OpenClipImageBackbone's default seed
    checkpoint = Path(pretrained).expanduser()
    if checkpoint.is_file():
        from model.embeddings import _file_fingerprint  # the rule OpenClipImageBackbone names file weights by

        return weights_id == f"file-{_file_fingerprint(checkpoint)}"
    return weights_id == pretrained
