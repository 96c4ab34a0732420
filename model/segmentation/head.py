"""A small segmentation head on the frozen feature map, trained with per-pixel weights.

The map's channels are first projected by PCA (fitted on the pool's cells): 1280 channels hold far more than a
head trained on tens of masks can use, and the projection makes each training step cheap on a CPU. The head is
a per-cell layer, a 3x3 convolution for context, and a per-cell classifier; its logits are upsampled bilinearly
to the mask's resolution, where the loss is a per-pixel weighted cross-entropy: human masks weigh 1, pseudo-mask
pixels their reliability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelInputError


@dataclass(frozen=True)
class HeadSettings:
    """``components``: PCA dimensions; ``hidden``: channels of the head; ``steps`` of Adam at ``learning_rate``,
    each on every human mask plus ``pseudo_batch`` pseudo-masked images; ``pseudo_loss_weight`` scales the
    pseudo-mask term against the human one."""

    components: int = 96
    hidden: int = 32
    steps: int = 80
    learning_rate: float = 5e-3
    weight_decay: float = 1e-4
    pseudo_batch: int = 32
    pseudo_loss_weight: float = 1.0
    seed: int = 0


class FeatureProjection:
    """PCA of the map's cells: ``project`` gives float32 (n, k, h, w), channels first, ready for convolutions."""

    def __init__(self, mean: np.ndarray, components: np.ndarray) -> None:
        self.mean = mean.astype(np.float32)
        self.components = components.astype(np.float32)

    @staticmethod
    def fit(features: np.ndarray, n_components: int, *, max_cells: int = 8000, seed: int = 0) -> FeatureProjection:
        cells: np.ndarray = np.asarray(features, dtype=np.float32).reshape(-1, features.shape[-1])
        if cells.shape[0] > max_cells:
            cells = cells[np.random.default_rng(seed).choice(cells.shape[0], max_cells, replace=False)]
        mean = cells.mean(axis=0)
        centred = cells - mean
        # The covariance's eigenvectors (a d x d problem) rather than an SVD of every cell: the same directions,
        # a fraction of the cost for thousands of cells.
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / max(cells.shape[0] - 1, 1))
        k = min(n_components, eigenvectors.shape[1])
        top = np.argsort(eigenvalues)[::-1][:k]
        # Whitened: every kept direction has unit variance, so one learning rate suits them all.
        scale = np.sqrt(np.maximum(eigenvalues[top], 0.0)) + 1e-6
        return FeatureProjection(mean, (eigenvectors[:, top] / scale).T)

    def project(self, features: np.ndarray) -> np.ndarray:
        n, h, w, d = features.shape
        out = np.empty((n, self.components.shape[0], h, w), dtype=np.float32)
        for start in range(0, n, 256):
            chunk = np.asarray(features[start : start + 256], dtype=np.float32).reshape(-1, d) - self.mean
            projected = (chunk @ self.components.T).reshape(-1, h, w, self.components.shape[0])
            out[start : start + 256] = projected.transpose(0, 3, 1, 2)
        return out


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

    def fit(self, maps: np.ndarray, human: np.ndarray, human_masks: np.ndarray, pseudo: np.ndarray | None = None,
            pseudo_masks: np.ndarray | None = None, pseudo_weights: np.ndarray | None = None) -> SegmentationHead:
        """``maps`` (n, k, h, w) projected; ``human`` indices with ``human_masks`` uint8 (len, s, s); optionally
        ``pseudo`` indices with ``pseudo_masks`` and per-pixel ``pseudo_weights`` in [0, 1] (same shape)."""
        settings = self.settings
        human = np.asarray(human, dtype=np.int64)
        x = torch.from_numpy(maps)
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
                    logits = self._logits(x[human], side)
                    loss = loss + F.cross_entropy(logits, human_y)
                if has_pseudo:
                    batch = generator.choice(pseudo_rows.size, min(settings.pseudo_batch, pseudo_rows.size),
                                             replace=False)
                    logits = self._logits(x[pseudo_rows[batch]], side)
                    per_pixel = F.cross_entropy(logits, pseudo_y[batch], reduction="none")
                    weights = pseudo_w[batch]
                    loss = loss + settings.pseudo_loss_weight * (per_pixel * weights).sum() / weights.sum().clamp_min(1.0)
                loss.backward()
                optimiser.step()
        self.net.eval()
        return self

    def _logits(self, x: torch.Tensor, side: int) -> torch.Tensor:
        return F.interpolate(self.net(x), size=(side, side), mode="bilinear", align_corners=False)

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
                out[start : start + 32] = self._logits(torch.from_numpy(maps[start : start + 32]), side).argmax(1)
        return out
