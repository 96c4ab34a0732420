"""Joint classification and segmentation with a weak annotator (after Belharbi et al.) on frozen feature maps.

``SegmentationModel.fit`` takes every pool image's feature map, the image-level labels where known, and the
human masks drawn so far. It trains the CAM classifier on the image-level labels, turns its maps into
pseudo-masks (for the human labels where known, else the predicted ones), measures how reliable each pseudo-mask
pixel is on the images that have human masks, and trains the segmentation head on the human masks plus the
weighted pseudo-masks of the other images. Then it self-learns at the pixel level: the head's own confident
predictions, restricted to the image's labels, replace the CAM pseudo-masks where both agree or the head is
sure, and the head is trained again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.errors import ModelInputError
from model.segmentation.cam import (
    CamClassifier,
    CamMasks,
    ReliabilityModel,
    cam_masks,
    choose_threshold,
    upsample,
)
from model.segmentation.head import FeatureProjection, HeadSettings, SegmentationHead

TRAIN_SIDE = 28
"""Masks are learned and scored for selection at this resolution (4 pixels per cell of a 7 x 7 map: finer
targets cost more per step than they teach a head whose input has 7 x 7 cells)."""


@dataclass(frozen=True)
class SegmentationSettings:
    """``use_pseudo``: train on pseudo-masks of unlabelled images too (False: human masks only);
    ``self_learning_rounds``: how often the head's predictions refresh the pseudo-masks; ``min_label_probability``:
    a label counts as present in an image without human labels when the classifier gives it this much (the most
    probable label always counts)."""

    use_pseudo: bool = True
    self_learning_rounds: int = 1
    min_label_probability: float = 0.5
    side: int = TRAIN_SIDE
    head: HeadSettings = field(default_factory=HeadSettings)


@dataclass(frozen=True)
class SegmentationFit:
    """What one fit leaves for prediction and selection (all over the pool the model was fitted on)."""

    classifier: CamClassifier
    threshold: float
    projection: FeatureProjection
    head: SegmentationHead | None
    present: np.ndarray
    """bool (n, L): the labels each pool image holds (human where known, else predicted)."""
    cams: np.ndarray
    """float32 (n, L, h, w): normalised CAMs of the pool."""
    pseudo: CamMasks
    """The CAM pseudo-masks of the pool at ``side``."""
    reliability: ReliabilityModel


class SegmentationModel:
    """Fits on a pool of feature maps; predicts masks of any images' feature maps."""

    def __init__(self, label_names: tuple[str, ...], settings: SegmentationSettings = SegmentationSettings()) -> None:
        if not label_names:
            raise ModelInputError("a segmentation model needs at least one label")
        self.label_names = tuple(label_names)
        self.settings = settings
        self.fitted: SegmentationFit | None = None

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def fit(self, features: np.ndarray, label_sets: np.ndarray, labels_known: np.ndarray, human: np.ndarray,
            human_masks: np.ndarray, *, classifier: CamClassifier | None = None,
            projection: FeatureProjection | None = None) -> SegmentationModel:
        """``features`` (n, h, w, d); ``label_sets`` bool (n, L) with ``labels_known`` bool (n,) saying which
        rows hold human image-level labels; ``human`` indices whose masks ``human_masks`` uint8 (len, side, side)
        a person drew (their labels count as known). A ``classifier`` or ``projection`` already fitted on the same
        labels and pool may be passed to skip refitting them (the benchmark shares them between runs)."""
        settings = self.settings
        n = features.shape[0]
        label_sets = np.asarray(label_sets, dtype=bool).copy()
        labels_known = np.asarray(labels_known, dtype=bool).copy()
        human = np.asarray(human, dtype=np.int64)
        human_masks = np.asarray(human_masks, dtype=np.uint8)
        if label_sets.shape != (n, self.n_labels) or labels_known.shape != (n,):
            raise ModelInputError(f"label_sets must be ({n}, {self.n_labels}) and labels_known ({n},)")
        if human_masks.shape != (human.size, settings.side, settings.side):
            raise ModelInputError(f"human_masks must be ({human.size}, {settings.side}, {settings.side}), "
                                  f"got {human_masks.shape}")
        if human_masks.size and human_masks.max() > self.n_labels:
            raise ModelInputError(f"human masks hold label values above {self.n_labels}")
        for row, mask in zip(human, human_masks):
            label_sets[row] = np.isin(np.arange(1, self.n_labels + 1), mask) | (label_sets[row] & labels_known[row])
            labels_known[row] = True
        known = np.flatnonzero(labels_known)
        if known.size == 0:
            raise ModelInputError("a segmentation model needs image-level labels or masks of some images")
        if classifier is None:
            classifier = CamClassifier(self.n_labels).fit(features[known], label_sets[known])
        present = np.where(labels_known[:, None], label_sets, self.predicted_labels(classifier, features))
        cams = classifier.activation_maps(features)
        threshold = choose_threshold(cams[human], present[human], human_masks)
        pseudo = cam_masks(cams, present, settings.side, threshold)
        reliability = ReliabilityModel.fit(CamMasks(pseudo.masks[human], pseudo.margin[human]), human_masks)
        if projection is None:
            projection = FeatureProjection.fit(features, settings.head.components, seed=settings.head.seed)
        maps = projection.project(features)
        head = None
        if human.size or settings.use_pseudo:
            head = self._train_head(maps, human, human_masks, pseudo, reliability, present)
        self.fitted = SegmentationFit(classifier, threshold, projection, head, present, cams, pseudo, reliability)
        return self

    def predicted_labels(self, classifier: CamClassifier, features: np.ndarray) -> np.ndarray:
        """bool (n, L): labels the classifier gives ``min_label_probability``, and always the most probable."""
        probabilities = classifier.predict_proba(features)
        present = probabilities >= self.settings.min_label_probability
        present[np.arange(len(present)), probabilities.argmax(axis=1)] = True
        return present

    def _train_head(self, maps: np.ndarray, human: np.ndarray, human_masks: np.ndarray, pseudo: CamMasks,
                    reliability: ReliabilityModel, present: np.ndarray) -> SegmentationHead:
        settings = self.settings
        head = SegmentationHead(self.n_labels + 1, maps.shape[1], settings.head)
        if not settings.use_pseudo:
            return head.fit(maps, human, human_masks)
        others = np.setdiff1d(np.arange(maps.shape[0]), human)
        targets = pseudo.masks[others]
        weights = reliability.weights(CamMasks(targets, pseudo.margin[others]))
        head.fit(maps, human, human_masks, others, targets, weights)
        for _ in range(settings.self_learning_rounds):
            targets, weights = self_learned_targets(head.predict_proba(maps[others], settings.side), present[others],
                                                    targets, weights)
            head = SegmentationHead(self.n_labels + 1, maps.shape[1], settings.head).fit(
                maps, human, human_masks, others, targets, weights)
        return head

    def _check(self) -> SegmentationFit:
        if self.fitted is None:
            raise ModelInputError("the segmentation model is not fitted")
        return self.fitted

    def predict_proba(self, features: np.ndarray, side: int) -> np.ndarray:
        """float32 (n, L + 1, side, side): the head's class probabilities per pixel (background first)."""
        fitted = self._check()
        if fitted.head is None:
            raise ModelInputError("the segmentation head is not trained yet (no masks and no pseudo-masks)")
        return fitted.head.predict_proba(fitted.projection.project(features), side)

    def predict(self, features: np.ndarray, side: int) -> np.ndarray:
        """uint8 (n, side, side): the head's masks."""
        fitted = self._check()
        if fitted.head is None:
            raise ModelInputError("the segmentation head is not trained yet (no masks and no pseudo-masks)")
        return fitted.head.predict(fitted.projection.project(features), side)

    def cam_masks(self, features: np.ndarray, side: int, present: np.ndarray | None = None) -> CamMasks:
        """CAM pseudo-masks of new images, for ``present`` labels (bool (n, L)) or else the predicted ones."""
        fitted = self._check()
        if present is None:
            present = self.predicted_labels(fitted.classifier, features)
        return cam_masks(fitted.classifier.activation_maps(features), present, side, fitted.threshold)

    def label_probabilities(self, features: np.ndarray) -> np.ndarray:
        return self._check().classifier.predict_proba(features)


def self_learned_targets(probabilities: np.ndarray, present: np.ndarray, cam_targets: np.ndarray,
                         cam_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level self-learning: the head's most probable class among background and the image's labels.

    Where head and CAM agree the pixel keeps the larger of the two confidences; where they disagree the head's
    class is taken only if it is surer than the CAM pixel was reliable, with the difference as its weight.
    """
    allowed = np.concatenate([np.ones((present.shape[0], 1), dtype=bool), present], axis=1)
    restricted = np.where(allowed[:, :, None, None], probabilities, 0.0)
    restricted /= np.maximum(restricted.sum(axis=1, keepdims=True), 1e-6)
    head_class = restricted.argmax(axis=1).astype(np.uint8)
    head_confidence = restricted.max(axis=1)
    # (confidence - chance) over (1 - chance), with chance one over the allowed classes
    chance = 1.0 / allowed.sum(axis=1)[:, None, None]
    head_weight = np.clip((head_confidence - chance) / (1.0 - chance), 0.0, 1.0)
    agree = head_class == cam_targets
    targets = np.where(agree | (head_weight > cam_weights), head_class, cam_targets).astype(np.uint8)
    weights = np.where(agree, np.maximum(head_weight, cam_weights), np.abs(head_weight - cam_weights))
    return targets, weights.astype(np.float32)


def resize_masks(masks: np.ndarray, side: int) -> np.ndarray:
    """uint8 (n, side, side): nearest-neighbour resize of label masks."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(m).resize((side, side), Image.Resampling.NEAREST)) for m in masks])


__all__ = ["SegmentationFit", "SegmentationModel", "SegmentationSettings", "TRAIN_SIDE", "self_learned_targets",
           "upsample", "resize_masks"]
