"""Which image to draw next: the one whose pseudo-mask is least reliable, with diversity in the batch.

Strategies read every unlabelled image's scores from a fitted ``SegmentationModel`` (``MaskScores``, the pool
they query) and pick a batch. They answer the one ``query(pool, budget, costs, rng)`` of ``model.query`` and are
registered in its ``STRATEGIES`` (``SEGMENTATION_STRATEGIES``, "mask-..." names), so ``create_strategy`` builds
them like every other strategy; a mask costs ``costs.human_fine``. The batch is diverse like ours: a shortlist of the most
uncertain images, ``shortlist_factor`` times the batch, then k-means++ seeding over their L2-normalised pooled
embeddings (``model.query.kmeans_plus_plus``), so that one kind of scene does not fill the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy import ndimage

from model.errors import ModelInputError
from model.query import (
    STRATEGIES,
    LabelCosts,
    LabelKind,
    Selection,
    _check_budget,
    affordable_count,
    create_strategy,
    kmeans_plus_plus,
    l2_normalised,
)
from model.segmentation.model import SegmentationModel
from model.spatial_features import FeaturePyramid


@dataclass(frozen=True)
class MaskScores:
    """Per unlabelled image (``indices`` into the pool), each in [0, 1], higher = less reliable:

    - ``cam_entropy``: mean per-pixel entropy of the pseudo-mask's confidence (the CAM evidence, with the
      foreground head's once masks exist), normalised by log 2;
    - ``disagreement``: share of pixels where the head's mask and the pseudo-mask differ;
    - ``boundary``: mean entropy of the head's per-pixel distribution within two pixels of its predicted region
      boundaries, normalised by log(L + 1).
    """

    indices: np.ndarray
    cam_entropy: np.ndarray
    disagreement: np.ndarray
    boundary: np.ndarray
    embeddings: np.ndarray
    """float32 (len(indices), d): pooled features, for batch diversity."""


def mask_scores(model: SegmentationModel, features: FeaturePyramid, indices: np.ndarray) -> MaskScores:
    """``MaskScores`` of pool images ``indices`` under a ``SegmentationModel`` fitted on ``features``."""
    model._check()
    pool = model.pool
    if pool is None:
        raise ModelInputError("mask scores need the pool's pseudo-masks from a fit, not a loaded checkpoint")
    side = model.settings.side
    indices = np.asarray(indices, dtype=np.int64)
    pseudo = pool.pseudo.masks[indices]
    # The pseudo-mask's confidence as a probability of its class around one half: its entropy.
    p = np.clip(0.5 + 0.5 * pool.pseudo.margin[indices], 1e-6, 1 - 1e-6)
    cam_entropy = (-(p * np.log(p) + (1 - p) * np.log(1 - p)) / np.log(2)).mean(axis=(1, 2))
    head = model.parts.head if model.parts is not None else None
    if head is None:
        disagreement = np.zeros(indices.size)
        boundary = np.zeros(indices.size)
    else:
        disagreement = np.empty(indices.size)
        boundary = np.empty(indices.size)
        for start in range(0, indices.size, 64):
            probabilities = head.predict_proba(pool.maps(indices[start : start + 64]), side)
            predicted = probabilities.argmax(axis=1)
            disagreement[start : start + 64] = (predicted != pseudo[start : start + 64]).mean(axis=(1, 2))
            entropy = -(probabilities * np.log(np.clip(probabilities, 1e-8, 1))).sum(axis=1)
            entropy /= np.log(probabilities.shape[1])
            for row, (mask, values) in enumerate(zip(predicted, entropy)):
                band = _boundary_band(mask)
                boundary[start + row] = values[band].mean() if band.any() else values.mean()
    embeddings = np.asarray(features.coarse[indices], dtype=np.float32).mean(axis=(1, 2))
    return MaskScores(indices, cam_entropy, disagreement, boundary, embeddings)


def _boundary_band(mask: np.ndarray, width: int = 2) -> np.ndarray:
    edges = np.zeros(mask.shape, dtype=bool)
    edges[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edges[1:, :] |= mask[1:, :] != mask[:-1, :]
    return ndimage.binary_dilation(edges, iterations=width)


class MaskPicker(Protocol):
    def select(self, scores: MaskScores, n_picks: int, rng: np.random.Generator) -> np.ndarray:
        """Pool indices of the next ``n_picks`` images to draw masks for, most wanted first."""
        ...


class MaskQuery:
    """``model.query``'s strategy interface over ``MaskScores``: as many masks as the budget buys, from a
    ``MaskPicker``."""

    def __init__(self, picker: MaskPicker) -> None:
        self.picker = picker

    def query(self, pool: MaskScores, budget: float, costs: LabelCosts, rng: np.random.Generator) -> list[Selection]:
        if not isinstance(pool, MaskScores):
            raise ModelInputError(f"a mask strategy needs MaskScores, got {type(pool).__name__}")
        _check_budget(budget)
        picked = self.picker.select(pool, affordable_count(budget, costs.human_fine), rng)
        return [Selection(int(i), LabelKind.HUMAN_FINE) for i in picked]


class RandomMasks:
    def select(self, scores: MaskScores, n_picks: int, rng: np.random.Generator) -> np.ndarray:
        n_picks = _check_picks(scores, n_picks)
        return scores.indices[rng.permutation(scores.indices.size)[:n_picks]]


class UncertainMasks:
    """The images with the highest ``measure`` ("cam-entropy", "disagreement", "boundary", or "combined": the
    mean of the three's percentile ranks), diversified by k-means++ over a shortlist."""

    MEASURES = ("cam-entropy", "disagreement", "boundary", "combined")

    def __init__(self, measure: str = "combined", shortlist_factor: float = 3.0) -> None:
        if measure not in self.MEASURES:
            raise ModelInputError(f"unknown mask uncertainty {measure!r}; known: {list(self.MEASURES)}")
        if shortlist_factor < 1:
            raise ModelInputError(f"shortlist_factor must be at least 1, got {shortlist_factor}")
        self.measure = measure
        self.shortlist_factor = shortlist_factor

    def uncertainty(self, scores: MaskScores) -> np.ndarray:
        if self.measure == "cam-entropy":
            return scores.cam_entropy
        if self.measure == "disagreement":
            return scores.disagreement
        if self.measure == "boundary":
            return scores.boundary
        ranks = [_percentile(v) for v in (scores.cam_entropy, scores.disagreement, scores.boundary)]
        return np.mean(ranks, axis=0)

    def select(self, scores: MaskScores, n_picks: int, rng: np.random.Generator) -> np.ndarray:
        n_picks = _check_picks(scores, n_picks)
        if n_picks == 0:
            return scores.indices[:0]
        uncertainty = self.uncertainty(scores)
        order = np.argsort(-uncertainty, kind="stable")
        shortlist = order[: max(n_picks, int(round(self.shortlist_factor * n_picks)))]
        points = l2_normalised(scores.embeddings[shortlist])
        # The most uncertain image first, then D²-sampling (k-means++) for the rest of the batch.
        picked = kmeans_plus_plus(points, n_picks, rng) if n_picks > 1 else np.array([0])
        picked = np.concatenate([[0], [p for p in picked if p != 0]])[:n_picks]
        return scores.indices[shortlist[picked]]


def _percentile(values: np.ndarray) -> np.ndarray:
    if values.size <= 1:
        return np.zeros_like(values, dtype=np.float64)
    return np.argsort(np.argsort(values, kind="stable"), kind="stable") / (values.size - 1)


def _check_picks(scores: MaskScores, n_picks: int) -> int:
    if n_picks < 0:
        raise ModelInputError(f"n_picks must be non-negative, got {n_picks}")
    return min(int(n_picks), scores.indices.size)


def _mask_strategy(picker: Callable[..., MaskPicker]) -> Callable[..., MaskQuery]:
    return lambda **options: MaskQuery(picker(**options))


SEGMENTATION_STRATEGIES: dict[str, Callable[..., MaskQuery]] = {
    "mask-random": _mask_strategy(RandomMasks),
    "mask-uncertainty": _mask_strategy(UncertainMasks),
    "mask-cam-entropy": _mask_strategy(lambda **options: UncertainMasks("cam-entropy", **options)),
    "mask-disagreement": _mask_strategy(lambda **options: UncertainMasks("disagreement", **options)),
    "mask-boundary": _mask_strategy(lambda **options: UncertainMasks("boundary", **options)),
}
"""Mask selection strategies by name (``mask-uncertainty`` combines the three measures), registered in the one
strategy registry, ``model.query.STRATEGIES``, when this module is imported."""
# The registry's type names single-label pools; these strategies refuse any pool but MaskScores (MaskQuery.query).
STRATEGIES.update(SEGMENTATION_STRATEGIES)  # type: ignore[arg-type]


def create_mask_strategy(name: str, **options: object) -> MaskQuery:
    """``model.query.create_strategy`` for callers that hold ``MaskScores``: refuses another layout's strategy."""
    strategy = create_strategy(name, **options)
    if not isinstance(strategy, MaskQuery):
        raise ModelInputError(f"{name!r} is not a mask strategy; known: {sorted(SEGMENTATION_STRATEGIES)}")
    return strategy


def mask_priority(scores: MaskScores, selected: np.ndarray, n: int, labelled: np.ndarray) -> np.ndarray:
    """float64 (n,) in [0, 1], ascending = draw first (Label Studio's queue order, as ``model.query.priority_scores``):
    the selected images in selection order, then the other unlabelled ones by descending combined uncertainty,
    labelled images last with 1.0."""
    priority = np.ones(n)
    chosen = [int(i) for i in dict.fromkeys(np.asarray(selected, dtype=np.int64).tolist()) if not labelled[i]]
    position = {int(index): row for row, index in enumerate(scores.indices)}
    combined = UncertainMasks("combined").uncertainty(scores)
    rest = [int(i) for i in scores.indices[np.argsort(-combined, kind="stable")] if int(i) not in set(chosen)]
    order = [i for i in chosen + rest if i in position]
    if order:
        priority[order] = np.arange(len(order)) / len(order)
    return priority
