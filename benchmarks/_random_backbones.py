"""Backbones of the benchmarked shapes with random weights, built from ``transformers`` configs.

The lent GPU machines have no model weights and no package registry, and round timing does not
depend on the weights' values, so ``bench_rounds.py --random-weights`` builds each backbone from a
config written here (the shapes of the real checkpoints) with freshly initialised weights: a
sequence classifier (``random_backbone``) or, for the LLaMA shapes, a causal LM with its output
head (``random_causal_lm``). This module imports only ``torch`` and ``transformers``.

Shapes (from the checkpoints' ``config.json``):

* ``minilm``: all-MiniLM-L6-v2, BERT with 6 blocks, hidden 384, 12 heads, FFN 1536, vocab 30,522;
* ``smollm2``: SmolLM2-135M-Instruct, LLaMA with 30 blocks, hidden 576, 9 query / 3 key-value
  heads, FFN 1536, vocab 49,152, tied embeddings;
* ``bert-base``: BERT-base, 12 blocks, hidden 768, 12 heads, FFN 3072 (85M parameters in the
  blocks, 110M with the embeddings), the paper's backbone size;
* ``tiny-bert`` / ``tiny-llama``: 4-block toys of the two families for CPU smoke runs.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RANDOM_LM_MODELS", "RANDOM_MODELS", "random_backbone", "random_causal_lm"]

RANDOM_MODELS = ("tiny-bert", "tiny-llama", "minilm", "smollm2", "bert-base")
RANDOM_LM_MODELS = ("tiny-llama", "smollm2")  # the decoder (LLaMA) shapes: causal LMs too


def _config(name: str, seq: int, num_labels: int):
    from transformers import BertConfig, LlamaConfig

    if name == "tiny-bert":
        return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=48, max_position_embeddings=max(seq, 16), num_labels=num_labels,
                          pad_token_id=0)
    if name == "tiny-llama":
        return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(seq, 16),
                           tie_word_embeddings=True, pad_token_id=2, num_labels=num_labels)
    if name == "minilm":
        return BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                          intermediate_size=1536, max_position_embeddings=512, num_labels=num_labels,
                          pad_token_id=0)
    if name == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                           rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, pad_token_id=2,
                           num_labels=num_labels)
    if name == "bert-base":
        return BertConfig(num_labels=num_labels, pad_token_id=0)  # the defaults are BERT-base
    raise ValueError(f"model: expected one of {RANDOM_MODELS} for random weights, got {name!r}")


def random_backbone(name: str, seq: int, num_labels: int, seed: int) -> nn.Module:
    """A sequence classifier of the shape ``name`` (``RANDOM_MODELS``), random weights, fp32, eval, CPU.

    Raises:
        ValueError: unknown name, or ``seq`` beyond the model's positions.
    """
    from transformers import BertForSequenceClassification, LlamaForSequenceClassification

    config = _checked_config(name, seq, num_labels)
    cls = LlamaForSequenceClassification if config.model_type == "llama" else BertForSequenceClassification
    return _build(cls, config, seed)


def random_causal_lm(name: str, seq: int, seed: int) -> nn.Module:
    """A causal LM (``LlamaForCausalLM``, output head tied to the embeddings as in SmolLM2) of the
    shape ``name`` (``RANDOM_LM_MODELS``), random weights, fp32, eval, CPU.

    Raises:
        ValueError: a name outside ``RANDOM_LM_MODELS``, or ``seq`` beyond the model's positions.
    """
    from transformers import LlamaForCausalLM

    if name not in RANDOM_LM_MODELS:
        raise ValueError(f"model: expected one of {RANDOM_LM_MODELS} for a random causal LM, got {name!r}")
    return _build(LlamaForCausalLM, _checked_config(name, seq, num_labels=2), seed)  # num_labels: unused


def _checked_config(name: str, seq: int, num_labels: int):
    config = _config(name, seq, num_labels)
    if seq > config.max_position_embeddings:
        raise ValueError(f"--seq: {name} takes at most {config.max_position_embeddings} positions, got {seq}")
    return config


def _build(cls: type, config, seed: int) -> nn.Module:
    """``cls(config)`` with weights drawn from ``seed`` (the caller's RNG left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).float().eval()
