"""Fixtures of the model-layer tests (helpers live in ``tiny.py``)."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["bert", "llama", "gpt2"])
def text_arch(request) -> str:
    """The text architectures of the acceptance criteria: BERT, LLaMA, GPT-2 (tiny configs)."""
    return request.param
