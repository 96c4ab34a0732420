"""Adam written out: the update torch.optim.Adam makes with its defaults on CPU (single-tensor path), step for step.

torch.optim imports torch._dynamo on the first optimiser call (``torch._disable_dynamo`` around its methods): about
180 MB resident in every process that fits, for a compiler these fits never use. ``tests/test_optim.py`` checks that
the parameters after many steps equal torch.optim.Adam's bit for bit."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class Adam:
    """torch.optim.Adam(params, lr, betas, eps) without weight decay, amsgrad, maximize or foreach kernels."""

    def __init__(
        self, params: Iterable[torch.Tensor], lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        # torch keeps the step count in a float32 tensor and reads it back as a Python float: the same numbers.
        step = float(self.steps)
        step_size = self.lr / (1 - beta1**step)
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        for param, exp_avg, exp_avg_sq in zip(self.params, self.exp_avg, self.exp_avg_sq):
            grad = param.grad
            if grad is None:
                continue
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)
