"""Noise-aware fine-grained classifier on frozen embeddings (torch, CPU).

Three variants share one training loop:

- ``hierarchical`` (ours): one fine head. Coarse probabilities are the fine probabilities summed over each
  coarse group, so weak coarse labels (forward-corrected with the transition matrix) train the fine head itself.
- ``reference``: the reference method's two linear heads. The coarse head learns from weak labels
  (forward-corrected) and from true coarse labels; the fine head from full labels only. With a frozen encoder
  nothing carries the weak labels over to the fine head: that is the reference's limitation, kept faithfully.
- ``fine-only``: a fine head on full labels only, for the plain active-learning baselines.

Embeddings are L2-normalised and centred inside the model, so prediction sees what training saw.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.errors import ModelInputError
from model.hierarchy import MISSING_LABEL, LabelHierarchy, validated_label_array
from model.io import atomic_write_json
from model.optim import Adam
from model.query import ROW_CHUNK

VARIANTS = ("fine-only", "reference", "hierarchical")
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
_LOG_FLOOR = 1e-12
"""Probabilities are clamped here before the log: a forward-corrected probability can underflow to 0."""
_TRANSITION_ROW_TOLERANCE = 1e-4
_LOG_SHIFT_FLOOR = -60.0
_TRANSITION_FLOOR = 1e-6
"""Transition entries below this are set to 0: products of tiny entries and tiny probabilities are subnormal."""


@dataclass(frozen=True)
class TrainingConfig:
    """How to train.

    ``epochs`` counts optimiser steps; each step sees one chunk of ``batch_size`` rows of every label type (with
    fewer labels than that, every step is full-batch). ``num_threads`` None leaves torch's
    setting; otherwise it is set for the duration of fit/predict and restored.
    """

    variant: str = "hierarchical"
    use_transition: bool = True
    epochs: int = 100
    learning_rate: float = 0.05
    weight_decay: float = 1e-4
    weak_loss_weight: float = 1.0
    seed: int = 0
    num_threads: int | None = None
    batch_size: int = 512
    """Rows per label type per step: each type (full, human coarse, weak) is shuffled once and visited in chunks
    of at most this many rows; a type with fewer rows is used whole at every step."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ModelInputError(f"unknown variant {self.variant!r}; expected one of {list(VARIANTS)}")
        # Values may come from numpy grids or JSON: store plain Python types so the config serialises.
        object.__setattr__(self, "use_transition", bool(self.use_transition))
        for name in ("epochs", "seed", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ModelInputError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("learning_rate", "weight_decay", "weak_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ModelInputError(f"{name} must be a number, got {value!r}")
            if not np.isfinite(value) or value < 0:
                raise ModelInputError(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.epochs < 1:
            raise ModelInputError(f"epochs must be a positive integer, got {self.epochs!r}")
        if self.learning_rate <= 0:
            raise ModelInputError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if self.batch_size < 1:
            raise ModelInputError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.num_threads is not None:
            threads = self.num_threads
            if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
                raise ModelInputError(f"num_threads must be None or a positive integer, got {self.num_threads!r}")
            object.__setattr__(self, "num_threads", int(self.num_threads))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelInputError(f"unknown training config fields: {unknown}")
        return cls(**dict(data))


@contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Use ``num_threads`` for the duration of a call and restore the caller's setting afterwards."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """log_softmax whose exponentials stay clear of float32 subnormals, which slow CPU arithmetic by orders of
    magnitude once a trained head is confident (probabilities below e^-60 are treated as e^-60)."""
    shifted = (logits - logits.max(dim=1, keepdim=True).values.detach()).clamp_min(_LOG_SHIFT_FLOOR)
    return shifted - shifted.exp().sum(dim=1, keepdim=True).log()


def _l2_normalise(embeddings: torch.Tensor) -> torch.Tensor:
    return embeddings / embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _l2_normalise_(embeddings: torch.Tensor) -> torch.Tensor:
    """``_l2_normalise`` in place (the same values): one (n, d) copy fewer while a large pool trains."""
    return embeddings.div_(embeddings.norm(dim=1, keepdim=True).clamp_min(1e-12))


def _validated_embeddings(embeddings: np.ndarray, embedding_dim: int) -> np.ndarray:
    """float16 or float32 (n, embedding_dim) as given (other numeric types as float32), checked finite in chunks."""
    array = np.asarray(embeddings)
    if array.ndim != 2 or array.shape[1] != embedding_dim:
        raise ModelInputError(f"embeddings must have shape (n, {embedding_dim}), got {array.shape}")
    if array.shape[0] == 0:
        raise ModelInputError("embeddings are empty")
    if not np.issubdtype(array.dtype, np.number):
        raise ModelInputError(f"embeddings must be numeric, got dtype {array.dtype}")
    if array.dtype not in (np.float16, np.float32):
        array = array.astype(np.float32)
    for start in range(0, array.shape[0], ROW_CHUNK):
        chunk = array[start : start + ROW_CHUNK]
        if not np.all(np.isfinite(chunk)):
            bad_rows = start + np.flatnonzero(~np.all(np.isfinite(chunk), axis=1))
            raise ModelInputError(f"embeddings contain NaN or inf in rows {bad_rows[:10].tolist()}")
    return array


def _float32_rows(array: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``array[index]`` as float32, gathered ROW_CHUNK rows at a time (no float16 copy of them all first)."""
    out = np.empty((index.size, array.shape[1]), dtype=np.float32)
    for start in range(0, index.size, ROW_CHUNK):
        out[start : start + ROW_CHUNK] = array[index[start : start + ROW_CHUNK]]
    return out


def _validated_labels(name: str, labels: np.ndarray | None, n_samples: int, n_classes: int) -> np.ndarray:
    if labels is None:
        return np.full(n_samples, MISSING_LABEL, dtype=np.int64)
    return validated_label_array(name, labels, n_classes, n_samples)


def validate_transition_matrix(matrix: np.ndarray, n_coarse: int) -> np.ndarray:
    """Return ``matrix`` as float32 (C, C) or raise: finite, non-negative, rows summing to 1."""
    array = np.asarray(matrix, dtype=np.float64)
    if array.shape != (n_coarse, n_coarse):
        raise ModelInputError(f"coarse_transition_matrix must have shape ({n_coarse}, {n_coarse}), got {array.shape}")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ModelInputError("coarse_transition_matrix must be finite and non-negative")
    row_sums = array.sum(axis=1)
    off = np.flatnonzero(np.abs(row_sums - 1.0) > _TRANSITION_ROW_TOLERANCE)
    if off.size:
        raise ModelInputError(
            f"coarse_transition_matrix rows must sum to 1; rows {off.tolist()} sum to {row_sums[off].round(4).tolist()}"
        )
    return array.astype(np.float32)


def _chunk_bounds(size: int, chunk_size: int) -> np.ndarray:
    """Bounds of contiguous chunks of nearly equal size (so every step weighs a label type alike)."""
    n_chunks = max(1, -(-size // chunk_size))
    return np.linspace(0, size, n_chunks + 1).round().astype(int)


def _visited_rows(size: int, chunk_size: int, steps: int) -> int:
    """How many leading rows of a label type ``steps`` optimiser steps visit (all unless chunks outnumber steps)."""
    bounds = _chunk_bounds(size, chunk_size)
    return int(bounds[min(len(bounds) - 1, steps)])


@dataclass(frozen=True)
class _LabelGroup:
    """Normalised, centred rows of one label type with their targets, shuffled once. Only the leading rows the
    optimiser visits are kept (``embeddings`` may be shorter than ``targets``): at 100k weak labels, 100 steps of 512
    rows see about half of them."""

    embeddings: torch.Tensor
    targets: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    def chunks(self, chunk_size: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The chunks ``steps`` steps visit, in order (each type cycles through its own chunks)."""
        bounds = _chunk_bounds(self.size, chunk_size)
        return [
            (self.embeddings[start:stop], self.targets[start:stop])
            for start, stop in list(zip(bounds[:-1], bounds[1:]))[:steps]
        ]


@dataclass(frozen=True)
class _Batch:
    full: tuple[torch.Tensor, torch.Tensor]
    human_coarse: tuple[torch.Tensor, torch.Tensor]
    weak: tuple[torch.Tensor, torch.Tensor]


def _batches(groups: dict[str, _LabelGroup], chunk_size: int, steps: int) -> Iterator[_Batch]:
    """One batch per step: the next chunk of every label type, each type cycling through its own chunks."""
    chunks = {name: group.chunks(chunk_size, steps) for name, group in groups.items()}
    for step in range(steps):
        yield _Batch(**{name: parts[step % len(parts)] for name, parts in chunks.items()})


class FineGrainedClassifier:
    """Linear heads on frozen, L2-normalised embeddings. See the module docstring for the variants."""

    def __init__(self, hierarchy: LabelHierarchy, embedding_dim: int, config: TrainingConfig | None = None) -> None:
        if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, (int, np.integer)) or embedding_dim < 1:
            raise ModelInputError(f"embedding_dim must be a positive integer, got {embedding_dim!r}")
        if not isinstance(hierarchy, LabelHierarchy):
            raise ModelInputError(f"hierarchy must be a LabelHierarchy, got {type(hierarchy).__name__}")
        self.hierarchy = hierarchy
        self.embedding_dim = int(embedding_dim)
        self.config = config or TrainingConfig()
        self._fine_to_coarse = torch.from_numpy(np.array(hierarchy.fine_to_coarse_matrix, dtype=np.float32))
        self._parameters: dict[str, torch.Tensor] | None = None

    @property
    def is_fitted(self) -> bool:
        return self._parameters is not None

    # ---- training -------------------------------------------------------------------------------------------

    def fit(
        self,
        embeddings: np.ndarray,
        fine_labels: np.ndarray,
        weak_coarse_labels: np.ndarray | None = None,
        coarse_transition_matrix: np.ndarray | None = None,
        human_coarse_labels: np.ndarray | None = None,
    ) -> FineGrainedClassifier:
        """Train from scratch. Labels are int64 with ``MISSING_LABEL``; at least one fine label is required.

        A sample's best label wins: a full label makes its weak and human coarse labels redundant, and a human
        coarse label overrides a weak one. Without a transition matrix (or with ``use_transition`` False) the
        weak labels are scored as if they were clean. ``fine-only`` ignores coarse labels altogether.
        """
        with _torch_threads(self.config.num_threads):
            groups, feature_mean = self._training_set(embeddings, fine_labels, weak_coarse_labels, human_coarse_labels)
            transition = self._transition_tensor(coarse_transition_matrix)
            self._parameters = self._optimise(groups, feature_mean, transition)
        return self

    def _training_set(
        self,
        embeddings: np.ndarray,
        fine_labels: np.ndarray,
        weak_coarse_labels: np.ndarray | None,
        human_coarse_labels: np.ndarray | None,
    ) -> tuple[dict[str, _LabelGroup], torch.Tensor]:
        """Label groups ``full``, ``human_coarse`` and ``weak`` (disjoint: a sample's best label wins)."""
        array = _validated_embeddings(embeddings, self.embedding_dim)
        n = array.shape[0]
        fine = _validated_labels("fine_labels", fine_labels, n, self.hierarchy.n_fine)
        weak = _validated_labels("weak_coarse_labels", weak_coarse_labels, n, self.hierarchy.n_coarse)
        human_coarse = _validated_labels("human_coarse_labels", human_coarse_labels, n, self.hierarchy.n_coarse)
        full_rows = np.flatnonzero(fine != MISSING_LABEL)
        if full_rows.size == 0:
            raise ModelInputError("no full (human fine) labels: the fine head cannot be trained")
        has_full = fine != MISSING_LABEL
        human_coarse_rows = np.flatnonzero((human_coarse != MISSING_LABEL) & ~has_full)
        weak_rows = np.flatnonzero((weak != MISSING_LABEL) & ~has_full & (human_coarse == MISSING_LABEL))
        if self.config.variant == "fine-only":
            human_coarse_rows, weak_rows = human_coarse_rows[:0], weak_rows[:0]
        rng = np.random.default_rng(self.config.seed)
        rows = {
            "full": rng.permutation(full_rows),
            "human_coarse": rng.permutation(human_coarse_rows),
            "weak": rng.permutation(weak_rows),
        }
        targets = {"full": fine, "human_coarse": human_coarse, "weak": weak}
        # The mean of every normalised row, ROW_CHUNK rows at a time; then a float32 copy of only the rows the
        # optimiser visits, normalised and centred in place.
        total, count = torch.zeros(array.shape[1], dtype=torch.float64), 0
        for index in rows.values():
            for start in range(0, index.size, ROW_CHUNK):
                chunk = _l2_normalise_(torch.from_numpy(_float32_rows(array, index[start : start + ROW_CHUNK])))
                total += chunk.sum(dim=0, dtype=torch.float64)
                count += chunk.shape[0]
        feature_mean = (total / max(count, 1)).to(torch.float32)
        visited = {name: index[: _visited_rows(index.size, self.config.batch_size, self.config.epochs)]
                   for name, index in rows.items()}
        groups = {
            name: _LabelGroup(_l2_normalise_(torch.from_numpy(_float32_rows(array, visited[name]))).sub_(feature_mean),
                              torch.from_numpy(targets[name][index]))
            for name, index in rows.items()
        }
        return groups, feature_mean

    def _transition_tensor(self, matrix: np.ndarray | None) -> torch.Tensor | None:
        if matrix is None:
            return None
        validated = validate_transition_matrix(matrix, self.hierarchy.n_coarse)
        if not self.config.use_transition:
            return None
        return torch.from_numpy(np.where(validated < _TRANSITION_FLOOR, 0.0, validated).astype(np.float32))

    def _initial_parameters(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed)
        scale = 0.01

        def head(n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
            weight = torch.randn(n_out, self.embedding_dim, generator=generator) * scale
            return weight, torch.zeros(n_out)

        parameters: dict[str, torch.Tensor] = {}
        parameters["fine_head.weight"], parameters["fine_head.bias"] = head(self.hierarchy.n_fine)
        if self.config.variant == "reference":
            parameters["coarse_head.weight"], parameters["coarse_head.bias"] = head(self.hierarchy.n_coarse)
        return parameters

    def _optimise(
        self, groups: dict[str, _LabelGroup], feature_mean: torch.Tensor, transition: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        parameters = {name: tensor.requires_grad_() for name, tensor in self._initial_parameters().items()}
        optimiser = Adam(parameters.values(), lr=self.config.learning_rate)  # torch.optim's, without torch._dynamo
        for batch in _batches(groups, self.config.batch_size, self.config.epochs):
            optimiser.zero_grad()
            self._loss(parameters, batch, transition).backward()
            optimiser.step()
        fitted = {name: tensor.detach().clone() for name, tensor in parameters.items()}
        fitted["feature_mean"] = feature_mean.clone()
        return fitted

    def _coarse_log_probabilities(self, fine_logits: torch.Tensor) -> torch.Tensor:
        coarse = _log_softmax(fine_logits).exp() @ self._fine_to_coarse
        return coarse.clamp_min(_LOG_FLOOR).log()

    def _loss(
        self, parameters: dict[str, torch.Tensor], batch: _Batch, transition: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean loss per label type; the coarse-level types are scaled by ``weak_loss_weight`` so that hundreds
        of cheap coarse labels do not drown a handful of full ones."""
        config = self.config
        full_x, fine_targets = batch.full
        human_x, human_targets = batch.human_coarse
        weak_x, weak_targets = batch.weak
        fine_weight, fine_bias = parameters["fine_head.weight"], parameters["fine_head.bias"]
        penalty = fine_weight.square().sum()
        if config.variant == "reference":
            coarse_weight, coarse_bias = parameters["coarse_head.weight"], parameters["coarse_head.bias"]
            penalty = penalty + coarse_weight.square().sum()
            # One pass over the full rows for both heads.
            full_logits = F.linear(full_x, torch.cat([fine_weight, coarse_weight]), torch.cat([fine_bias, coarse_bias]))
            fine_logits, full_coarse_logits = full_logits.split([self.hierarchy.n_fine, self.hierarchy.n_coarse], dim=1)
            true_coarse = self._fine_to_coarse.argmax(dim=1)[fine_targets]
            loss = F.nll_loss(_log_softmax(full_coarse_logits), true_coarse)

            def coarse_log_probs(x: torch.Tensor) -> torch.Tensor:
                return _log_softmax(F.linear(x, coarse_weight, coarse_bias))
        else:
            fine_logits = F.linear(full_x, fine_weight, fine_bias)
            loss = torch.zeros(())

            def coarse_log_probs(x: torch.Tensor) -> torch.Tensor:
                return self._coarse_log_probabilities(F.linear(x, fine_weight, fine_bias))

        loss = loss + F.nll_loss(_log_softmax(fine_logits), fine_targets)
        if config.variant != "fine-only" and human_targets.numel():
            loss = loss + config.weak_loss_weight * F.nll_loss(coarse_log_probs(human_x), human_targets)
        if config.variant != "fine-only" and weak_targets.numel():
            weak_log_probs = coarse_log_probs(weak_x)
            if transition is not None:
                weak_log_probs = (weak_log_probs.exp() @ transition).clamp_min(_LOG_FLOOR).log()
            loss = loss + config.weak_loss_weight * F.nll_loss(weak_log_probs, weak_targets)
        return loss + 0.5 * config.weight_decay * penalty

    # ---- prediction -----------------------------------------------------------------------------------------

    def _fitted_parameters(self) -> dict[str, torch.Tensor]:
        if self._parameters is None:
            raise ModelInputError("the classifier is not fitted yet: call fit() or load() first")
        return self._parameters

    def _features(self, array: np.ndarray) -> torch.Tensor:
        """Normalised, centred float32 features of validated rows (one chunk of them)."""
        features = torch.from_numpy(np.asarray(array, dtype=np.float32))
        return _l2_normalise(features).sub_(self._fitted_parameters()["feature_mean"])

    def _probabilities(self, embeddings: np.ndarray, head: str) -> np.ndarray:
        """softmax of one head, ROW_CHUNK rows at a time."""
        parameters = self._fitted_parameters()
        weight, bias = parameters[f"{head}.weight"], parameters[f"{head}.bias"]
        array = _validated_embeddings(embeddings, self.embedding_dim)
        out = np.empty((array.shape[0], weight.shape[0]), dtype=np.float32)
        with _torch_threads(self.config.num_threads), torch.inference_mode():
            for start in range(0, array.shape[0], ROW_CHUNK):
                logits = F.linear(self._features(array[start : start + ROW_CHUNK]), weight, bias)
                out[start : start + ROW_CHUNK] = F.softmax(logits, dim=1).numpy()
        return out

    def predict_fine_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 (n, n_fine), rows summing to 1."""
        return self._probabilities(embeddings, "fine_head")

    def predict_coarse_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 (n, n_coarse): the coarse head (reference) or fine probabilities summed per group."""
        if self.config.variant != "reference":
            fine = self.predict_fine_proba(embeddings)
            return (fine @ self.hierarchy.fine_to_coarse_matrix).astype(np.float32)
        return self._probabilities(embeddings, "coarse_head")

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "hierarchy": self.hierarchy.to_dict(),
            "config": self.config.to_dict(),
            "embedding_dim": self.embedding_dim,
            "tensors": _describe(self._expected_shapes()),
        }

    def _expected_shapes(self) -> dict[str, torch.Size]:
        d, n_fine, n_coarse = self.embedding_dim, self.hierarchy.n_fine, self.hierarchy.n_coarse
        shapes = {
            "fine_head.weight": torch.Size([n_fine, d]),
            "fine_head.bias": torch.Size([n_fine]),
            "feature_mean": torch.Size([d]),
        }
        if self.config.variant == "reference":
            shapes["coarse_head.weight"] = torch.Size([n_coarse, d])
            shapes["coarse_head.bias"] = torch.Size([n_coarse])
        return shapes

    def save(self, directory: str | Path) -> None:
        """Write ``weights.safetensors`` and ``metadata.json`` into ``directory``, replacing it as a whole."""
        if self._parameters is None:
            raise ModelInputError("cannot save a classifier that is not fitted")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            tensors = {name: tensor.contiguous() for name, tensor in self._parameters.items()}
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "vlm-al-finegrained"})
            atomic_write_json(staging / METADATA_FILE, self._metadata())
            _replace_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path, expected_hierarchy: LabelHierarchy | None = None) -> FineGrainedClassifier:
        """Read a checkpoint written by ``save``; with ``expected_hierarchy``, reject one trained on another."""
        directory = Path(directory)
        metadata = _read_metadata(directory)
        try:
            hierarchy = LabelHierarchy.from_dict(metadata["hierarchy"])
            config = TrainingConfig.from_dict(metadata["config"])
            embedding_dim = metadata["embedding_dim"]
        except (KeyError, TypeError) as exc:
            raise ModelInputError(f"{directory / METADATA_FILE}: incomplete metadata ({exc!r})") from exc
        if expected_hierarchy is not None and expected_hierarchy != hierarchy:
            raise ModelInputError(
                f"checkpoint {directory} was trained on another label hierarchy: "
                f"{hierarchy.to_dict()} != expected {expected_hierarchy.to_dict()}"
            )
        classifier = cls(hierarchy, embedding_dim, config)
        try:
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, RuntimeError, ValueError) as exc:
            raise ModelInputError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from exc
        expected = classifier._expected_shapes()
        actual = {name: tensor.shape for name, tensor in tensors.items()}
        if actual != expected:
            raise ModelInputError(
                f"checkpoint {directory}: tensors {_describe(actual)} do not match its metadata {_describe(expected)}"
            )
        classifier._parameters = {name: tensor.to(torch.float32) for name, tensor in tensors.items()}
        return classifier


def _describe(shapes: Mapping[str, torch.Size]) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in sorted(shapes.items())}


def _read_metadata(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    try:
        metadata = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"cannot read checkpoint metadata {path}: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelInputError(f"{path}: expected a JSON object")
    version = metadata.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise ModelInputError(
            f"{path}: checkpoint format version {version!r} is not supported (expected {CHECKPOINT_FORMAT_VERSION})"
        )
    return metadata


def _replace_directory(staging: Path, target: Path) -> None:
    """Move ``staging`` onto ``target``. A rename cannot replace a non-empty directory, so an existing target
    is first moved aside; a reader sees the old checkpoint or the new one, never a mix of both."""
    for path in staging.iterdir():
        _fsync_path(path)
    _fsync_path(staging)
    if not target.exists():
        os.rename(staging, target)
    else:
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".old"))
        os.rename(target, retired / target.name)
        os.rename(staging, target)
        shutil.rmtree(retired, ignore_errors=True)
    _fsync_path(target.parent)


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---- model selection ----------------------------------------------------------------------------------------


def stratified_folds(labels: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number of every sample: each class is shuffled and dealt round-robin, continuing where the
    previous class stopped so that small classes do not all land in fold 0."""
    folds = np.empty(labels.shape[0], dtype=np.int64)
    next_fold = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        folds[members] = (next_fold + np.arange(members.size)) % n_folds
        next_fold = (next_fold + members.size) % n_folds
    return folds


def _candidate_configs(base_config: TrainingConfig, candidates: Mapping[str, Sequence[Any]]) -> list[TrainingConfig]:
    known = {f.name for f in fields(TrainingConfig)}
    unknown = sorted(set(candidates) - known)
    if unknown:
        raise ModelInputError(f"unknown TrainingConfig fields in candidates: {unknown}")
    empty = sorted(name for name, values in candidates.items() if len(values) == 0)
    if empty:
        raise ModelInputError(f"no candidate values for {empty}")
    names = list(candidates)
    return [replace(base_config, **dict(zip(names, values))) for values in itertools.product(*candidates.values())]


def _without(labels: np.ndarray | None, held_out: np.ndarray) -> np.ndarray | None:
    return None if labels is None else np.where(held_out, MISSING_LABEL, labels)


def cross_validated_accuracy(
    hierarchy: LabelHierarchy,
    embeddings: np.ndarray,
    fine_labels: np.ndarray,
    weak_coarse_labels: np.ndarray | None,
    coarse_transition_matrix: np.ndarray | None,
    config: TrainingConfig,
    folds: np.ndarray,
    human_coarse_labels: np.ndarray | None = None,
) -> float:
    """Mean fine accuracy over folds of the full-labelled samples (``folds[i]`` = -1 for the others, which
    always stay in training)."""
    accuracies = []
    for fold in range(int(folds.max()) + 1):
        held_out = folds == fold
        if not np.any(held_out):
            continue
        # A held-out sample keeps no label of any kind in training, so its coarse labels cannot leak either.
        classifier = FineGrainedClassifier(hierarchy, embeddings.shape[1], config).fit(
            embeddings,
            np.where(held_out, MISSING_LABEL, fine_labels),
            _without(weak_coarse_labels, held_out),
            coarse_transition_matrix,
            _without(human_coarse_labels, held_out),
        )
        predicted = classifier.predict_fine_proba(embeddings[held_out]).argmax(axis=1)
        accuracies.append(float(np.mean(predicted == fine_labels[held_out])))
    return float(np.mean(accuracies))


def select_training_config(
    hierarchy: LabelHierarchy,
    embeddings: np.ndarray,
    fine_labels: np.ndarray,
    weak_coarse_labels: np.ndarray | None,
    coarse_transition_matrix: np.ndarray | None,
    base_config: TrainingConfig,
    candidates: Mapping[str, Sequence[Any]],
    n_folds: int = 3,
    human_coarse_labels: np.ndarray | None = None,
) -> TrainingConfig:
    """Pick the candidate config with the best stratified k-fold fine accuracy on the full-labelled samples.

    ``candidates`` maps TrainingConfig fields to values; every combination is tried. Weak samples always stay
    in training. Ties go to the earlier combination. With fewer full labels than folds, or a single
    candidate, ``base_config`` with the first combination is returned without cross-validation.
    """
    if not isinstance(n_folds, int) or n_folds < 2:
        raise ModelInputError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    configs = _candidate_configs(base_config, candidates)
    array = _validated_embeddings(embeddings, int(np.asarray(embeddings).shape[-1]))
    n = array.shape[0]
    fine = _validated_labels("fine_labels", fine_labels, n, hierarchy.n_fine)
    if weak_coarse_labels is not None:
        weak_coarse_labels = _validated_labels("weak_coarse_labels", weak_coarse_labels, n, hierarchy.n_coarse)
    if human_coarse_labels is not None:
        human_coarse_labels = _validated_labels("human_coarse_labels", human_coarse_labels, n, hierarchy.n_coarse)
    full = np.flatnonzero(fine != MISSING_LABEL)
    if len(configs) == 1 or full.size < n_folds:
        return configs[0]
    folds = np.full(fine.shape[0], -1, dtype=np.int64)
    folds[full] = stratified_folds(fine[full], n_folds, np.random.default_rng(base_config.seed))
    scores = [
        cross_validated_accuracy(
            hierarchy, array, fine, weak_coarse_labels, coarse_transition_matrix, config, folds, human_coarse_labels
        )
        for config in configs
    ]
    return configs[int(np.argmax(scores))]
