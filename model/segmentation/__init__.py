"""Segmentation with a weak annotator: CAM pseudo-masks, a head on frozen feature maps, and mask selection.

``cam``: the CAM classifier, pseudo-masks, cleaning and pixel reliability; ``head``: the PCA projection and the
segmentation head; ``model``: ``SegmentationModel`` (fit on human masks plus weighted pseudo-masks, with
pixel-level self-learning); ``query``: mask selection strategies (``SEGMENTATION_STRATEGIES``); ``metrics``: mIoU.
"""

from model.segmentation.cam import CamClassifier, CamMasks, ReliabilityModel, cam_masks, clean_mask
from model.segmentation.head import FeatureProjection, HeadSettings, SegmentationHead
from model.segmentation.metrics import mean_iou
from model.segmentation.model import (
    TRAIN_SIDE,
    SegmentationModel,
    SegmentationSettings,
    resize_masks,
    self_learned_targets,
)
from model.segmentation.query import (
    SEGMENTATION_STRATEGIES,
    MaskScores,
    create_segmentation_strategy,
    mask_priority,
    mask_scores,
)

__all__ = [
    "SEGMENTATION_STRATEGIES", "TRAIN_SIDE", "CamClassifier", "CamMasks", "FeatureProjection", "HeadSettings",
    "MaskScores", "ReliabilityModel", "SegmentationHead", "SegmentationModel", "SegmentationSettings", "cam_masks",
    "clean_mask", "create_segmentation_strategy", "mask_priority", "mask_scores", "mean_iou", "resize_masks",
    "self_learned_targets",
]
