"""Finding the modules to wrap and the transformer blocks they belong to.

Target names follow PEFT's ``target_modules`` rules: a list of names matches a module whose
qualified name equals one of them or ends with ``"." + name``; a single string is a regular
expression that must match the whole qualified name.

A *block* is an element of a ``nn.ModuleList`` that holds the model's layers (BERT's
``encoder.layer``, ViT's ``encoder.layer``, LLaMA's ``model.layers``, GPT-2's ``transformer.h``,
T5's ``encoder.block`` and ``decoder.block``). The block of a module is found from its
*outermost* ``ModuleList`` ancestor, so lists nested inside a block (mixture-of-experts
``experts``) never count as blocks. Several block lists (encoder and decoder) are numbered one
after the other, in the order the model registers them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

__all__ = ["BlockMap", "is_conv1d", "is_linear_like", "match_modules", "find_blocks"]


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's linear with weight ``[in, out]``)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D``."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return False
    return isinstance(module, Conv1D)


def _linear_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if name and is_linear_like(m)})


def match_modules(model: nn.Module, spec: str | Sequence[str], arg: str) -> list[str]:
    """Qualified names of the modules of ``model`` selected by ``spec`` (PEFT matching rules).

    Args:
        model: the model to search.
        spec: a list of names (suffix match on dot boundaries) or one regular expression
            (full match).
        arg: the argument name used in error messages.

    Raises:
        TypeError: ``spec`` is neither a string nor a sequence of strings.
        ValueError: ``spec`` is empty, or a name (or the regular expression) matches nothing.
    """
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(spec, str):
        pattern = re.compile(spec)
        found = [n for n in names if pattern.fullmatch(n)]
        if not found:
            raise ValueError(
                f"{arg}: regular expression {spec!r} matches no module of {type(model).__name__}; "
                f"its linear layers are named {_linear_names(model)}"
            )
        return found
    if not isinstance(spec, Sequence) or not all(isinstance(s, str) for s in spec):
        raise TypeError(f"{arg}: expected a list of module names or a regex string, got {spec!r}")
    if len(spec) == 0:
        raise ValueError(f"{arg}: expected at least one module name, got an empty list")
    found: list[str] = []
    for target in spec:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(
                f"{arg}: no module named {target!r} in {type(model).__name__}; "
                f"its linear layers are named {_linear_names(model)}"
            )
        found.extend(h for h in hits if h not in found)
    return sorted(found, key=names.index)


@dataclass(frozen=True)
class BlockMap:
    """Transformer blocks of a model.

    Attributes:
        lists: qualified names of the block ``ModuleList`` s, in model order.
        offsets: global index of the first block of each list (``len(lists) + 1`` entries; the
            last one is the total number of blocks L).
    """

    lists: tuple[str, ...]
    offsets: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return self.offsets[-1]

    def block_of(self, name: str) -> int | None:
        """Global block index of the module ``name``, None if it is in no block."""
        for i, prefix in enumerate(self.lists):
            if name.startswith(prefix + "."):
                index = name[len(prefix) + 1 :].split(".", 1)[0]
                return self.offsets[i] + int(index)
        return None


def _outermost_list(model: nn.Module, name: str) -> str | None:
    """Qualified name of the outermost ModuleList that contains module ``name`` as a descendant."""
    parts = name.split(".")
    module = model
    for depth, part in enumerate(parts[:-1]):
        module = getattr(module, part)
        if isinstance(module, nn.ModuleList) and parts[depth + 1].isdigit():
            return ".".join(parts[: depth + 1])
    return None


def find_blocks(model: nn.Module, module_names: Sequence[str], arg: str) -> BlockMap:
    """The block lists holding ``module_names``; every name must sit inside a block.

    Raises:
        ValueError: a module is outside every ``ModuleList`` of layers.
    """
    lists: list[str] = []
    for name in module_names:
        outer = _outermost_list(model, name)
        if outer is None:
            raise ValueError(
                f"{arg}: module {name!r} is not inside a transformer block (a ModuleList of layers); "
                "adapters are allocated per block, so target modules must be block members"
            )
        if outer not in lists:
            lists.append(outer)
    order = [name for name, _ in model.named_modules()]
    lists.sort(key=order.index)
    offsets = [0]
    for prefix in lists:
        offsets.append(offsets[-1] + len(model.get_submodule(prefix)))
    return BlockMap(tuple(lists), tuple(offsets))
