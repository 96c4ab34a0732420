"""Class activation maps over the frozen backbone's spatial feature map, and pseudo-masks made from them.

The classifier is linear on the pooled feature vector; because the backbone pools by averaging, the same weights
applied to every cell of the map give each class's score per cell (Zhou et al.'s CAM). Maps are normalised per
image and class to [0, 1], upsampled, thresholded and cleaned with ``scipy.ndimage`` morphology (an opening, hole
filling and dropping specks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

from model.errors import ModelInputError

CAM_THRESHOLDS = (0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7)
"""Candidate thresholds on the normalised CAM; one is chosen per fit on the human-masked images."""
DEFAULT_CAM_THRESHOLD = 0.4
"""Used until human masks exist to choose one."""
MIN_REGION_SHARE = 0.004
"""Connected regions smaller than this share of the mask are dropped by the cleaning step (specks)."""


def pooled(features: np.ndarray) -> np.ndarray:
    """float32 (n, d): the mean over the map's cells (what the backbone's own head computes)."""
    return np.asarray(features, dtype=np.float32).mean(axis=(1, 2))


class CamClassifier:
    """One-vs-rest logistic regression per label on pooled features; its weights give the maps.

    Works for one label per image (a row with one True) and for several (scenes with 2-4 objects). A label that
    no training image has (or that every image has) gets a constant score, and a flat map. ``regularisation``
    0.1 (C = 0.01 on standardised features) gave the best label mAP on a validation slice of the openclipart-scenes
    train split (0.78, vs 0.76 at 1 and 0.75 at 10).
    """

    def __init__(self, n_labels: int, *, regularisation: float = 0.1) -> None:
        if n_labels < 1:
            raise ModelInputError(f"n_labels must be at least 1, got {n_labels}")
        self.n_labels = n_labels
        self.regularisation = regularisation
        self.weights: np.ndarray | None = None  # (L, d)
        self.bias: np.ndarray | None = None  # (L,)
        self._scale: np.ndarray | None = None

    def fit(self, features: np.ndarray, label_sets: np.ndarray) -> CamClassifier:
        """``features`` (n, h, w, d), ``label_sets`` bool (n, L): the image-level labels."""
        label_sets = np.asarray(label_sets, dtype=bool)
        if label_sets.ndim != 2 or label_sets.shape != (features.shape[0], self.n_labels):
            raise ModelInputError(f"label_sets must be ({features.shape[0]}, {self.n_labels}), got {label_sets.shape}")
        x = pooled(features)
        # Standardising makes one regularisation strength fit every backbone; it is folded back into the weights.
        scale = x.std(axis=0) + 1e-6
        mean = x.mean(axis=0)
        z = (x - mean) / scale
        weights = np.zeros((self.n_labels, x.shape[1]), dtype=np.float32)
        bias = np.zeros(self.n_labels, dtype=np.float32)
        for label in range(self.n_labels):
            y = label_sets[:, label]
            if y.all() or not y.any():
                share = float(y.mean()) if y.size else 0.0
                bias[label] = np.log((share + 1e-3) / (1 - share + 1e-3))
                continue
            model = LogisticRegression(C=self.regularisation / 10.0, max_iter=300)
            model.fit(z, y)
            weights[label] = model.coef_[0] / scale
            bias[label] = model.intercept_[0] - float(weights[label] @ mean)
        self.weights, self.bias = weights, bias
        return self

    def _check(self) -> tuple[np.ndarray, np.ndarray]:
        if self.weights is None or self.bias is None:
            raise ModelInputError("the CAM classifier is not fitted")
        return self.weights, self.bias

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """float32 (n, L): the probability that each label is in each image."""
        weights, bias = self._check()
        return (1.0 / (1.0 + np.exp(-(pooled(features) @ weights.T + bias)))).astype(np.float32)

    def activation_maps(self, features: np.ndarray) -> np.ndarray:
        """float32 (n, L, h, w): each label's score per cell, min-max normalised per image and label to [0, 1]."""
        weights, _ = self._check()
        n, h, w, d = features.shape
        cells = np.asarray(features, dtype=np.float32).reshape(-1, d)
        scores = (cells @ weights.T).reshape(n, h, w, -1).transpose(0, 3, 1, 2)  # a BLAS product, not einsum
        low = scores.min(axis=(2, 3), keepdims=True)
        high = scores.max(axis=(2, 3), keepdims=True)
        return ((scores - low) / np.maximum(high - low, 1e-6)).astype(np.float32)


def upsample(maps: np.ndarray, side: int) -> np.ndarray:
    """float32 (n, c, side, side): bilinear upsampling of (n, c, h, w) maps (half-pixel centres)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32))
    return F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False).numpy()


_SQUARE = np.ones((3, 3), dtype=bool)
"""The opening's structuring element: a square keeps the corners of square regions."""


def clean_mask(mask: np.ndarray, n_labels: int) -> np.ndarray:
    """A label mask (0 = background) after morphology: per label, an opening (removes thin spurs), holes filled,
    and connected regions under ``MIN_REGION_SHARE`` of the image dropped."""
    cleaned = np.zeros_like(mask)
    min_size = max(1, int(MIN_REGION_SHARE * mask.size))
    for label in range(1, n_labels + 1):
        region = mask == label
        if not region.any():
            continue
        region = ndimage.binary_fill_holes(ndimage.binary_opening(region, structure=_SQUARE))
        components, count = ndimage.label(region)
        if count:
            sizes = ndimage.sum_labels(region, components, index=np.arange(1, count + 1))
            region = np.isin(components, 1 + np.flatnonzero(sizes >= min_size))
        cleaned[region & (cleaned == 0)] = label
    return cleaned


@dataclass(frozen=True)
class CamMasks:
    """Pseudo-masks from CAMs: ``masks`` uint8 (n, s, s), 0 = background and k + 1 = label k; ``margin`` float32
    (n, s, s) in [0, 1], how far each pixel's CAM lies from the threshold (0 = on it, 1 = as far as it gets)."""

    masks: np.ndarray
    margin: np.ndarray


def cam_masks(cams: np.ndarray, present: np.ndarray, side: int, threshold: float) -> CamMasks:
    """Pseudo-masks at ``side`` pixels from normalised CAMs (n, L, h, w) and which labels each image holds
    (bool (n, L): the human labels where known, else the predicted ones).

    A pixel gets the present label with the highest CAM if that CAM reaches ``threshold``, else background.
    """
    if not 0.0 < threshold < 1.0:
        raise ModelInputError(f"the CAM threshold must lie in (0, 1), got {threshold}")
    present = np.asarray(present, dtype=bool)
    if present.shape != cams.shape[:2]:
        raise ModelInputError(f"present must be {cams.shape[:2]}, got {present.shape}")
    n_labels = cams.shape[1]
    masks = np.zeros((cams.shape[0], side, side), dtype=np.uint8)
    margin = np.zeros((cams.shape[0], side, side), dtype=np.float32)
    for start in range(0, cams.shape[0], 64):
        chunk = upsample(cams[start : start + 64], side)
        chunk = np.where(present[start : start + 64, :, None, None], chunk, -1.0)
        best = chunk.argmax(axis=1)
        best_value = chunk.max(axis=1)
        foreground = best_value >= threshold
        raw = np.where(foreground, best + 1, 0).astype(np.uint8)
        masks[start : start + 64] = [clean_mask(m, n_labels) for m in raw]
        value = np.clip(best_value, 0.0, 1.0)
        margin[start : start + 64] = np.where(
            foreground, (value - threshold) / (1.0 - threshold), (threshold - value) / threshold
        )
    return CamMasks(masks, np.clip(margin, 0.0, 1.0))


def choose_threshold(cams: np.ndarray, present: np.ndarray, human_masks: np.ndarray,
                     candidates: tuple[float, ...] = CAM_THRESHOLDS) -> float:
    """The candidate threshold whose pseudo-masks have the best mean IoU against ``human_masks`` (uint8
    (n, s, s)); ``DEFAULT_CAM_THRESHOLD`` without any."""
    if human_masks.shape[0] == 0:
        return DEFAULT_CAM_THRESHOLD
    from model.segmentation.metrics import mean_iou

    n_labels = cams.shape[1]
    scores = [mean_iou(cam_masks(cams, present, human_masks.shape[1], t).masks, human_masks, n_labels + 1)
              for t in candidates]
    return float(candidates[int(np.argmax(scores))])
