"""``fedhello doctor``: which kernel backends run here, which offline assets are installed, what is missing.

``fedhello doctor --config RUN.yaml`` also builds that run's model and prints its memory: the
frozen base (quantized or not), the adapter and head banks, their optimizer state.

``report()`` returns the lines to print and the list of missing things (each with the command
that installs it), so a user (or CI) sees in one place why a run would fall back to a slower
backend or fail to find a model or data set.
"""

from __future__ import annotations

import platform
from collections import defaultdict
from typing import Callable

from fedhello.errors import MissingExtraError

__all__ = ["EXTENSION_ROLE", "memory_lines", "report"]

# What the csrc extension is for, given how ``resolve_backend("auto", ...)`` chooses.
EXTENSION_ROLE = ("the csrc extension is the fast path for CPU tensors, and for CUDA tensors the fallback "
                  "where Triton is not installed ('auto' takes Triton whenever it is)")


def _backend_name(name: str) -> str:
    return {"torch": "torch (reference)", "cpu": "cpu (csrc extension)", "cuda": "cuda (csrc extension)"}.get(name, name)


def _backend_lines(missing: list[str]) -> list[str]:
    import torch

    from fedhello.kernels import resolve_backend, triton_available, triton_interpreting
    from fedhello.kernels import extension

    cuda = torch.cuda.is_available()
    lines = ["kernel backends:", "  torch   always available (reference implementation, any device)"]
    if triton_available():
        import triton

        where = "CUDA tensors" + (", and CPU tensors in the interpreter (TRITON_INTERPRET=1)"
                                  if triton_interpreting() else "")
        lines.append(f"  triton  installed ({triton.__version__}): runs on {where}")
    else:
        lines.append("  triton  not installed: pip install triton")
        missing.append("triton (pip install triton)")
    for device_type in extension.DEVICE_TYPES:
        if extension.backend(device_type) is not None:
            lines.append(f"  {device_type:<7} csrc extension loaded")
            continue
        error = extension.load_error(device_type)
        lines.append(f"  {device_type:<7} csrc extension not available: {error}")
        if device_type == "cpu" or cuda:
            missing.append(f"csrc {device_type} extension ({error})")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    picks = ", ".join(f"{d} tensors -> {_backend_name(resolve_backend('auto', torch.device(d)).NAME)}" for d in devices)
    lines.append(f"  'auto' picks: {picks}")
    lines.append(f"  {EXTENSION_ROLE}")
    return lines


def _model_asset_status(locate: Callable[[], object]) -> str | None:
    """None when the asset behind an alias is installed, else the error naming its install command."""
    from fedhello.models import assets

    try:
        # smollm2_path converts the GGUF file on first use (~30 s): check the package instead.
        (assets.smollm2_gguf if locate is assets.smollm2_path else locate)()
    except assets.MissingAssetError as err:
        return str(err)
    return None


def _asset_lines(missing: list[str]) -> list[str]:
    from fedhello.data.sources import BUILTIN_DATASETS, _builtin_missing
    from fedhello.models.loading import _ALIASES

    lines = ["offline assets:"]
    by_asset: dict[Callable[[], object], list[str]] = defaultdict(list)
    for alias, (locate, _hub_fallback) in _ALIASES.items():
        by_asset[locate].append(alias)
    for locate, aliases in by_asset.items():
        problem = _model_asset_status(locate)
        status = "installed" if problem is None else f"MISSING: {problem}"
        lines.append(f"  model.name {' | '.join(sorted(aliases, key=len))}: {status}")
        if problem is not None:
            missing.append(problem)
    for name in BUILTIN_DATASETS:
        problem = _builtin_missing(name, None)
        lines.append(f"  data.name  {name}: {'installed' if problem is None else 'MISSING: ' + problem}")
        if problem is not None:
            missing.append(problem)
    return lines


def _quantization_lines(missing: list[str]) -> list[str]:
    from fedhello.quantization import BNB_REQUIREMENT, bitsandbytes_problem

    problem = bitsandbytes_problem()
    if problem is None:
        import importlib.metadata

        version = importlib.metadata.version("bitsandbytes")
        return [f"quantized backbones: bitsandbytes {version} (model.quantize nf4, fp4, int8)"]
    missing.append(f"bitsandbytes for model.quantize ({problem}): pip install '{BNB_REQUIREMENT}'")
    return [f"quantized backbones: unavailable, {problem} (model.quantize none only)"]


def memory_lines(config) -> list[str]:
    """What the run of ``config`` (a ``RunConfig``) holds in memory, measured on its built model
    (backbone loaded and quantized, adapters injected; its data is loaded too, for the head size)."""
    from fedhello.fl.server import FederatedRun

    run = FederatedRun(config, progress=False)
    return [f"run {config.output_dir}: model {config.model.name}, {run.model.num_clients} client slots, "
            f"model.quantize {config.model.quantize}"] + run.memory().lines()


def report() -> tuple[list[str], list[str]]:
    """The doctor's report: (lines to print, one entry per missing thing with how to install it)."""
    import torch

    import fedhello
    from fedhello.hub import hub_offline_reason

    missing: list[str] = []
    cuda = (f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)" if torch.cuda.is_available()
            else "no CUDA device")
    lines = [f"fedhello {fedhello.__version__}: python {platform.python_version()}, torch {torch.__version__}, "
             f"{cuda}"]
    lines += _backend_lines(missing)
    try:
        lines += _asset_lines(missing)
    except MissingExtraError as err:  # a core install: the kernels only
        lines.append(f"offline assets: not checked: {err}")
    lines += _quantization_lines(missing)
    reason = hub_offline_reason()
    lines.append("hub: reachable (hub ids load)" if reason is None else
                 f"hub: {reason}; only offline aliases, local folders and cached hub ids load")
    if missing:
        lines.append(f"missing ({len(missing)}):")
        lines += [f"  - {m}" for m in missing]
    else:
        lines.append("nothing is missing")
    return lines, missing
