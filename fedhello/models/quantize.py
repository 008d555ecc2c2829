"""Quantizing a loaded backbone the QLoRA way, and what the run's model holds in memory.

``quantize_backbone(model, "nf4", torch.bfloat16)`` replaces every ``nn.Linear`` inside the
model's transformer blocks (attention and MLP projections) by a frozen bitsandbytes layer, one
layer at a time, so the full-precision weights are released as it goes. Embeddings, norms and
output or classification heads (outside the blocks) stay in full precision, as transformers'
``load_in_4bit`` / ``load_in_8bit`` leave them. ``base_quantization(model)`` reads how a model
that arrives already quantized (by transformers' ``BitsAndBytesConfig``, bitsandbytes itself or
``quantize_backbone``) was quantized, refusing what the multi-client layers cannot serve.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedhello.nn.discovery import is_conv1d
from fedhello.nn.model import COMPUTE_DTYPES
from fedhello.nn.quantized import check_quantized_base, quantization_of, quantize_linear, quantized_bytes
from fedhello.quantization import QUANTIZATIONS, require_bitsandbytes

__all__ = ["BaseQuantization", "MemoryReport", "base_quantization", "memory_report", "quantize_backbone"]


def _in_block(name: str, model: nn.Module) -> bool:
    """True when module ``name`` sits inside a ``ModuleList`` of layers (a transformer block)."""
    parts = name.split(".")
    module = model
    for depth, part in enumerate(parts[:-1]):
        module = getattr(module, part)
        if isinstance(module, nn.ModuleList) and parts[depth + 1].isdigit():
            return True
    return False


def quantize_backbone(model: nn.Module, kind: str, compute_dtype: torch.dtype, field: str = "model.quantize") -> list[str]:
    """Quantize the linear layers of ``model``'s blocks in place; returns their qualified names.

    Args:
        model: a ``transformers`` model (not yet given adapters).
        kind: ``"nf4"``, ``"fp4"`` or ``"int8"`` (``"none"`` does nothing).
        compute_dtype: what 4-bit layers multiply in (see ``fedhello.nn.quantized.quantize_linear``).
        field: the config field named in errors.

    Raises:
        UserError: bitsandbytes missing (names the pip command).
        ValueError: naming ``field``: an unknown kind, a model whose blocks hold transformers
            ``Conv1D`` layers (GPT-2: not quantized here) or no linear layer at all.
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"{field}: expected one of {QUANTIZATIONS}, got {kind!r}")
    if kind == "none":
        return []
    require_bitsandbytes(field, kind)
    names, conv = [], []
    for name, module in model.named_modules():
        if name and _in_block(name, model):
            if type(module) is nn.Linear:
                names.append(name)
            elif is_conv1d(module):
                conv.append(name)
    if conv:
        raise ValueError(f"{field}: {type(model).__name__} computes its blocks with transformers Conv1D layers "
                         f"({conv[0]}, ...), which are not quantized here; use model.quantize: none")
    if not names:
        raise ValueError(f"{field}: {type(model).__name__} has no nn.Linear inside its transformer blocks")
    for name in names:
        model.set_submodule(name, quantize_linear(model.get_submodule(name), kind, compute_dtype))
    # The flag transformers' bitsandbytes loading sets: PEFT reads it to pick its bitsandbytes LoRA layers.
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return names


@dataclass(frozen=True)
class BaseQuantization:
    """How a built model's frozen base is quantized.

    Attributes:
        kind: ``"none"`` (no bitsandbytes layer), ``"nf4"``, ``"fp4"`` or ``"int8"``.
        compute_dtype: what its 4-bit layers multiply in; None for int8, for a full-precision
            base, or for 4-bit layers built without one (bitsandbytes then takes the input's dtype).
        layers: the qualified names of its bitsandbytes layers.
    """

    kind: str
    compute_dtype: torch.dtype | None
    layers: tuple[str, ...]


def base_quantization(model: nn.Module, arg: str = "model") -> BaseQuantization:
    """How ``model`` (a ``transformers`` model, not yet given adapters) is quantized; refuses what
    the multi-client layers cannot serve.

    Raises:
        ValueError: naming ``arg``: a transformers quantization other than bitsandbytes
            (``config.quantization_config``: GPTQ, AWQ, HQQ, torchao, ...); a linear layer whose
            weight is not a plain floating-point tensor (packed by another library); bitsandbytes
            layers of more than one kind, or 4-bit layers of more than one compute dtype, or of
            one outside float32/bfloat16/float16; an int8 layer with an outlier threshold.
    """
    spec = getattr(getattr(model, "config", None), "quantization_config", None)
    method = spec.get("quant_method") if isinstance(spec, dict) else getattr(spec, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod is a str enum
    if spec is not None and method != "bitsandbytes":
        raise ValueError(f"{arg}: quantized by transformers with {method!r} (config.quantization_config); fedhello "
                         "serves bitsandbytes bases only (nf4, fp4, int8): load it with BitsAndBytesConfig, or "
                         "without quantization_config")
    kinds: dict[str, list[str]] = {}
    dtypes: dict[torch.dtype | None, str] = {}
    for name, module in model.named_modules():
        kind = check_quantized_base(module, f"{arg}: {name}")
        if kind is not None:
            kinds.setdefault(kind, []).append(name)
            if kind != "int8":
                dtypes.setdefault(module.compute_dtype, name)
        elif isinstance(module, nn.Linear):
            # Another library's packing (a non-float or tensor-subclass weight) the kernels would read as numbers.
            weight = module.weight
            if not weight.is_floating_point() or type(weight.data) is not torch.Tensor:
                raise ValueError(f"{arg}: {name}.weight is {weight.dtype} ({type(weight.data).__name__}; quantized, "
                                 "but not by bitsandbytes): fedhello serves bitsandbytes 4-bit/8-bit layers or "
                                 "floating-point weights")
    if len(kinds) > 1:
        mixed = ", ".join(f"{kind} ({names[0]}, ...)" for kind, names in sorted(kinds.items()))
        raise ValueError(f"{arg}: mixes bitsandbytes layers of kinds {mixed}; quantize its layers one way")
    if len(dtypes) > 1 or not set(dtypes) <= {None, *COMPUTE_DTYPES}:
        found = ", ".join(f"{dtype} ({name}, ...)" for dtype, name in dtypes.items())
        raise ValueError(f"{arg}: its 4-bit layers compute in {found}; expected one of float32, bfloat16, float16 "
                         "for all of them (bitsandbytes' compute_dtype)")
    if not kinds:
        return BaseQuantization("none", None, ())
    [(kind, names)] = kinds.items()
    return BaseQuantization(kind, next(iter(dtypes), None), tuple(names))


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of a multi-client model: the frozen base (quantized layers at their packed size), the
    adapter and head banks of all N slots, and the optimizer state of those banks."""

    base: int
    quantized: int
    banks: int
    optimizer: int
    quantization: str

    def lines(self) -> list[str]:
        """Human-readable lines (MiB), as the run and ``fedhello doctor --config`` print them."""
        mib = 2.0 ** 20
        kind = "full precision" if self.quantization == "none" else self.quantization
        return [f"memory: frozen base {self.base / mib:.1f} MiB ({kind}; quantized layers "
                f"{self.quantized / mib:.1f} MiB of it), adapter and head banks {self.banks / mib:.1f} MiB, "
                f"optimizer state {self.optimizer / mib:.1f} MiB"]


def memory_report(model, optimizer_slots: int) -> MemoryReport:
    """What ``model`` (a ``MultiLoRAModel``) holds, with ``optimizer_slots`` float32 tensors of
    optimizer state per bank element (AdamW: 2, SGD with momentum: 1, plain SGD: 0)."""
    banks = [p for _, _, p in model.lora_banks()] + [p for _, p in model.head_banks()]
    bank_ids = {id(p) for p in banks}
    quantized_layers = [m for m in model.backbone.modules() if quantization_of(m) is not None]
    inside = {id(t) for m in quantized_layers for t in (*m.parameters(), *m.buffers())}
    quantized = sum(quantized_bytes(m) for m in quantized_layers)
    rest = [t for t in (*model.backbone.parameters(), *model.backbone.buffers())
            if id(t) not in bank_ids and id(t) not in inside]
    bank_bytes = _nbytes(banks)
    kinds = sorted({quantization_of(m) for m in quantized_layers})
    return MemoryReport(base=quantized + _nbytes(rest), quantized=quantized, banks=bank_bytes,
                        optimizer=optimizer_slots * bank_bytes, quantization="+".join(kinds) or "none")
