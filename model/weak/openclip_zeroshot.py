"""Zero-shot coarse labels from an open_clip model: prompt ensembles per class, cosine similarity, softmax."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from model.embeddings import OpenClipImageBackbone
from model.errors import ModelInputError
from model.hierarchy import LabelHierarchy
from model.weak.base import WeakLabels

DEFAULT_PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of a {}.",
    "a low resolution photo of a {}.",
    "a black and white photo of a {}.",
    "a product photo of a {}.",
)
"""Generic templates in the style of CLIP's ImageNet prompt ensemble."""

CoarseFrom = Literal["coarse_prompts", "fine_sum"]


class OpenClipZeroShot:
    """Coarse labels by zero-shot classification.

    ``coarse_from="coarse_prompts"`` scores the coarse class names directly; ``"fine_sum"`` scores the fine
    class names and sums the probabilities within each coarse group. Each class's text embedding is the mean of
    its normalised prompt embeddings, renormalised. ``domain_template`` (e.g. "a photo of a {}, a type of
    bird.") joins the ensemble.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        hierarchy: LabelHierarchy,
        prompt_templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
        domain_template: str | None = None,
        coarse_from: CoarseFrom = "coarse_prompts",
        cost_per_label: float = 0.0,
        device: str = "cpu",
        batch_size: int = 64,
        model_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        backbone = OpenClipImageBackbone(
            model_name, pretrained, batch_size=batch_size, device=device, model_overrides=model_overrides
        )
        self._init(backbone, hierarchy, prompt_templates, domain_template, coarse_from, cost_per_label)

    @classmethod
    def from_backbone(
        cls,
        backbone: OpenClipImageBackbone,
        hierarchy: LabelHierarchy,
        prompt_templates: Sequence[str] = DEFAULT_PROMPT_TEMPLATES,
        domain_template: str | None = None,
        coarse_from: CoarseFrom = "coarse_prompts",
        cost_per_label: float = 0.0,
    ) -> OpenClipZeroShot:
        """Share an already loaded open_clip model (its cached image embeddings feed ``annotate_embeddings``)."""
        annotator = cls.__new__(cls)
        annotator._init(backbone, hierarchy, prompt_templates, domain_template, coarse_from, cost_per_label)
        return annotator

    def _init(
        self,
        backbone: OpenClipImageBackbone,
        hierarchy: LabelHierarchy,
        prompt_templates: Sequence[str],
        domain_template: str | None,
        coarse_from: str,
        cost_per_label: float,
    ) -> None:
        import open_clip

        if coarse_from not in ("coarse_prompts", "fine_sum"):
            raise ModelInputError(f"coarse_from must be 'coarse_prompts' or 'fine_sum', got {coarse_from!r}")
        if cost_per_label < 0:
            raise ModelInputError(f"cost_per_label must be non-negative, got {cost_per_label}")
        templates = list(prompt_templates) + ([domain_template] if domain_template else [])
        if not templates:
            raise ModelInputError("need at least one prompt template")
        for template in templates:
            if not isinstance(template, str) or template.count("{}") != 1:
                raise ModelInputError(f"prompt template {template!r} must contain exactly one '{{}}'")
        self.backbone = backbone
        self.hierarchy = hierarchy
        self.coarse_classes = hierarchy.coarse_classes
        self.coarse_from = coarse_from
        self.cost_per_label = float(cost_per_label)
        self.prompt_templates = tuple(templates)
        self._tokenizer = open_clip.get_tokenizer(backbone.model_name)
        class_names = hierarchy.coarse_classes if coarse_from == "coarse_prompts" else hierarchy.fine_classes
        self.class_text_embeddings = self._class_text_embeddings(class_names)
        model = backbone.model
        # Trained CLIP models learn this temperature; it sets how peaked the probabilities are.
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
        prompts_digest = hashlib.sha256(json.dumps([self.prompt_templates, class_names]).encode()).hexdigest()[:8]
        self.name = f"zero-shot:{backbone.name}:{coarse_from}:{prompts_digest}"

    def __repr__(self) -> str:
        return f"OpenClipZeroShot({self.name!r})"

    @property
    def prompts_per_class(self) -> int:
        return len(self.prompt_templates)

    def prompts_for(self, class_name: str) -> list[str]:
        return [template.format(class_name) for template in self.prompt_templates]

    def _class_text_embeddings(self, class_names: Sequence[str]) -> np.ndarray:
        model = self.backbone.model
        rows = []
        with torch.inference_mode():
            for class_name in class_names:
                tokens = self._tokenizer(self.prompts_for(class_name)).to(self.backbone.device)
                prompt_embeddings = torch.nn.functional.normalize(model.encode_text(tokens).float(), dim=-1)
                rows.append(torch.nn.functional.normalize(prompt_embeddings.mean(dim=0), dim=-1))
        return torch.stack(rows).cpu().numpy().astype(np.float32)

    def _class_probabilities(self, image_features: np.ndarray) -> np.ndarray:
        features = np.asarray(image_features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.class_text_embeddings.shape[1]:
            raise ModelInputError(
                f"expected image features of shape (n, {self.class_text_embeddings.shape[1]}), got {features.shape}"
            )
        if not np.all(np.isfinite(features)):
            raise ModelInputError("image features contain NaN or inf")
        norms = np.linalg.norm(features, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise ModelInputError("image features contain an all-zero row")
        logits = self.logit_scale * (features / norms) @ self.class_text_embeddings.T
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32)

    def fine_probabilities(self, image_features: np.ndarray) -> np.ndarray:
        """Zero-shot fine-class probabilities (only with ``coarse_from='fine_sum'``)."""
        if self.coarse_from != "fine_sum":
            raise ModelInputError("fine probabilities need coarse_from='fine_sum' (fine-class prompts)")
        return self._class_probabilities(image_features)

    def annotate_embeddings(self, image_features: np.ndarray) -> WeakLabels:
        """Weak labels from image features of this model computed elsewhere (e.g. the embedding store)."""
        probabilities = self._class_probabilities(image_features)
        if self.coarse_from == "fine_sum":
            probabilities = probabilities @ self.hierarchy.fine_to_coarse_matrix
        return WeakLabels.from_probabilities(probabilities)

    annotate_image_features = annotate_embeddings

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels:
        return self.annotate_embeddings(self.backbone.embed(images))

    def score_labels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Per-label scores for a multi-label project (``LabelScorer``): the zero-shot probability of every class
        prompt, read per label (thresholds are calibrated per label on human labels, never an argmax)."""
        return self.label_scores_embeddings(self.backbone.embed(images))

    def label_scores_embeddings(self, image_features: np.ndarray) -> np.ndarray:
        """float32 (n, C) from image features of this model computed elsewhere."""
        return self.annotate_embeddings(image_features).coarse_probabilities


__all__ = ["DEFAULT_PROMPT_TEMPLATES", "OpenClipZeroShot"]
