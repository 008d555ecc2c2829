"""One batched pass over N clients equals N separate PEFT models (outputs and gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from fedhello.nn import inject_multi_lora

from .tiny import ARCHS, LABELS, make_batch, make_model, peft_client, peft_grads, randomize_banks, select

N, RANK, ALPHA = 5, 4, 8.0
# Every client, some twice, unsorted, plus one sample routed to the frozen base model.
CLIENTS = torch.tensor([3, 0, 4, 1, 1, 2, 0, 3, 4, 2, -1])
HET_RANKS = [4, 2, 3, 1, 4]
TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(arch: str, ranks: list[int] | None = None):
    pristine = make_model(arch)
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS[arch].targets, N, rank=RANK, ranks=ranks,
                              alpha=ALPHA, backend="torch")
    randomize_banks(model)
    return pristine, model


def _rows(client: int) -> torch.Tensor:
    return (CLIENTS == client).nonzero().flatten()


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "vit"])
def test_fresh_banks_leave_outputs_unchanged(arch):
    pristine = make_model(arch)
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS[arch].targets, N, rank=RANK, alpha=ALPHA,
                              backend="torch")
    batch = make_batch(arch, len(CLIENTS))
    with torch.no_grad(), model.route(CLIENTS):
        out = model(**batch).logits
    torch.testing.assert_close(out, pristine(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("ranks", [None, HET_RANKS], ids=["uniform", "hetlora"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2", "vit"])
def test_batched_forward_matches_peft_per_client(arch, ranks):
    pristine, model = _setup(arch, ranks)
    batch = make_batch(arch, len(CLIENTS))
    with torch.no_grad(), model.route(CLIENTS):
        logits = model(**batch).logits
    assert logits.shape == (len(CLIENTS), LABELS)
    rank_of = ranks or [RANK] * N
    for c in range(N):
        reference = peft_client(pristine, arch, model.client_state(c), rank_of[c], ALPHA)
        with torch.no_grad():
            expected = reference(**select(batch, _rows(c))).logits
        torch.testing.assert_close(logits[_rows(c)], expected, **TOL)
    with torch.no_grad():
        base = pristine(**select(batch, _rows(-1))).logits
    torch.testing.assert_close(logits[_rows(-1)], base, **TOL)


def _client_mean_loss(logits: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum over clients of each client's mean cross-entropy (the engine's loss; -1 rows count alone)."""
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    counts = torch.bincount(ids + 1, minlength=N + 1).to(per_sample.dtype)
    return (per_sample / counts[ids + 1]).sum()


@pytest.mark.parametrize("ranks", [None, HET_RANKS], ids=["uniform", "hetlora"])
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_gradients_match_peft_per_client(arch, ranks):
    pristine, model = _setup(arch, ranks)
    batch = make_batch(arch, len(CLIENTS))
    labels = torch.randint(0, LABELS, (len(CLIENTS),), generator=torch.Generator().manual_seed(5))
    with model.route(CLIENTS):
        logits = model(**batch).logits
    _client_mean_loss(logits, labels, CLIENTS).backward()
    banks = {name: p for name, _, p in model.lora_banks()} | dict(model.head_banks())

    rank_of = ranks or [RANK] * N
    for c in range(N):
        reference = peft_client(pristine, arch, model.client_state(c), rank_of[c], ALPHA)
        rows = _rows(c)
        F.cross_entropy(reference(**select(batch, rows)).logits, labels[rows]).backward()
        expected = peft_grads(reference)
        assert set(expected) == set(banks)
        r = rank_of[c]
        for name, grad in expected.items():
            got = banks[name].grad[c]
            if name.endswith(".lora_a"):
                torch.testing.assert_close(got[:r], grad, **TOL)
                assert torch.count_nonzero(got[r:]) == 0, f"{name}: rank slices beyond r_c got gradient"
            elif name.endswith(".lora_b"):
                torch.testing.assert_close(got[:, :r], grad, **TOL)
                assert torch.count_nonzero(got[:, r:]) == 0, f"{name}: rank slices beyond r_c got gradient"
            else:
                torch.testing.assert_close(got, grad, **TOL)
            assert grad.abs().sum() > 0, f"{name}: vacuous comparison, PEFT gradient is zero"


def test_client_without_samples_gets_zero_gradient():
    _, model = _setup("llama")
    ids = torch.tensor([0, 2, 2, 0])
    batch = make_batch("llama", len(ids))
    with model.route(ids):
        model(**batch).logits.square().sum().backward()
    for name, _, bank in model.lora_banks():
        assert torch.count_nonzero(bank.grad[[1, 3, 4]]) == 0, name
        assert torch.count_nonzero(bank.grad[[0, 2]]) > 0, name
    for name, bank in model.head_banks():
        assert torch.count_nonzero(bank.grad[[1, 3, 4]]) == 0, name


def test_route_one_id_for_the_whole_batch():
    _, model = _setup("gpt2")
    batch = make_batch("gpt2", 4)
    with torch.no_grad():
        with model.route(3):
            shared = model(**batch).logits
        with model.route(torch.full((4,), 3)):
            per_sample = model(**batch).logits
    torch.testing.assert_close(shared, per_sample, rtol=0, atol=0)
