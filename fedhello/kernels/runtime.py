"""What the Triton backend can run on here: is triton installed, does it interpret on the CPU."""

from __future__ import annotations

import os

__all__ = ["triton_available", "triton_interpreting"]


def triton_available() -> bool:
    """True when the Triton package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
