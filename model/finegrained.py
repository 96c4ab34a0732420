"""Noise-aware fine-grained classifier on frozen embeddings (numpy, CPU).

Three variants share one training loop:

- ``hierarchical`` (ours): one fine head. Coarse probabilities are the fine probabilities summed over each
  coarse group, so weak coarse labels (forward-corrected with the transition matrix) train the fine head itself.
- ``reference``: the reference method's two linear heads. The coarse head learns from weak labels
  (forward-corrected) and from true coarse labels; the fine head from full labels only. With a frozen encoder
  nothing carries the weak labels over to the fine head: that is the reference's limitation, kept faithfully.
- ``fine-only``: a fine head on full labels only, for the plain active-learning baselines.

Embeddings are L2-normalised and centred inside the model, so prediction sees what training saw.

The heads are linear, so their gradients are written out by hand (``_scaled_nll``) and stepped with torch's Adam
update (``model.optim``): fitting and serving never import torch, which alone costs about 500 MB resident in every
worker. ``tests/test_finegrained_numpy.py`` checks the loss and gradients against torch autograd.
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
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from threadpoolctl import threadpool_limits

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
    fewer labels than that, every step is full-batch). ``num_threads`` caps the BLAS threads numpy's matrix
    products use (through threadpoolctl) for the duration of fit/predict; None leaves the BLAS library's setting.
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
def _blas_threads(num_threads: int | None) -> Iterator[None]:
    """Cap the BLAS thread pools at ``num_threads`` for the duration of a call (None: leave them as they are)."""
    if num_threads is None:
        yield
        return
    with threadpool_limits(limits=num_threads, user_api="blas"):
        yield


def _log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log_softmax whose exponentials stay clear of float32 subnormals, which slow CPU arithmetic by orders of
    magnitude once a trained head is confident (probabilities below e^-60 are treated as e^-60).

    Returns the log-probabilities, the softmax of the clamped logits (the log-softmax's Jacobian) and where the
    clamp lets the gradient through (at or above the floor, as torch's clamp_min); the row maximum is a constant
    of the gradient, as a detached maximum is."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    passes = shifted >= _LOG_SHIFT_FLOOR
    np.maximum(shifted, _LOG_SHIFT_FLOOR, out=shifted)
    exponentials = np.exp(shifted)
    total = exponentials.sum(axis=1, keepdims=True)
    return shifted - np.log(total), exponentials / total, passes


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exponentials = np.exp(shifted, out=shifted)
    return exponentials / exponentials.sum(axis=1, keepdims=True)


def _scaled_nll(
    logits: np.ndarray, targets: np.ndarray, scale: float, mixing: Sequence[np.ndarray]
) -> tuple[float, np.ndarray]:
    """``scale`` times the mean negative log-likelihood of ``targets`` and its gradient with respect to ``logits``.

    The probabilities are ``_log_softmax(logits)`` pushed through each matrix of ``mixing`` in turn
    (``p -> clamp_min(exp(log p) @ M, _LOG_FLOOR)`` before the next log): fine to coarse, then the transition.
    The backward pass mirrors autograd of that forward pass: log passes grad / input, exp grad * output, a
    matrix product grad @ M.T, and a clamp passes the gradient only where its input is at or above the floor.
    """
    log_probs, softmax, passes = _log_softmax(logits)
    stages = []
    for matrix in mixing:
        probs = np.exp(log_probs)
        mixed = probs @ matrix
        clamped = np.maximum(mixed, _LOG_FLOOR)
        stages.append((matrix, probs, clamped, mixed >= _LOG_FLOOR))
        log_probs = np.log(clamped)
    n = targets.size
    rows = np.arange(n)
    loss = -scale * float(log_probs[rows, targets].mean())
    gradient = np.zeros_like(log_probs)
    gradient[rows, targets] = -scale / n
    for matrix, probs, clamped, unclamped in reversed(stages):
        gradient = (np.where(unclamped, gradient / clamped, 0) @ matrix.T) * probs
    return loss, (gradient - softmax * gradient.sum(axis=1, keepdims=True)) * passes


def _row_norms(rows: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", rows, rows))


def _l2_normalise_(rows: np.ndarray, norms: np.ndarray | None = None) -> np.ndarray:
    """Divide float32 rows by their L2 norms (computed unless given) in place: one (n, d) copy fewer while a large
    pool trains."""
    rows /= np.maximum(_row_norms(rows) if norms is None else norms, 1e-12)[:, None]
    return rows


def _embedding_matrix(embeddings: np.ndarray, embedding_dim: int | None) -> np.ndarray:
    """A numeric (n, embedding_dim) array as given (any width for None), without a copy: float16 stays float16 until
    each chunk of it is converted (``_finite_float32_chunk``), which is also where rows are checked finite."""
    array = np.asarray(embeddings)
    if array.ndim != 2 or (embedding_dim is not None and array.shape[1] != embedding_dim):
        raise ModelInputError(f"embeddings must have shape (n, {embedding_dim or 'd'}), got {array.shape}")
    if array.shape[0] == 0:
        raise ModelInputError("embeddings are empty")
    if not np.issubdtype(array.dtype, np.number):
        raise ModelInputError(f"embeddings must be numeric, got dtype {array.dtype}")
    return array


def _finite_float32_chunk(array: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """A float32 copy of ``array[start : start + ROW_CHUNK]`` with its row norms, or ModelInputError if a row holds
    NaN or inf. A NaN or inf makes its row's norm non-finite, so only a chunk with such a norm is searched element by
    element (a finite row whose squares overflow float32 passes, with an infinite norm, as it did under torch)."""
    with np.errstate(over="ignore"):  # a value beyond float32's range becomes inf, reported below
        chunk = array[start : start + ROW_CHUNK].astype(np.float32)
        norms = _row_norms(chunk)
    if not np.isfinite(norms).all():
        bad_rows = start + np.flatnonzero(~np.isfinite(chunk).all(axis=1))
        if bad_rows.size:
            raise ModelInputError(f"embeddings contain NaN or inf in rows {bad_rows[:10].tolist()}")
    return chunk, norms


class PoolStatistics:
    """What every fit on a pool of embeddings computes before it trains, computed once for all the fits of a round
    (the training fit, its cross-validation and out-of-fold fits, a learning curve's): every row checked finite, its
    L2 norm, and the float64 sum of each ROW_CHUNK slice's L2-normalised rows.

    The first fit records them as it walks the pool; later fits take the mean from the kept sums and gather only the
    rows they train on, instead of converting the whole pool again (at 100,000 float16 rows that pass was about half
    of every fit). A fit given these statistics computes the same bits as one that computes them itself. A slice is
    converted when a fit first needs it, so a caller can hand them to a classifier that may not read them. They
    describe the array object they were made from, which must not change while they are in use."""

    def __init__(self, embeddings: np.ndarray) -> None:
        self._source = embeddings
        self.embeddings = _embedding_matrix(embeddings, None)
        n, dim = self.embeddings.shape
        self._norms = np.empty(n, dtype=np.float32)
        self._sums = np.empty((-(-n // ROW_CHUNK), dim), dtype=np.float64)
        self._known = np.zeros(self._sums.shape[0], dtype=bool)

    def describes(self, embeddings: np.ndarray) -> bool:
        """Whether these are the statistics of ``embeddings`` (the same object: its values are not compared)."""
        return embeddings is self._source or embeddings is self.embeddings

    @classmethod
    def reusing(cls, given: PoolStatistics | None, embeddings: np.ndarray) -> PoolStatistics:
        """``given`` when it describes ``embeddings``, else new statistics of them."""
        return given if given is not None and given.describes(embeddings) else cls(embeddings)

    def _slice(self, index: int) -> np.ndarray:
        """Slice ``index`` as L2-normalised float32 rows (a copy). Its first conversion checks it finite and records
        its norms and sum."""
        start = index * ROW_CHUNK
        if self._known[index]:
            with np.errstate(over="ignore"):  # as in _finite_float32_chunk: a float64 row beyond float32's range
                rows = self.embeddings[start : start + ROW_CHUNK].astype(np.float32)
            return _l2_normalise_(rows, self._norms[start : start + rows.shape[0]])
        rows, norms = _finite_float32_chunk(self.embeddings, start)
        _l2_normalise_(rows, norms)
        self._norms[start : start + rows.shape[0]] = norms
        self._sums[index] = rows.sum(axis=0, dtype=np.float64)
        self._known[index] = True
        return rows

    def normalised(self, rows: np.ndarray) -> np.ndarray:
        """float32 copies of ``rows`` of the pool, L2-normalised with the kept norms: the same bits as converting and
        normalising their whole ROW_CHUNK slice."""
        rows = np.asarray(rows, dtype=np.intp)
        for index in np.unique(rows // ROW_CHUNK):
            if not self._known[index]:
                self._slice(int(index))
        with np.errstate(over="ignore"):
            selected = np.asarray(self.embeddings[rows], dtype=np.float32)
        return _l2_normalise_(selected, self._norms[rows])

    def mean_and_rows(self, used: np.ndarray, copied: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The float32 mean of the normalised rows where ``used`` is True, and the normalised rows listed in
        ``copied`` (in that order) centred by it, in one walk over the ROW_CHUNK slices in pool order. A slice seen
        for the first time is converted whole; after that a slice whose rows are all used adds its kept sum, another
        the sum of its used rows (float32 rows summed in float64 either way), and a slice is converted again whole
        only when more than half of it is copied, else just its copied rows. Nothing larger than a slice is
        allocated beside the result."""
        rows = np.empty((copied.size, self.embeddings.shape[1]), dtype=np.float32)
        order = np.argsort(copied)  # rows[order[k]] is pool row sorted_rows[k]
        sorted_rows = copied[order]
        total = np.zeros(self.embeddings.shape[1], dtype=np.float64)
        for index, start in enumerate(range(0, self.embeddings.shape[0], ROW_CHUNK)):
            selected = used[start : start + ROW_CHUNK]
            lo, hi = np.searchsorted(sorted_rows, [start, start + ROW_CHUNK])
            convert = not self._known[index] or 2 * (hi - lo) > selected.size
            whole = self._slice(index) if convert else None
            if selected.all():
                total += self._sums[index]
            elif whole is not None:
                total += whole[selected].sum(axis=0, dtype=np.float64)
            else:
                total += self.normalised(start + np.flatnonzero(selected)).sum(axis=0, dtype=np.float64)
            if whole is not None:
                rows[order[lo:hi]] = whole[sorted_rows[lo:hi] - start]
            elif hi > lo:
                rows[order[lo:hi]] = self.normalised(sorted_rows[lo:hi])
        mean = (total / max(int(np.count_nonzero(used)), 1)).astype(np.float32)
        rows -= mean
        return mean, rows


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


def _steps_go_round(size: int, chunk_size: int, steps: int) -> bool:
    """Whether ``steps`` steps visit some rows of a label type more than once (it has fewer chunks than steps)."""
    return len(_chunk_bounds(size, chunk_size)) - 1 < steps


@dataclass(frozen=True)
class _LabelGroup:
    """One label type: its pool rows shuffled once, with their targets. Only the leading rows the optimiser visits
    are listed (``rows`` may be shorter than ``targets``: at 100k weak labels, 100 steps of 512 rows see about half
    of them).

    A type whose steps cycle through its chunks more than once has its visited rows normalised and centred once,
    into a float32 copy (``prepared``): converting a 512-row float16 chunk costs about as much as the step's
    matrix products. A larger type's steps see each row once, so each step prepares its own rows and training holds
    no copy of them (at 100k tasks that copy was 260 MB, the largest thing a fit held)."""

    pool: PoolStatistics
    """The caller's (n, d) rows (float16 or float32), already checked finite, with their norms."""
    mean: np.ndarray
    rows: np.ndarray
    targets: np.ndarray
    prepared: np.ndarray | None
    """The visited rows normalised and centred, or None when each visited row is used once."""

    @property
    def size(self) -> int:
        return int(self.targets.shape[0])

    def chunks(self, chunk_size: int, steps: int) -> list[tuple[int, int]]:
        """Bounds (in visit order) of the chunks ``steps`` steps visit, in order (each type cycles through its own)."""
        bounds = _chunk_bounds(self.size, chunk_size)
        return [(int(start), int(stop)) for start, stop in list(zip(bounds[:-1], bounds[1:]))[:steps]]

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(normalised, centred float32 rows, targets) of visit positions ``start:stop``."""
        if self.prepared is not None:
            return self.prepared[start:stop], self.targets[start:stop]
        x = self.pool.normalised(self.rows[start:stop])
        x -= self.mean
        return x, self.targets[start:stop]


@dataclass(frozen=True)
class _Batch:
    full: tuple[np.ndarray, np.ndarray]
    human_coarse: tuple[np.ndarray, np.ndarray]
    weak: tuple[np.ndarray, np.ndarray]


def _batches(groups: dict[str, _LabelGroup], chunk_size: int, steps: int) -> Iterator[_Batch]:
    """One batch per step: the next chunk of every label type, each type cycling through its own chunks."""
    chunks = {name: group.chunks(chunk_size, steps) for name, group in groups.items()}
    for step in range(steps):
        yield _Batch(**{name: groups[name].chunk(*group_chunks[step % len(group_chunks)])
                        for name, group_chunks in chunks.items()})


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
        self._fine_to_coarse = np.array(hierarchy.fine_to_coarse_matrix, dtype=np.float32)
        self._parameters: dict[str, np.ndarray] | None = None

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
        pool: PoolStatistics | None = None,
    ) -> FineGrainedClassifier:
        """Train from scratch. Labels are int64 with ``MISSING_LABEL``; at least one fine label is required.

        A sample's best label wins: a full label makes its weak and human coarse labels redundant, and a human
        coarse label overrides a weak one. Without a transition matrix (or with ``use_transition`` False) the
        weak labels are scored as if they were clean. ``fine-only`` ignores coarse labels altogether.

        ``pool``: the statistics of ``embeddings`` (the same array object), shared by several fits on it; computed
        here when not given.
        """
        with _blas_threads(self.config.num_threads):
            groups, feature_mean = self._training_set(embeddings, fine_labels, weak_coarse_labels, human_coarse_labels,
                                                      pool)
            transition = self._transition(coarse_transition_matrix)
            self._parameters = self._optimise(groups, feature_mean, transition)
        return self

    def _training_set(
        self,
        embeddings: np.ndarray,
        fine_labels: np.ndarray,
        weak_coarse_labels: np.ndarray | None,
        human_coarse_labels: np.ndarray | None,
        pool: PoolStatistics | None = None,
    ) -> tuple[dict[str, _LabelGroup], np.ndarray]:
        """Label groups ``full``, ``human_coarse`` and ``weak`` (disjoint: a sample's best label wins)."""
        array = _embedding_matrix(embeddings, self.embedding_dim)
        if pool is None:
            pool = PoolStatistics(array)
        elif not pool.describes(embeddings):
            raise ModelInputError("pool statistics describe another embeddings array than the one given to fit")
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
        used = np.zeros(n, dtype=bool)
        for index in rows.values():
            used[index] = True
        # The mean is taken over every labelled row; of each type only the rows the optimiser visits are listed, and
        # those of a type the steps go round more than once are copied out, prepared, once.
        steps, batch_size = self.config.epochs, self.config.batch_size
        visited = {name: index[: _visited_rows(index.size, batch_size, steps)] for name, index in rows.items()}
        prepared_names = [name for name, index in rows.items() if _steps_go_round(index.size, batch_size, steps)]
        feature_mean, prepared = pool.mean_and_rows(
            used, np.concatenate([visited[name] for name in prepared_names] or [np.zeros(0, dtype=np.int64)]))
        bounds = np.cumsum([0, *(visited[name].size for name in prepared_names)])
        prepared_rows = {name: prepared[lo:hi] for name, lo, hi in zip(prepared_names, bounds[:-1], bounds[1:])}
        groups = {
            name: _LabelGroup(pool, feature_mean, visited[name], targets[name][index], prepared_rows.get(name))
            for name, index in rows.items()
        }
        return groups, feature_mean

    def _transition(self, matrix: np.ndarray | None) -> np.ndarray | None:
        if matrix is None:
            return None
        validated = validate_transition_matrix(matrix, self.hierarchy.n_coarse)
        if not self.config.use_transition:
            return None
        return np.where(validated < _TRANSITION_FLOOR, 0.0, validated).astype(np.float32)

    def _initial_parameters(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.config.seed)
        scale = np.float32(0.01)

        def head(n_out: int) -> tuple[np.ndarray, np.ndarray]:
            weight = rng.standard_normal((n_out, self.embedding_dim), dtype=np.float32) * scale
            return weight, np.zeros(n_out, dtype=np.float32)

        parameters: dict[str, np.ndarray] = {}
        parameters["fine_head.weight"], parameters["fine_head.bias"] = head(self.hierarchy.n_fine)
        if self.config.variant == "reference":
            parameters["coarse_head.weight"], parameters["coarse_head.bias"] = head(self.hierarchy.n_coarse)
        return parameters

    def _optimise(
        self, groups: dict[str, _LabelGroup], feature_mean: np.ndarray, transition: np.ndarray | None
    ) -> dict[str, np.ndarray]:
        parameters = self._initial_parameters()
        optimiser = Adam(parameters.values(), lr=self.config.learning_rate)  # updates the arrays in place
        for batch in _batches(groups, self.config.batch_size, self.config.epochs):
            _, gradients = self._loss_and_gradients(parameters, batch, transition)
            optimiser.step([gradients[name] for name in parameters])
        return {**parameters, "feature_mean": feature_mean}

    def _loss_and_gradients(
        self, parameters: dict[str, np.ndarray], batch: _Batch, transition: np.ndarray | None
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Mean loss per label type and its gradient for every parameter; the coarse-level types are scaled by
        ``weak_loss_weight`` so that hundreds of cheap coarse labels do not drown a handful of full ones. Weight
        decay is ``0.5 * weight_decay * ||W||^2`` on the weights, not the biases."""
        config = self.config
        weights = [name for name in parameters if name.endswith(".weight")]
        loss = 0.5 * config.weight_decay * sum(float(np.square(parameters[name]).sum()) for name in weights)
        gradients = {
            name: config.weight_decay * value if name in weights else np.zeros_like(value)
            for name, value in parameters.items()
        }

        def add_term(
            head: str, x: np.ndarray, targets: np.ndarray, scale: float, mixing: Sequence[np.ndarray]
        ) -> float:
            weight, bias = parameters[f"{head}.weight"], parameters[f"{head}.bias"]
            term, logit_gradient = _scaled_nll(x @ weight.T + bias, targets, scale, mixing)
            gradients[f"{head}.weight"] += logit_gradient.T @ x
            gradients[f"{head}.bias"] += logit_gradient.sum(axis=0)
            return term

        full_x, fine_targets = batch.full
        loss += add_term("fine_head", full_x, fine_targets, 1.0, ())
        coarse_mixing: tuple[np.ndarray, ...]
        if config.variant == "reference":
            true_coarse = self.hierarchy.parent_array[fine_targets]
            loss += add_term("coarse_head", full_x, true_coarse, 1.0, ())
            coarse_head, coarse_mixing = "coarse_head", ()
        else:
            coarse_head, coarse_mixing = "fine_head", (self._fine_to_coarse,)
        if config.variant != "fine-only":
            human_x, human_targets = batch.human_coarse
            if human_targets.size:
                loss += add_term(coarse_head, human_x, human_targets, config.weak_loss_weight, coarse_mixing)
            weak_x, weak_targets = batch.weak
            if weak_targets.size:
                weak_mixing = coarse_mixing if transition is None else (*coarse_mixing, transition)
                loss += add_term(coarse_head, weak_x, weak_targets, config.weak_loss_weight, weak_mixing)
        return loss, gradients

    # ---- prediction -----------------------------------------------------------------------------------------

    def _fitted_parameters(self) -> dict[str, np.ndarray]:
        if self._parameters is None:
            raise ModelInputError("the classifier is not fitted yet: call fit() or load() first")
        return self._parameters

    def _probabilities(self, embeddings: np.ndarray, heads: Sequence[str]) -> list[np.ndarray]:
        """softmax of each head in ``heads`` from one pass over the rows, ROW_CHUNK rows at a time: each chunk is
        converted to float32 (and checked finite) on its own, so a float16 pool is never copied whole."""
        parameters = self._fitted_parameters()
        array = _embedding_matrix(embeddings, self.embedding_dim)
        outs = [np.empty((array.shape[0], parameters[f"{head}.bias"].shape[0]), dtype=np.float32) for head in heads]
        with _blas_threads(self.config.num_threads):
            for start in range(0, array.shape[0], ROW_CHUNK):
                features = _l2_normalise_(*_finite_float32_chunk(array, start))
                features -= parameters["feature_mean"]
                for head, out in zip(heads, outs):
                    logits = features @ parameters[f"{head}.weight"].T + parameters[f"{head}.bias"]
                    out[start : start + ROW_CHUNK] = _softmax(logits)
        return outs

    def _coarse_from_fine(self, fine: np.ndarray) -> np.ndarray:
        return (fine @ self.hierarchy.fine_to_coarse_matrix).astype(np.float32)

    def predict_fine_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 (n, n_fine), rows summing to 1."""
        return self._probabilities(embeddings, ["fine_head"])[0]

    def predict_coarse_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """float32 (n, n_coarse): the coarse head (reference) or fine probabilities summed per group."""
        if self.config.variant != "reference":
            return self._coarse_from_fine(self.predict_fine_proba(embeddings))
        return self._probabilities(embeddings, ["coarse_head"])[0]

    def predict_fine_and_coarse_proba(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(predict_fine_proba, predict_coarse_proba)`` of the same rows from one pass over them."""
        if self.config.variant != "reference":
            fine = self.predict_fine_proba(embeddings)
            return fine, self._coarse_from_fine(fine)
        fine, coarse = self._probabilities(embeddings, ["fine_head", "coarse_head"])
        return fine, coarse

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "hierarchy": self.hierarchy.to_dict(),
            "config": self.config.to_dict(),
            "embedding_dim": self.embedding_dim,
            "tensors": _describe(self._expected_shapes()),
        }

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        d, n_fine, n_coarse = self.embedding_dim, self.hierarchy.n_fine, self.hierarchy.n_coarse
        shapes = {"fine_head.weight": (n_fine, d), "fine_head.bias": (n_fine,), "feature_mean": (d,)}
        if self.config.variant == "reference":
            shapes["coarse_head.weight"] = (n_coarse, d)
            shapes["coarse_head.bias"] = (n_coarse,)
        return shapes

    def save(self, directory: str | Path) -> None:
        """Write ``weights.safetensors`` and ``metadata.json`` into ``directory``, replacing it as a whole.

        The safetensors file is the same format ``safetensors.torch`` writes, so checkpoints from the torch-based
        classifier load unchanged."""
        if self._parameters is None:
            raise ModelInputError("cannot save a classifier that is not fitted")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            tensors = {name: np.ascontiguousarray(array) for name, array in self._parameters.items()}
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
        except (OSError, SafetensorError, ValueError) as exc:
            raise ModelInputError(f"cannot read {directory / WEIGHTS_FILE}: {exc}") from exc
        expected = classifier._expected_shapes()
        actual = {name: tuple(array.shape) for name, array in tensors.items()}
        if actual != expected:
            raise ModelInputError(
                f"checkpoint {directory}: tensors {_describe(actual)} do not match its metadata {_describe(expected)}"
            )
        classifier._parameters = {name: array.astype(np.float32) for name, array in tensors.items()}
        return classifier


def _describe(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
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
    pool: PoolStatistics | None = None,
) -> float:
    """Mean fine accuracy over folds of the full-labelled samples (``folds[i]`` = -1 for the others, which
    always stay in training). ``pool``: the statistics of ``embeddings``, shared by the folds' fits."""
    pool = PoolStatistics.reusing(pool, embeddings)
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
            pool,
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
    pool: PoolStatistics | None = None,
) -> TrainingConfig:
    """Pick the candidate config with the best stratified k-fold fine accuracy on the full-labelled samples.

    ``candidates`` maps TrainingConfig fields to values; every combination is tried. Weak samples always stay
    in training. Ties go to the earlier combination. With fewer full labels than folds, or a single
    candidate, ``base_config`` with the first combination is returned without cross-validation. ``pool``: the
    statistics of ``embeddings``, shared by every fit.
    """
    if not isinstance(n_folds, int) or n_folds < 2:
        raise ModelInputError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    configs = _candidate_configs(base_config, candidates)
    pool = PoolStatistics.reusing(pool, embeddings)
    n = pool.embeddings.shape[0]
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
            hierarchy, pool.embeddings, fine, weak_coarse_labels, coarse_transition_matrix, config, folds,
            human_coarse_labels, pool,
        )
        for config in configs
    ]
    return configs[int(np.argmax(scores))]
