"""Segmentation scores: intersection over union per class, and their mean."""

from __future__ import annotations

import numpy as np

from model.errors import ModelInputError


def confusion(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """int64 (n_classes, n_classes): pixel counts, rows = true class, columns = predicted class."""
    predicted = np.asarray(predicted)
    truth = np.asarray(truth)
    if predicted.shape != truth.shape:
        raise ModelInputError(f"predicted {predicted.shape} and true {truth.shape} masks differ in shape")
    index = truth.astype(np.int64).ravel() * n_classes + predicted.astype(np.int64).ravel()
    return np.bincount(index, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def iou_per_class(counts: np.ndarray) -> np.ndarray:
    """float64 (n_classes,): IoU of each class over all pixels counted; NaN for a class absent from both."""
    intersection = np.diag(counts).astype(np.float64)
    union = counts.sum(axis=0) + counts.sum(axis=1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def mean_iou(predicted: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """mIoU over the classes (background included) that occur in the truth or the prediction; pixels of all
    images are pooled per class (the usual data-set-level mIoU)."""
    values = iou_per_class(confusion(predicted, truth, n_classes))
    return float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
