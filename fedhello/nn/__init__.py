"""Model layer: one frozen Hugging Face backbone serving N clients' LoRA adapters and heads.

Public API::

    from fedhello.nn import inject_multi_lora, export_peft, import_peft
    model = inject_multi_lora(hf_model, ["query", "value"], num_clients=8, rank=8, alpha=16.0)
    with model.route(client_ids):        # int [batch], values in [-1, N)
        out = model(**batch)
"""

from fedhello.errors import require_extra

require_extra("hf", "fedhello.nn")

from .discovery import BlockMap, find_blocks, match_modules
from .heads import ClientHeadBank
from .lora_linear import MultiLoRALinear
from .inject import AUTO_HEAD_NAMES, inject_multi_lora
from .model import MultiLoRAModel
from .peft_io import export_peft, import_peft
from .routing import RoutingContext

__all__ = [
    "AUTO_HEAD_NAMES",
    "BlockMap",
    "ClientHeadBank",
    "MultiLoRALinear",
    "MultiLoRAModel",
    "RoutingContext",
    "export_peft",
    "find_blocks",
    "import_peft",
    "inject_multi_lora",
    "match_modules",
]
