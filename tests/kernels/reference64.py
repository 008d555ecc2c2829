"""An fp64 dense reference of the multi-client LoRA linear, independent of every backend.

Each row gathers its own client's (rank-masked) adapter and the gradients come from
autograd, so the code shares nothing with the per-client loop or the kernels it checks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Reference:
    y: torch.Tensor
    dx: torch.Tensor
    d_a: torch.Tensor
    d_b: torch.Tensor
    sqnorm: torch.Tensor


def reference_fp64(x, weight, bias, lora_a, lora_b, client_ids, scaling, ranks, trainable, dy,
                   dropout_scale=None) -> Reference:
    """fp64 forward and backward of ``multi_lora_linear`` for inputs of any dtype.

    ``scaling [N]`` float, ``ranks [N]`` int, ``trainable [N]`` bool, ``dy`` like the output;
    ``dropout_scale``: optional ``[rows, d_in]`` factors (0 or ``1/(1-p)``) on the adapters' input.
    Frozen clients' gradients are zeroed afterwards, as the contract says. Inputs may sit on any
    device (a GPU run passes CUDA activations with CPU routing); the reference computes on the CPU.
    """
    f64 = dict(dtype=torch.float64, device="cpu")
    client_ids, scaling, ranks, trainable = (t.detach().cpu() for t in (client_ids, scaling, ranks, trainable))
    x = x.detach().to(**f64).requires_grad_()
    a = lora_a.detach().to(**f64).requires_grad_()
    b = lora_b.detach().to(**f64).requires_grad_()
    w = weight.detach().to(**f64)
    n, r_max, d_in = a.shape
    keep = (torch.arange(r_max)[None, :] < ranks.long()[:, None]).to(torch.float64)  # [N, r]
    a_m = a * keep[:, :, None]
    b_m = b * keep[:, None, :]
    x2 = x.reshape(-1, d_in)
    ids = client_ids.long()
    routed = (ids >= 0).to(torch.float64)[:, None]
    c = ids.clamp(min=0)
    x_lora = x2 if dropout_scale is None else x2 * dropout_scale.to(**f64)
    h = torch.einsum("td,trd->tr", x_lora, a_m[c])
    delta = torch.einsum("tr,tor->to", h, b_m[c]) * scaling.to(**f64)[c][:, None] * routed
    y2 = x2 @ w.t() + delta
    if bias is not None:
        y2 = y2 + bias.detach().to(**f64)
    y = y2.reshape(*x.shape[:-1], w.shape[0])
    y.backward(dy.detach().to(**f64))
    frozen = ~trainable.bool()
    d_a, d_b = a.grad.clone(), b.grad.clone()
    d_a[frozen] = 0
    d_b[frozen] = 0
    sqnorm = d_a.square().sum(dim=(1, 2)) + d_b.square().sum(dim=(1, 2))
    return Reference(y.detach(), x.grad, d_a, d_b, sqnorm)
