"""The fedhello cache folder: converted offline backbones and the csrc extensions built on first use."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The fedhello cache folder (``$FEDHELLO_CACHE`` or ``~/.cache/fedhello``), created if needed."""
    root = os.environ.get("FEDHELLO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fedhello")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
