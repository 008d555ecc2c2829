"""N clients with different ranks in one batch over a bitsandbytes base equal each client alone
through PEFT's LoRA over the same bitsandbytes base: outputs, gradients and AdamW steps.

The base is quantized once (``quantize_backbone``); the multi-client model and every PEFT
reference get copies of that one quantized model, so both sides read the same packed weights.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("bitsandbytes")

from fedhello.models.quantize import quantize_backbone  # noqa: E402
from fedhello.nn import inject_multi_lora  # noqa: E402

from .tiny import ARCHS, LABELS, make_batch, make_model, peft_client, peft_grads, randomize_banks, select  # noqa: E402

N, RANK, ALPHA = 3, 4, 8.0
RANKS = [4, 2, 3]
CLIENTS = torch.tensor([2, 0, 1, 1, 0, 2, -1, 1])
TOL = dict(rtol=1e-5, atol=1e-5)
KINDS = ["nf4", "fp4", "int8"]


def _quantized(kind: str):
    pristine = make_model("llama")
    names = quantize_backbone(pristine, kind, torch.float32)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    model = inject_multi_lora(copy.deepcopy(pristine), ARCHS["llama"].targets, N, rank=RANK, ranks=RANKS,
                              alpha=ALPHA, backend="torch")
    randomize_banks(model, std=0.1)
    return pristine, model


def _reference(pristine, model, client: int):
    reference = peft_client(pristine, "llama", model.client_state(client), RANKS[client], ALPHA)
    layers = {f"{type(m).__module__}.{type(m).__name__}" for m in reference.modules() if hasattr(m, "lora_A")}
    expected = "Linear8bitLt" if getattr(model, "is_loaded_in_8bit", False) else "Linear4bit"
    assert layers == {f"peft.tuners.lora.bnb.{expected}"}, layers  # PEFT's own bitsandbytes LoRA layers
    return reference


def _rows(client: int) -> torch.Tensor:
    return (CLIENTS == client).nonzero().flatten()


def _loss(logits, labels, ids):
    """Sum over clients of each client's mean cross-entropy (the engine's loss)."""
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    counts = torch.bincount(ids + 1, minlength=N + 1).to(per_sample.dtype)
    return (per_sample / counts[ids + 1]).sum()


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_and_gradients_match_peft_over_the_same_quantized_base(kind):
    pristine, model = _quantized(kind)
    batch = make_batch("llama", len(CLIENTS))
    labels = torch.randint(0, LABELS, (len(CLIENTS),), generator=torch.Generator().manual_seed(5))
    with model.route(CLIENTS):
        logits = model(**batch).logits
    _loss(logits, labels, CLIENTS).backward()
    banks = {name: p for name, _, p in model.lora_banks()} | dict(model.head_banks())
    for c in range(N):
        reference = _reference(pristine, model, c)
        rows = _rows(c)
        out = reference(**select(batch, rows)).logits
        torch.testing.assert_close(logits[rows].detach(), out.detach(), **TOL)
        F.cross_entropy(out, labels[rows]).backward()
        expected = peft_grads(reference)
        assert set(expected) == set(banks)
        r = RANKS[c]
        for name, grad in expected.items():
            got = banks[name].grad[c]
            got = got[:r] if name.endswith(".lora_a") else got[:, :r] if name.endswith(".lora_b") else got
            torch.testing.assert_close(got, grad, **TOL)
            assert grad.abs().sum() > 0, f"{name}: vacuous comparison, PEFT gradient is zero"
    with torch.no_grad():
        base = pristine(**select(batch, _rows(-1))).logits
    torch.testing.assert_close(logits[_rows(-1)].detach(), base, **TOL)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adamw_steps_match_peft_per_client(kind):
    pristine, model = _quantized(kind)
    references = [_reference(pristine, model, c) for c in range(N)]
    batch = make_batch("llama", len(CLIENTS))
    labels = torch.randint(0, LABELS, (len(CLIENTS),), generator=torch.Generator().manual_seed(5))
    model.train()
    banks = [p for _, _, p in model.lora_banks()] + [p for _, p in model.head_banks()]
    optimizer = torch.optim.AdamW(banks, lr=1e-2)
    ref_optimizers = []
    for reference in references:
        reference.train()
        ref_optimizers.append(torch.optim.AdamW([p for p in reference.parameters() if p.requires_grad], lr=1e-2))
    for _ in range(3):
        optimizer.zero_grad()
        with model.route(CLIENTS):
            _loss(model(**batch).logits, labels, CLIENTS).backward()
        optimizer.step()
        for c, (reference, ref_opt) in enumerate(zip(references, ref_optimizers)):
            ref_opt.zero_grad()
            rows = _rows(c)
            F.cross_entropy(reference(**select(batch, rows)).logits, labels[rows]).backward()
            ref_opt.step()
    model.eval()
    for c, reference in enumerate(references):
        reference.eval()
        state = model.client_state(c)
        r = RANKS[c]
        for name, param in reference.base_model.model.named_parameters():
            if ".lora_A.default." in name:
                torch.testing.assert_close(state[name.split(".lora_A.")[0] + ".lora_a"][:r], param.detach(), **TOL)
            elif ".lora_B.default." in name:
                torch.testing.assert_close(state[name.split(".lora_B.")[0] + ".lora_b"][:, :r], param.detach(), **TOL)
        rows = _rows(c)
        with torch.no_grad(), model.route(CLIENTS[rows]):
            got = model(**select(batch, rows)).logits
        with torch.no_grad():
            torch.testing.assert_close(got, reference(**select(batch, rows)).logits, **TOL)
