"""Multi-label images: per-label VLM pseudo-labels with per-label noise, label-specific features and label
co-occurrence, in the same active-learning loop (importing this package registers its query strategies)."""

from model.multilabel.classifier import MultiLabelClassifier, MultiLabelTrainingConfig, SpatialProjection
from model.multilabel.learner import (
    MultiLabelLearner,
    MultiLabelRoundLabels,
    MultiLabelRoundModel,
    MultiLabelSettings,
)
from model.multilabel.metrics import mean_average_precision, micro_f1
from model.multilabel.noise import LabelTransitions, estimate_label_transitions
from model.multilabel.strategies import MULTILABEL_STRATEGIES, MultiLabelPool, multilabel_priority_scores
from model.multilabel.thresholds import LabelThresholds, calibrate_label_thresholds

__all__ = [
    "LabelThresholds", "LabelTransitions", "MULTILABEL_STRATEGIES", "MultiLabelClassifier", "MultiLabelLearner",
    "MultiLabelPool", "MultiLabelRoundLabels", "MultiLabelRoundModel", "MultiLabelSettings", "MultiLabelTrainingConfig",
    "SpatialProjection", "calibrate_label_thresholds", "estimate_label_transitions", "mean_average_precision",
    "micro_f1", "multilabel_priority_scores",
]
