"""``inject_multi_lora``: give a ``transformers`` model N client adapter slots on its target layers, in place.

The target linear layers become ``MultiLoRALinear`` banks and the trainable heads
``ClientHeadBank`` s; the returned ``MultiLoRAModel`` (``fedhello.nn.model``) wraps the model.
Targets are matched as PEFT matches them (``fedhello.nn.model.DEFAULT_TARGET_MODULES`` names them
per architecture where a run names none); ``AUTO_HEAD_NAMES`` are the heads ``head_modules="auto"`` finds.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .discovery import find_blocks, is_linear_like, match_modules
from .heads import ClientHeadBank
from .lora_linear import MultiLoRALinear, check_ranks, check_settings
from .quantized import check_quantized_base, prepare_quantized_base
from .model import MultiLoRAModel
from .norms import recompute_frozen_rmsnorms
from .routing import RoutingContext

__all__ = ["inject_multi_lora", "AUTO_HEAD_NAMES"]

# Names transformers gives the trainable heads of its classification models
# (BERT, ViT, RoBERTa: "classifier"; LLaMA, GPT-2, Mistral, Qwen: "score").
AUTO_HEAD_NAMES = ("classifier", "score")


def _head_linears(model: nn.Module, head_modules: str | Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(matched head modules, the nn.Linear layers inside them that become client banks)."""
    if head_modules is None:
        return [], []
    if head_modules == "auto":
        roots = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in AUTO_HEAD_NAMES]
        roots = [n for n in roots if not any(n.startswith(r + ".") for r in roots)]
    else:
        roots = match_modules(model, head_modules, "head_modules")
    linears: list[str] = []
    for root in roots:
        module = model.get_submodule(root)
        if isinstance(module, nn.Linear):
            linears.append(root)
            continue
        inside = [f"{root}.{n}" for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
        covered = {id(p) for n in inside for p in model.get_submodule(n).parameters()}
        other = [n for n, p in module.named_parameters() if id(p) not in covered]
        if not inside:
            raise ValueError(f"head_modules: expected an nn.Linear or a module of nn.Linear layers, got {root!r} "
                             f"({type(module).__name__}) with no nn.Linear inside")
        if other:
            raise ValueError(f"head_modules: expected only nn.Linear layers inside {root!r}, got parameters "
                             f"{other[:3]} outside them (name the linear layers to bank instead)")
        linears.extend(n for n in inside if n not in linears)
    return roots, linears


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def inject_multi_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    num_clients: int,
    rank: int = 8,
    ranks: Sequence[int] | None = None,
    alpha: float = 16.0,
    dropout: float = 0.0,
    head_modules: str | Sequence[str] | None = "auto",
    backend: str = "auto",
    seed: int = 0,
    backbone_train_mode: bool = False,
) -> MultiLoRAModel:
    """Give a ``transformers`` model N client adapter slots on its target layers, in place.

    Args:
        model: any ``nn.Module`` whose targets are ``nn.Linear`` or transformers ``Conv1D``
            inside its transformer blocks (BERT/MiniLM, ViT, LLaMA/SmolLM2, GPT-2, ...). All its
            parameters are frozen; none is copied. Its RMSNorms keep their 16-bit input for the
            backward instead of a float32 copy (``fedhello.nn.norms``; bit-identical results).
        target_modules: names matched as PEFT does (a list: exact name or ``.name`` suffix; a
            string: a regular expression on the whole qualified name), e.g. ``["query", "value"]``.
        num_clients: N, the number of client slots.
        rank: r_max, the bank's rank dimension.
        ranks: per-client ranks in ``[0, rank]`` (HetLoRA; 0: no adapter); default all ``rank``.
        alpha: LoRA alpha; client c is scaled by ``alpha / ranks[c]`` (PEFT's ``lora_alpha / r``; 0 for
            rank 0).
        dropout: LoRA dropout probability (per-client generators, seeded from ``seed``).
        head_modules: modules that each client trains in full, like PEFT's ``modules_to_save``:
            ``"auto"`` (every module named "classifier" or "score"), names/regex as for targets,
            or None. Each must be an ``nn.Linear`` or contain only ``nn.Linear`` layers.
        backend: the ``multi_lora_linear`` backend.
        seed: seeds the adapter init (every slot starts from the same PEFT init) and dropout.
        backbone_train_mode: let ``train()`` switch the backbone's own dropout on as well.

    Returns:
        the ``MultiLoRAModel`` wrapping ``model``.

    Raises:
        ValueError: a target name matches nothing or matches a module that is not a linear
            layer or not inside a transformer block; bad ranks, alpha, dropout or backend; a
            bitsandbytes layer that cannot serve as a frozen base (``check_quantized_base``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch nn.Module (a transformers model), got {type(model).__name__}")
    if any(isinstance(m, (MultiLoRALinear, ClientHeadBank)) for m in model.modules()):
        raise ValueError("model: already holds multi-client modules (inject_multi_lora was applied before)")
    check_settings(num_clients, rank, alpha, dropout, backend)
    rank_list = check_ranks(ranks, num_clients, rank)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if seed < 0:
        raise ValueError(f"seed: expected >= 0, got {seed}")

    head_roots, head_names = _head_linears(model, head_modules)
    targets = [
        n for n in match_modules(model, target_modules, "target_modules")
        if not any(n == h or n.startswith(h + ".") for h in head_roots)
    ]
    if not targets:
        raise ValueError(f"target_modules: {target_modules!r} only matches head modules {head_roots}")
    for name in targets:
        module = model.get_submodule(name)
        if "experts" in name.split("."):
            # An expert sees only the tokens its router sends it, as a 2-D gather: rows no longer
            # line up with samples, so a per-sample client id cannot be applied to them.
            raise ValueError(f"target_modules: {name!r} is inside a mixture-of-experts layer; per-client "
                             "adapters on experts are not supported (target the attention projections)")
        if not is_linear_like(module):
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__}; expected nn.Linear or transformers "
                "Conv1D (name the linear layers inside it)"
            )
    blocks = find_blocks(model, targets, "target_modules")
    # Every bitsandbytes layer of the base, targets or not: one quantized by transformers or by the
    # caller never went through quantize_linear (see prepare_quantized_base).
    quantized = [m for n, m in model.named_modules() if check_quantized_base(m, f"model: {n}") is not None]

    model.requires_grad_(False)
    recompute_frozen_rmsnorms(model)
    for layer in quantized:
        prepare_quantized_base(layer)
    context = RoutingContext(num_clients, seed)
    generator = torch.Generator().manual_seed(seed)
    for name in targets:
        _replace(model, name, MultiLoRALinear(
            model.get_submodule(name), num_clients, rank, ranks=rank_list, alpha=alpha, dropout=dropout,
            backend=backend, context=context, generator=generator, name=name,
        ))
    for name in head_names:
        _replace(model, name, ClientHeadBank(model.get_submodule(name), num_clients, context=context, name=name))
    return MultiLoRAModel(
        model, context, blocks, targets, head_names, max_rank=rank, alpha=alpha, dropout=dropout,
        backbone_train_mode=backbone_train_mode,
    )
