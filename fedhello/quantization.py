"""Quantized frozen backbones (QLoRA): the ``model.quantize`` choices and the bitsandbytes check.

Light on purpose (no torch import): ``fedhello.config`` checks a run's quantization here before
anything heavy loads. The layers themselves are in ``fedhello.nn.quantized``.

``model.quantize``:

* ``none``: the full-precision backbone;
* ``nf4`` / ``fp4``: bitsandbytes ``Linear4bit`` (4-bit NormalFloat or FP4, double quantization
  of the block scales, block size 64: QLoRA's recipe);
* ``int8``: bitsandbytes ``Linear8bitLt`` (LLM.int8() vector-wise weights, outlier threshold 0).

About a message bitsandbytes 0.50 logs on import: on CPUs with AVX512-BF16 it looks for an
optional 4-bit *inference* kernel that the ``kernels`` package would download from the Hugging
Face Hub ("Failed to load CPU gemm_4bit_forward from kernels-community"). fedhello does not
install ``kernels``, so nothing is fetched and bitsandbytes uses its bundled CPU library; that
kernel serves bitsandbytes' repacked inference layout, which ``fedhello.nn`` switches off for the
layers it wraps (it computes in bfloat16 and has no backward). ``quiet_bitsandbytes`` (installed
by ``import fedhello``) drops that one message and nothing else.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

__all__ = ["BNB_REQUIREMENT", "QUANTIZATIONS", "bitsandbytes_problem", "quiet_bitsandbytes", "require_bitsandbytes"]

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
# The pip requirement of the [quant] extra (pyproject.toml), named in the "what to install" errors.
BNB_REQUIREMENT = "bitsandbytes>=0.50,<0.51"
_BNB_SERIES = (0, 50)
_HUB_KERNEL_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def bitsandbytes_problem() -> str | None:
    """None when a supported bitsandbytes (0.50.x) is installed, else what is wrong (no import)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    version = importlib.metadata.version("bitsandbytes")
    series = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if series != _BNB_SERIES:
        return f"bitsandbytes {version} is installed, fedhello is tested with 0.50.x"
    return None


def require_bitsandbytes(field: str = "model.quantize", value: str = "nf4") -> None:
    """Raise ``UserError`` (one line naming ``field`` and the pip command) unless bitsandbytes 0.50.x is installed."""
    from fedhello.errors import UserError

    problem = bitsandbytes_problem()
    if problem is not None:
        raise UserError(f"{field}: {value!r} needs bitsandbytes, but {problem}; install it with "
                        f"pip install '{BNB_REQUIREMENT}' (or pip install -e '.[quant]')")


class _DropHubKernelNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_HUB_KERNEL_NOTE)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' note about its optional Hub inference kernel (see the module doc); idempotent.

    A filter on the logger that emits it, so it holds whoever imports bitsandbytes first (PEFT
    imports it as soon as it is installed).
    """
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropHubKernelNote) for f in logger.filters):
        logger.addFilter(_DropHubKernelNote())
