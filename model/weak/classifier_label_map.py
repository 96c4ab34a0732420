"""A weak annotator from an ImageNet classifier: its 1000 classes are mapped onto the coarse classes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import HierarchyError, ModelInputError, UnknownClassError
from model.hierarchy import MISSING_LABEL
from model.weak.base import ImageNetClassifier, WeakLabels

N_IMAGENET_CLASSES = 1000


class ImageNetClassNames:
    """ImageNet-1k class names from timm's bundled copy (offline), resolvable by index, name or WordNet id."""

    def __init__(self) -> None:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        self.descriptions = tuple(info.index_to_description(i) for i in range(N_IMAGENET_CLASSES))
        self._by_wordnet_id = {info.index_to_label_name(i): i for i in range(N_IMAGENET_CLASSES)}
        # Some descriptions repeat ("crane": the bird and the machine), so names map to lists of indices.
        self._by_description: dict[str, list[int]] = {}
        self._by_synonym: dict[str, list[int]] = {}
        for index, description in enumerate(self.descriptions):
            self._by_description.setdefault(description, []).append(index)
            for synonym in description.split(", "):
                self._by_synonym.setdefault(synonym, []).append(index)

    def resolve(self, entry: int | str) -> int:
        """An index from an index, a full description ("tabby, tabby cat"), a WordNet id ("n02123045"),
        or a synonym that names exactly one class ("Egyptian cat")."""
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise ModelInputError(f"ImageNet class must be an index or a name, got {entry!r}")
        if isinstance(entry, int):
            if not 0 <= entry < N_IMAGENET_CLASSES:
                raise ModelInputError(f"ImageNet class index {entry} is outside 0..{N_IMAGENET_CLASSES - 1}")
            return entry
        if entry in self._by_wordnet_id:
            return self._by_wordnet_id[entry]
        candidates = self._by_description.get(entry) or self._by_synonym.get(entry, [])
        if len(candidates) == 1:
            return candidates[0]
        if candidates:
            raise ModelInputError(
                f"ImageNet name {entry!r} is ambiguous: "
                + "; ".join(f"{i} = {self.descriptions[i]!r}" for i in candidates)
            )
        raise UnknownClassError(f"{entry!r} is not an ImageNet class name, WordNet id or index")


def load_imagenet_map(path: str | Path, coarse_classes: Sequence[str]) -> dict[int, str]:
    """Read ``{coarse: [ImageNet index or name, ...]}`` from JSON into ``{imagenet index: coarse}``.

    Unknown coarse classes, unknown or ambiguous ImageNet names, indices out of range and an ImageNet class
    listed under two coarse classes are errors that name the entry.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"cannot read the ImageNet map {path}: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise ModelInputError(f"{path}: expected a JSON object mapping coarse class -> list of ImageNet classes")
    known_coarse = set(coarse_classes)
    unknown = [c for c in data if c not in known_coarse]
    if unknown:
        raise UnknownClassError(f"{path}: coarse classes not in {list(coarse_classes)}: {unknown}")
    names = ImageNetClassNames()
    mapping: dict[int, str] = {}
    for coarse, entries in data.items():
        for entry in entries:
            try:
                index = names.resolve(entry)
            except ModelInputError as exc:
                raise type(exc)(f"{path}, under {coarse!r}: {exc}") from exc
            if index in mapping and mapping[index] != coarse:
                raise HierarchyError(
                    f"{path}: ImageNet class {index} ({names.descriptions[index]!r}) is listed under "
                    f"both {mapping[index]!r} and {coarse!r}"
                )
            mapping[index] = coarse
    return mapping


class ClassifierLabelMap:
    """Coarse probability = softmax mass of the ImageNet classes mapped to each coarse class, renormalised over
    the mapped mass. Images whose mapped mass is below ``min_mapped_probability`` get no answer (-1)."""

    def __init__(
        self,
        backbone: ImageNetClassifier,
        imagenet_to_coarse: Mapping[int, str],
        coarse_classes: Sequence[str],
        cost_per_label: float = 0.0,
        name: str | None = None,
        min_mapped_probability: float = 0.0,
    ) -> None:
        self.backbone = backbone
        self.coarse_classes = tuple(coarse_classes)
        if len(self.coarse_classes) < 2 or len(set(self.coarse_classes)) != len(self.coarse_classes):
            raise HierarchyError(f"need at least 2 distinct coarse classes, got {list(self.coarse_classes)}")
        if not imagenet_to_coarse:
            raise ModelInputError("the ImageNet map is empty")
        if cost_per_label < 0:
            raise ModelInputError(f"cost_per_label must be non-negative, got {cost_per_label}")
        if not 0.0 <= min_mapped_probability < 1.0:
            raise ModelInputError(f"min_mapped_probability must be in [0, 1), got {min_mapped_probability}")
        coarse_position = {c: i for i, c in enumerate(self.coarse_classes)}
        self.n_logits = int(getattr(backbone, "num_classes", N_IMAGENET_CLASSES) or N_IMAGENET_CLASSES)
        membership = np.zeros((self.n_logits, len(self.coarse_classes)), dtype=bool)
        for index, coarse in imagenet_to_coarse.items():
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.n_logits:
                raise ModelInputError(f"ImageNet index {index!r} is outside 0..{self.n_logits - 1}")
            if coarse not in coarse_position:
                raise UnknownClassError(f"map target {coarse!r} is not a coarse class {list(self.coarse_classes)}")
            membership[int(index), coarse_position[coarse]] = True
        self.membership = membership
        self.unmapped_coarse_classes = tuple(c for i, c in enumerate(self.coarse_classes) if not membership[:, i].any())
        self.cost_per_label = float(cost_per_label)
        self.min_mapped_probability = float(min_mapped_probability)
        map_digest = hashlib.sha256(
            json.dumps(sorted((int(k), v) for k, v in imagenet_to_coarse.items())).encode()
            + json.dumps([self.coarse_classes, self.min_mapped_probability]).encode()
        ).hexdigest()[:10]
        self.name = name or f"imagenet-map:{backbone.name}:{map_digest}"

    def __repr__(self) -> str:
        return f"ClassifierLabelMap({self.name!r})"

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels:
        return self.annotate_logits(self.backbone.classify_logits(images))

    def annotate_logits(self, logits: np.ndarray) -> WeakLabels:
        """Weak labels from classifier logits computed elsewhere (e.g. with the embeddings)."""
        logits = np.asarray(logits, dtype=np.float64)
        if logits.ndim != 2 or logits.shape[1] != self.n_logits:
            raise ModelInputError(f"expected logits of shape (n, {self.n_logits}), got {logits.shape}")
        if not np.all(np.isfinite(logits)):
            raise ModelInputError("logits contain NaN or inf")
        # Work in log space: the mapped mass can be tiny, and summing exponentials would underflow to 0/0.
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_total = np.log(np.exp(shifted).sum(axis=1))
        n, n_coarse = logits.shape[0], len(self.coarse_classes)
        log_mass = np.full((n, n_coarse), -np.inf)
        for c in range(n_coarse):
            members = self.membership[:, c]
            if members.any():
                part = shifted[:, members]
                top = part.max(axis=1, keepdims=True)
                log_mass[:, c] = top[:, 0] + np.log(np.exp(part - top).sum(axis=1))
        log_mapped = np.logaddexp.reduce(log_mass, axis=1)
        probabilities = np.exp(log_mass - log_mapped[:, None]).astype(np.float32)
        coarse_index = probabilities.argmax(axis=1).astype(np.int64) if n else np.zeros(0, dtype=np.int64)
        mapped_probability = np.exp(log_mapped - log_total)
        unsure = mapped_probability < self.min_mapped_probability
        coarse_index[unsure] = MISSING_LABEL
        probabilities[unsure] = 0.0
        return WeakLabels(coarse_index=coarse_index, coarse_probabilities=probabilities)
