"""Weak coarse annotators: zero-shot open_clip, an ImageNet classifier through a class map, a chat-completions VLM."""

from model.weak.base import WeakAnnotator, WeakLabels

__all__ = ["WeakAnnotator", "WeakLabels"]
