"""A small segmentation head on frozen hypercolumns, trained with per-pixel weights.

The pyramid's maps are first brought to one map at the finest stride (``HypercolumnProjection``: the final map
PCA-whitened and upsampled, the finer stages standardised). The head is a per-cell layer, a 3x3 convolution for
context, and a per-cell classifier; its logits are upsampled bilinearly to the mask's resolution, where the loss
is a per-pixel weighted cross-entropy: human masks weigh 1, pseudo-mask pixels their confidence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelInputError
from model.spatial_features import FeaturePyramid

MapSource = Callable[[np.ndarray], np.ndarray]
"""Rows of the pool -> their projected maps, float32 (len(rows), k, h, w): computed per batch, so a pool's
hypercolumns (0.8 MB per image in float32) are never all held at once."""


@dataclass(frozen=True)
class HeadSettings:
    """``components``: PCA dimensions of the final map; ``hidden``: channels of the head; ``steps`` of Adam at
    ``learning_rate``, each on up to ``human_batch`` human masks plus ``pseudo_batch`` pseudo-masked images;
    ``pseudo_loss_weight`` scales the pseudo-mask term against the human one."""

    components: int = 96
    hidden: int = 48
    steps: int = 80
    human_batch: int = 32
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    pseudo_batch: int = 32
    pseudo_loss_weight: float = 1.0
    seed: int = 0


class HypercolumnProjection:
    """A ``FeaturePyramid`` as one map per image at its finest stride (a hypercolumn per cell), channels first:
    the coarse map's channels PCA-whitened to ``k`` (1280 channels hold far more than a head trained on tens of
    masks can use), upsampled bilinearly, then every detail stage's channels standardised and upsampled likewise.
    ``project`` gives float32 (n, k + sum of detail channels, H, W)."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, detail_means: Sequence[np.ndarray],
                 detail_scales: Sequence[np.ndarray]) -> None:
        self.mean = np.asarray(mean, dtype=np.float32)
        self.components = np.asarray(components, dtype=np.float32)
        self.detail_means = [np.asarray(m, dtype=np.float32) for m in detail_means]
        self.detail_scales = [np.asarray(s, dtype=np.float32) for s in detail_scales]

    @property
    def channels(self) -> int:
        return int(self.components.shape[0] + sum(m.size for m in self.detail_means))

    @staticmethod
    def fit(pyramid: FeaturePyramid, n_components: int, *, max_cells: int = 8000, seed: int = 0
            ) -> HypercolumnProjection:
        rng = np.random.default_rng(seed)
        cells = _sample_cells(pyramid.coarse, max_cells, rng)
        mean = cells.mean(axis=0)
        centred = cells - mean
        # The covariance's eigenvectors (a d x d problem) rather than an SVD of every cell: the same directions,
        # a fraction of the cost for thousands of cells.
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / max(cells.shape[0] - 1, 1))
        k = min(n_components, eigenvectors.shape[1])
        top = np.argsort(eigenvalues)[::-1][:k]
        # Whitened: every kept direction has unit variance, so one learning rate suits them all.
        scale = np.sqrt(np.maximum(eigenvalues[top], 0.0)) + 1e-6
        detail_cells = [_sample_cells(detail, max_cells, rng) for detail in pyramid.details]
        return HypercolumnProjection(mean, (eigenvectors[:, top] / scale).T, [c.mean(axis=0) for c in detail_cells],
                                     [c.std(axis=0) + 1e-5 for c in detail_cells])

    def project(self, pyramid: FeaturePyramid) -> np.ndarray:
        if len(pyramid.details) != len(self.detail_means):
            raise ModelInputError(f"the projection was fitted on {len(self.detail_means)} detail stages, "
                                  f"got {len(pyramid.details)}")
        n = len(pyramid)
        side = max([pyramid.coarse.shape[1], *(d.shape[1] for d in pyramid.details)])
        out = np.empty((n, self.channels, side, side), dtype=np.float32)
        for start in range(0, n, 64):
            rows = slice(start, start + 64)
            coarse = np.asarray(pyramid.coarse[rows], dtype=np.float32)
            h, w, d = coarse.shape[1:]
            projected = ((coarse.reshape(-1, d) - self.mean) @ self.components.T).reshape(-1, h, w,
                                                                                          self.components.shape[0])
            parts = [projected] + [(np.asarray(detail[rows], dtype=np.float32) - m) / s
                                   for detail, m, s in zip(pyramid.details, self.detail_means, self.detail_scales)]
            channel = 0
            for part in parts:
                tensor = torch.from_numpy(np.ascontiguousarray(part.transpose(0, 3, 1, 2)))
                if tensor.shape[-1] != side:
                    tensor = F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False)
                out[rows, channel : channel + tensor.shape[1]] = tensor.numpy()
                channel += tensor.shape[1]
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"mean": self.mean, "components": self.components}
        for i, (m, s) in enumerate(zip(self.detail_means, self.detail_scales)):
            arrays[f"detail_mean_{i}"], arrays[f"detail_scale_{i}"] = m, s
        return arrays

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray]) -> HypercolumnProjection:
        stages = sum(1 for key in arrays if key.startswith("detail_mean_"))
        return HypercolumnProjection(arrays["mean"], arrays["components"],
                                     [arrays[f"detail_mean_{i}"] for i in range(stages)],
                                     [arrays[f"detail_scale_{i}"] for i in range(stages)])


class ProjectedPool:
    """A ``MapSource`` over one pool: its rows' hypercolumns, projected on demand, or all at once (kept as
    float16) when they fit in ``memo_bytes``: every training step reads a few dozen rows, so a pool that fits is
    projected once per fit instead of once per step."""

    def __init__(self, pyramid: FeaturePyramid, projection: HypercolumnProjection, *,
                 memo_bytes: int = 512 * 1024 * 1024) -> None:
        self.pyramid = pyramid
        self.projection = projection
        side = max([pyramid.coarse.shape[1], *(d.shape[1] for d in pyramid.details)])
        self._memo: np.ndarray | None = None
        if len(pyramid) * projection.channels * side * side * 2 <= memo_bytes:
            self._memo = np.concatenate([projection.project(pyramid.take(slice(start, start + 256)))
                                         .astype(np.float16) for start in range(0, len(pyramid), 256)])

    def __len__(self) -> int:
        return len(self.pyramid)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if self._memo is not None:
            return self._memo[rows].astype(np.float32)
        # Sorted rows read a memory-mapped pyramid in order; the result is put back in the order asked for.
        order = np.argsort(rows)
        return self.projection.project(self.pyramid.take(rows[order]))[np.argsort(order)]


def _sample_cells(maps: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (<= max_cells, c): cells of a few images' maps, drawn without building every cell in float32."""
    n, h, w, c = maps.shape
    per_image = h * w
    # At least 64 images, so that a fine stage's statistics (784 cells per image) are not those of a handful.
    images = np.sort(rng.choice(n, min(n, max(64, -(-max_cells // per_image))), replace=False))
    cells: np.ndarray = np.asarray(maps[images], dtype=np.float32).reshape(-1, c)
    if cells.shape[0] > max_cells:
        cells = cells[rng.choice(cells.shape[0], max_cells, replace=False)]
    return cells


class _HeadNet(nn.Module):
    def __init__(self, channels: int, hidden: int, n_classes: int) -> None:
        super().__init__()
        self.cells = nn.Conv2d(channels, hidden, 1)
        self.context = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.classify = nn.Conv2d(hidden, n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.cells(x))
        x = x + F.relu(self.context(x))
        return self.classify(x)


class SegmentationHead:
    """``fit`` on projected maps with per-pixel targets and weights; ``predict_proba`` at any resolution."""

    def __init__(self, n_classes: int, channels: int, settings: HeadSettings = HeadSettings()) -> None:
        if n_classes < 2:
            raise ModelInputError(f"a segmentation head needs at least 2 classes (background + 1), got {n_classes}")
        self.n_classes = n_classes
        self.settings = settings
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.net = _HeadNet(channels, settings.hidden, n_classes)

    def fit(self, maps: MapSource, human: np.ndarray, human_masks: np.ndarray, pseudo: np.ndarray | None = None,
            pseudo_masks: np.ndarray | None = None, pseudo_weights: np.ndarray | None = None) -> SegmentationHead:
        """``maps`` gives the projected maps of pool rows; ``human`` rows with ``human_masks`` uint8 (len, s, s);
        optionally ``pseudo`` rows with ``pseudo_masks`` and per-pixel ``pseudo_weights`` in [0, 1] (same
        shape)."""
        settings = self.settings
        human = np.asarray(human, dtype=np.int64)
        human_y = torch.from_numpy(np.asarray(human_masks, dtype=np.int64))
        pseudo_rows = np.asarray(pseudo if pseudo is not None else [], dtype=np.int64)
        has_pseudo = pseudo_rows.size > 0
        if not has_pseudo and human.size == 0:
            raise ModelInputError("the segmentation head needs human masks or pseudo-masks to learn from")
        if has_pseudo:
            if pseudo_masks is None or pseudo_weights is None:
                raise ModelInputError("pseudo-masked rows need their pseudo_masks and pseudo_weights")
            pseudo_y = torch.from_numpy(np.asarray(pseudo_masks, dtype=np.int64))
            pseudo_w = torch.from_numpy(np.asarray(pseudo_weights, dtype=np.float32))
        side = int(human_masks.shape[-1] if human.size or pseudo_masks is None else pseudo_masks.shape[-1])
        optimiser = torch.optim.Adam(self.net.parameters(), lr=settings.learning_rate,
                                     weight_decay=settings.weight_decay)
        generator = np.random.default_rng(settings.seed)
        self.net.train()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            for _ in range(settings.steps):
                optimiser.zero_grad()
                loss = torch.zeros(())
                if human.size:
                    batch = (np.arange(human.size) if human.size <= settings.human_batch
                             else np.sort(generator.choice(human.size, settings.human_batch, replace=False)))
                    logits = self._logits(torch.from_numpy(maps(human[batch])), side)
                    loss = loss + F.cross_entropy(logits, human_y[batch])
                if has_pseudo:
                    batch = generator.choice(pseudo_rows.size, min(settings.pseudo_batch, pseudo_rows.size),
                                             replace=False)
                    logits = self._logits(torch.from_numpy(maps(pseudo_rows[batch])), side)
                    per_pixel = F.cross_entropy(logits, pseudo_y[batch], reduction="none")
                    weights = pseudo_w[batch]
                    loss = loss + settings.pseudo_loss_weight * (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)
                loss.backward()
                optimiser.step()
        self.net.eval()
        return self

    def _logits(self, x: torch.Tensor, side: int) -> torch.Tensor:
        logits = self.net(x)
        if logits.shape[-1] == side and logits.shape[-2] == side:
            return logits
        return F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)

    def predict_proba(self, maps: np.ndarray, side: int) -> np.ndarray:
        """float32 (n, n_classes, side, side)."""
        out = np.empty((maps.shape[0], self.n_classes, side, side), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, maps.shape[0], 64):
                logits = self._logits(torch.from_numpy(maps[start : start + 64]), side)
                out[start : start + 64] = torch.softmax(logits, dim=1).numpy()
        return out

    def predict(self, maps: np.ndarray, side: int) -> np.ndarray:
        """uint8 (n, side, side): the most probable class per pixel, chunk by chunk (full-size probabilities of
        a whole split would not fit in memory)."""
        out = np.empty((maps.shape[0], side, side), dtype=np.uint8)
        with torch.inference_mode():
            for start in range(0, maps.shape[0], 32):
                out[start : start + 32] = self._logits(torch.from_numpy(maps[start : start + 32]), side).argmax(1).numpy()
        return out

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The network's parameters as float32 arrays (saved without pickle)."""
        return {name: tensor.detach().numpy().copy() for name, tensor in self.net.state_dict().items()}

    def load_state_arrays(self, arrays: Mapping[str, np.ndarray]) -> SegmentationHead:
        try:
            self.net.load_state_dict({name: torch.from_numpy(np.asarray(array)) for name, array in arrays.items()})
        except (RuntimeError, KeyError) as exc:
            raise ModelInputError(f"the saved segmentation head does not fit this network: {exc}") from exc
        self.net.eval()
        return self
