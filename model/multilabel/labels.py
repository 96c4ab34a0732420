"""A multi-label project's labels as the weak annotators see them."""

from __future__ import annotations

from collections.abc import Sequence

from model.hierarchy import LabelHierarchy


def flat_label_hierarchy(label_names: Sequence[str]) -> LabelHierarchy:
    """Every label its own coarse class with itself as its one fine class: each weak annotator that scores coarse
    class names (semantic zero-shot, open_clip, the API VLM) then scores the labels, one column per label."""
    names = tuple(label_names)
    return LabelHierarchy(fine_classes=names, coarse_classes=names, parent_of_fine=tuple(range(len(names))))
