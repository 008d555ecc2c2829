"""Per-row losses of a batch, for classification and next-token prediction alike.

The engine trains many clients in one pass with loss ``sum_c mean_loss_c``: it needs each row's
summed loss and, per client, how many loss terms its rows hold (``row_terms``), so that dividing
by the client's total gives the client's own mean. Classification has one term per row (its
label); a causal LM has one per target token: position t predicts ``labels[t + 1]`` and labels
equal to ``IGNORE_INDEX`` (-100: padding, instruction prompts) contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "row_losses", "row_terms"]

IGNORE_INDEX = -100


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
