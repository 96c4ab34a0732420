"""The weak annotator interface: images in, a coarse label and coarse probabilities out, at a cost per label."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL


@dataclass(frozen=True)
class WeakLabels:
    """Weak coarse answers for n images.

    ``coarse_index``: int64 (n,), ``MISSING_LABEL`` (-1) where the annotator gave no usable answer.
    ``coarse_probabilities``: float32 (n, C); rows sum to 1, or are all zero where there is no answer.
    """

    coarse_index: np.ndarray
    coarse_probabilities: np.ndarray

    def __post_init__(self) -> None:
        index = np.asarray(self.coarse_index)
        probabilities = np.asarray(self.coarse_probabilities)
        if index.ndim != 1 or probabilities.ndim != 2 or probabilities.shape[0] != index.shape[0]:
            raise ModelInputError(
                f"weak labels need coarse_index (n,) and coarse_probabilities (n, C), "
                f"got {index.shape} and {probabilities.shape}"
            )
        if not np.issubdtype(index.dtype, np.integer):
            raise ModelInputError(f"coarse_index must be integers, got {index.dtype}")
        n_coarse = probabilities.shape[1]
        if np.any((index < MISSING_LABEL) | (index >= n_coarse)):
            raise ModelInputError(f"coarse_index values must be -1 or in [0, {n_coarse})")
        if not np.all(np.isfinite(probabilities)) or np.any(probabilities < 0):
            raise ModelInputError("coarse_probabilities must be finite and non-negative")
        sums = probabilities.sum(axis=1)
        answered = index != MISSING_LABEL
        if not np.allclose(sums[answered], 1.0, atol=1e-3) or not np.all(sums[~answered] <= 1.0 + 1e-3):
            raise ModelInputError("coarse_probabilities rows must sum to 1 where there is an answer")
        # Normalise dtypes once so every consumer sees the documented types.
        object.__setattr__(self, "coarse_index", index.astype(np.int64, copy=False))
        object.__setattr__(self, "coarse_probabilities", probabilities.astype(np.float32, copy=False))

    @classmethod
    def from_indices(cls, coarse_index: Sequence[int] | np.ndarray, n_coarse: int) -> WeakLabels:
        """For answers without probabilities: one-hot rows, a zero row where the index is -1."""
        index = np.asarray(coarse_index, dtype=np.int64).reshape(-1)
        if np.any((index < MISSING_LABEL) | (index >= n_coarse)):
            raise ModelInputError(f"coarse indices must be -1 or in [0, {n_coarse})")
        probabilities = np.zeros((index.size, n_coarse), dtype=np.float32)
        answered = index != MISSING_LABEL
        probabilities[np.flatnonzero(answered), index[answered]] = 1.0
        return cls(coarse_index=index, coarse_probabilities=probabilities)

    @classmethod
    def from_probabilities(cls, coarse_probabilities: np.ndarray) -> WeakLabels:
        """The answer is each row's most probable class."""
        probabilities = np.asarray(coarse_probabilities, dtype=np.float32)
        if probabilities.ndim != 2:
            raise ModelInputError(f"coarse_probabilities must be (n, C), got {probabilities.shape}")
        index = (
            probabilities.argmax(axis=1).astype(np.int64)
            if probabilities.shape[0]
            else np.zeros(0, dtype=np.int64)
        )
        return cls(coarse_index=index, coarse_probabilities=probabilities)

    def __len__(self) -> int:
        return int(self.coarse_index.shape[0])

    @property
    def answered(self) -> np.ndarray:
        """bool (n,): where the annotator gave a usable answer."""
        return self.coarse_index != MISSING_LABEL


class ImageNetClassifier(Protocol):
    """An image model with a 1000-way ImageNet head (TimmBackbone with ImageNet weights) whose logits a weak
    annotator maps onto coarse classes."""

    name: str

    @property
    def num_classes(self) -> int: ...

    def classify_logits(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@runtime_checkable
class WeakAnnotator(Protocol):
    """Gives coarse labels for images. ``name`` is stable and changes whenever the answers could."""

    name: str
    coarse_classes: tuple[str, ...]
    cost_per_label: float

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels: ...


@runtime_checkable
class LabelScorer(Protocol):
    """A weak annotator that can also score every label of a multi-label project on its own.

    ``score_labels`` returns float32 (n, L) in [0, 1] over ``coarse_classes`` read as the project's labels, higher
    meaning more likely present; the scale may differ per label (thresholds are calibrated per label on human
    labels), and a row of NaN means no usable answer for that image."""

    name: str
    coarse_classes: tuple[str, ...]
    cost_per_label: float

    def score_labels(self, images: Sequence[Image.Image]) -> np.ndarray: ...
