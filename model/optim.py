"""Adam on numpy arrays: the update torch.optim.Adam makes with its defaults on CPU (single-tensor path).

The fine-grained classifier trains with numpy so that fitting never imports torch (about 500 MB resident in every
worker that fits). ``tests/test_optim.py`` checks that the parameters after many steps equal torch.optim.Adam's on
the same gradients, to float32 tolerance."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


class Adam:
    """torch.optim.Adam(params, lr, betas, eps) without weight decay, amsgrad or maximize; updates float32 arrays
    in place."""

    def __init__(
        self, params: Iterable[np.ndarray], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.steps = 0
        self.exp_avg = [np.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [np.zeros_like(p) for p in self.params]

    def step(self, grads: Sequence[np.ndarray]) -> None:
        """One update with ``grads[i]`` the gradient of ``params[i]``."""
        if len(grads) != len(self.params):
            raise ValueError(f"expected {len(self.params)} gradients, got {len(grads)}")
        beta1, beta2 = self.betas
        self.steps += 1
        step = float(self.steps)
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for param, grad, exp_avg, exp_avg_sq in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            # torch's lerp_(grad, 1 - beta1) and mul_(beta2).addcmul_(grad, grad, value=1 - beta2), in float32.
            exp_avg += param.dtype.type(1 - beta1) * (grad - exp_avg)
            exp_avg_sq *= param.dtype.type(beta2)
            exp_avg_sq += param.dtype.type(1 - beta2) * grad * grad
            denom = np.sqrt(exp_avg_sq) / param.dtype.type(bias_correction2_sqrt) + param.dtype.type(self.eps)
            param -= param.dtype.type(step_size) * (exp_avg / denom)
