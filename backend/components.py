"""The models named by the config, loaded once at server start-up (never inside a request)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backend.config import Config
from backend.features import ImageCodec, WeakAnnotatorFactory
from backend.shared_store import StateStore, build_state_store
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
    state_store: StateStore | None = None
    """Where the embedding cache, the image-URL index and the projects' records live (files, or Redis)."""


def build_components(config: Config) -> Components:
    """Load the backbone, the weak annotator (or its heavy model) and the state store named by the config."""
    state_store = build_state_store(config)
    backbone = build_backbone(config)
    weak_annotator, weak_annotator_factory = build_weak_annotator(config, backbone)
    return Components(
        backbone=backbone,
        weak_annotator=weak_annotator,
        embedding_store=state_store.embedding_store(),
        image_codec=build_image_codec(config),
        weak_annotator_factory=weak_annotator_factory,
        state_store=state_store,
    )


def build_backbone(config: Config) -> Any:
    """The embedding backbone named by BACKBONE, on DEVICE, under EMBEDDING_RUNTIME."""
    from model.embeddings import configure_torch_threads
    from model.runtime import create_backbone

    if config.torch_threads:
        configure_torch_threads(config.torch_threads)
    return create_backbone(
        config.backbone, image_size=config.image_size, device=config.device, runtime=config.embedding_runtime,
        cache_dir=Path(config.model_dir) / "runtime-cache", threads=config.torch_threads,
    )


def build_image_codec(config: Config) -> ImageCodec:
    """Downloaded bytes to a content key and a decoded image, within MAX_IMAGE_BYTES and MAX_IMAGE_PIXELS."""
    from model.embedding_store import content_key
    from model.images import ImageLimits, decode_image

    limits = ImageLimits(max_bytes=config.max_image_bytes, max_pixels=config.max_image_pixels)
    return ImageCodec(content_key=content_key,
                      decode=lambda data, *, at_least=None: decode_image(data, limits, at_least=at_least))


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


@dataclass(frozen=True)
class SemanticZeroShotFactory:
    """ConSE zero-shot prompts with a project's class names over one ImageNet classifier and one text encoder, both
    loaded at start-up; the ImageNet label embeddings are computed once and shared by every project."""

    classifier: Any
    text_encoder: Any
    imagenet_embeddings: Any
    descriptions: dict[str, list[str]]
    cost_per_label: float

    @property
    def description(self) -> str:
        return f"semantic:{self.classifier.name}:{self.text_encoder.name} (per project classes)"

    def __call__(self, hierarchy: LabelHierarchy) -> Any:
        from model.weak.semantic_zeroshot import SemanticZeroShot

        descriptions = {c: d for c, d in self.descriptions.items() if c in hierarchy.coarse_classes}
        return SemanticZeroShot(
            self.classifier, self.text_encoder, hierarchy, descriptions=descriptions,
            imagenet_embeddings=self.imagenet_embeddings, cost_per_label=self.cost_per_label,
        )


WeakAnnotatorChoice = tuple[Any, WeakAnnotatorFactory | None]
"""``(fixed annotator, per-project factory)``, at most one of them set."""


def _semantic(config: Config, backbone: Any) -> WeakAnnotatorChoice:
    from model.embeddings import TimmBackbone
    from model.weak.semantic_zeroshot import imagenet_label_embeddings
    from model.weak.text_encoder import packaged_minilm

    wanted = config.semantic_classifier
    backbone_is_imagenet = getattr(backbone, "num_classes", 0) == 1000
    if backbone_is_imagenet and (wanted is None or wanted == getattr(backbone, "model_name", None)):
        classifier = backbone  # one forward pass per image gives the embedding and the logits
    else:
        classifier = TimmBackbone(wanted or "efficientnet_lite0", image_size=config.image_size)
    cache_dir = Path(config.model_dir) / "text-encoders"
    # ONNX Runtime on a CPU: no sentence-transformers, transformers or scikit-learn in the server (about 150 MB)
    encoder = packaged_minilm(cache_dir, onnx=True)
    return None, SemanticZeroShotFactory(
        classifier, encoder, imagenet_label_embeddings(encoder, cache_dir=cache_dir),
        _read_descriptions(config.class_descriptions_file), config.cost_weak,
    )


def _read_descriptions(path: Path | None) -> dict[str, list[str]]:
    """CLASS_DESCRIPTIONS_FILE: JSON ``{coarse class: "text" | ["text", ...]}``."""
    if path is None:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"CLASS_DESCRIPTIONS_FILE {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"CLASS_DESCRIPTIONS_FILE {path}: expected a JSON object {{class: description(s)}}")
    out: dict[str, list[str]] = {}
    for name, value in data.items():
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"CLASS_DESCRIPTIONS_FILE {path}: {name!r} must map to a string or a list of strings")
        out[name] = texts
    return out


def _imagenet_map(config: Config, backbone: Any) -> WeakAnnotatorChoice:
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


def _open_clip(config: Config, backbone: Any) -> WeakAnnotatorChoice:
    from model.embeddings import OpenClipImageBackbone

    if isinstance(backbone, OpenClipImageBackbone) and _same_open_clip_weights(
        backbone, config.open_clip_model, config.open_clip_pretrained
    ):
        clip_backbone = backbone
    else:
        clip_backbone = OpenClipImageBackbone(config.open_clip_model, config.open_clip_pretrained)
    return None, OpenClipZeroShotFactory(clip_backbone, config.cost_weak)


def _simulated(config: Config, backbone: Any) -> WeakAnnotatorChoice:
    from model.weak.lookup import LookupWeakAnnotator

    if config.simulated_weak_labels_file is None:
        raise ValueError("WEAK_ANNOTATOR=simulated needs SIMULATED_WEAK_LABELS_FILE")
    return LookupWeakAnnotator.from_file(config.simulated_weak_labels_file, cost_per_label=config.cost_weak), None


def _openai(config: Config, backbone: Any) -> WeakAnnotatorChoice:
    return None, OpenAICompatibleVLMFactory(
        config.vlm_api_base_url or "", config.vlm_api_key, config.vlm_api_model or "", config.cost_weak
    )


WEAK_ANNOTATOR_BUILDERS = {
    "semantic": _semantic,
    "imagenet-map": _imagenet_map,
    "open-clip": _open_clip,
    "openai": _openai,
    "simulated": _simulated,
    "none": lambda config, backbone: (None, None),
}
"""WEAK_ANNOTATOR -> builder. The ImageNet map has its own classes (from its map file); open-vocabulary annotators
read each project's class names, so only their heavy models are loaded at start-up. ``simulated`` answers from a
table drawn through a known T by ``vlm-al replay``: it is for the replay only. The backbone's model is shared
where it is the same one."""


def build_weak_annotator(config: Config, backbone: Any) -> WeakAnnotatorChoice:
    """``(fixed annotator, per-project factory)`` for WEAK_ANNOTATOR, at most one of them set."""
    builder = WEAK_ANNOTATOR_BUILDERS.get(config.weak_annotator)
    if builder is None:
        raise ValueError(f"unknown WEAK_ANNOTATOR {config.weak_annotator!r}; known: {sorted(WEAK_ANNOTATOR_BUILDERS)}")
    return builder(config, backbone)


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
        from model.io import file_digest  # the rule OpenClipImageBackbone names file weights by

        return weights_id == f"file-{file_digest(checkpoint)}"
    return weights_id == pretrained
