"""Is the Hugging Face hub usable right now? One quick probe, no retries.

Hub clients retry a dead connection for a minute or more before failing with a long traceback;
name checks (``fedhello.models.loading.check_backbone_name``,
``fedhello.data.sources.check_data_source``) ask here first and fail in one line instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

__all__ = [
    "HUB_PROBE_TIMEOUT",
    "hub_lacks",
    "hub_offline_reason",
    "hub_problem",
    "in_hub_cache",
    "looks_like_hub_id",
    "use_cache_only",
]

HUB_PROBE_TIMEOUT = 3.0  # seconds; a reachable hub answers a HEAD request far sooner
_TRUE = {"1", "on", "yes", "true"}


def _env_offline(*names: str) -> str | None:
    for name in names:
        if os.environ.get(name, "").strip().lower() in _TRUE:
            return name
    return None


@functools.lru_cache(maxsize=None)
def _probe(endpoint: str, timeout: float) -> str | None:
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as err:  # any failure to connect means: not usable now; the message says which
        return f"the Hugging Face hub ({endpoint}) is unreachable ({type(err).__name__}: {err})"
    return None


def hub_offline_reason(*, datasets: bool = False, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why the hub cannot serve a download now (offline mode set, or no connection), or None if it can.

    Args:
        datasets: also honour ``HF_DATASETS_OFFLINE`` (the ``datasets`` library's own switch).
        timeout: seconds the one connection attempt may take; the answer is cached per process.
    """
    variable = _env_offline("HF_HUB_OFFLINE", *(("HF_DATASETS_OFFLINE",) if datasets else ()))
    if variable is not None:
        return f"{variable} is set (offline mode)"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return _probe(endpoint, timeout)


def in_hub_cache(repo_id: str, repo_type: str = "model") -> bool:
    """Whether the local hub cache (or, for data sets, the ``datasets`` cache) holds ``repo_id``."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if (folder / "snapshots").is_dir() and any((folder / "snapshots").iterdir()):
        return True
    if repo_type == "dataset":
        datasets_cache = os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")
        return (Path(datasets_cache) / repo_id.replace("/", "___")).is_dir()
    return False


def looks_like_hub_id(name: str) -> bool:
    """``name`` has the shape of a hub repository id: ``name`` or ``owner/name`` of letters, digits, ``-_.``."""
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return 1 <= len(parts) <= 2 and all(p and set(p) <= allowed and p[0] not in "-." and ".." not in p
                                        for p in parts)


def use_cache_only() -> None:
    """Put this process's hub clients in offline mode (read the local cache, never retry the network).

    For a name found in the cache while the hub is unreachable: without this, ``transformers``
    and ``datasets`` would first retry the dead connection for a minute. Takes effect for
    libraries imported afterwards (the CLI imports them after the checks).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def hub_lacks(repo_id: str, repo_type: str = "model") -> bool:
    """True only when the (reachable) hub answers that ``repo_id`` does not exist.

    Any other outcome (it exists, is gated, or the question fails) is False: the loader then
    tries and reports in its own words; this check only turns a sure "no such repository"
    into one line before anything heavy is imported.
    """
    from huggingface_hub import repo_exists

    try:
        return not repo_exists(repo_id, repo_type=repo_type)
    except Exception:  # network or auth trouble: not a sure answer
        return False


def hub_problem(repo_id: str, repo_type: str = "model") -> str | None:
    """Why ``repo_id`` cannot load from the hub now (offline and not cached, or no such repository), or None.

    A repository found in the local cache while the hub is offline is fine, and this process's
    hub clients are then switched to cache-only mode (``use_cache_only``).
    """
    reason = hub_offline_reason(datasets=repo_type == "dataset")
    if reason is not None:
        if not in_hub_cache(repo_id, repo_type):
            return reason
        use_cache_only()
    elif hub_lacks(repo_id, repo_type):
        return f"the Hugging Face hub has no {repo_type} {repo_id!r}"
    return None
