"""Every backend implements ``contract.Backend``: the members, and each method's exact signature."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from fedhello.kernels import extension, resolve_backend, triton_available
from fedhello.kernels.backends import torch as torch_backend
from fedhello.kernels.backends.compiled import CompiledBackend
from fedhello.kernels.contract import Backend

METHODS = ("saved_shape", "lora_forward", "lora_backward")


def _backends() -> list[Backend]:
    """The torch and Triton backends, and a compiled one over a stand-in for the extension (the class is
    what is checked; whether an extension is built here does not matter)."""
    found: list[Backend] = [torch_backend, CompiledBackend("cpu", SimpleNamespace(__name__="native"))]
    if triton_available():
        from fedhello.kernels.backends import triton as triton_backend

        found.append(triton_backend)
    return found


def _signature(fn) -> inspect.Signature:
    """The signature with its annotations evaluated (so ``Tensor`` and ``torch.Tensor`` compare equal)."""
    return inspect.signature(fn, eval_str=True)


def _protocol_signature(name: str) -> inspect.Signature:
    sig = _signature(getattr(Backend, name))
    return sig.replace(parameters=list(sig.parameters.values())[1:])  # without self


@pytest.mark.parametrize("backend", _backends(), ids=lambda b: b.NAME)
def test_backend_satisfies_the_protocol(backend) -> None:
    assert isinstance(backend, Backend)
    assert isinstance(backend.NAME, str) and isinstance(backend.FUSED_DROPOUT, bool)
    assert backend.DTYPES and all(isinstance(d, torch.dtype) for d in backend.DTYPES)
    for name in METHODS:
        assert _signature(getattr(backend, name)) == _protocol_signature(name), name


def test_each_backend_is_the_one_its_name_selects() -> None:
    cpu = torch.device("cpu")
    assert resolve_backend(torch_backend.NAME, cpu) is torch_backend
    compiled = extension.backend("cpu")
    if compiled is not None:
        assert compiled.NAME == "cpu" and resolve_backend("cpu", cpu) is compiled
    if triton_available():
        from fedhello.kernels.backends import triton as triton_backend

        assert triton_backend.NAME == "triton" and triton_backend.FUSED_DROPOUT
    assert not torch_backend.FUSED_DROPOUT and not CompiledBackend.FUSED_DROPOUT


def test_a_drifted_backend_fails_the_check() -> None:
    """The checks above would catch a backend whose signature drifts or that lacks a member."""

    def lora_forward(x2d, lora_a, lora_b, plan, params):  # bias dropped
        raise AssertionError("never called")

    drifted = SimpleNamespace(**{name: getattr(torch_backend, name) for name in ("NAME", "DTYPES", "FUSED_DROPOUT",
                                                                                "saved_shape", "lora_backward")})
    assert not isinstance(drifted, Backend)  # lora_forward missing
    drifted.lora_forward = lora_forward
    assert isinstance(drifted, Backend)  # runtime_checkable looks at names only, hence the signature check
    assert _signature(drifted.lora_forward) != _protocol_signature("lora_forward")
