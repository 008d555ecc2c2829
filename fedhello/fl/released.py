"""Reproductions of the paper's released code where it departs from the paper's text.

They exist for one purpose: to measure how much these departures change a comparison (the
ablation in docs/results.md). None of them is a recommended setting, and each is off by default.

``released_frozen_blocks``: the released local training gives learning rate 0 to every parameter
whose name contains the *string* of a block the client was not allotted. The block index is the
only number in the names of its LoRA parameters (``...encoder.layer.10.attention...``), so
block ``b`` is frozen whenever the decimal string of some unallotted block is a substring of
``str(b)``: at 12 blocks, block 10 whenever block 0 or 1 is missing and block 11 whenever block 1
is. A frozen block is still sent back (an exact-zero delta) and still counted in the average.

``released_proxy_fisher``: the released proxy-set Fisher score (``FIMCalculator``). It
back-propagates the label's raw logit, not the loss; takes as its sample count the number of
*batches* of the proxy loader, and restarts the loader for every batch it reads, so it reads that
many samples, all from the first batch; squares and averages each LoRA tensor's gradient over them;
and scores a block by the sum of the Frobenius norms of its tensors' mean squared gradients.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported only when the estimator runs: configs import this module
    import torch

    from fedhello.nn.model import MultiLoRAModel

__all__ = ["released_frozen_blocks", "released_fisher_rows", "released_proxy_fisher"]


def released_frozen_blocks(allotted: np.ndarray) -> np.ndarray:
    """The allotted blocks the released code's name match freezes.

    Args:
        allotted: bool ``[L]`` (one client) or ``[L, n]`` (a cohort, one column per client).

    Returns:
        bool, the shape of ``allotted``: True where a block is allotted but some unallotted block
        ``u`` has ``str(u) in str(b)``.
    """
    mask = np.asarray(allotted)
    if mask.dtype != bool or mask.ndim not in (1, 2) or mask.shape[0] < 1:
        raise ValueError(f"allotted: expected a bool [L] or [L, n] mask, got {mask.dtype} of shape {mask.shape}")
    columns = mask.reshape(mask.shape[0], -1)
    frozen = np.zeros_like(columns)
    names = [str(b) for b in range(mask.shape[0])]
    for j in range(columns.shape[1]):
        missing = [names[u] for u in np.flatnonzero(~columns[:, j])]
        for b in np.flatnonzero(columns[:, j]):
            frozen[b, j] = any(u in names[b] for u in missing)
    return frozen.reshape(mask.shape)


def released_fisher_rows(num_samples: int, batch_size: int) -> np.ndarray:
    """The proxy rows the released estimator reads, in order, int64 ``[ceil(n / batch_size)]``.

    Its count is ``len(loader)`` (batches), and each pass of its outer loop restarts the loader, so
    it reads rows ``0, 1, ...`` of the first batch, wrapping around within that batch.
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    count = -(-int(num_samples) // int(batch_size))
    return np.arange(count, dtype=np.int64) % min(int(batch_size), int(num_samples))


def released_proxy_fisher(model: "MultiLoRAModel", proxy: dict[str, "torch.Tensor"], batch_size: int,
                          device: "torch.device") -> np.ndarray:
    """Per-block Fisher scores as the released code computes them, float64 ``[L]``.

    Args:
        model: every slot holding the global adapters at full rank, all blocks trainable, in eval
            mode (as ``fedhello.fl.proxy_fisher.proxy_fisher_scores`` prepares it); its gradients are left cleared.
        proxy: the proxy set, tensors with a leading dim ``n`` and ``labels`` int ``[n]``.
        batch_size: the released proxy loader's batch size (its local batch size).
        device: where the model runs.

    Each sample read goes to its own slot, so one backward gives every sample's gradient of every
    tensor; their squares are summed in float64.
    """
    import torch

    rows = torch.from_numpy(released_fisher_rows(int(proxy["labels"].shape[0]), batch_size))
    banks = model.lora_banks()
    squares = [torch.zeros(p.shape[1:], dtype=torch.float64, device=p.device) for _, _, p in banks]
    slots = model.num_clients
    for start in range(0, rows.numel(), slots):
        chunk = rows[start:start + slots]
        batch = {k: v[chunk].to(device) for k, v in proxy.items()}
        with model.route(torch.arange(chunk.numel())):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits.gather(1, batch["labels"].long()[:, None]).sum().backward()
        for total, (_, _, p) in zip(squares, banks):
            total += p.grad[:chunk.numel()].double().square().sum(dim=0)
            p.grad = None
    for p in model.parameters():
        p.grad = None
    scores = np.zeros(model.num_blocks)
    for total, (_, block, _) in zip(squares, banks):
        scores[block] += float(torch.linalg.vector_norm(total / rows.numel()))
    return scores
