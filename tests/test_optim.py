"""model.optim.Adam (numpy) makes torch.optim.Adam's updates, to float32 tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.optim import Adam


def test_adam_matches_torch_optim_adam_on_the_same_gradients():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator)]
    inputs, targets = torch.randn(64, 5, generator=generator), torch.randint(0, 7, (64,), generator=generator)

    def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        """Cross-entropy gradients of ``params`` on one slice of the data."""
        leaves = [p.detach().clone().requires_grad_() for p in params]
        rows = slice((step * 16) % 64, (step * 16) % 64 + 16)
        torch.nn.functional.cross_entropy(inputs[rows] @ leaves[0].T + leaves[1], targets[rows]).backward()
        return [leaf.grad for leaf in leaves if leaf.grad is not None]

    reference = [p.clone().requires_grad_() for p in start]
    torch_adam = torch.optim.Adam(reference, lr=0.01)
    ours = [p.numpy().copy() for p in start]
    numpy_adam = Adam(ours, lr=0.01)
    for step in range(200):
        grads = gradients(reference, step)  # the same gradients go to both
        for param, grad in zip(reference, grads):
            param.grad = grad
        torch_adam.step()
        numpy_adam.step([grad.numpy() for grad in grads])

    for mine, theirs, initial in zip(ours, reference, start):
        assert mine.dtype == np.float32
        np.testing.assert_allclose(mine, theirs.detach().numpy(), rtol=1e-6, atol=1e-6)
        assert np.abs(mine - initial.numpy()).max() > 0.1  # it moved


def test_adam_steps_each_parameter_in_place_with_its_own_gradient():
    weight, bias = np.ones((2, 3), dtype=np.float32), np.zeros(2, dtype=np.float32)
    optimiser = Adam([weight, bias], lr=0.1)
    optimiser.step([np.ones_like(weight), -np.ones_like(bias)])
    # Adam's first step moves every coordinate by lr against the sign of its gradient.
    np.testing.assert_allclose(weight, 0.9, rtol=1e-6)
    np.testing.assert_allclose(bias, 0.1, rtol=1e-6)
    with pytest.raises(ValueError, match="expected 2 gradients"):
        optimiser.step([np.ones_like(weight)])
