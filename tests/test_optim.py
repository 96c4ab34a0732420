"""model.optim.Adam makes torch.optim.Adam's updates bit for bit, and fitting no longer imports torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import torch

from model.optim import Adam


def test_adam_matches_torch_optim_adam_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(7, 5, generator=generator), torch.randn(7, generator=generator)]
    unused = torch.randn(3, generator=generator)  # no gradient: left alone by both
    inputs, targets = torch.randn(64, 5, generator=generator), torch.randint(0, 7, (64,), generator=generator)

    def train(make_optimiser):
        params = [p.clone().requires_grad_() for p in [*start, unused]]
        optimiser = make_optimiser(params)
        for step in range(60):
            optimiser.zero_grad()
            rows = slice((step * 16) % 64, (step * 16) % 64 + 16)
            logits = inputs[rows] @ params[0].T + params[1]
            torch.nn.functional.cross_entropy(logits, targets[rows]).backward()
            optimiser.step()
        return [p.detach() for p in params]

    ours = train(lambda params: Adam(params, lr=0.01))
    reference = train(lambda params: torch.optim.Adam(params, lr=0.01))
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)
    assert torch.equal(ours[2], unused)


def test_a_fine_grained_fit_does_not_import_torch_dynamo():
    script = (
        "import sys, numpy as np\n"
        "from model.finegrained import FineGrainedClassifier\n"
        "from model.hierarchy import LabelHierarchy\n"
        "h = LabelHierarchy.from_groups({'X': ['a', 'b'], 'Y': ['c']})\n"
        "rng = np.random.default_rng(0)\n"
        "x = rng.standard_normal((40, 8)).astype(np.float32)\n"
        "fine = np.array([0, 1, 2, -1] * 10)\n"
        "clf = FineGrainedClassifier(h, 8)\n"
        "clf.fit(x, fine_labels=fine)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
