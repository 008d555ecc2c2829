"""Tiny random-config transformers models and a PEFT reference for the model-layer tests.

Models are built from configs (no download): hidden 32, 2 blocks, 3 labels. ``peft_client``
builds an independent reference: PEFT's own LoRA (and ``modules_to_save``) on a pristine copy
of the model, with one client's tensors written straight into PEFT's modules.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB, HIDDEN, LABELS, PAD = 64, 32, 3, 0


@dataclass
class Arch:
    """A tiny model factory with its LoRA targets and head name."""

    name: str
    build: Callable[[], nn.Module]
    targets: list[str]
    head: str
    vision: bool = False


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=LABELS, pad_token_id=PAD))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=LABELS, pad_token_id=PAD,
        bos_token_id=1, eos_token_id=2))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2ForSequenceClassification

    return GPT2ForSequenceClassification(GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=32, num_labels=LABELS,
        pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def _vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=64, num_labels=LABELS))


ARCHS = {
    "bert": Arch("bert", _bert, ["query", "value"], "classifier"),
    # LLaMA with attention and MLP targets; GPT-2's fused c_attn and both c_proj are Conv1D.
    "llama": Arch("llama", _llama, ["q_proj", "v_proj", "down_proj"], "score"),
    "gpt2": Arch("gpt2", _gpt2, ["c_attn", "c_proj"], "score"),
    "vit": Arch("vit", _vit, ["q_proj", "v_proj", "fc2"], "classifier", vision=True),
}


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A fresh tiny model in eval mode (deterministic weights for ``seed``)."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ARCHS[arch].build()
    return model.eval()


def make_batch(arch: str, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs for ``batch`` samples: right-padded token ids of varied length, or images."""
    gen = torch.Generator().manual_seed(seed)
    if ARCHS[arch].vision:
        return {"pixel_values": torch.randn(batch, 3, 8, 8, generator=gen)}
    seq = 7
    ids = torch.randint(3, VOCAB, (batch, seq), generator=gen)
    lengths = torch.randint(3, seq + 1, (batch,), generator=gen)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    return {"input_ids": torch.where(mask, ids, PAD), "attention_mask": mask.long()}


def select(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[rows] for k, v in batch.items()}


@torch.no_grad()
def randomize_banks(model, seed: int = 2, std: float = 0.3) -> None:
    """Give every client slot its own random adapters (B non-zero) and head."""
    gen = torch.Generator().manual_seed(seed)
    for _, _, bank in model.lora_banks():
        bank.copy_(torch.randn(bank.shape, generator=gen) * std)
    for _, bank in model.head_banks():
        bank.copy_(torch.randn(bank.shape, generator=gen) * std)


def perturb_slots(model, gen: torch.Generator, std: float = 0.2) -> None:
    """Add N(0, std) noise to every slot's adapters and heads, each slot its own draw."""
    for slot in range(model.num_clients):
        model.load_client_state(slot, {k: v + std * torch.randn(v.shape, generator=gen)
                                       for k, v in model.client_state(slot).items()})


def peft_client(pristine: nn.Module, arch: str, state: dict[str, torch.Tensor], rank: int, alpha: float):
    """PEFT LoRA (rank ``rank``) on a copy of ``pristine`` holding one client's ``state``."""
    from peft import LoraConfig, get_peft_model

    info = ARCHS[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(pristine), LoraConfig(
            r=rank, lora_alpha=alpha, target_modules=info.targets, modules_to_save=[info.head]))
    write_peft_state(peft_model, state, rank)
    return peft_model.eval()


@torch.no_grad()
def write_peft_state(peft_model, state: dict[str, torch.Tensor], rank: int) -> None:
    """Write one client's state (adapters cut to ``rank``, heads) into a PEFT model's modules."""
    for key, value in state.items():
        module_name, _, tensor = key.rpartition(".")
        module = peft_model.base_model.model.get_submodule(module_name)
        if tensor == "lora_a":
            module.lora_A["default"].weight.copy_(value[:rank])
        elif tensor == "lora_b":
            module.lora_B["default"].weight.copy_(value[:, :rank])
        else:
            getattr(module.modules_to_save["default"], tensor).copy_(value)


def peft_grads(peft_model) -> dict[str, torch.Tensor]:
    """Gradients of a PEFT model's adapter and head, keyed like a client state (rank-sized)."""
    out = {}
    for name, param in peft_model.base_model.model.named_parameters():
        if param.grad is None:
            continue
        if ".lora_A.default." in name:
            out[name.split(".lora_A.")[0] + ".lora_a"] = param.grad
        elif ".lora_B.default." in name:
            out[name.split(".lora_B.")[0] + ".lora_b"] = param.grad
        elif ".modules_to_save.default." in name:
            head, _, tensor = name.partition(".modules_to_save.default.")
            out[f"{head}.{tensor}"] = param.grad
    return out


def tiny_causal_lm(vocab: int, tie: bool = True) -> nn.Module:
    """A random 2-block LLaMA causal LM (hidden 32, pad 2, bos 1, eos 2), the same for every call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, pad_token_id=2, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=tie)).eval()


def tiny_lm_run_config(model_dir, data, out, **model) -> dict:
    """A 2-round causal-LM run config over the tiny LM folder and news CSV of ``tests/fl/conftest.py``
    (4 clients, 3 per round), with ``model`` fields added."""
    return {
        "task": "causal_lm", "seed": 1,
        "model": {"name": str(model_dir), "rank": 4, "alpha": 8, **model},
        "data": {"path": str(data), "text_column": "text", "label_column": "topic", "max_length": 16,
                 "num_clients": 4, "test_fraction": 0.25, "partition": {"kind": "pathological", "classes_per_client": 1}},
        "strategy": {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 1}},
        "tiers": {"fractions": [0.5, 1.0], "shares": [1, 1]},
        "rounds": 2, "cohort_size": 3, "local": {"steps": 3, "batch_size": 4, "lr": 0.05},
        "engine": {"device": "cpu"}, "eval_every": 1, "checkpoint_every": 1, "output_dir": str(out),
    }
