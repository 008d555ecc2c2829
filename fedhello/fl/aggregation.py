"""Server-side aggregation of client updates, block by block.

Tensors are plain ``name -> torch.Tensor`` dicts. ``tensor_blocks`` maps every name of the
global state to the transformer block its LoRA adapter sits in, or to ``None`` for tensors
every participant trains (the classification head, like PEFT's ``modules_to_save``).

``aggregate_layerwise``: for each LoRA tensor, the clients that trained its block (by exact
block index, from ``ClientUpdate.trained_blocks``) contribute their deltas, weighted by their
sample counts, uniformly, or (``"norm"``, HetLoRA's sparsity-weighted aggregation) by the
Frobenius norm of the client's adapters after local training (``client_norm_weights``); a tensor
no client trained keeps its value; head tensors are averaged over all participants, or with
``heads="keep_initial"`` (a reproduction of the paper's released code, which sends back LoRA
tensors only) never change. Deltas of blocks a client did not train are ignored even if present,
so an engine may send full states.

``aggregate_rank_padded`` (HetLoRA): clients train every block at different ranks. Three ways
to average rank slice i (row i of ``A``) over clients of different ranks: ``"factors"`` pads the
clients' *factors* with zeros, as HetLoRA (Cho et al., 2024) does: slice i becomes the weighted
sum of the covering clients' factors over the weight of all contributors, so a slice that few
clients train shrinks (HetLoRA's self-pruning); ``"all"`` pads their *deltas* with zeros (an
uncovering client counts as keeping the global value: the covering clients' change, scaled by
their share of the weight); ``"covering"`` averages slice i over the covering clients only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from fedhello.names import HEADS, RANK_NORMALIZATIONS, WEIGHTINGS

__all__ = [
    "WEIGHTINGS",
    "RANK_NORMALIZATIONS",
    "HEADS",
    "ClientUpdate",
    "aggregate_layerwise",
    "aggregate_rank_padded",
    "lora_factor_pairs",
    "lora_rank_dims",
    "client_norm_weights",
]


def _block_set(trained_blocks: Iterable[int] | np.ndarray | torch.Tensor) -> frozenset[int]:
    if isinstance(trained_blocks, torch.Tensor):
        trained_blocks = trained_blocks.detach().cpu().numpy()
    if isinstance(trained_blocks, np.ndarray) and trained_blocks.dtype == bool:
        if trained_blocks.ndim != 1:
            raise ValueError(f"trained_blocks: expected a bool [L] mask, got shape {trained_blocks.shape}")
        return frozenset(np.flatnonzero(trained_blocks).tolist())
    blocks = []
    for b in trained_blocks:
        if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)) or b < 0:
            raise ValueError(f"trained_blocks: expected block indices >= 0 or a bool mask, got {b!r}")
        blocks.append(int(b))
    return frozenset(blocks)


@dataclass(frozen=True)
class ClientUpdate:
    """One client's contribution to a round.

    Attributes:
        delta: ``name -> local - global`` for the tensors it trained (others may be present and
            are ignored); shapes as in the global state (HetLoRA factors may be cut to the
            client's rank along the rank dimension).
        num_samples: the client's training samples (the aggregation weight), >= 1.
        trained_blocks: indices of the blocks it trained (a bool ``[L]`` mask is accepted).
        rank: its LoRA rank (HetLoRA), None for the model's rank.
    """

    delta: Mapping[str, torch.Tensor]
    num_samples: int
    trained_blocks: frozenset[int]
    rank: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, (int, np.integer)) \
                or self.num_samples < 1:
            raise ValueError(f"num_samples: expected an int >= 1, got {self.num_samples!r}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer))
                                      or self.rank < 1):
            raise ValueError(f"rank: expected an int >= 1 or None, got {self.rank!r}")
        for name, value in self.delta.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"delta: expected torch.Tensor values, got {type(value).__name__} for {name!r}")
        object.__setattr__(self, "num_samples", int(self.num_samples))
        object.__setattr__(self, "trained_blocks", _block_set(self.trained_blocks))

    @classmethod
    def from_states(cls, local_state: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor],
                    num_samples: int, trained_blocks: Iterable[int] | np.ndarray | torch.Tensor,
                    tensor_blocks: Mapping[str, int | None], rank: int | None = None) -> "ClientUpdate":
        """The update of a client whose state after local training is ``local_state``.

        Only tensors of trained blocks and head tensors (block None) go into the delta.
        """
        blocks = _block_set(trained_blocks)
        delta = {}
        for name, block in tensor_blocks.items():
            if block is None or block in blocks:
                if name not in local_state or name not in global_state:
                    raise ValueError(f"local_state: tensor {name!r} is missing from the local or the global state")
                delta[name] = local_state[name].detach() - global_state[name].detach().to(local_state[name].device)
        return cls(delta, num_samples, blocks, rank)


def _check_common(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                  tensor_blocks: Mapping[str, int | None], weighting: str, heads: str) -> list[float]:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {WEIGHTINGS}, got {weighting!r}")
    if heads not in HEADS:
        raise ValueError(f"heads: expected one of {HEADS}, got {heads!r}")
    if len(updates) == 0:
        raise ValueError("updates: expected at least one client update, got none")
    for i, u in enumerate(updates):
        if not isinstance(u, ClientUpdate):
            raise TypeError(f"updates[{i}]: expected a ClientUpdate, got {type(u).__name__}")
        extra = sorted(set(u.delta) - set(global_state))
        if extra:
            raise ValueError(f"updates[{i}].delta: tensor {extra[0]!r} is not in the global state")
    missing = sorted(set(global_state) - set(tensor_blocks))
    if missing:
        raise ValueError(f"tensor_blocks: no block given for tensor {missing[0]!r} (use None for head tensors)")
    if weighting == "norm":
        return client_norm_weights(global_state, updates, tensor_blocks)
    return [1.0 if weighting == "uniform" else float(u.num_samples) for u in updates]


def lora_factor_pairs(names: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``name -> (A name, B name)`` for every LoRA factor whose partner is present: the two
    differ only in a last part ``lora_a``/``lora_b`` (or ``lora_A``/``lora_B``)."""
    names = set(names)
    pairs = {}
    for name in names:
        head, _, last = name.rpartition(".")
        if last.lower() != "lora_a":
            continue
        partner = f"{head}.{last[:-1]}{'B' if last[-1] == 'A' else 'b'}" if head else ""
        if partner in names:
            pairs[name] = pairs[partner] = (name, partner)
    return pairs


def _local_factor(g: torch.Tensor, updates: Sequence["ClientUpdate"], i: int, name: str, dim: int) -> torch.Tensor:
    """Client ``i``'s factor ``name`` after training (global + delta), cut to its rank along ``dim``, fp64."""
    d = updates[i].delta.get(name)
    rank = updates[i].rank if updates[i].rank is not None else g.shape[dim]
    if d is None or d.dim() != g.dim() or not rank <= d.shape[dim] <= g.shape[dim]:
        raise ValueError(f"updates[{i}].delta: norm weighting needs {name!r} at rank {rank} along dim {dim}; got "
                         f"{'nothing' if d is None else tuple(d.shape)} (global {tuple(g.shape)})")
    return g.narrow(dim, 0, rank).double() + d.narrow(dim, 0, rank).to(g.device).double()


# A client whose adapters are exactly zero gets this weight instead of 0, so that a tensor only
# such clients trained is still a (plain) average, not a division by zero.
_ZERO_NORM_WEIGHT = 1e-30


def client_norm_weights(global_state: Mapping[str, torch.Tensor], updates: Sequence["ClientUpdate"],
                        tensor_blocks: Mapping[str, int | None]) -> list[float]:
    """HetLoRA's sparsity weights: client c's weight is the Frobenius norm of its whole update
    ``B_c A_c``, i.e. ``sqrt(sum_m ||B_{c,m} A_{c,m}||_F^2)`` over the adapted modules m of the
    blocks it trained, with ``A [r, d_in]`` and ``B [d_out, r]`` its factors after training
    (global + delta, cut to its rank). Only the ratios matter: each tensor is averaged with the
    weights of its contributors.
    """
    pairs = sorted(set(lora_factor_pairs(global_state).values()))
    weights = []
    for i, update in enumerate(updates):
        squared = 0.0
        for a_name, b_name in pairs:
            if tensor_blocks.get(a_name) not in update.trained_blocks:
                continue
            a = _local_factor(global_state[a_name], updates, i, a_name, 0)
            b = _local_factor(global_state[b_name], updates, i, b_name, -1)
            # ||B A||_F^2 = trace((B^T B)(A A^T)): r x r products instead of the d_out x d_in matrix.
            squared += float(((b.t() @ b) * (a @ a.t())).sum().clamp_min(0.0))
        weights.append(max(squared ** 0.5, _ZERO_NORM_WEIGHT))
    return weights


def _contributors(name: str, block: int | None, updates: Sequence[ClientUpdate]) -> list[int]:
    """Indices of the updates that trained ``name``; each must carry its delta."""
    if block is None:
        chosen = list(range(len(updates)))
    else:
        chosen = [i for i, u in enumerate(updates) if block in u.trained_blocks]
    for i in chosen:
        if name not in updates[i].delta:
            what = "head tensor (every participant trains it)" if block is None else f"tensor of trained block {block}"
            raise ValueError(f"updates[{i}].delta: missing {what} {name!r}")
    return chosen


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def aggregate_layerwise(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                        tensor_blocks: Mapping[str, int | None], *,
                        weighting: str = "samples", heads: str = "average") -> dict[str, torch.Tensor]:
    """Layer-wise weighted average of the deltas, over the clients that trained each tensor.

    Args:
        global_state: ``name -> tensor`` before the round.
        updates: the participants' updates.
        tensor_blocks: ``name -> block index`` of every global tensor, None for head tensors.
        weighting: ``"samples"`` (weights = ``num_samples``), ``"uniform"`` or ``"norm"``
            (``client_norm_weights``).
        heads: ``"average"`` the head tensors (block None) over all participants, or
            ``"keep_initial"``: return them unchanged (the released code's behaviour).

    Returns:
        the new global state: ``g + sum_c w_c d_c / sum_c w_c`` over the contributors of each
        tensor, accumulated in fp32 (fp64 for fp64 tensors) and cast back to the global dtype;
        tensors without contributors are returned as the same objects.
    """
    weights = _check_common(global_state, updates, tensor_blocks, weighting, heads)
    return _average(global_state, updates, tensor_blocks, weights, heads)


def _average(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
             tensor_blocks: Mapping[str, int | None], weights: Sequence[float],
             heads: str) -> dict[str, torch.Tensor]:
    """``aggregate_layerwise`` with the per-client weights given (after the common checks)."""
    new: dict[str, torch.Tensor] = {}
    for name, g in global_state.items():
        kept_head = tensor_blocks[name] is None and heads == "keep_initial"
        chosen = [] if kept_head else _contributors(name, tensor_blocks[name], updates)
        if not chosen:
            new[name] = g
            continue
        acc = torch.zeros(g.shape, dtype=_acc_dtype(g), device=g.device)
        for i in chosen:
            d = updates[i].delta[name]
            if d.shape != g.shape:
                raise ValueError(f"updates[{i}].delta: {name!r} has shape {tuple(d.shape)}, expected {tuple(g.shape)}")
            acc.add_(d.to(device=g.device, dtype=acc.dtype), alpha=weights[i])
        acc /= sum(weights[i] for i in chosen)
        new[name] = (g.to(acc.dtype) + acc).to(g.dtype)
    return new


def lora_rank_dims(names: Iterable[str]) -> dict[str, int]:
    """Rank dimension of LoRA factors by name: ``lora_A``/``lora_a`` → 0 (``[r, d_in]``),
    ``lora_B``/``lora_b`` → -1 (``[d_out, r]``), matched on whole dot-separated name parts."""
    dims = {}
    for name in names:
        parts = {p.lower() for p in name.split(".")}
        if "lora_a" in parts:
            dims[name] = 0
        elif "lora_b" in parts:
            dims[name] = -1
    return dims


def aggregate_rank_padded(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate],
                          tensor_blocks: Mapping[str, int | None], rank_dims: Mapping[str, int], *,
                          weighting: str = "samples", normalize: str = "all",
                          heads: str = "average") -> dict[str, torch.Tensor]:
    """HetLoRA aggregation: clients of different ranks averaged rank slice by rank slice.

    Args:
        global_state, updates, tensor_blocks, weighting, heads: as for ``aggregate_layerwise``.
        rank_dims: ``name -> rank dimension`` of each LoRA factor (see ``lora_rank_dims``);
            other tensors are averaged as in ``aggregate_layerwise``.
        normalize: with ``W`` the weight of all contributors and ``W_i`` that of those whose rank
            exceeds i: ``"factors"``: slice i = ``(W_i g_i + sum_cov w d_i) / W`` (the factors
            zero-padded, HetLoRA's own rule: uncovered weight pulls the slice towards zero);
            ``"all"``: ``g_i + sum_cov w d_i / W`` (the deltas zero-padded); ``"covering"``:
            ``g_i + sum_cov w d_i / W_i`` (slices nobody covers keep their value).

    A client's factor delta is either cut to its rank (size ``rank`` along the rank dimension)
    or full-size, in which case slices at or beyond ``ClientUpdate.rank`` are ignored.

    Returns:
        the new global state (tensors without contributors are the same objects).
    """
    if normalize not in RANK_NORMALIZATIONS:
        raise ValueError(f"normalize: expected one of {RANK_NORMALIZATIONS}, got {normalize!r}")
    weights = _check_common(global_state, updates, tensor_blocks, weighting, heads)
    unknown = sorted(set(rank_dims) - set(global_state))
    if unknown:
        raise ValueError(f"rank_dims: tensor {unknown[0]!r} is not in the global state")
    plain = {n: g for n, g in global_state.items() if n not in rank_dims}
    new = _average(plain, updates, tensor_blocks, weights, heads)
    for name, g in global_state.items():
        if name not in rank_dims:
            continue
        dim = rank_dims[name] % g.dim()
        full = g.shape[dim]
        chosen = _contributors(name, tensor_blocks[name], updates)
        if not chosen:
            new[name] = g
            continue
        acc = torch.zeros(g.shape, dtype=_acc_dtype(g), device=g.device)
        cover = torch.zeros(full, dtype=acc.dtype, device=g.device)
        for i in chosen:
            d = updates[i].delta[name]
            size = d.shape[dim] if d.dim() == g.dim() else -1
            rank = updates[i].rank if updates[i].rank is not None else size
            other_ok = d.dim() == g.dim() and all(d.shape[j] == g.shape[j] for j in range(g.dim()) if j != dim)
            if not other_ok or not (size == full or size == rank) or not 1 <= rank <= full:
                raise ValueError(f"updates[{i}].delta: {name!r} has shape {tuple(d.shape)}; expected {tuple(g.shape)} "
                                 f"or cut to rank {rank} along dim {dim}")
            acc.narrow(dim, 0, rank).add_(d.narrow(dim, 0, rank).to(device=g.device, dtype=acc.dtype),
                                          alpha=weights[i])
            cover[:rank] += weights[i]
        shape = [1] * g.dim()
        shape[dim] = full
        total = sum(weights[i] for i in chosen)
        if normalize == "factors":  # sum_cov w (g + d) / W: the uncovered weight's zeros count
            new[name] = ((g.to(acc.dtype) * (cover / total).view(shape)) + acc / total).to(g.dtype)
            continue
        if normalize == "all":
            acc /= total
        else:
            acc /= cover.clamp_min(torch.finfo(acc.dtype).tiny).view(shape)
        new[name] = (g.to(acc.dtype) + acc).to(g.dtype)
    return {name: new[name] for name in global_state}
