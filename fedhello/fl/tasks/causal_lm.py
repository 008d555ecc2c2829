"""Causal-LM runs (``task: causal_lm``): next-token loss, the backbone's own output head, frozen.

The global model is judged by held-out token loss and perplexity, overall and per client (each
client's own mix of groups). A few fixed held-out prompts are completed greedily at the start,
every ``COMPLETIONS_EVERY`` evaluations and at the end (``completions.jsonl``), and the final
global adapters are exported as a PEFT LoRA folder (``peft_adapter/``) that
``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from fedhello.data import FederatedData, lm_tensors
from fedhello import run_folder
from fedhello.fl.tasks.base import Batch, RunTask
from fedhello.nn import MultiLoRAModel, export_peft
from fedhello.nn.lm_eval import evaluate_lm, greedy_completions, mixture_perplexity
from fedhello.nn.losses import row_terms

__all__ = ["CausalLMTask", "COMPLETIONS_EVERY", "COMPLETION_PROMPTS", "COMPLETION_TOKENS"]

# Completions are written every this many evaluations, for this many prompts.
COMPLETIONS_EVERY = 4
COMPLETION_PROMPTS = 3
COMPLETION_TOKENS = 32


class CausalLMTask(RunTask):
    """Next-token training of a causal LM; the output head is the checkpoint's, frozen
    (``head_modules=None``: ``inject_multi_lora`` freezes all)."""

    head_modules = None

    def load_backbone(self, load: Callable[..., nn.Module], data: FederatedData, **base: Any) -> nn.Module:
        return load(task="causal-lm", **base)

    def prepare(self, data: FederatedData, backbone: nn.Module, load_tokenizer: Callable[[], Any]) -> dict[str, Any]:
        """Every client's rows (chunks of its documents, or its instructions), the test rows (with
        their group), the proxy rows, each client's training tokens per group (``"mixes"``), and
        the prompts whose completions are written during the run (``"prompts"``)."""
        cfg = self.config
        self.tokenizer = load_tokenizer()

        def prepare(ds) -> Batch:
            return lm_tensors(ds, self.tokenizer, cfg.data.max_length, chat_template=cfg.data.chat_template,
                              max_chunks=cfg.data.max_chunks)

        clients, mixes = [], []
        for idx in data.partitions:
            rows = prepare(data.train.select(idx))
            group = rows.pop("group")
            terms = row_terms(rows["labels"])
            mixes.append({int(g): float(terms[group == g].sum()) for g in torch.unique(group).tolist()})
            clients.append(rows)
        test = prepare(data.test)
        proxy = prepare(data.proxy) if data.proxy is not None else None
        if proxy is not None:
            proxy.pop("group")
        self.tensors = {"clients": clients, "test": test, "proxy": proxy, "mixes": mixes,
                        "prompts": _completion_prompts(test, COMPLETION_PROMPTS)}
        return self.tensors

    def evaluate(self, model: MultiLoRAModel, device: torch.device) -> dict[str, Any]:
        """``loss`` (nats per target token), ``perplexity``, and ``client_perplexity``: for every
        client, the perplexity on the held-out rows of its own mix of groups (topics), weighted by
        its training tokens per group."""
        result = evaluate_lm(model, self.tensors["test"], self.config.engine.eval_batch_size, device=device)
        groups = result.pop("group_loss")
        result["client_perplexity"] = [mixture_perplexity(groups, mix) for mix in self.tensors["mixes"]]
        return result

    def evaluated(self, model: MultiLoRAModel, rounds_done: int) -> None:
        """Append the global model's greedy completions of the fixed prompts, at the start, every
        ``COMPLETIONS_EVERY`` evaluations and at the end."""
        cfg, prompts = self.config, self.tensors["prompts"]
        due = (rounds_done // cfg.eval_every) % COMPLETIONS_EVERY == 0 or rounds_done == cfg.rounds
        if not due or not prompts:
            return
        texts = greedy_completions(model, self.tokenizer, prompts, max_new_tokens=COMPLETION_TOKENS)
        run_folder.append_completions(self.out, rounds_done,
                                      [(self.tokenizer.decode(prompt), text) for prompt, text in zip(prompts, texts)])

    def resumed(self, next_round: int) -> None:
        """Completions written after the checkpoint are written again: drop them."""
        run_folder.keep_completions(self.out, next_round)

    def export(self, model: MultiLoRAModel, global_state: dict[str, torch.Tensor]) -> None:
        """The final global adapters as a PEFT LoRA folder (``run_folder.PEFT_FOLDER``) in the run folder."""
        export_peft(model, None, self.out / run_folder.PEFT_FOLDER, state=global_state)


def _completion_prompts(test: Batch, count: int) -> list[list[int]]:
    """Token ids of up to ``count`` fixed held-out prompts: an instruction row's prompt, or the
    first quarter of a text row (the first rows of the test split: fixed for a run seed)."""
    prompts = []
    for ids, mask, labels in zip(test["input_ids"], test["attention_mask"], test["labels"]):
        length = int(mask.sum())
        target = (labels[:length] != -100).nonzero().flatten()
        start = int(target[0]) if target.numel() else length
        cut = start if start > 0 else max(1, length // 4)
        prompts.append(ids[:cut].tolist())
        if len(prompts) == count:
            break
    return prompts
