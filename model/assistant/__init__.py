"""What a labeling assistant adds on top of a round: auto-accept with audited precision, likely label errors, and
a stopping signal. Pure numpy/scipy/cleanlab on out-of-fold predictions; no Label Studio or Flask here."""

from model.assistant.auto_accept import (
    AuditRecord,
    AuditSummary,
    AutoAcceptDecision,
    ClassThreshold,
    choose_audit,
    class_thresholds,
    clopper_pearson_lower,
    decide_auto_accept,
    summarize_audits,
)
from model.assistant.label_errors import LabelIssue, likely_label_errors
from model.assistant.stopping import (
    InversePowerLaw,
    LearningCurve,
    StabilizingPredictions,
    StoppingSuggestion,
    cross_validated_curve,
    fit_inverse_power_law,
    kappa_average,
    stabilizing_predictions,
    suggest_stopping,
)

__all__ = [
    "AuditRecord", "AuditSummary", "AutoAcceptDecision", "ClassThreshold", "InversePowerLaw", "LabelIssue",
    "LearningCurve", "StabilizingPredictions", "StoppingSuggestion", "choose_audit", "class_thresholds", "clopper_pearson_lower",
    "cross_validated_curve", "decide_auto_accept", "fit_inverse_power_law", "kappa_average", "likely_label_errors", "stabilizing_predictions",
    "suggest_stopping", "summarize_audits",
]
