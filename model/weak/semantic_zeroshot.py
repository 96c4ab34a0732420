"""Zero-shot coarse labels for any class names, offline: an ImageNet classifier plus a sentence encoder.

Two ways to combine them, both from the same text embeddings (nothing is trained, so a project with any class
names gets real weak labels from the first image on):

- ``"conse"`` (Norouzi et al., "Zero-Shot Learning by Convex Combination of Semantic Embeddings", ICLR 2014): the
  classifier's top-k ImageNet classes, weighted by their renormalised probabilities, give a convex combination of
  those classes' text embeddings; its cosine with each coarse class's text embedding, through a temperature-scaled
  softmax, gives the coarse probabilities.
- ``"label-map"`` (the default): the same cosines between ImageNet class names and coarse classes, read as a soft
  map from each ImageNet class to the coarse classes (a softmax over cosines, each coarse class's column centred
  by its mean cosine over all 1000 ImageNet names, so that a class whose words are close to everything does not
  collect every image). An image's coarse probabilities are its ImageNet probabilities pushed through that map:
  a learned-free version of the hand-written ImageNet map, for any class names.

On validation slices of the pools' split (Fashion-MNIST train, openclipart train) the label map with centring
beat ConSE on both data sets (bench/results/semantic_tuning.json).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import HierarchyError, ModelInputError
from model.hierarchy import LabelHierarchy
from model.io import atomic_write_bytes
from model.weak.base import ImageNetClassifier, WeakLabels
from model.weak.text_encoder import TextEncoder

COMBINE_MODES = ("label-map", "conse")
PROMPT_TEMPLATES: tuple[str, ...] = ("a photo of a {}.", "a drawing of a {}.", "a {}.")
"""Templates every class and ImageNet name goes through; their embeddings are averaged (a prompt ensemble)."""
IMAGENET_SYNONYMS = 3
"""ImageNet names are comma-separated synonym lists ("tabby, tabby cat"); the first few are averaged."""


def readable(name: str) -> str:
    """A class name as words a text encoder reads: Unicode normalised, separators as spaces."""
    text = unicodedata.normalize("NFKC", name)
    for separator in ("_", "/", "|"):
        text = text.replace(separator, " ")
    return " ".join(text.split())


def _has_words(name: str) -> bool:
    return any(ch.isalnum() for ch in name)


def prompt_embedding(encoder: TextEncoder, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
    """Unit vector: the mean of the unit embeddings of every template filled with every name."""
    texts = [template.format(name) for name in names for template in templates]
    vectors = encoder.encode(texts)
    mean = vectors.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def imagenet_label_embeddings(
    encoder: TextEncoder, templates: Sequence[str] = PROMPT_TEMPLATES, cache_dir: str | Path | None = None
) -> np.ndarray:
    """float32 (1000, d): each ImageNet class's prompt-ensemble embedding over its first synonyms.

    Cached on disk under ``cache_dir`` by encoder and templates (1,000 classes take seconds to encode on a CPU)."""
    from model.weak.classifier_label_map import ImageNetClassNames

    key = hashlib.sha256(json.dumps([encoder.name, list(templates), IMAGENET_SYNONYMS]).encode()).hexdigest()[:12]
    file_name = f"imagenet-label-embeddings-{key}.npy"
    path = Path(cache_dir).expanduser() / file_name if cache_dir is not None else None
    # The package ships the default templates' embeddings for the packaged MiniLM (the key names the encoder's
    # content digest), so a fresh server does not spend its start-up encoding 3,000 texts.
    for candidate in (path, Path(__file__).resolve().parent.parent / "data" / file_name):
        if candidate is not None and candidate.is_file():
            try:
                cached = np.load(candidate, allow_pickle=False)
                if cached.shape == (1000, encoder.dim) and np.all(np.isfinite(cached)):
                    return cached.astype(np.float32)
            except (OSError, ValueError):
                pass  # a damaged cache file is rebuilt below
    descriptions = ImageNetClassNames().descriptions
    synonyms = [[s.strip() for s in d.split(",") if s.strip()][:IMAGENET_SYNONYMS] for d in descriptions]
    counts = [len(s) for s in synonyms]
    texts = [template.format(name) for names in synonyms for name in names for template in templates]
    vectors = encoder.encode(texts).reshape(-1, len(templates), encoder.dim).mean(axis=1)
    rows, start = [], 0
    for count in counts:
        rows.append(vectors[start : start + count].mean(axis=0))
        start += count
    matrix = np.stack(rows)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    matrix = matrix.astype(np.float32)
    if path is not None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, matrix, allow_pickle=False)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError:
            pass  # a read-only cache only costs the encoding time next start
    return matrix


class SemanticZeroShot:
    """Coarse labels by ConSE over an ImageNet classifier and a text encoder.

    Each coarse class is described by a prompt ensemble over its own name (weight ``name_weight``) and the names
    of its fine children (the rest, shared equally), plus optional free-text ``descriptions`` per class that
    count as more children. ``combine`` chooses how image and text meet (see the module docstring);
    ``top_k`` and ``temperature`` belong to ConSE, ``map_temperature`` to the label map. ``backbone`` is the classifier: when the server's embedding backbone is that same
    object, one forward pass gives both the embedding and the logits this annotator reads (``annotate_logits``).
    """

    def __init__(
        self,
        classifier: ImageNetClassifier,
        text_encoder: TextEncoder,
        hierarchy: LabelHierarchy,
        *,
        descriptions: Mapping[str, Sequence[str]] | None = None,
        combine: str = "label-map",
        top_k: int = 20,
        temperature: float = 0.02,
        map_temperature: float = 0.1,
        name_weight: float = 0.25,
        templates: Sequence[str] = PROMPT_TEMPLATES,
        imagenet_embeddings: np.ndarray | None = None,
        label_cache_dir: str | Path | None = None,
        cost_per_label: float = 0.0,
    ) -> None:
        if not isinstance(hierarchy, LabelHierarchy):
            raise ModelInputError(f"SemanticZeroShot needs a LabelHierarchy, got {type(hierarchy).__name__}")
        n_logits = int(getattr(classifier, "num_classes", 0) or 0)
        if n_logits != 1000:
            raise ModelInputError(
                f"SemanticZeroShot needs an ImageNet-1k classifier; {getattr(classifier, 'name', classifier)!r} has "
                f"{n_logits} classes"
            )
        if not 1 <= int(top_k) <= 1000:
            raise ModelInputError(f"top_k must be in 1..1000, got {top_k}")
        if combine not in COMBINE_MODES:
            raise ModelInputError(f"combine must be one of {list(COMBINE_MODES)}, got {combine!r}")
        for label, value in (("temperature", temperature), ("map_temperature", map_temperature)):
            if not (np.isfinite(value) and value > 0):
                raise ModelInputError(f"{label} must be a finite number > 0, got {value}")
        if not 0.0 <= name_weight <= 1.0:
            raise ModelInputError(f"name_weight must be in [0, 1], got {name_weight}")
        if cost_per_label < 0:
            raise ModelInputError(f"cost_per_label must be non-negative, got {cost_per_label}")
        if not templates or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise ModelInputError("templates must be strings with exactly one '{}' each")
        coarse_classes = tuple(hierarchy.coarse_classes)
        if len(coarse_classes) < 2:
            raise HierarchyError(f"SemanticZeroShot needs at least 2 coarse classes, got {list(coarse_classes)}")
        descriptions = {str(k): [str(v) for v in vs] for k, vs in (descriptions or {}).items()}
        unknown = sorted(set(descriptions) - set(coarse_classes))
        if unknown:
            raise ModelInputError(f"descriptions name classes that are not coarse classes: {unknown}")
        nameless = [c for c in coarse_classes if not _has_words(readable(c))]
        if nameless:
            raise ModelInputError(
                f"coarse class names {nameless} have no letters or digits, so a text encoder cannot read them; "
                "rename the classes or give descriptions"
            )

        self.backbone = classifier
        self.text_encoder = text_encoder
        self.hierarchy = hierarchy
        self.coarse_classes = coarse_classes
        self.combine = combine
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self.map_temperature = float(map_temperature)
        self.name_weight = float(name_weight)
        self.templates = tuple(templates)
        self.cost_per_label = float(cost_per_label)
        self.class_embeddings = np.stack(
            [self._class_embedding(c, descriptions.get(c, ())) for c in coarse_classes]
        )
        self._refuse_indistinguishable_classes()
        self.imagenet_embeddings = (
            np.asarray(imagenet_embeddings, dtype=np.float32)
            if imagenet_embeddings is not None
            else imagenet_label_embeddings(text_encoder, self.templates, label_cache_dir)
        )
        if self.imagenet_embeddings.shape != (1000, self.class_embeddings.shape[1]):
            raise ModelInputError(
                f"imagenet_embeddings must be (1000, {self.class_embeddings.shape[1]}), "
                f"got {self.imagenet_embeddings.shape}"
            )
        # (1000, C): where each ImageNet class's probability goes in the label map.
        cosines = self.imagenet_embeddings.astype(np.float64) @ self.class_embeddings.T.astype(np.float64)
        self.label_map = _softmax((cosines - cosines.mean(axis=0, keepdims=True)) / self.map_temperature)
        settings = json.dumps(
            [self.combine, self.top_k, self.temperature, self.map_temperature, self.name_weight,
             list(self.templates), hierarchy.to_dict(), sorted(descriptions.items())],
            sort_keys=True,
        )
        digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
        self.name = f"semantic:{classifier.name}:{text_encoder.name}:{digest}"

    def __repr__(self) -> str:
        return f"SemanticZeroShot({self.name!r})"

    def _class_embedding(self, coarse: str, extra: Sequence[str]) -> np.ndarray:
        name = readable(coarse)
        children = [readable(f) for f in self.hierarchy.children(coarse)]
        children = [c for c in children if _has_words(c) and c.casefold() != name.casefold()]
        children += [readable(d) for d in extra if _has_words(d)]
        own = prompt_embedding(self.text_encoder, [name], self.templates)
        if not children:
            return own
        child_vectors = np.stack([prompt_embedding(self.text_encoder, [c], self.templates) for c in children])
        mixed = self.name_weight * own + (1.0 - self.name_weight) * child_vectors.mean(axis=0)
        return (mixed / max(float(np.linalg.norm(mixed)), 1e-12)).astype(np.float32)

    def _refuse_indistinguishable_classes(self) -> None:
        similarity = self.class_embeddings @ self.class_embeddings.T
        np.fill_diagonal(similarity, -1.0)
        first, second = np.unravel_index(int(np.argmax(similarity)), similarity.shape)
        if similarity[first, second] > 0.9999:
            raise ModelInputError(
                f"coarse classes {self.coarse_classes[first]!r} and {self.coarse_classes[second]!r} read as the "
                "same words to the text encoder; rename one or give descriptions"
            )

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels:
        return self.annotate_logits(self.backbone.classify_logits(images))

    def semantic_vectors(self, logits: np.ndarray) -> np.ndarray:
        """float32 (n, d): ConSE's convex combination of the top-k ImageNet classes' text embeddings, unit length."""
        logits = _checked_logits(logits)
        if logits.shape[0] == 0:
            return np.zeros((0, self.imagenet_embeddings.shape[1]), dtype=np.float32)
        top = np.argpartition(-logits, self.top_k - 1, axis=1)[:, : self.top_k]
        top_logits = np.take_along_axis(logits, top, axis=1)
        # The softmax over all 1000 classes, renormalised over the top k, is the softmax over the top-k logits.
        weights = np.exp(top_logits - top_logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        vectors = np.einsum("nk,nkd->nd", weights, self.imagenet_embeddings[top].astype(np.float64))
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32)

    def coarse_scores(self, logits: np.ndarray) -> np.ndarray:
        """float32 (n, C): cosine of each image's semantic vector with each coarse class."""
        return self.semantic_vectors(logits) @ self.class_embeddings.T

    def annotate_logits(self, logits: np.ndarray) -> WeakLabels:
        """Weak labels from ImageNet logits computed elsewhere (e.g. in the embedding pass)."""
        if self.combine == "conse":
            probabilities = _softmax(self.coarse_scores(logits).astype(np.float64) / self.temperature)
        else:
            probabilities = _softmax(_checked_logits(logits)) @ self.label_map
            probabilities /= np.maximum(probabilities.sum(axis=1, keepdims=True), 1e-12)
        return WeakLabels.from_probabilities(probabilities.astype(np.float32))


    def score_labels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Per-label scores for a multi-label project (``LabelScorer``): see ``label_scores_logits``."""
        return self.label_scores_logits(self.backbone.classify_logits(images))

    def label_scores_logits(self, logits: np.ndarray) -> np.ndarray:
        """float32 (n, C): each class's share of the image's ImageNet probability mass under the label map (ConSE:
        its temperature-scaled cosine probability). Several objects share the mass, so each label is read on its
        own scale and cut by a threshold calibrated on human labels, never by an argmax."""
        return self.annotate_logits(logits).coarse_probabilities


def _checked_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] != 1000:
        raise ModelInputError(f"expected ImageNet logits of shape (n, 1000), got {logits.shape}")
    if not np.all(np.isfinite(logits)):
        raise ModelInputError("logits contain NaN or inf")
    return logits


def _softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax of a float64 (n, k) array; an empty array stays empty."""
    if scores.size == 0:
        return scores.copy()
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)
