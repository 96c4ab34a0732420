"""Segmentation with a weak annotator: CAM pseudo-masks, a head on frozen feature maps, and mask selection.

``cam``: the CAM classifier, CAM pseudo-masks and their cleaning; ``head``: the hypercolumn projection and the
segmentation head; ``model``: ``SegmentationModel`` (a foreground head from human masks and the CAMs make
pseudo-masks; the head learns from human plus weighted pseudo-masks, with pixel-level self-learning; checkpoints); ``query``: mask selection strategies (``SEGMENTATION_STRATEGIES``); ``metrics``: mIoU.
"""

from model.segmentation.cam import CamClassifier, CamMasks, cam_masks, clean_mask
from model.segmentation.head import (
    HeadSettings,
    HypercolumnProjection,
    ProjectedPool,
    SegmentationHead,
)
from model.segmentation.metrics import mean_iou
from model.segmentation.model import (
    CHECKPOINT_KIND,
    TRAIN_SIDE,
    SegmentationModel,
    SegmentationSettings,
    resize_masks,
    self_learned_targets,
)
from model.segmentation.query import (
    SEGMENTATION_STRATEGIES,
    MaskScores,
    create_mask_strategy,
    mask_priority,
    mask_scores,
)

__all__ = [
    "CHECKPOINT_KIND", "SEGMENTATION_STRATEGIES", "TRAIN_SIDE", "CamClassifier", "CamMasks", "HeadSettings",
    "HypercolumnProjection", "MaskScores", "ProjectedPool", "SegmentationHead", "SegmentationModel",
    "SegmentationSettings", "cam_masks", "clean_mask", "create_mask_strategy", "mask_priority", "mask_scores", "mean_iou", "resize_masks",
    "self_learned_targets",
]
