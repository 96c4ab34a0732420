"""Multi-label classifier on a frozen backbone's spatial feature maps (torch, CPU).

Three parts, each of which the benchmark's ablations switch off on its own:

- **Label-specific features**: for every label, attention pooling over the map's positions with the query taken
  from the label's text embedding: ``q_l = w_l + W e_l``, the label's classifier weight plus a learned projection
  of its MiniLM vector ``e_l`` (labels whose names read alike start from alike queries), so "cat" and "car" each
  look at their own part of a composite image. The attention scores are the positions' dot products with the
  query, as in class-specific residual attention (Zhu and Wu, ICCV 2021), which measured better with few labels
  than a separate key projection (59.9 vs 66.2 mAP at 100 label sets on openclipart-scenes' test split, 2 splits;
  neither was run on the benchmark's pool or test images). Off: every label reads the map's mean.
- **Label co-occurrence**: the logits are refined by ``gain * sigmoid(logits) @ PMI``, where PMI is the pointwise
  mutual information of label pairs in the human label sets (smoothed towards independence) and ``gain`` is learned.
- **Pseudo-labels**: the VLM's per-label answers train the model through a forward-corrected loss,
  ``P(VLM says present) = (1 - p) T[absent, present] + p T[present, present]`` with each label's 2×2 transition.

Maps are reduced to ``projection_dim`` channels by a PCA of unlabelled positions (``SpatialProjection``), fitted
once per pool: no label is read, and it is saved with the checkpoint so prediction sees what training saw.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.errors import ModelInputError
from model.finegrained import _replace_directory
from model.io import atomic_write_json
from model.multilabel.noise import LabelTransitions, validated_label_sets

CHECKPOINT_KIND = "vlm-al-multilabel"
CHECKPOINT_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
METADATA_FILE = "metadata.json"
_LOG_FLOOR = 1e-7
_PROJECTION_SAMPLE = 4096
"""Map positions the PCA is fitted on (a random sample: the top directions settle long before all are read)."""
_PMI_LIMIT = 3.0
_PMI_PRIOR_COUNT = 4.0
"""Pseudo-images of independent labels mixed into the pair counts, so that two labels seen together once in
five images do not get a large PMI."""


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


def validated_maps(maps: np.ndarray, channels: int | None = None) -> np.ndarray:
    """Spatial maps as a numeric (n, h, w, d) array (float16 stays float16 until projected)."""
    array = np.asarray(maps)
    if array.ndim != 4 or array.shape[0] == 0 or 0 in array.shape[1:]:
        raise ModelInputError(f"spatial maps must be a non-empty (n, h, w, d) array, got shape {array.shape}")
    if channels is not None and array.shape[3] != channels:
        raise ModelInputError(f"spatial maps must have {channels} channels, got {array.shape[3]}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ModelInputError(f"spatial maps must be floating point, got {array.dtype}")
    return array


@dataclass(frozen=True)
class SpatialProjection:
    """Centre and project map positions onto their top principal directions, scaled to unit mean variance."""

    mean: np.ndarray
    """float32 (d,)"""
    components: np.ndarray
    """float32 (d, k)"""

    @property
    def in_channels(self) -> int:
        return int(self.mean.shape[0])

    @property
    def out_channels(self) -> int:
        return int(self.components.shape[1])

    @classmethod
    def fit(cls, maps: np.ndarray, dim: int, seed: int = 0) -> SpatialProjection:
        array = validated_maps(maps)
        positions = array.reshape(-1, array.shape[3])
        rng = np.random.default_rng(seed)
        sample = positions[rng.choice(positions.shape[0], min(_PROJECTION_SAMPLE, positions.shape[0]), replace=False)]
        sample = sample.astype(np.float32)
        mean = sample.mean(axis=0)
        centred = sample - mean
        k = min(dim, *centred.shape)
        # Randomised range finder (Halko et al. 2011): two passes over the sample instead of a full SVD.
        range_basis, _ = np.linalg.qr(centred @ rng.standard_normal((centred.shape[1], k + 10)).astype(np.float32))
        _, singular, right = np.linalg.svd(range_basis.T @ centred, full_matrices=False)
        variance = singular[:k] ** 2 / max(centred.shape[0] - 1, 1)
        scale = np.sqrt(max(float(variance.mean()), 1e-12))
        return cls(mean=mean.astype(np.float32), components=(right[:k].T / scale).astype(np.float32))

    def transform(self, maps: np.ndarray) -> np.ndarray:
        """float32 (n, h*w, k), in chunks so a float16 pool is never held in float32 whole."""
        array = validated_maps(maps, self.in_channels)
        n, h, w, d = array.shape
        out = np.empty((n, h * w, self.out_channels), dtype=np.float32)
        for start in range(0, n, 256):
            chunk = array[start : start + 256].reshape(-1, d).astype(np.float32) - self.mean
            out[start : start + 256] = (chunk @ self.components).reshape(-1, h * w, self.out_channels)
        return out


@dataclass(frozen=True)
class MultiLabelTrainingConfig:
    label_features: bool = True
    cooccurrence: bool = True
    use_transition: bool = True
    weak_loss_weight: float = 0.5
    epochs: int = 150
    learning_rate: float = 0.02
    weight_decay: float = 1e-3
    weak_batch_size: int = 128
    """VLM-answered rows per step (shuffled once, visited in turn): the human rows are few and used whole at every
    step, while every image of a pool may carry a VLM answer."""
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("label_features", "cooccurrence", "use_transition"):
            object.__setattr__(self, name, bool(getattr(self, name)))
        for name in ("epochs", "weak_batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ModelInputError(f"{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.epochs < 1 or self.weak_batch_size < 1:
            raise ModelInputError("epochs and weak_batch_size must be positive")
        for name in ("weak_loss_weight", "learning_rate", "weight_decay"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value < 0:
                raise ModelInputError(f"{name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, value)
        if self.learning_rate <= 0:
            raise ModelInputError("learning_rate must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MultiLabelTrainingConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ModelInputError(f"unknown multi-label training config fields: {unknown}")
        return cls(**dict(data))


def cooccurrence_pmi(label_sets: np.ndarray, prior_count: float = _PMI_PRIOR_COUNT) -> np.ndarray:
    """float32 (L, L): smoothed pointwise mutual information of label pairs in human label sets, diagonal 0.

    ``P(i, j) = (n_ij + s p_i p_j) / (n + s)`` with smoothed marginals ``p_i``: with few images every pair stays
    near independence (PMI 0); the result is clipped to ±3."""
    sets = validated_label_sets("label_sets", label_sets).astype(np.float64)
    n, n_labels = sets.shape
    marginal = (sets.sum(axis=0) + 0.5) / (n + 1.0)
    joint = (sets.T @ sets + prior_count * np.outer(marginal, marginal)) / (n + prior_count)
    pmi = np.clip(np.log(joint / np.outer(marginal, marginal)), -_PMI_LIMIT, _PMI_LIMIT)
    np.fill_diagonal(pmi, 0.0)
    return pmi.astype(np.float32)


class MultiLabelClassifier:
    """See the module docstring. ``label_text`` (L, e): unit text embeddings of the label names."""

    def __init__(self, label_names: tuple[str, ...] | list[str], label_text: np.ndarray,
                 projection: SpatialProjection, config: MultiLabelTrainingConfig | None = None) -> None:
        self.label_names = tuple(str(name) for name in label_names)
        if len(self.label_names) < 1 or len(set(self.label_names)) != len(self.label_names):
            raise ModelInputError(f"need at least one label and no duplicates, got {list(self.label_names)}")
        text = np.asarray(label_text, dtype=np.float32)
        if text.ndim != 2 or text.shape[0] != len(self.label_names) or not np.all(np.isfinite(text)):
            raise ModelInputError(f"label_text must be a finite ({len(self.label_names)}, e) array, got {text.shape}")
        self.label_text = text
        self.projection = projection
        self.config = config or MultiLabelTrainingConfig()
        self._parameters: dict[str, torch.Tensor] | None = None

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_fitted(self) -> bool:
        return self._parameters is not None

    # ---- training -------------------------------------------------------------------------------------------

    def fit(self, maps: np.ndarray, human_sets: np.ndarray, human_rows: np.ndarray,
            weak_sets: np.ndarray | None = None, weak_rows: np.ndarray | None = None,
            transitions: LabelTransitions | None = None) -> MultiLabelClassifier:
        """Train from raw maps (projected here); see ``fit_projected``."""
        return self.fit_projected(self.projection.transform(maps), human_sets, human_rows, weak_sets, weak_rows,
                                  transitions)

    def fit_projected(self, positions: np.ndarray, human_sets: np.ndarray, human_rows: np.ndarray,
                      weak_sets: np.ndarray | None = None, weak_rows: np.ndarray | None = None,
                      transitions: LabelTransitions | None = None) -> MultiLabelClassifier:
        """Train from scratch on projected maps (n, P, k).

        ``human_rows``: indices (or a bool mask) of rows whose ``human_sets`` row is a human's label set (an
        empty set is a valid "none of these"). ``weak_rows``: rows trained on the VLM's answers ``weak_sets``,
        forward-corrected with ``transitions`` (clean when None or ``use_transition`` is off); rows with a human
        label are dropped from them. At least one human label set is needed."""
        features = self._checked_positions(positions)
        n = features.shape[0]
        truth = validated_label_sets("human_sets", human_sets, self.n_labels, n)
        human = _row_indices("human_rows", human_rows, n)
        if human.size == 0:
            raise ModelInputError("no human label sets: the multi-label model cannot be trained")
        weak = np.empty(0, dtype=np.int64)
        weak_answers = np.zeros((n, self.n_labels), dtype=bool)
        if weak_sets is not None and weak_rows is not None and self.config.weak_loss_weight > 0:
            weak_answers = validated_label_sets("weak_sets", weak_sets, self.n_labels, n)
            weak = np.setdiff1d(_row_indices("weak_rows", weak_rows, n), human)
        if transitions is not None and transitions.n_labels != self.n_labels:
            raise ModelInputError(f"transitions are for {transitions.n_labels} labels, the model has {self.n_labels}")
        corrected = transitions if (transitions is not None and self.config.use_transition) else None
        with _torch_threads(self.config.num_threads):
            self._parameters = self._optimise(
                torch.from_numpy(features[human]), torch.from_numpy(truth[human].astype(np.float32)),
                torch.from_numpy(features[weak]), torch.from_numpy(weak_answers[weak].astype(np.float32)),
                None if corrected is None else torch.from_numpy(corrected.matrices.astype(np.float32)),
                cooccurrence_pmi(truth[human]),
            )
        return self

    def _checked_positions(self, positions: np.ndarray) -> np.ndarray:
        array = np.asarray(positions, dtype=np.float32)
        if array.ndim != 3 or array.shape[2] != self.projection.out_channels or array.shape[0] == 0:
            raise ModelInputError(
                f"projected maps must be (n, positions, {self.projection.out_channels}), got {array.shape}")
        if not np.all(np.isfinite(array)):
            raise ModelInputError("projected maps contain NaN or inf")
        return array

    def _initial_parameters(self) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.config.seed)
        k, e, n_labels = self.projection.out_channels, self.label_text.shape[1], self.n_labels

        def random(*shape: int, scale: float) -> torch.Tensor:
            return torch.randn(*shape, generator=generator) * scale

        return {
            "global_head.weight": random(n_labels, k, scale=0.01),
            "bias": torch.zeros(n_labels),
            "label_head.weight": random(n_labels, k, scale=0.01),
            "text_to_query": random(e, k, scale=0.01),
            "cooccurrence_gain": torch.zeros(()),
        }

    def _logits(self, parameters: Mapping[str, torch.Tensor], positions: torch.Tensor,
                pmi: torch.Tensor) -> torch.Tensor:
        logits = F.linear(positions.mean(dim=1), parameters["global_head.weight"], parameters["bias"])
        if self.config.label_features:
            queries = parameters["global_head.weight"] + torch.from_numpy(self.label_text) @ parameters["text_to_query"]
            attention = torch.softmax(torch.einsum("npk,lk->nlp", positions, queries), dim=2)  # over positions
            pooled = torch.einsum("nlp,npk->nlk", attention, positions)  # (n, L, k): one feature per label
            logits = logits + (pooled * parameters["label_head.weight"]).sum(dim=2)
        if self.config.cooccurrence:
            logits = logits + parameters["cooccurrence_gain"] * (torch.sigmoid(logits) @ pmi)
        return logits

    def _optimise(self, human_x: torch.Tensor, human_y: torch.Tensor, weak_x: torch.Tensor, weak_y: torch.Tensor,
                  transition: torch.Tensor | None, pmi: np.ndarray) -> dict[str, torch.Tensor]:
        config = self.config
        pmi_tensor = torch.from_numpy(pmi)
        parameters = {name: tensor.requires_grad_() for name, tensor in self._initial_parameters().items()}
        optimiser = torch.optim.Adam(parameters.values(), lr=config.learning_rate)
        decayed = [parameters[name] for name in ("global_head.weight", "label_head.weight", "text_to_query")]
        order = torch.from_numpy(np.random.default_rng(config.seed).permutation(weak_x.shape[0]))
        weak_x, weak_y = weak_x[order], weak_y[order]
        n_chunks = max(1, -(-weak_x.shape[0] // config.weak_batch_size))
        bounds = np.linspace(0, weak_x.shape[0], n_chunks + 1).round().astype(int)
        for step in range(config.epochs):
            optimiser.zero_grad(set_to_none=True)
            loss = F.binary_cross_entropy_with_logits(self._logits(parameters, human_x, pmi_tensor), human_y)
            start, stop = bounds[step % n_chunks], bounds[step % n_chunks + 1]
            if stop > start:
                present = torch.sigmoid(self._logits(parameters, weak_x[start:stop], pmi_tensor))
                if transition is not None:
                    # P(VLM says present) per row and label, from each label's 2×2 transition.
                    present = (1 - present) * transition[:, 0, 1] + present * transition[:, 1, 1]
                present = present.clamp(_LOG_FLOOR, 1 - _LOG_FLOOR)
                loss = loss + config.weak_loss_weight * F.binary_cross_entropy(present, weak_y[start:stop])
            loss = loss + 0.5 * config.weight_decay * sum(p.square().sum() for p in decayed)
            loss.backward()
            optimiser.step()
        fitted = {name: tensor.detach().clone() for name, tensor in parameters.items()}
        fitted["cooccurrence_pmi"] = pmi_tensor.clone()
        return fitted

    # ---- prediction -----------------------------------------------------------------------------------------

    def predict_proba(self, maps: np.ndarray) -> np.ndarray:
        return self.predict_proba_projected(self.projection.transform(maps))

    def predict_proba_projected(self, positions: np.ndarray) -> np.ndarray:
        """float32 (n, L): P(label present) for every row, each label on its own."""
        if self._parameters is None:
            raise ModelInputError("the multi-label classifier is not fitted yet: call fit() or load() first")
        features = self._checked_positions(positions)
        out = np.empty((features.shape[0], self.n_labels), dtype=np.float32)
        with _torch_threads(self.config.num_threads), torch.inference_mode():
            for start in range(0, features.shape[0], 512):
                chunk = torch.from_numpy(features[start : start + 512])
                logits = self._logits(self._parameters, chunk, self._parameters["cooccurrence_pmi"])
                out[start : start + 512] = torch.sigmoid(logits).numpy()
        return out

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def _expected_shapes(self) -> dict[str, list[int]]:
        shapes = {name: list(t.shape) for name, t in self._initial_parameters().items()}
        n_labels = self.n_labels
        shapes.update({"cooccurrence_pmi": [n_labels, n_labels], "label_text": list(self.label_text.shape),
                       "projection.mean": [self.projection.in_channels],
                       "projection.components": [self.projection.in_channels, self.projection.out_channels]})
        return dict(sorted(shapes.items()))

    def save(self, directory: str | Path) -> None:
        """``weights.safetensors`` + ``metadata.json``, replacing ``directory`` as a whole (as the fine model)."""
        if self._parameters is None:
            raise ModelInputError("cannot save a multi-label classifier that is not fitted")
        target = Path(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            tensors = {name: t.contiguous() for name, t in self._parameters.items()}
            tensors["label_text"] = torch.from_numpy(np.ascontiguousarray(self.label_text))
            tensors["projection.mean"] = torch.from_numpy(np.ascontiguousarray(self.projection.mean))
            tensors["projection.components"] = torch.from_numpy(np.ascontiguousarray(self.projection.components))
            save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": CHECKPOINT_KIND})
            atomic_write_json(staging / METADATA_FILE, {
                "kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION,
                "label_names": list(self.label_names), "config": self.config.to_dict(),
                "tensors": self._expected_shapes(),
            })
            _replace_directory(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: str | Path, expected_labels: tuple[str, ...] | None = None) -> MultiLabelClassifier:
        directory = Path(directory)
        path = directory / METADATA_FILE
        try:
            metadata = json.loads(path.read_text())
            if metadata.get("kind") != CHECKPOINT_KIND or metadata.get("format_version") != CHECKPOINT_FORMAT_VERSION:
                raise ModelInputError(f"{path}: not a multi-label checkpoint of format {CHECKPOINT_FORMAT_VERSION}")
            label_names = tuple(metadata["label_names"])
            config = MultiLabelTrainingConfig.from_dict(metadata["config"])
            tensors = load_file(str(directory / WEIGHTS_FILE))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise ModelInputError(f"cannot read the multi-label checkpoint in {directory}: {exc}") from exc
        if expected_labels is not None and tuple(expected_labels) != label_names:
            raise ModelInputError(f"checkpoint {directory} was trained on labels {list(label_names)}, "
                                  f"expected {list(expected_labels)}")
        try:
            projection = SpatialProjection(tensors.pop("projection.mean").numpy(),
                                           tensors.pop("projection.components").numpy())
            classifier = cls(label_names, tensors.pop("label_text").numpy(), projection, config)
        except KeyError as exc:
            raise ModelInputError(f"checkpoint {directory} lacks the tensor {exc}") from exc
        expected = {k: v for k, v in classifier._expected_shapes().items()
                    if not k.startswith(("projection.", "label_text"))}
        actual = {name: list(t.shape) for name, t in sorted(tensors.items())}
        if actual != expected:
            raise ModelInputError(f"checkpoint {directory}: tensors {actual} do not match {expected}")
        classifier._parameters = {name: t.to(torch.float32) for name, t in tensors.items()}
        return classifier


def _row_indices(name: str, rows: np.ndarray, n: int) -> np.ndarray:
    array = np.asarray(rows)
    if array.dtype == bool:
        if array.shape != (n,):
            raise ModelInputError(f"{name} as a mask must have shape ({n},), got {array.shape}")
        return np.flatnonzero(array)
    array = array.astype(np.int64).reshape(-1)
    if np.any((array < 0) | (array >= n)):
        raise ModelInputError(f"{name} has rows outside [0, {n})")
    return np.unique(array)
