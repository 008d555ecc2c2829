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
kernel serves bitsandbytes' repacked bfloat16 inference layout, which ``fedhello.nn`` switches
off for the layers it wraps (see ``fedhello.nn.quantized.prepare_quantized_base``).
``quiet_bitsandbytes`` (installed by ``import fedhello``) drops that one message.

It also drops bitsandbytes' "MatMul8bitLt: inputs will be cast from torch.float32 to float16"
warning: an int8 layer in eval mode quantizes its input through float16 by design (LLM.int8()),
as it does under PEFT; training mode on CPU multiplies by the dequantized weight instead.
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
# logger name -> the start of the one message dropped from it (see the module doc)
_DROPPED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "bitsandbytes.autograd._functions": "MatMul8bitLt: inputs will be cast from",
}


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


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Drop bitsandbytes' note about its optional Hub inference kernel and its int8 float16-cast
    warning (see the module doc), nothing else; idempotent.

    Filters on the loggers that emit them, so they hold whoever imports bitsandbytes first (PEFT
    imports it as soon as it is installed).
    """
    for name, prefix in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
