"""Per-row losses of a batch, for classification and next-token prediction alike.

The engine trains many clients in one pass with loss ``sum_c mean_loss_c``: it needs each row's
summed loss and, per client, how many loss terms its rows hold (``row_terms``), so that dividing
by the client's total gives the client's own mean. Classification has one term per row (its
label); a causal LM has one per target token: position t predicts ``labels[t + 1]`` and labels
equal to ``IGNORE_INDEX`` (-100: padding, instruction prompts) contribute nothing.

16-bit next-token logits take a leaner path (``_HalfLogitsCrossEntropy``): ``F.cross_entropy`` on
their float32 upcast keeps a float32 log-softmax over the vocabulary for the backward and builds two
more float32 tensors of that size in it (about 0.4 MiB per token at a 32,000-word vocabulary, 1.5
MiB at 128,000, where everything a LoRA backward keeps for a token of a 7B model is about 4 MiB).
The lean path keeps the 16-bit logits (alive anyway) and one float32 log-sum-exp per token, and
works through float32 in chunks of rows. Float32 logits keep ``F.cross_entropy``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedhello.kernels.checks import HALF_DTYPES, in_torch_func_transform

__all__ = ["IGNORE_INDEX", "row_losses", "row_terms"]

IGNORE_INDEX = -100
# float32 values one chunk of the lean path works on at once (16 MiB).
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(logits: torch.Tensor) -> list[slice]:
    """Slices of ``logits``' rows, each holding at most ``CHUNK_ELEMENTS`` values (at least one row)."""
    rows = max(1, CHUNK_ELEMENTS // logits.shape[1])
    return [slice(start, start + rows) for start in range(0, logits.shape[0], rows)]


class _HalfLogitsCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of 16-bit logits, float32 ``[tokens]`` (0 where the target is
    ``IGNORE_INDEX``), computed in float32 a chunk of rows at a time.

    Saved for the backward: the logits (the caller's tensor, not a copy), the targets and the
    float32 log-sum-exp of each row. The gradient ``g_t (softmax(x_t) - onehot(y_t))`` is
    formed in float32 per chunk and written in the logits' dtype.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        valid = targets != IGNORE_INDEX
        safe = torch.where(valid, targets, 0)
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        loss = torch.empty_like(lse)
        for part in _row_chunks(logits):
            x = logits[part].float()
            lse[part] = torch.logsumexp(x, dim=1)
            picked = x.gather(1, safe[part, None]).squeeze(1)
            loss[part] = torch.where(valid[part], lse[part] - picked, 0.0)
        ctx.save_for_backward(logits, safe, valid, lse)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, safe, valid, lse = ctx.saved_tensors
        weight = torch.where(valid, grad_loss.float(), 0.0)
        grad = torch.empty_like(logits)
        for part in _row_chunks(logits):
            p = torch.exp(logits[part].float() - lse[part, None])
            p.scatter_add_(1, safe[part, None], torch.full_like(p[:, :1], -1.0))
            grad[part] = p.mul_(weight[part, None])
        return grad, None


def _lean_path(logits: torch.Tensor) -> bool:
    """16-bit logits outside ``torch.compile`` and ``torch.func`` transforms (which take the plain
    ops: the compiler plans its own memory; torch.func cannot run this autograd.Function)."""
    return logits.dtype in HALF_DTYPES and not torch.compiler.is_compiling() and not in_torch_func_transform()


def row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of each row, float32 ``[rows]``.

    Args:
        logits: ``[rows, classes]`` with int64 ``labels [rows]`` (classification), or
            ``[rows, S, vocab]`` with int64 ``labels [rows, S]`` (causal LM: unshifted, as
            ``transformers`` takes them; ``IGNORE_INDEX`` entries are left out).
    """
    if labels.dim() == 1:
        return F.cross_entropy(logits.float(), labels, reduction="none")
    if labels.dim() != 2 or logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(f"labels: expected [rows] or [rows, S] matching logits {tuple(logits.shape)}, "
                         f"got {tuple(labels.shape)}")
    if _lean_path(logits):
        # Every position against the next label (the last against nothing): the logits are used
        # as they are, so the graph keeps no sliced copy of them.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        tokens = _HalfLogitsCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return tokens.view(targets.shape).sum(dim=1)
    shifted = logits[:, :-1].float()
    targets = labels[:, 1:]
    tokens = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none",
                             ignore_index=IGNORE_INDEX)
    return tokens.view(targets.shape).sum(dim=1)


def row_terms(labels: torch.Tensor) -> torch.Tensor:
    """int64 ``[rows]``: the loss terms each row holds (1 per classification row, its target
    tokens for a causal LM)."""
    if labels.dim() == 1:
        return torch.ones_like(labels, dtype=torch.int64)
    return (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)
