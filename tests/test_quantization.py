"""The bitsandbytes dependency: what a missing or wrong version says, and a quiet import."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest

from fedhello import quantization
from fedhello.errors import UserError


def test_missing_bitsandbytes_names_field_and_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(UserError, match=r"^model\.quantize: 'int8' needs bitsandbytes, but bitsandbytes is not "
                                        r"installed; install it with pip install 'bitsandbytes>=0\.50,<0\.51'"):
        quantization.require_bitsandbytes("model.quantize", "int8")


def test_other_bitsandbytes_series_is_named(monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    assert quantization.bitsandbytes_problem() == "bitsandbytes 0.45.5 is installed, fedhello is tested with 0.50.x"


def test_import_is_quiet_and_offline():
    """PEFT imports bitsandbytes when it is installed: its Hub-kernel note and the int8 eval path's
    float16 note are dropped, nothing else is printed."""
    pytest.importorskip("bitsandbytes")
    code = ("import fedhello, peft, torch; from fedhello.nn.quantized import quantize_linear; "
            "m = quantize_linear(torch.nn.Linear(8, 8), 'int8', torch.float32).eval(); m(torch.randn(2, 8)); "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "ok\n" and done.stderr == ""
