"""Masked batched optimizers equal one torch optimizer per client."""

from __future__ import annotations

import pytest
import torch

from fedhello.nn.optim import MaskedAdamW, MaskedSGD


def _run(kind: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n, steps = 5, 7
    banks = [torch.randn(n, 3, 4, generator=gen), torch.randn(n, 6, generator=gen)]
    masks = [[torch.rand(n, generator=gen) < 0.6 for _ in banks] for _ in range(steps)]
    grads = [[torch.randn(b.shape, generator=gen) for b in banks] for _ in range(steps)]

    batched = [b.clone() for b in banks]
    if kind == "adamw":
        opt = MaskedAdamW(batched, lr=0.05, weight_decay=0.1)
    else:
        opt = MaskedSGD(batched, lr=0.05, momentum=0.9, weight_decay=0.01)
    for s in range(steps):
        for p, g in zip(batched, grads[s]):
            p.grad = g.clone()
        opt.step(masks[s])

    # Reference: each client slice is its own leaf with its own torch optimizer, stepped
    # only when its mask is set (torch skips parameters whose grad is None).
    for c in range(n):
        leaves = [b[c].clone().requires_grad_() for b in banks]
        if kind == "adamw":
            ref = torch.optim.AdamW(leaves, lr=0.05, weight_decay=0.1)
        else:
            ref = torch.optim.SGD(leaves, lr=0.05, momentum=0.9, weight_decay=0.01)
        for s in range(steps):
            for leaf, g, m in zip(leaves, grads[s], masks[s]):
                leaf.grad = g[c].clone() if m[c] else None
            ref.step()
        for leaf, b in zip(leaves, batched):
            torch.testing.assert_close(b[c], leaf.detach(), rtol=1e-5, atol=1e-5)
    return banks, batched, masks


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_equals_per_client_optimizers(kind, seed):
    _run(kind, seed)


def test_untouched_clients_keep_values_and_state():
    p = torch.randn(3, 4)
    before = p.clone()
    opt = MaskedAdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step([torch.tensor([True, False, False])])
    assert not torch.equal(p[0], before[0])
    assert torch.equal(p[1:], before[1:])
    assert opt.state[0].step.tolist() == [1, 0, 0]
    assert (opt.state[0].exp_avg[1:] == 0).all()


def test_bad_masks_are_rejected():
    opt = MaskedAdamW([torch.zeros(3, 2)])
    with pytest.raises(ValueError, match="masks: expected bool \\[3\\]"):
        opt.step([torch.ones(3)])
    with pytest.raises(ValueError, match="masks: expected one bool"):
        opt.step([])
