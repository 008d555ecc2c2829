"""Fixtures of the causal_lm and Flower tests: the offline SmolLM2 tokenizer, and a folder with a tiny
random LLaMA causal LM beside a small generated news file. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nn.tiny import tiny_causal_lm


@pytest.fixture(scope="module")
def tokenizer():
    from fedhello.models import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def tiny_lm_files(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A tiny LLaMA causal LM folder (with the SmolLM2 tokenizer) and a CSV of two topics' news."""
    root = tmp_path_factory.mktemp("tiny-lm")
    model_dir = root / "model"
    tiny_causal_lm(vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    topics = {"sport": "The team won the match in the final minute.", "tech": "The new chip runs code faster."}
    data = root / "news.csv"
    lines = ["text,topic"] + [f"\"{text} Story {i}.\",{topic}" for i in range(12) for topic, text in topics.items()]
    data.write_text("\n".join(lines) + "\n")
    return model_dir, data
