"""Held-out evaluation of a causal LM served by a ``MultiLoRAModel`` slot.

``evaluate_lm`` gives the token-level loss and perplexity of one slot on held-out rows, overall
and per group (e.g. BBC News topic), so that a client's held-out perplexity can be computed for
its own mix of groups (``mixture_perplexity``) without a held-out split per client.
``greedy_completions`` decodes a few prompts greedily (what a user reads to see what the model
learned).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .losses import row_losses, row_terms
from .model import MultiLoRAModel

__all__ = ["evaluate_lm", "mixture_mean", "mixture_perplexity", "greedy_completions"]


@torch.no_grad()
def evaluate_lm(model: MultiLoRAModel, data: dict[str, torch.Tensor], batch_size: int, slot: int = 0,
                device: torch.device | None = None) -> dict[str, Any]:
    """Mean next-token cross-entropy (nats per target token) and perplexity of slot ``slot``.

    Args:
        data: ``input_ids``/``attention_mask``/``labels`` ``[n, S]`` (``fedhello.data.lm_tensors``),
            optionally ``group`` int64 ``[n]``.

    Returns:
        ``{"loss", "perplexity", "tokens", "group_loss": {group: loss}}`` (group losses only
        when ``data`` has ``group``).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = data["labels"].shape[0]
    groups = data.get("group")
    loss = torch.zeros(n, dtype=torch.float64)
    terms = row_terms(data["labels"])
    try:
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size].to(device) for k, v in data.items() if k != "group"}
            labels = batch.pop("labels")
            with model.route(torch.full((labels.shape[0],), slot, dtype=torch.long)):
                logits = model(**batch).logits
            loss[start:start + labels.shape[0]] = row_losses(logits, labels).double().cpu()
    finally:
        model.train(was_training)
    total = int(terms.sum())
    mean = float(loss.sum()) / max(total, 1)
    out: dict[str, Any] = {"loss": mean, "perplexity": math.exp(mean) if total else math.nan, "tokens": total}
    if groups is not None:
        out["group_loss"] = {
            int(g): float(loss[groups == g].sum()) / max(int(terms[groups == g].sum()), 1)
            for g in torch.unique(groups).tolist()
        }
    return out


def mixture_mean(group_value: dict[int, float], weights: dict[int, float]) -> float:
    """``sum_g w_g value_g / sum_g w_g`` over the groups that have a held-out value and weight > 0
    (a client's own mix of topics or classes); NaN when none has."""
    shared = {g: w for g, w in weights.items() if g in group_value and w > 0}
    if not shared:
        return math.nan
    return sum(w * group_value[g] for g, w in shared.items()) / sum(shared.values())


def mixture_perplexity(group_loss: dict[int, float], weights: dict[int, float]) -> float:
    """Perplexity on a mix of groups: ``exp(mixture_mean(group_loss, weights))`` (a client's own
    topic mix, weighted by its training tokens per topic)."""
    return math.exp(mixture_mean(group_loss, weights))


@torch.no_grad()
def greedy_completions(model: MultiLoRAModel, tokenizer: Any, prompts: Sequence[list[int]], slot: int = 0,
                       max_new_tokens: int = 32) -> list[str]:
    """Greedy continuations (decoded text, prompt excluded) of token-id prompts by slot ``slot``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt in prompts:
            ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)
            with model.route(torch.tensor([slot])):
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
            out.append(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out
