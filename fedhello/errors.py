"""The errors a user is expected to meet (bad config, missing file, offline name, missing extra).

The command line prints such an error as one line on stderr and exits with status 2; anything
else is a bug and keeps its traceback. ``UserError`` is a ``ValueError``, so code that catches
``ValueError`` keeps working.

``require_extra`` is called where a layer of the package starts (``fedhello.nn``,
``fedhello.models``, ``fedhello.data``, ``fedhello.fl``, ``fedhello.config``,
``fedhello.fl.flower``, the command line): the core install (``pip install fedhello``) has the
kernels only, and a layer whose pip extra is missing says which one in one line, rather than
failing on the first third-party import somewhere below it.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_MODULES", "MissingExtraError", "UserError", "require_extra"]


class UserError(ValueError):
    """An expected failure caused by the user's input or environment; the message names what to fix."""


class MissingExtraError(UserError, ImportError):
    """A part of fedhello needs an optional dependency group (a pip extra) that is not installed."""


# The modules each extra of pyproject.toml provides (import names), and the extras it includes.
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("transformers", "peft", "safetensors"),
    "fl": ("datasets", "flwr_datasets", "yaml", "tqdm", "matplotlib", "sklearn", "scipy"),
    "flower": ("flwr",),
    "dp": ("dp_accounting",),
    "quant": ("bitsandbytes",),
}
_INCLUDES = {"hf": (), "fl": ("hf",), "flower": ("fl",), "dp": (), "quant": ()}


def _modules(extra: str) -> list[str]:
    return [m for inner in _INCLUDES[extra] for m in _modules(inner)] + list(EXTRA_MODULES[extra])


def require_extra(extra: str, what: str) -> None:
    """Raise ``MissingExtraError`` naming ``extra`` when a module it provides is not installed.

    Args:
        extra: a key of ``EXTRA_MODULES`` (``"hf"``, ``"fl"``, ``"flower"``); an extra's included
            extras are checked too (``fl`` needs ``hf``).
        what: the module or command that needs it, for the message.

    Nothing is imported: ``importlib.util.find_spec`` only looks the modules up.
    """
    if extra not in EXTRA_MODULES:
        raise ValueError(f"extra: expected one of {sorted(EXTRA_MODULES)}, got {extra!r}")
    missing = [m for m in _modules(extra) if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed): "
                                f"pip install 'fedhello[{extra}]'")
