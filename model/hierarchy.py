"""The two-level label hierarchy: fine classes, coarse classes and the parent of every fine class."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from model.errors import HierarchyError, ModelInputError, UnknownClassError

MISSING_LABEL = -1
"""Label arrays are int64 class indices; this value marks 'no label'."""


def validated_label_array(name: str, labels: object, n_classes: int, n_samples: int | None = None) -> np.ndarray:
    """``labels`` as a 1-d int64 array of class indices in [0, n_classes) or MISSING_LABEL, or a ModelInputError
    naming ``name``. With ``n_samples``, the length must match too."""
    array = np.asarray(labels)
    if n_samples is not None and array.shape != (n_samples,):
        raise ModelInputError(f"{name} must have shape ({n_samples},), got {array.shape}")
    if array.ndim != 1:
        raise ModelInputError(f"{name} must be a 1-d array of class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ModelInputError(f"{name} must hold integer class indices, got dtype {array.dtype}")
    array = array.astype(np.int64)
    bad = (array != MISSING_LABEL) & ((array < 0) | (array >= n_classes))
    if np.any(bad):
        raise ModelInputError(
            f"{name} has indices outside [0, {n_classes}) (and not {MISSING_LABEL}): {np.unique(array[bad]).tolist()}"
        )
    return array


@dataclass(frozen=True)
class LabelHierarchy:
    """Fine classes grouped under coarse classes.

    ``parent_of_fine[i]`` is the index in ``coarse_classes`` of fine class ``fine_classes[i]``.
    """

    fine_classes: tuple[str, ...]
    coarse_classes: tuple[str, ...]
    parent_of_fine: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.fine_classes) != len(self.parent_of_fine):
            raise HierarchyError(
                f"{len(self.fine_classes)} fine classes but {len(self.parent_of_fine)} parent entries"
            )
        if len(self.fine_classes) < 2:
            raise HierarchyError(f"need at least 2 fine classes, got {list(self.fine_classes)}")
        if len(self.coarse_classes) < 1:
            raise HierarchyError("need at least 1 coarse class")
        for kind, names in (("fine", self.fine_classes), ("coarse", self.coarse_classes)):
            seen: set[str] = set()
            for name in names:
                if not isinstance(name, str) or not name:
                    raise HierarchyError(f"{kind} class names must be non-empty strings, got {name!r}")
                if name in seen:
                    raise HierarchyError(f"duplicate {kind} class {name!r}")
                seen.add(name)
        for fine, parent in zip(self.fine_classes, self.parent_of_fine):
            if not 0 <= parent < len(self.coarse_classes):
                raise HierarchyError(f"fine class {fine!r} has parent index {parent} out of range")
        childless = [c for i, c in enumerate(self.coarse_classes) if i not in set(self.parent_of_fine)]
        if childless:
            raise HierarchyError(f"coarse classes without any fine class: {childless}")

    @classmethod
    def from_parent_map(
        cls, parent_by_fine: Mapping[str, str], coarse_order: Sequence[str] | None = None
    ) -> LabelHierarchy:
        """Build from ``{fine: coarse}``. Fine order is the map's order; coarse order is first appearance
        unless ``coarse_order`` is given (then every parent must be in it)."""
        if not parent_by_fine:
            raise HierarchyError("the parent map is empty")
        missing = [f for f, c in parent_by_fine.items() if c is None or c == ""]
        if missing:
            raise HierarchyError(f"fine classes without a parent: {missing}")
        if coarse_order is None:
            coarse_order = list(dict.fromkeys(parent_by_fine.values()))
        coarse_index = {c: i for i, c in enumerate(coarse_order)}
        unknown = sorted({c for c in parent_by_fine.values() if c not in coarse_index})
        if unknown:
            raise HierarchyError(f"parents not among the coarse classes {list(coarse_order)}: {unknown}")
        return cls(
            fine_classes=tuple(parent_by_fine),
            coarse_classes=tuple(coarse_order),
            parent_of_fine=tuple(coarse_index[c] for c in parent_by_fine.values()),
        )

    @classmethod
    def from_groups(cls, fine_by_coarse: Mapping[str, Iterable[str]]) -> LabelHierarchy:
        """Build from ``{coarse: [fine, ...]}``."""
        parent_by_fine: dict[str, str] = {}
        for coarse, fines in fine_by_coarse.items():
            for fine in fines:
                if fine in parent_by_fine:
                    raise HierarchyError(f"fine class {fine!r} is listed under two coarse classes")
                parent_by_fine[fine] = coarse
        return cls.from_parent_map(parent_by_fine, coarse_order=list(fine_by_coarse))

    @classmethod
    def from_json_file(cls, path: str | Path, fine_classes: Sequence[str] | None = None) -> LabelHierarchy:
        """Read a JSON parent map ``{fine: coarse}``. With ``fine_classes``, every one of them must have a parent
        and the map may not name others; the fine order is then ``fine_classes``."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise HierarchyError(f"cannot read the parent map {path}: {exc}") from exc
        if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
            raise HierarchyError(f"{path}: expected a JSON object mapping fine class -> coarse class")
        if fine_classes is not None:
            orphans = [f for f in fine_classes if f not in data]
            if orphans:
                raise HierarchyError(f"{path}: fine classes without a parent: {orphans}")
            extra = [f for f in data if f not in set(fine_classes)]
            if extra:
                raise HierarchyError(f"{path}: the map names classes that are not fine classes: {extra}")
            data = {f: data[f] for f in fine_classes}
        return cls.from_parent_map(data)

    def to_dict(self) -> dict:
        return {
            "fine_classes": list(self.fine_classes),
            "coarse_classes": list(self.coarse_classes),
            "parent_of_fine": list(self.parent_of_fine),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LabelHierarchy:
        return cls(
            fine_classes=tuple(data["fine_classes"]),
            coarse_classes=tuple(data["coarse_classes"]),
            parent_of_fine=tuple(int(p) for p in data["parent_of_fine"]),
        )

    @property
    def n_fine(self) -> int:
        return len(self.fine_classes)

    @property
    def n_coarse(self) -> int:
        return len(self.coarse_classes)

    @cached_property
    def _fine_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.fine_classes)}

    @cached_property
    def _coarse_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.coarse_classes)}

    def fine_index(self, name: str) -> int:
        try:
            return self._fine_index[name]
        except KeyError:
            raise UnknownClassError(f"unknown fine class {name!r}; known: {list(self.fine_classes)}") from None

    def coarse_index(self, name: str) -> int:
        try:
            return self._coarse_index[name]
        except KeyError:
            raise UnknownClassError(
                f"unknown coarse class {name!r}; known: {list(self.coarse_classes)}"
            ) from None

    def parent_name(self, fine_name: str) -> str:
        return self.coarse_classes[self.parent_of_fine[self.fine_index(fine_name)]]

    def children(self, coarse_name: str) -> tuple[str, ...]:
        c = self.coarse_index(coarse_name)
        return tuple(f for f, p in zip(self.fine_classes, self.parent_of_fine) if p == c)

    @cached_property
    def parent_array(self) -> np.ndarray:
        """int64 array: coarse index of every fine class."""
        arr = np.asarray(self.parent_of_fine, dtype=np.int64)
        arr.setflags(write=False)
        return arr

    @cached_property
    def fine_to_coarse_matrix(self) -> np.ndarray:
        """float32 (n_fine, n_coarse) one-hot membership: fine probabilities @ this = coarse probabilities."""
        m = np.zeros((self.n_fine, self.n_coarse), dtype=np.float32)
        m[np.arange(self.n_fine), self.parent_array] = 1.0
        m.setflags(write=False)
        return m

    def coarse_of_fine_labels(self, fine_labels: np.ndarray) -> np.ndarray:
        """Map fine label indices (MISSING_LABEL allowed) to coarse indices."""
        fine_labels = np.asarray(fine_labels, dtype=np.int64)
        out = np.full(fine_labels.shape, MISSING_LABEL, dtype=np.int64)
        known = fine_labels != MISSING_LABEL
        if np.any((fine_labels[known] < 0) | (fine_labels[known] >= self.n_fine)):
            raise UnknownClassError(f"fine label indices out of range [0, {self.n_fine})")
        out[known] = self.parent_array[fine_labels[known]]
        return out
