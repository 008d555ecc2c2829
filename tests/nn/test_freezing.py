"""Freezing that holds: frozen and unrouted slots stay bit-identical under AdamW with momentum and decay."""

from __future__ import annotations

import pytest
import torch

from fedhello.nn import inject_multi_lora

from .tiny import ARCHS, make_batch, make_model, randomize_banks

N, RANK, ALPHA = 4, 4, 8.0
IDS = torch.tensor([0, 0, 1, 1, 2, 2])  # slot 3 gets no rows: it is absent from every batch


def _model():
    model = inject_multi_lora(make_model("bert"), ARCHS["bert"].targets, N, rank=RANK, alpha=ALPHA,
                              backend="torch")
    randomize_banks(model)
    return model.train()


def _backward(model, step: int) -> None:
    batch = make_batch("bert", len(IDS), seed=10 + step)
    labels = torch.arange(len(IDS)) % 3
    with model.route(IDS):
        logits = model(**batch).logits
    torch.nn.functional.cross_entropy(logits, labels).backward()


def _snapshot(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.optimizer_banks()]


def _frozen_slot_1() -> torch.Tensor:
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[:, 1] = False  # slot 1: every block frozen
    mask[0, 2] = False  # slot 2: block 0 frozen, block 1 trained
    return mask


def _block_of_banks(model) -> list[int | None]:
    return [block for _, block, _ in model.lora_banks()] + [None] * len(model.head_banks())


def test_plain_adamw_moves_frozen_and_absent_slots():
    """Why masked_optimizer exists: torch.optim.AdamW over the banks moves a frozen slot (momentum)
    and an absent one (weight decay), though their gradients are zero."""
    model = _model()
    opt = torch.optim.AdamW(model.optimizer_banks(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    model.set_trainable(_frozen_slot_1())
    before = _snapshot(model)
    lora_a = model.optimizer_banks()[0]
    for step in range(2, 5):
        _backward(model, step)
        assert not lora_a.grad[1].any() and not lora_a.grad[3].any()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(lora_a[1], before[0][1])  # frozen slot moved
    assert not torch.equal(lora_a[3], before[0][3])  # absent slot moved


@pytest.mark.parametrize("freeze_after", [0, 2])
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_masked_optimizer_keeps_frozen_and_absent_slots_bit_identical(name, freeze_after):
    model = _model()
    opt = model.masked_optimizer(name, lr=1e-2, weight_decay=0.1, momentum=0.9)
    start = _snapshot(model)
    for step in range(freeze_after):
        _backward(model, step)
        opt.step(model.step_masks(IDS))
        opt.zero_grad()
    model.set_trainable(_frozen_slot_1())
    frozen = _snapshot(model)
    for step in range(freeze_after, freeze_after + 5):
        _backward(model, step)
        opt.step(model.step_masks(IDS))
        opt.zero_grad()

    blocks = _block_of_banks(model)
    for bank, was_start, was_frozen, block in zip(model.optimizer_banks(), start, frozen, blocks):
        assert torch.equal(bank[3], was_start[3])  # absent from every batch: adapters and head untouched
        assert not torch.equal(bank[0], was_frozen[0])  # trained throughout
        if block is None:  # heads have no trainable mask: every routed slot trains its head
            assert not torch.equal(bank[1], was_frozen[1])
            continue
        assert torch.equal(bank[1], was_frozen[1])  # frozen in every block
        assert torch.equal(bank[2], was_frozen[2]) == (block == 0)  # frozen in block 0 only


def test_step_masks_follow_routing_and_trainable_blocks():
    model = _model()
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[1, 0] = False
    model.set_trainable(mask)
    masks = model.step_masks(torch.tensor([-1, 0, 2, 2]))
    blocks = _block_of_banks(model)
    assert len(masks) == len(model.optimizer_banks())
    for m, block in zip(masks, blocks):
        routed = torch.tensor([True, False, True, False])
        assert torch.equal(m, routed & mask[block] if block is not None else routed)
    assert all(torch.equal(m, torch.tensor([False, False, True, False]) & (mask[b] if b is not None else True))
               for m, b in zip(model.step_masks(2), blocks))
    assert not any(m.any() for m in model.step_masks(-1))
    with pytest.raises(ValueError, match=r"client_ids: expected values in \[-1, 4\)"):
        model.step_masks(torch.tensor([0, 4]))
