"""A slot of a multi-client model over a bitsandbytes base, exported as a PEFT folder, loads on
the same base quantized the same way (QLoRA) and on the full-precision base."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from fedhello.models import load_backbone  # noqa: E402
from fedhello.nn import export_peft, import_peft, inject_multi_lora  # noqa: E402

from .tiny import perturb_slots, tiny_causal_lm  # noqa: E402

VOCAB = 96
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_exported_slot_loads_on_the_quantized_and_the_full_precision_base(tmp_path, kind):
    from peft import PeftModel

    base_dir = tmp_path / "base"
    tiny_causal_lm(VOCAB, tie=False).save_pretrained(base_dir)
    model = inject_multi_lora(load_backbone(base_dir, task="causal-lm", quantize=kind), TARGETS, num_clients=3,
                              rank=4, alpha=8, head_modules=None, backend="torch", seed=1)
    gen = torch.Generator().manual_seed(2)
    perturb_slots(model, gen)
    model.set_ranks({1: 2})
    export_peft(model, 1, tmp_path / "adapter")
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    with torch.no_grad(), model.route(torch.tensor([1, 1])):
        slot = model(input_ids=ids).logits

    quantized = PeftModel.from_pretrained(load_backbone(base_dir, task="causal-lm", quantize=kind),
                                          str(tmp_path / "adapter")).eval()
    assert any(type(m).__module__ == "peft.tuners.lora.bnb" for m in quantized.modules())
    with torch.no_grad():
        torch.testing.assert_close(quantized(input_ids=ids).logits, slot, rtol=1e-5, atol=1e-5)

    # On the full-precision base the adapter gives what a full-precision multi-client slot gives.
    full = PeftModel.from_pretrained(load_backbone(base_dir, task="causal-lm"), str(tmp_path / "adapter")).eval()
    reference = inject_multi_lora(load_backbone(base_dir, task="causal-lm"), TARGETS, num_clients=1, rank=4, alpha=8,
                                  head_modules=None, backend="torch")
    import_peft(reference, 0, tmp_path / "adapter")
    with torch.no_grad(), reference.route(0):
        want = reference(input_ids=ids).logits
    with torch.no_grad():
        got = full(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert float((got - slot).abs().max()) < 0.5  # the quantization error, not another adapter
    with torch.no_grad(), model.route(torch.tensor([0, 0])):  # another slot differs: the checks can fail
        assert float((model(input_ids=ids).logits - slot).abs().max()) > 1e-3
