"""``MultiLoRALinear``: one frozen linear layer, a bank of N client LoRA adapters, one pass.

The layer keeps the wrapped module (``nn.Linear``, or transformers' ``Conv1D`` whose weight is
stored ``[in, out]``) untouched and frozen, and adds

* ``lora_a``: float32 ``[N, r_max, d_in]`` and ``lora_b``: float32 ``[N, d_out, r_max]``, the
  stacked adapters of the N client slots (master weights; cast to the activations' dtype on
  use);
* buffers ``ranks`` (int32 ``[N]``, each in ``[0, r_max]``), ``scaling`` (float32 ``[N]``,
  ``alpha / ranks`` as in PEFT; 0 for a rank-0 slot), ``trainable`` (bool ``[N]``) and ``grad_sqnorm`` (float32 ``[N]``,
  accumulated by every backward).

Each forward reads the batch's routing from its ``RoutingContext`` and calls
``fedhello.kernels.multi_lora_linear``: row t gets ``x W^T + b + s_c (x A_c^T) B_c^T`` with
``c`` its client, rows routed to ``-1`` the base output only.

A slot of rank 0 has no adapter: its rows get the base output, its adapter entries no gradient,
and its scale is 0 (not ``alpha / 0``), as in the kernels, which take ranks in ``[0, r_max]``.

A bitsandbytes base (``Linear4bit`` nf4/fp4, ``Linear8bitLt``; see ``quantized.py``) computes
``x W^T + b`` and its share of ``dx`` itself, through its own ops; ``fedhello.kernels.lora_delta``
then adds the LoRA term into that output, with the same kernels, dropout masks, ranks, frozen
clients and fused gradient norms. No dequantized copy of the weight is kept.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from fedhello.kernels import BACKENDS, lora_delta, multi_lora_linear
from fedhello.names import RANK_SCALINGS

from .discovery import is_conv1d, is_linear_like
from .quantized import prepare_quantized_base, quantization_of
from .routing import RoutingContext

__all__ = ["RANK_SCALINGS", "MultiLoRALinear", "check_ranks", "check_settings"]

_FLOAT32_BUFFERS = ("scaling", "grad_sqnorm")


def check_ranks(ranks: Sequence[int] | torch.Tensor | None, num_clients: int, max_rank: int) -> list[int]:
    """Per-client ranks as a list of N ints in ``[0, max_rank]`` (``None``: every client at ``max_rank``).

    Rank 0 is a slot with no adapter (the base layer only), as the kernels define it.

    Raises:
        TypeError: not a sequence of ints.
        ValueError: wrong length or a rank out of range.
    """
    if ranks is None:
        return [max_rank] * num_clients
    if isinstance(ranks, torch.Tensor):
        if ranks.dtype.is_floating_point or ranks.dtype == torch.bool:
            raise TypeError(f"ranks: expected integer ranks, got dtype {ranks.dtype}")
        values = ranks.flatten().tolist()
    elif isinstance(ranks, Sequence) and not isinstance(ranks, (str, bytes)):
        values = list(ranks)
        if not all(isinstance(r, int) and not isinstance(r, bool) for r in values):
            raise TypeError(f"ranks: expected a list of ints, got {values!r}")
    else:
        raise TypeError(f"ranks: expected a list of {num_clients} ints, got {type(ranks).__name__}")
    if len(values) != num_clients:
        raise ValueError(f"ranks: expected one rank per client ({num_clients}), got {len(values)}")
    bad = [r for r in values if not 0 <= r <= max_rank]
    if bad:
        raise ValueError(f"ranks: expected values in [0, rank={max_rank}] (rank is r_max), got {bad[0]}")
    return values


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with N per-client LoRA adapters applied by routing.

    Args:
        base: the frozen ``nn.Linear`` or transformers ``Conv1D`` to wrap (kept as ``self.base``).
        num_clients: N, the number of adapter slots.
        rank: r_max, the rank dimension of the bank.
        ranks: optional per-client ranks (list of N ints in ``[0, rank]``, HetLoRA; 0: no adapter);
            default all ``rank``.
        alpha: LoRA alpha; client c is scaled by ``alpha / ranks[c]`` (0 when ``ranks[c] = 0``).
        dropout: LoRA dropout probability on the adapter input (training mode only, fused into the
            kernels, never on the base path); each client's masks come from its own stream in
            ``context``, so they do not depend on the other clients in the batch. Activation
            checkpointing (``torch.utils.checkpoint``, transformers' ``gradient_checkpointing_enable``)
            works with dropout 0 and the backward run inside ``route()``; with dropout > 0 its
            recomputation raises (it would draw new masks).
        backend: ``multi_lora_linear`` backend ("auto", "triton", "torch", "cpu", "cuda").
        context: the routing shared with the other layers of a model; a private one by default
            (route standalone use with ``layer.context.route(ids)``).
        generator: CPU generator for the Kaiming init of ``lora_a`` (every slot starts equal).
        name: the layer's qualified name, used in error messages.

    Input ``[..., d_in]`` with leading dim = batch (or ``[batch * seq, d_in]``), output
    ``[..., d_out]`` in the input dtype.
    """

    def __init__(
        self,
        base: nn.Module,
        num_clients: int,
        rank: int = 8,
        *,
        ranks: Sequence[int] | torch.Tensor | None = None,
        alpha: float = 16.0,
        dropout: float = 0.0,
        backend: str = "auto",
        context: RoutingContext | None = None,
        generator: torch.Generator | None = None,
        name: str = "MultiLoRALinear",
    ) -> None:
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"base: expected nn.Linear or transformers Conv1D, got {type(base).__name__}")
        check_settings(num_clients, rank, alpha, dropout, backend)
        rank_list = check_ranks(ranks, num_clients, rank)
        if context is not None and context.num_clients != num_clients:
            raise ValueError(f"context: expected num_clients={num_clients}, got {context.num_clients}")

        # "nf4", "fp4" or "int8" for a bitsandbytes base (its weight is packed: shapes come from
        # the module), None for a full-precision one.
        self.quantization = quantization_of(base)
        if self.quantization is not None:
            prepare_quantized_base(base, "base")
        self.base = base.requires_grad_(False)
        self.conv1d = is_conv1d(base)
        weight = base.weight
        if self.quantization is not None:
            self.in_features, self.out_features = base.in_features, base.out_features
        else:
            self.in_features, self.out_features = (weight.shape[0], weight.shape[1]) if self.conv1d else (
                weight.shape[1], weight.shape[0])
        self.num_clients, self.max_rank = num_clients, rank
        self.alpha, self.dropout, self.backend = float(alpha), float(dropout), backend
        self.context = context if context is not None else RoutingContext(num_clients)
        self.name = name

        device = weight.device
        self.lora_a = nn.Parameter(torch.empty(num_clients, rank, self.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(num_clients, self.out_features, rank, device=device))
        self.register_buffer("ranks", torch.tensor(rank_list, dtype=torch.int32, device=device))
        self.register_buffer("scaling", torch.empty(num_clients, dtype=torch.float32, device=device))
        self.register_buffer("trainable", torch.ones(num_clients, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("grad_sqnorm", torch.zeros(num_clients, dtype=torch.float32, device=device),
                             persistent=False)
        self.rank_scaling = "client"
        self._update_scaling()
        self.reset_parameters(generator)
        self.register_load_state_dict_post_hook(_rank_scaling_from_buffers)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's init in every slot: ``A`` Kaiming-uniform (a=sqrt(5)), ``B`` zeros (the layer starts as its base)."""
        a = torch.empty(self.max_rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.lora_a.copy_(a.unsqueeze(0).expand_as(self.lora_a))
            self.lora_b.zero_()

    def set_ranks(self, ranks: Sequence[int] | torch.Tensor) -> None:
        """Set all N per-client ranks (each in ``[0, r_max]``); scales become ``alpha / rank`` (0 for rank 0)."""
        values = check_ranks(ranks, self.num_clients, self.max_rank)
        self.ranks.copy_(torch.tensor(values, dtype=torch.int32))
        self._update_scaling()

    def set_rank_scaling(self, mode: str) -> None:
        """``"client"``: client c is scaled by ``alpha / ranks[c]`` (PEFT, the default);
        ``"max"``: every client by ``alpha / r_max`` whatever its rank (HetLoRA's fixed scale)."""
        if mode not in RANK_SCALINGS:
            raise ValueError(f"mode: expected one of {RANK_SCALINGS}, got {mode!r}")
        self.rank_scaling = mode
        self._update_scaling()

    def _update_scaling(self) -> None:
        self.scaling.copy_(self._scales(self.rank_scaling))

    def _scales(self, mode: str) -> torch.Tensor:
        """float32 ``[N]``: every client's scale under rank scaling ``mode``; 0 for a rank-0 slot, which
        has no adapter to scale (``alpha / 0`` would be inf, and ``inf * 0`` a NaN in the kernels)."""
        if mode == "max":
            scales = torch.full_like(self.scaling, self.alpha / self.max_rank)
        else:
            scales = self.alpha / self.ranks.to(torch.float32)
        return scales.masked_fill(self.ranks == 0, 0.0)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 (nn.Module's signature)
        """``.to(...)``, ``.cuda()``, ``.half()`` and the like move ``scaling`` and ``grad_sqnorm`` to the
        new device but keep them float32: the kernels take them in float32 whatever the compute dtype
        (and a cast would round ``alpha / rank``)."""
        kept = {name: self._buffers[name] for name in _FLOAT32_BUFFERS}
        self._buffers.update(dict.fromkeys(kept))  # None: nn.Module._apply skips them
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        for name, buf in kept.items():
            moved = fn(buf)
            self._buffers[name] = moved if moved.dtype == torch.float32 else buf.to(moved.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Like nn.Linear under autocast: every operand in autocast's dtype; the kernels then run
            # with autocast off (they pick their own fp32 accumulation).
            dtype = torch.get_autocast_dtype(device_type)
            with torch.autocast(device_type, enabled=False):
                return self._forward(x.to(dtype), cast_base=True)
        return self._forward(x, cast_base=False)

    def _forward(self, x: torch.Tensor, cast_base: bool) -> torch.Tensor:
        plan = self.context.plan_for(x, self.name)
        lora_a = self.lora_a if self.lora_a.dtype == x.dtype else self.lora_a.to(x.dtype)
        lora_b = self.lora_b if self.lora_b.dtype == x.dtype else self.lora_b.to(x.dtype)
        # LoRA dropout happens inside the kernels, on the adapters' input only; each client's
        # masks come from its own counter-based stream in the routing context.
        dropping = self.training and self.dropout > 0
        if dropping and torch._C._current_graph_task_id() != -1:
            # A forward inside a backward is activation checkpointing's recomputation: the streams
            # would hand it new masks, and the gradient would belong to another forward.
            raise RuntimeError(
                f"{self.name}: recomputed inside a backward pass (activation checkpointing) with LoRA "
                f"dropout {self.dropout}; the recomputation would draw new dropout masks. Use dropout 0 "
                "with activation checkpointing, or turn checkpointing off")
        lora = dict(ranks=self.ranks, trainable=self.trainable, grad_sqnorm=self.grad_sqnorm, backend=self.backend,
                    dropout_p=self.dropout if dropping else 0.0,
                    dropout_seeds=self.context.dropout_seeds(plan) if dropping else None)
        if self.quantization is not None:
            # The float32 master banks themselves: lora_delta takes them under half-precision x, and
            # a cast copy would be kept for the backward, half a client's adapter bytes per slot
            # alive through every step (the memory a quantized base is chosen to save).
            return self._forward_quantized(x, self.lora_a, self.lora_b, plan, lora)
        weight = self.base.weight.t() if self.conv1d else self.base.weight
        bias = self.base.bias
        if cast_base:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return multi_lora_linear(x, weight, bias, lora_a, lora_b, plan, self.scaling, **lora)

    def _forward_quantized(self, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, plan, lora: dict):
        """The bitsandbytes base computes ``y`` (and, backward, its share of ``dx``); the LoRA term is
        added into ``y``."""
        if x.dtype == torch.float64:
            raise TypeError(f"x: {self.name} has a {self.quantization} base, whose bitsandbytes ops compute in "
                            f"float32, bfloat16 or float16; got float64")
        y = self.base(x)
        if y._is_view() and torch.is_grad_enabled():
            # bitsandbytes' int8 eval matmul hands back a view made inside its autograd function;
            # autograd refuses in-place updates of such views (it would override their backward).
            y = y.clone()
        y = lora_delta(x, lora_a, lora_b, plan, self.scaling, **lora, out=y)
        return _NoDoubleBackward.apply(y, self.name, self.quantization)

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.conv1d else "Linear" if self.quantization is None else f"Linear {self.quantization}"
        return (f"{kind}(in={self.in_features}, out={self.out_features}), clients={self.num_clients}, "
                f"r_max={self.max_rank}, alpha={self.alpha}, dropout={self.dropout}, backend={self.backend!r}")


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on ``y`` whose backward refuses ``create_graph=True``. bitsandbytes promises no
    higher-order gradients for its layers (their backward functions are written for one backward
    pass, on state shared between calls), so a gradient penalty over a quantized base is refused
    instead of trusted."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, name: str, quantization: str) -> torch.Tensor:
        ctx.name, ctx.quantization = name, quantization
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        if torch.is_grad_enabled():  # the engine enables grad mode only for create_graph=True
            raise RuntimeError(f"create_graph: {ctx.name} has a {ctx.quantization} (bitsandbytes) base, which "
                               "promises no higher-order gradients; they need a full-precision base")
        return dy, None, None


def _rank_scaling_from_buffers(layer: MultiLoRALinear, incompatible_keys: object) -> None:
    """``rank_scaling`` is a Python setting, not a tensor: after ``load_state_dict`` it is read back
    off the loaded ``scaling`` and ``ranks``, so a later ``set_ranks`` keeps the saved mode."""
    for mode in RANK_SCALINGS:
        if torch.equal(layer.scaling, layer._scales(mode)):
            layer.rank_scaling = mode
            return


def check_settings(num_clients: int, rank: int, alpha: float, dropout: float, backend: str) -> None:
    """Validate the scalar settings shared by ``MultiLoRALinear`` and ``inject_multi_lora``."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int):
        raise TypeError(f"num_clients: expected an int, got {type(num_clients).__name__}")
    if num_clients < 1:
        raise ValueError(f"num_clients: expected >= 1, got {num_clients}")
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank: expected an int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank: expected >= 1, got {rank}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a float, got {type(alpha).__name__}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: expected a finite number > 0, got {alpha}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise TypeError(f"dropout: expected a float, got {type(dropout).__name__}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
