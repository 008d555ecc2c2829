"""Frozen bitsandbytes base layers: recognising them, building them, making them safe to train through.

``MultiLoRALinear`` wraps a bitsandbytes ``Linear4bit`` (nf4 or fp4, with or without double
quantization) or ``Linear8bitLt`` as it wraps an ``nn.Linear``: the base part of ``y`` and ``dx``
is the bitsandbytes module's own forward and backward (its weight is dequantized one layer at a
time, inside bitsandbytes, and dropped), and the LoRA part is added into that output.

bitsandbytes is imported only by ``quantize_linear``: a model without quantized layers never
needs it, and ``quantization_of`` looks it up in ``sys.modules`` (if it was never imported, no
module can be one of its layers).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from fedhello.quantization import QUANTIZATIONS, require_bitsandbytes

__all__ = ["QUANT_BLOCKSIZE", "check_quantized_base", "prepare_quantized_base", "quantization_of", "quantize_linear",
           "quantized_bytes"]

# QLoRA's block size for the 4-bit weights (bitsandbytes' default, the transformers default too).
QUANT_BLOCKSIZE = 64


def quantization_of(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes linear layer, None for anything else."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return module.weight.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def quantize_linear(linear: nn.Linear, kind: str, compute_dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes copy of ``linear``, quantized on ``linear``'s device.

    Args:
        linear: a plain ``nn.Linear`` (not a subclass); its weight is read, not kept.
        kind: ``"nf4"``/``"fp4"`` (``Linear4bit``, double quantization, block size 64) or
            ``"int8"`` (``Linear8bitLt``, frozen int8 weights, outlier threshold 0).
        compute_dtype: the dtype 4-bit layers dequantize to and multiply in (bitsandbytes'
            ``compute_dtype``); int8 layers compute in the activations' dtype and ignore it.

    A 4-bit weight is quantized from its value in ``compute_dtype``, as transformers quantizes a
    checkpoint loaded in that dtype: bitsandbytes dequantizes to the dtype it quantized from, so a
    float32 source under a bfloat16 compute dtype would make every backward dequantize a float32
    copy of the layer and cast it (three times the one compute-dtype transient; 258 MiB against
    86 MiB for a 7B MLP layer).

    The bias (if any) stays in its dtype, frozen, and the layer takes ``linear``'s train/eval mode;
    the caller drops ``linear`` afterwards, so only the quantized weight stays alive.
    """
    if kind not in QUANTIZATIONS[1:]:
        raise ValueError(f"kind: expected one of {QUANTIZATIONS[1:]}, got {kind!r}")
    if type(linear) is not nn.Linear:
        raise TypeError(f"linear: expected a plain nn.Linear, got {type(linear).__name__}")
    require_bitsandbytes("kind", kind)
    import bitsandbytes as bnb

    weight = linear.weight.detach()
    has_bias = linear.bias is not None
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                    threshold=0.0, device="meta")
        layer.weight = bnb.nn.Int8Params(weight.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype,
                                  compress_statistics=True, quant_type=kind, device="meta")
        layer.weight = bnb.nn.Params4bit(weight.to(compute_dtype, copy=True), requires_grad=False,
                                         blocksize=QUANT_BLOCKSIZE,
                                         compress_statistics=True, quant_type=kind, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    layer = layer.to(weight.device)  # bitsandbytes quantizes on the move to a real device
    # linear's mode too: it picks bitsandbytes' int8 matmul (a fresh module would be in training mode).
    return prepare_quantized_base(layer.requires_grad_(False).train(linear.training), "linear")


def check_quantized_base(layer: nn.Module, arg: str = "base") -> str | None:
    """``quantization_of(layer)``, after checking that a bitsandbytes layer can serve as a frozen base.

    Refused (``ValueError`` naming ``arg``): a ``Linear8bitLt`` with an outlier threshold > 0, which
    picks the outlier columns of ``x`` over the whole batch, so a client's output would depend on
    the other clients in its batch.
    """
    kind = quantization_of(layer)
    if kind == "int8" and layer.state.threshold > 0:
        raise ValueError(f"{arg}: Linear8bitLt with outlier threshold {layer.state.threshold} chooses its "
                         "outlier columns over the whole batch, so one client's output would depend on the "
                         "others; use threshold=0.0 (transformers: llm_int8_threshold=0.0)")
    return kind


def prepare_quantized_base(layer: nn.Module, arg: str = "base") -> nn.Module:
    """Make a bitsandbytes layer safe to serve as a frozen training base, in place; returns it.

    * 4-bit, CPU: bitsandbytes repacks the weight of an eval-mode layer called without gradients
      into the layout of a bfloat16 inference kernel, and keeps it so: a later forward with
      gradients fails (an in-place bias add on a leaf), and shapes the repacking does not take
      fail at once. Repacking is switched off here (a layer already repacked is unpacked back).
    * 8-bit: an outlier threshold > 0 is refused (``check_quantized_base``).

    Raises:
        ValueError: naming ``arg``, for an 8-bit layer with an outlier threshold.
    """
    kind = check_quantized_base(layer, arg)
    if kind is not None and kind != "int8":
        import bitsandbytes.functional as bnb_f

        layer.support_avx512bf16_for_cpu = False
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = bnb_f._convert_weight_packed_for_cpu_inverse(
                layer.weight.data, state)
    return layer


def quantized_bytes(layer: nn.Module) -> int:
    """Bytes a bitsandbytes layer holds: packed weight, its scales (and their scales), bias."""
    kind = quantization_of(layer)
    if kind is None:
        raise TypeError(f"layer: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(layer).__name__}")
    tensors = [layer.weight]
    if layer.bias is not None:
        tensors.append(layer.bias)
    if kind == "int8":
        tensors.append(layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB)
    else:
        tensors.extend(v for v in layer.weight.quant_state.as_dict(packed=True).values()
                       if isinstance(v, torch.Tensor))
    return sum(t.numel() * t.element_size() for t in tensors)
