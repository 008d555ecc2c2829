"""The bitsandbytes dependency: what a missing or wrong version says, a quiet import, and the heap trim after quantizing."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys

import pytest
import torch

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


_TRIM_PROBE = """
import os, torch
from fedhello.models.quantize import release_freed_host_memory
def rss(): return int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
keep, junk = [], []
for i in range(4000):  # 250 MiB in 64 KiB pieces, below glibc's mmap threshold: they come from the heap
    junk.append(torch.ones(16384))
    if i % 100 == 99:
        keep.append(torch.ones(16))  # live pieces between them keep the heap from shrinking by itself
del junk
freed = rss()
print(release_freed_host_memory(), freed, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_freed_host_memory_goes_back_to_the_os():
    """What a layer-by-layer quantization frees stays resident under glibc until the heap is trimmed."""
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, timeout=120, check=True)
    trimmed, freed, after = out.stdout.split()
    assert trimmed == "True"
    assert int(freed) - int(after) > 150 * 2**20, out.stdout


def test_quantize_backbone_trims_the_heap(monkeypatch):
    pytest.importorskip("bitsandbytes", reason="the [quant] extra is not installed")
    import fedhello.models.quantize as quantize
    from tests.nn.tiny import tiny_causal_lm

    calls = []
    monkeypatch.setattr(quantize, "release_freed_host_memory", lambda: calls.append(1) or True)
    quantize.quantize_backbone(tiny_causal_lm(64), "nf4", torch.float32)
    assert calls == [1]
