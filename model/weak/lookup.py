"""A weak annotator that answers from a table of known images: the simulated VLM of ``vlm-al replay``.

The replay draws each pool image's weak coarse answer from its ground truth through a known transition matrix T,
as ``vlm-al simulate`` does, and hands the server this table. The server then sees the same weak labels the
offline benchmark sees, through the same code path as a real annotator. Images are matched by their decoded
pixels (``image_digest``), the one thing the annotator is given; an image that is not in the table gets no answer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL
from model.weak.base import WeakLabels

TABLE_FORMAT = "vlm-al-weak-answers-v1"


def image_digest(image: Image.Image) -> str:
    """sha256 of a decoded image's mode, size and pixels: equal for equal pictures, whatever file they came from."""
    digest = hashlib.sha256(f"{image.mode}|{image.width}x{image.height}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class LookupWeakAnnotator:
    """Coarse answers looked up by ``image_digest``; ``answers`` maps a digest to a coarse class name."""

    coarse_classes: tuple[str, ...]
    answers: Mapping[str, str]
    name: str
    cost_per_label: float = 0.0

    def __post_init__(self) -> None:
        if len(set(self.coarse_classes)) != len(self.coarse_classes) or not self.coarse_classes:
            raise ModelInputError("a weak-answer table needs distinct, non-empty coarse classes")
        unknown = sorted({a for a in self.answers.values() if a not in self.coarse_classes})
        if unknown:
            raise ModelInputError(f"weak-answer table answers {unknown[:5]} are not among its coarse classes")

    @classmethod
    def from_file(cls, path: Path, cost_per_label: float = 0.0) -> LookupWeakAnnotator:
        """Read a table written by ``write_answer_table``; its digest names the annotator (and its cache)."""
        try:
            raw = Path(path).read_bytes()
            table = json.loads(raw)
        except (OSError, ValueError) as exc:
            raise ModelInputError(f"cannot read the weak-answer table {path}: {exc}") from exc
        if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT:
            raise ModelInputError(f"{path} is not a weak-answer table (format {TABLE_FORMAT!r})")
        classes, answers = table.get("coarse_classes"), table.get("answers")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ModelInputError(f"{path}: 'coarse_classes' must be a list of names")
        if not isinstance(answers, dict) or not all(isinstance(v, str) for v in answers.values()):
            raise ModelInputError(f"{path}: 'answers' must map image digests to class names")
        name = f"lookup:{hashlib.sha256(raw).hexdigest()[:12]}"
        return cls(tuple(classes), dict(answers), name, cost_per_label)

    def annotate(self, images: Sequence[Image.Image]) -> WeakLabels:
        index = {name: i for i, name in enumerate(self.coarse_classes)}
        answers = [self.answers.get(image_digest(image)) for image in images]
        coarse = np.array([MISSING_LABEL if a is None else index[a] for a in answers], dtype=np.int64)
        return WeakLabels.from_indices(coarse, len(self.coarse_classes))


def write_answer_table(path: Path, coarse_classes: Sequence[str], answers: Mapping[str, str]) -> None:
    """The file ``LookupWeakAnnotator.from_file`` reads (written atomically)."""
    from model.io import atomic_write_json

    atomic_write_json(Path(path), {"format": TABLE_FORMAT, "coarse_classes": list(coarse_classes),
                                   "answers": dict(answers)})
