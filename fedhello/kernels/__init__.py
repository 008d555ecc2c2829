"""Multi-client LoRA kernels: one frozen linear layer, N adapters, one pass.

Public API::

    from fedhello.kernels import LoRAPlan, multi_lora_linear
    plan = LoRAPlan.build(client_ids, num_clients)
    y = multi_lora_linear(x, weight, bias, lora_a, lora_b, plan, scaling)
    y = lora_delta(x, lora_a, lora_b, plan, scaling, out=base_layer(x))  # any base layer
"""

from .contract import Backend
from .delta import lora_delta
from .multi_lora import BACKENDS, multi_lora_linear, resolve_backend
from .runtime import triton_available, triton_interpreting
from .plan import LoRAPlan, TileList
from . import ops  # registers torch.ops.fedhello.*

__all__ = [
    "BACKENDS",
    "Backend",
    "LoRAPlan",
    "TileList",
    "lora_delta",
    "multi_lora_linear",
    "resolve_backend",
    "triton_available",
    "triton_interpreting",
]
