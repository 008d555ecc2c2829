"""Per-block Fisher scores of the global model on the server's proxy set (``fisher_source: proxy``).

The score of block l is the mean over proxy samples of the per-sample squared gradient norm of
the block's LoRA parameters. Each sample of a batch is routed to its own bank slot, so one batched
backward yields per-sample norms (the kernels accumulate them, ``MultiLoRAModel.fisher_norms``).
``estimator="released"`` gives the released code's estimate instead
(``fedhello.fl.released.released_proxy_fisher``).
"""

from __future__ import annotations

import numpy as np
import torch

from fedhello.fl.released import released_proxy_fisher
from fedhello.nn import MultiLoRAModel
from fedhello.nn.losses import row_losses

__all__ = ["proxy_fisher_scores"]


def proxy_fisher_scores(model: MultiLoRAModel, proxy: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor],
                        rank: int, estimator: str, batch_size: int, device: torch.device) -> np.ndarray:
    """float64 ``[L]``: the Fisher score of every block of ``global_state`` (at rank ``rank``) on ``proxy``.

    Every bank slot of ``model`` is overwritten with ``global_state`` and left in eval mode with
    cleared gradients. ``batch_size`` is the released estimator's proxy batch size (the paper's
    estimator takes as many samples per step as ``model`` has slots).
    """
    slots = model.num_clients
    model.broadcast_state(global_state, range(slots))
    model.set_ranks({s: rank for s in range(slots)})
    model.set_trainable(torch.ones(model.num_blocks, slots, dtype=torch.bool))
    model.reset_fisher_norms()
    model.eval()
    if estimator == "released":
        return released_proxy_fisher(model, proxy, batch_size, device)
    n = proxy["labels"].shape[0]
    for start in range(0, n, slots):
        batch = {k: v[start:start + slots].to(device) for k, v in proxy.items()}
        ids = torch.arange(batch["labels"].shape[0])
        with model.route(ids):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        row_losses(logits, batch["labels"]).sum().backward()
        for p in model.parameters():
            p.grad = None
    return (model.fisher_norms().sum(dim=1) / max(n, 1)).double().cpu().numpy()
