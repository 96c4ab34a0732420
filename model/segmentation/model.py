"""Joint classification and segmentation with a weak annotator (after Belharbi et al.) on frozen feature maps.

``SegmentationModel.fit`` takes every pool image's ``FeaturePyramid``, the image-level labels where known, and
the human masks drawn so far:

1. The CAM classifier learns the image-level labels from the final map; its maps say which labelled object is
   where, coarsely (7 x 7 cells).
2. A foreground head (background vs any object) learns from the human masks on hypercolumns: where an object's
   boundary runs is the same question for every label, so a few masks teach it, while telling eight labels apart
   per pixel from the same few masks does not work.
3. Pseudo-masks of the other pool images: a pixel is foreground where the foreground head and the CAM evidence
   (each a probability that is one half at its own decision boundary) agree on average, and takes the present
   label (human where known, else predicted) whose CAM is strongest there. Its weight is how far that average
   lies from one half.
4. The segmentation head learns every label per pixel from the human masks plus the weighted pseudo-masks, then
   self-learns at the pixel level: its own confident predictions, restricted to the image's labels, replace the
   pseudo-masks where both agree or the head is sure, and it is trained again.

Without human masks, step 3 uses the CAM alone (its threshold's default) at ``CAM_PRIOR_WEIGHT``.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import ModelInputError
from model.io import atomic_write_bytes, atomic_write_json
from model.segmentation.cam import (
    CamClassifier,
    CamMasks,
    cam_masks,
    choose_threshold,
    upsample,
)
from model.segmentation.head import (
    HeadSettings,
    HypercolumnProjection,
    MapSource,
    ProjectedPool,
    SegmentationHead,
)
from model.spatial_features import FeaturePyramid

TRAIN_SIDE = 28
"""Masks are learned and scored for selection at this resolution: the finest hypercolumn stride at 224 px."""
CAM_PRIOR_WEIGHT = 0.5
"""A CAM pseudo-mask pixel's weight while no human mask exists to train the foreground head."""
CHECKPOINT_KIND = "segmentation"
"""The ``kind`` a saved model's metadata names (the classification checkpoints name none)."""


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
class SegmentationParts:
    """What prediction needs, and what a checkpoint holds."""

    classifier: CamClassifier
    threshold: float
    projection: HypercolumnProjection
    head: SegmentationHead | None


@dataclass(frozen=True)
class PoolPseudoMasks:
    """What the last fit knew of its pool, for choosing the next masks: the labels each image holds (bool (n, L):
    human where known, else predicted), its pseudo-masks at ``side`` (``margin``: the pixel's confidence), and
    its projected hypercolumns."""

    present: np.ndarray
    pseudo: CamMasks
    maps: MapSource


class SegmentationModel:
    """Fits on a pool of feature pyramids; predicts masks of any images' pyramids; saves and loads."""

    def __init__(self, label_names: tuple[str, ...], settings: SegmentationSettings = SegmentationSettings()) -> None:
        if not label_names:
            raise ModelInputError("a segmentation model needs at least one label")
        self.label_names = tuple(label_names)
        self.settings = settings
        self.parts: SegmentationParts | None = None
        self.pool: PoolPseudoMasks | None = None

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def fit(self, features: FeaturePyramid, label_sets: np.ndarray, labels_known: np.ndarray, human: np.ndarray,
            human_masks: np.ndarray, *, classifier: CamClassifier | None = None,
            pool_maps: ProjectedPool | None = None) -> SegmentationModel:
        """``features`` of n images; ``label_sets`` bool (n, L) with ``labels_known`` bool (n,) saying which rows
        hold human image-level labels; ``human`` indices whose masks ``human_masks`` uint8 (len, side, side) a
        person drew (their labels count as known). A ``classifier`` fitted on the same labels, or ``pool_maps``
        (the pool's projected hypercolumns) may be passed to skip refitting them (the benchmark shares them
        between runs)."""
        settings = self.settings
        n = len(features)
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
        coarse = features.coarse
        if classifier is None:
            classifier = CamClassifier(self.n_labels).fit(np.asarray(coarse[known], dtype=np.float32),
                                                          label_sets[known])
        present = np.where(labels_known[:, None], label_sets, self.predicted_labels(classifier, coarse))
        cams = classifier.activation_maps(coarse)
        threshold = choose_threshold(cams[human], present[human], human_masks)
        if pool_maps is None:
            pool_maps = ProjectedPool(features, HypercolumnProjection.fit(features, settings.head.components,
                                                                          seed=settings.head.seed))
        if len(pool_maps) != n:
            raise ModelInputError(f"pool_maps hold {len(pool_maps)} images, the pool {n}")
        projection, maps = pool_maps.projection, pool_maps
        if human.size and settings.use_pseudo:
            pseudo = self._pseudo_masks(maps, n, cams, present, human, human_masks, threshold, projection.channels)
        else:
            cam = cam_masks(cams, present, settings.side, threshold)
            pseudo = CamMasks(cam.masks, np.full(cam.masks.shape, CAM_PRIOR_WEIGHT, dtype=np.float32))
        head = None
        if human.size or settings.use_pseudo:
            head = self._train_head(maps, n, projection.channels, human, human_masks, pseudo, present)
        self.parts = SegmentationParts(classifier, threshold, projection, head)
        self.pool = PoolPseudoMasks(present, pseudo, maps)
        return self

    def predicted_labels(self, classifier: CamClassifier, coarse: np.ndarray) -> np.ndarray:
        """bool (n, L): labels the classifier gives ``min_label_probability``, and always the most probable."""
        probabilities = classifier.predict_proba(coarse)
        present = probabilities >= self.settings.min_label_probability
        present[np.arange(len(present)), probabilities.argmax(axis=1)] = True
        return present

    def _pseudo_masks(self, maps: MapSource, n: int, cams: np.ndarray, present: np.ndarray, human: np.ndarray,
                      human_masks: np.ndarray, threshold: float, channels: int) -> CamMasks:
        """Pseudo-masks of the whole pool from the foreground head and the CAMs (step 3 of the module's doc)."""
        side = self.settings.side
        foreground = SegmentationHead(2, channels, self.settings.head).fit(
            maps, human, (human_masks > 0).astype(np.uint8))
        masks = np.zeros((n, side, side), dtype=np.uint8)
        confidence = np.zeros((n, side, side), dtype=np.float32)
        for start in range(0, n, 64):
            rows = np.arange(start, min(n, start + 64))
            head_foreground = foreground.predict_proba(maps(rows), side)[:, 1]
            evidence = np.where(present[rows, :, None, None], upsample(cams[rows], side), -1.0)
            # The CAM's evidence as a probability that is one half at the chosen threshold, like the head's.
            cam_foreground = np.clip(evidence.max(axis=1) / (2.0 * threshold), 0.0, 1.0)
            combined = 0.5 * (head_foreground + cam_foreground)
            # An image without any label (a person said it holds none) is all background.
            foreground_here = (combined >= 0.5) & present[rows].any(axis=1)[:, None, None]
            masks[rows] = np.where(foreground_here, evidence.argmax(axis=1) + 1, 0)
            confidence[rows] = np.abs(2.0 * combined - 1.0)
        return CamMasks(masks, confidence)

    def _train_head(self, maps: MapSource, n: int, channels: int, human: np.ndarray, human_masks: np.ndarray,
                    pseudo: CamMasks, present: np.ndarray) -> SegmentationHead:
        settings = self.settings
        head = SegmentationHead(self.n_labels + 1, channels, settings.head)
        if not settings.use_pseudo:
            return head.fit(maps, human, human_masks)
        others = np.setdiff1d(np.arange(n), human)
        targets, weights = pseudo.masks[others], pseudo.margin[others]
        head.fit(maps, human, human_masks, others, targets, weights)
        for _ in range(settings.self_learning_rounds):
            probabilities = np.concatenate([head.predict_proba(maps(others[start : start + 64]), settings.side)
                                            for start in range(0, others.size, 64)])
            targets, weights = self_learned_targets(probabilities, present[others], targets, weights)
            head = SegmentationHead(self.n_labels + 1, channels, settings.head).fit(
                maps, human, human_masks, others, targets, weights)
        return head

    def _check(self) -> SegmentationParts:
        if self.parts is None:
            raise ModelInputError("the segmentation model is not fitted")
        return self.parts

    def _head(self) -> tuple[SegmentationParts, SegmentationHead]:
        parts = self._check()
        if parts.head is None:
            raise ModelInputError("the segmentation head is not trained yet (no masks and no pseudo-masks)")
        return parts, parts.head

    def predict_proba(self, features: FeaturePyramid, side: int) -> np.ndarray:
        """float32 (n, L + 1, side, side): the head's class probabilities per pixel (background first)."""
        parts, head = self._head()
        out = np.empty((len(features), self.n_labels + 1, side, side), dtype=np.float32)
        for start in range(0, len(features), 64):
            rows = slice(start, start + 64)
            out[rows] = head.predict_proba(parts.projection.project(features.take(rows)), side)
        return out

    def predict(self, features: FeaturePyramid, side: int) -> np.ndarray:
        """uint8 (n, side, side): the head's masks, chunk by chunk (full-size probabilities of a whole split
        would not fit in memory)."""
        parts, head = self._head()
        out = np.empty((len(features), side, side), dtype=np.uint8)
        for start in range(0, len(features), 64):
            rows = slice(start, start + 64)
            out[rows] = head.predict(parts.projection.project(features.take(rows)), side)
        return out

    def cam_masks(self, features: FeaturePyramid, side: int, present: np.ndarray | None = None) -> CamMasks:
        """CAM pseudo-masks of new images, for ``present`` labels (bool (n, L)) or else the predicted ones."""
        parts = self._check()
        if present is None:
            present = self.predicted_labels(parts.classifier, features.coarse)
        return cam_masks(parts.classifier.activation_maps(features.coarse), present, side, parts.threshold)

    def label_probabilities(self, features: FeaturePyramid) -> np.ndarray:
        return self._check().classifier.predict_proba(features.coarse)

    # -- checkpoints ----------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """``metadata.json`` (kind, labels, settings, threshold, shapes) and ``arrays.npz`` (no pickle)."""
        parts = self._check()
        if parts.classifier.weights is None or parts.classifier.bias is None:
            raise ModelInputError("the CAM classifier is not fitted")
        directory = Path(directory)
        # Any: numpy's stub types savez's keywords as its allow_pickle flag
        arrays: dict[str, Any] = {"classifier.weights": parts.classifier.weights,
                                  "classifier.bias": parts.classifier.bias}
        arrays.update({f"projection.{k}": v for k, v in parts.projection.to_arrays().items()})
        if parts.head is not None:
            arrays.update({f"head.{k}": v for k, v in parts.head.state_arrays().items()})
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write_bytes(directory / "arrays.npz", buffer.getvalue())
        atomic_write_json(directory / "metadata.json", {
            "kind": CHECKPOINT_KIND, "labels": list(self.label_names), "settings": asdict(self.settings),
            "threshold": parts.threshold, "classifier_regularisation": parts.classifier.regularisation,
            "has_head": parts.head is not None, "channels": parts.projection.channels,
        })

    @staticmethod
    def load(directory: Path) -> SegmentationModel:
        directory = Path(directory)
        try:
            metadata = json.loads((directory / "metadata.json").read_text())
            with np.load(directory / "arrays.npz", allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except (OSError, ValueError) as exc:
            raise ModelInputError(f"cannot read the segmentation checkpoint in {directory}: {exc}") from exc
        if not isinstance(metadata, dict) or metadata.get("kind") != CHECKPOINT_KIND:
            raise ModelInputError(f"{directory} holds no segmentation checkpoint")
        try:
            raw = dict(metadata["settings"])
            settings = SegmentationSettings(**{**raw, "head": HeadSettings(**raw["head"])})
            model = SegmentationModel(tuple(str(name) for name in metadata["labels"]), settings)
            classifier = CamClassifier(model.n_labels, regularisation=float(metadata["classifier_regularisation"]))
            classifier.weights = arrays["classifier.weights"]
            classifier.bias = arrays["classifier.bias"]
            projection = HypercolumnProjection.from_arrays(
                {k.removeprefix("projection."): v for k, v in arrays.items() if k.startswith("projection.")})
            head = None
            if metadata["has_head"]:
                head = SegmentationHead(model.n_labels + 1, int(metadata["channels"]), settings.head).load_state_arrays(
                    {k.removeprefix("head."): v for k, v in arrays.items() if k.startswith("head.")})
            model.parts = SegmentationParts(classifier, float(metadata["threshold"]), projection, head)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelInputError(f"the segmentation checkpoint in {directory} is incomplete: {exc}") from exc
        return model


def self_learned_targets(probabilities: np.ndarray, present: np.ndarray, cam_targets: np.ndarray,
                         cam_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level self-learning: the head's most probable class among background and the image's labels.

    Where head and pseudo-mask agree the pixel keeps the larger of the two confidences; where they disagree the
    head's class is taken only if it is surer than the pseudo-mask pixel was, with the difference as its weight.
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


__all__ = [
    "CAM_PRIOR_WEIGHT",
    "CHECKPOINT_KIND",
    "TRAIN_SIDE",
    "PoolPseudoMasks",
    "SegmentationModel",
    "SegmentationParts",
    "SegmentationSettings",
    "resize_masks",
    "self_learned_targets",
]
