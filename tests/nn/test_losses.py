"""fedhello.nn.losses.row_losses on 16-bit next-token logits: the chunked float32 path.

Checked against a float64 reference on fresh random logits (odd vocabulary, ignored targets, a
row with no target), against ``F.cross_entropy`` on the float32 upcast (the path float32 logits
keep), chunk by chunk, and by what its graph keeps for the backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedhello.nn import losses
from fedhello.nn.losses import IGNORE_INDEX, row_losses

ROWS, SEQ, VOCAB = 3, 9, 101


def _data(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(ROWS, SEQ, VOCAB, generator=gen)).to(dtype)
    labels = torch.randint(0, VOCAB, (ROWS, SEQ), generator=gen)
    labels[0, :4] = IGNORE_INDEX  # a prompt
    labels[1, 5] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with no target at all
    return logits, labels


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """float64 ``[rows]``: summed -log softmax(logits[t])[labels[t + 1]] over the kept targets."""
    x = logits.double()
    out = torch.zeros(logits.shape[0], dtype=torch.float64)
    for r in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            y = int(labels[r, t + 1])
            if y != IGNORE_INDEX:
                out[r] += torch.logsumexp(x[r, t], 0) - x[r, t, y]
    return out


def _plain(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = logits[:, :-1].float()
    tokens = F.cross_entropy(shifted.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), reduction="none",
                             ignore_index=IGNORE_INDEX)
    return tokens.view(ROWS, SEQ - 1).sum(1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_match_float64_and_the_plain_gradient(dtype):
    logits, labels = _data(dtype)
    x = logits.clone().requires_grad_()
    got = row_losses(x, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _reference(logits, labels), rtol=1e-6, atol=1e-5)
    assert got[2] == 0
    weights = torch.tensor([0.5, -2.0, 3.0])
    (grad,) = torch.autograd.grad((got * weights).sum(), x)
    x_plain = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad((_plain(x_plain, labels) * weights).sum(), x_plain)
    assert grad.dtype == dtype
    # The same float32 values rounded once to the logits' dtype: at most one unit in the last place.
    torch.testing.assert_close(grad.float(), expected.float(), rtol=2 ** -7 if dtype == torch.bfloat16 else 2 ** -10,
                               atol=1e-6)
    # float64 gradient: w_r (softmax - onehot) at kept positions, 0 elsewhere (last position, ignored, row 2).
    x64 = logits.double().requires_grad_()
    (ref,) = torch.autograd.grad((_reference_graph(x64, labels) * weights.double()).sum(), x64)
    torch.testing.assert_close(grad.double(), ref, rtol=1e-2, atol=1e-3)
    assert torch.count_nonzero(grad[2]) == 0 and torch.count_nonzero(grad[:, -1]) == 0


def _reference_graph(x64: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    targets = labels[:, 1:]
    lp = torch.log_softmax(x64[:, :-1], dim=-1)
    picked = lp.gather(2, targets.clamp_min(0)[..., None]).squeeze(-1)
    return -(picked * (targets != IGNORE_INDEX)).sum(1)


def test_chunks_change_nothing(monkeypatch):
    logits, labels = _data(torch.bfloat16, seed=1)
    x = logits.clone().requires_grad_()
    whole = row_losses(x, labels)
    (g_whole,) = torch.autograd.grad(whole.sum(), x)
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 2 * VOCAB + 5)  # 2 rows a chunk, the last one short
    y = logits.clone().requires_grad_()
    chunked = row_losses(y, labels)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), y)
    assert torch.equal(whole, chunked) and torch.equal(g_whole, g_chunked)


def test_graph_keeps_the_logits_and_a_float_per_token_not_a_float32_vocabulary():
    logits, labels = _data(torch.bfloat16, seed=2)
    x = logits.clone().requires_grad_()
    kept = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            kept.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        row_losses(x, labels)
    tokens = ROWS * SEQ
    # targets (int64), their mask (bool) and the float32 log-sum-exp: 13 bytes a token.
    assert sum(kept) == tokens * (8 + 1 + 4)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _plain(x, labels)
    assert sum(kept) >= ROWS * (SEQ - 1) * VOCAB * 4  # the float32 log-softmax


def test_float32_logits_keep_cross_entropy_exactly():
    logits, labels = _data(torch.float32, seed=3)
    assert torch.equal(row_losses(logits, labels), _plain(logits, labels))


def test_torch_func_grad_takes_the_plain_ops():
    logits, labels = _data(torch.bfloat16, seed=4)
    got = torch.func.grad(lambda t: row_losses(t, labels).sum())(logits)
    x = logits.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_plain(x, labels).sum(), x)
    assert torch.equal(got, expected)


def test_double_backward_is_refused():
    logits, labels = _data(torch.bfloat16, seed=5)
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(row_losses(x, labels).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.float().sum().backward()
