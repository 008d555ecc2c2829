"""Masked batched optimizers over stacked per-client parameters.

``torch.optim`` over a bank moves every slot: AdamW's momentum keeps updating a slot whose
gradient became zero, and weight decay shrinks slots that never had a gradient. These
optimizers step only the slots a mask selects. ``MultiLoRAModel.masked_optimizer`` builds one
over a model's banks and ``MultiLoRAModel.step_masks`` the masks of a batch; the federated
engine uses them the same way.

Every parameter handled here is a *bank*: a tensor whose leading dimension indexes the N
client slots (``lora_a [N, r, d_in]``, a head weight ``[N, out, in]``, ...). A step takes,
for each bank, a bool ``[N]`` mask of the clients that update it now (or None: nobody); the
others are not touched at all — neither their values nor their moments nor their step counts —
so a client that had no rows this step, or trains no adapter in that block, is exactly where it
would be if it had been trained alone with its own ``torch.optim`` optimizer.

A step reads nothing back to the host: the update is computed for every slot of a bank and
written only where the mask is set (``torch.where``), so a training loop on a GPU never waits
for the optimizer.

The arithmetic follows ``torch.optim.AdamW`` / ``torch.optim.SGD`` (decoupled weight decay
for AdamW, L2 for SGD), with a per-client step count for AdamW's bias correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MaskedAdamW", "MaskedSGD", "make_masked_optimizer"]


def _check_masks(params: list[torch.Tensor], masks: list[torch.Tensor | None]) -> None:
    if len(masks) != len(params):
        raise ValueError(f"masks: expected one bool [N] mask (or None) per bank ({len(params)}), got {len(masks)}")
    for p, m in zip(params, masks):
        if m is None:
            continue
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != (p.shape[0],):
            raise ValueError(f"masks: expected bool [{p.shape[0]}] for a bank of shape {tuple(p.shape)}, "
                             f"got {getattr(m, 'dtype', type(m).__name__)} {tuple(getattr(m, 'shape', ()))}")


def _slots(mask: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The ``[N]`` mask shaped to broadcast over a bank ``[N, ...]``."""
    return mask.reshape((-1,) + (1,) * (p.dim() - 1))


@dataclass
class _AdamState:
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: torch.Tensor  # int64 [N]


class MaskedAdamW:
    """AdamW over client banks, updating only the masked client slices.

    Args:
        params: banks, each ``[N, ...]`` float (fp32 recommended for master weights).
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
    """

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas: expected values in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError(f"eps/weight_decay: expected eps > 0 and weight_decay >= 0, got {eps}, {weight_decay}")
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.state = [
            _AdamState(torch.zeros_like(p), torch.zeros_like(p),
                       torch.zeros(p.shape[0], dtype=torch.int64, device=p.device))
            for p in self.params
        ]

    @torch.no_grad()
    def step(self, masks: list[torch.Tensor | None]) -> None:
        """Update the clients selected by ``masks`` (one bool ``[N]`` per bank, None: none) from ``.grad``."""
        _check_masks(self.params, masks)
        beta1, beta2 = self.betas
        for p, st, mask in zip(self.params, self.state, masks):
            if p.grad is None or mask is None:
                continue
            sel = _slots(mask, p)
            grad = p.grad
            st.step.add_(mask.to(torch.int64))
            # Slots at step 0 (never updated) would divide by 0 below; their values are discarded.
            step = st.step.clamp(min=1).to(p.dtype)
            value = p.mul(1 - self.lr * self.weight_decay)
            m = st.exp_avg.lerp(grad, 1 - beta1)
            v = st.exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias1 = _slots(1 - beta1 ** step, p)
            bias2_sqrt = _slots((1 - beta2 ** step).sqrt(), p)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            value.addcdiv_(m, denom * bias1, value=-self.lr)
            p.copy_(torch.where(sel, value, p))
            st.exp_avg.copy_(torch.where(sel, m, st.exp_avg))
            st.exp_avg_sq.copy_(torch.where(sel, v, st.exp_avg_sq))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self, clients: torch.Tensor | None = None) -> None:
        """Forget the state of some client slots (all when ``clients`` is None): a new client
        taking over a slot starts with a fresh optimizer, as it would alone."""
        for st in self.state:
            if clients is None:
                st.exp_avg.zero_(), st.exp_avg_sq.zero_(), st.step.zero_()
            else:
                st.exp_avg[clients] = 0
                st.exp_avg_sq[clients] = 0
                st.step[clients] = 0


class MaskedSGD:
    """SGD with optional momentum and L2 weight decay over client banks (masked slices only)."""

    def __init__(self, params: list[torch.Tensor], lr: float = 1e-2, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum/weight_decay: expected >= 0, got {momentum}, {weight_decay}")
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf = [torch.zeros_like(p) for p in self.params]
        self.started = [torch.zeros(p.shape[0], dtype=torch.bool, device=p.device) for p in self.params]

    @torch.no_grad()
    def step(self, masks: list[torch.Tensor | None]) -> None:
        """Update the clients selected by ``masks`` (one bool ``[N]`` per bank, None: none) from ``.grad``."""
        _check_masks(self.params, masks)
        for p, buf, started, mask in zip(self.params, self.buf, self.started, masks):
            if p.grad is None or mask is None:
                continue
            sel = _slots(mask, p)
            grad = p.grad
            if self.weight_decay:
                grad = grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                # torch.optim.SGD starts the buffer at the first gradient, then b = m*b + g.
                b = torch.where(_slots(started, p), buf.mul(self.momentum).add(grad), grad)
                buf.copy_(torch.where(sel, b, buf))
                started.logical_or_(mask)
                grad = b
            p.copy_(torch.where(sel, p.add(grad, alpha=-self.lr), p))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def reset(self, clients: torch.Tensor | None = None) -> None:
        for buf, started in zip(self.buf, self.started):
            if clients is None:
                buf.zero_(), started.zero_()
            else:
                buf[clients] = 0
                started[clients] = False


def make_masked_optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0,
                          momentum: float = 0.0) -> MaskedAdamW | MaskedSGD:
    """Build the masked optimizer called ``name`` ("adamw" or "sgd")."""
    if name == "adamw":
        return MaskedAdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return MaskedSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected 'adamw' or 'sgd', got {name!r}")
