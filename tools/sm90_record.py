"""Recording for the static sm_90 gate: the Triton launches of the public API, captured on CPU.

Every ``@triton.jit`` kernel of a module is swapped for a recorder whose ``kernel[grid](...)``
keeps the arguments instead of launching; ``record_public_api`` runs one ``multi_lora_linear``
forward + backward on CPU tensors at the headline sizes with the launchers patched to take their
GPU decisions (see ``tools/static_check.py`` for what is patched and why).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["DTYPES", "HEADLINE", "HOPPER_SMS", "Launch", "PatchTargetMissing", "record_launches", "record_public_api"]

# The headline specialisation (every launch's divisibility and constexprs follow it).
HEADLINE = {"n": 32, "t": 8192, "d_in": 4096, "d_out": 4096, "r": 16}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HOPPER_SMS = 132  # multiprocessors of an H100 SXM / H200
# A product below this many multiply-adds runs for real inside the recording (plans, small
# reductions); above it its values cannot matter to which kernels are launched.
_SKIP_PRODUCT_MACS = 1 << 24



@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)`` call.

    Attributes:
        kernel: the ``triton.runtime.jit.JITFunction`` that would have been launched.
        grid: the grid as given (a tuple or a callable of the bound arguments).
        args: positional arguments (tensors are kept alive, so their pointers stay valid).
        kwargs: keyword arguments: constexprs and launch options (``num_warps``, ``num_stages``).
        phase: ``"forward"`` or ``"backward"``, the pass that launched it.
    """

    kernel: Any
    grid: Any
    args: tuple
    kwargs: dict
    phase: str

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__


class _LaunchRecorder:
    """Stands in for one ``JITFunction``: ``recorder[grid](...)`` appends a ``Launch``."""

    def __init__(self, kernel: Any, sink: list[Launch], phase: list[str]) -> None:
        self._kernel = kernel
        self._sink = sink
        self._phase = phase

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            self._sink.append(Launch(self._kernel, grid, args, dict(kwargs), self._phase[0]))
        return record

    def __getattr__(self, name: str) -> Any:
        # Anything else a launcher reads off the kernel (``fn``, ``arg_names``...) is the real one's.
        return getattr(self._kernel, name)


@contextlib.contextmanager
def record_launches(module: ModuleType, phase: list[str] | None = None) -> Iterator[list[Launch]]:
    """Replace every ``JITFunction`` attribute of ``module`` by a recorder while the block runs.

    Yields the list the launches are appended to. ``phase`` is a one-element list whose value
    is stamped on each launch (the caller switches it between passes). Kernels wrapped in
    another ``KernelInterface`` (an autotuner) cannot be compiled statically and raise.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction, KernelInterface

    phase = phase if phase is not None else ["forward"]
    sink: list[Launch] = []
    originals = {name: value for name, value in vars(module).items() if isinstance(value, KernelInterface)}
    if any(isinstance(value, InterpretedFunction) for value in originals.values()):
        raise RuntimeError(f"{module.__name__}: its kernels were made under TRITON_INTERPRET (the "
                           "interpreter replaces @triton.jit); record in a process started without it")
    wrapped = [name for name, value in originals.items() if not isinstance(value, JITFunction)]
    if wrapped:
        raise TypeError(f"{module.__name__}: kernels {wrapped} are not plain @triton.jit functions "
                        "(autotuned?); the static gate compiles a fixed configuration only")
    if not originals:
        raise ValueError(f"module: {module.__name__} has no @triton.jit kernels to record")
    try:
        for name, kernel in originals.items():
            setattr(module, name, _LaunchRecorder(kernel, sink, phase))
        yield sink
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)


class _SkipDenseProducts(TorchDispatchMode):
    """Answers large ``mm``/``addmm``/``bmm`` (and in-place ``addmm_``) without computing them.

    The base layer's GEMMs (``x W^T``, ``dy W``) only fill values that no launch decision
    depends on; on a CPU they would take minutes at the headline size.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's protocol)
        kwargs = kwargs or {}
        shape = self._product_shape(func, args)
        if shape is None:
            return func(*args, **kwargs)
        out_shape, macs, like = shape
        if macs < _SKIP_PRODUCT_MACS:
            return func(*args, **kwargs)
        if "out" in kwargs:
            return kwargs["out"]
        if func._schema.name.endswith("_"):  # in place: the result is its first argument
            return args[0]
        return torch.empty(out_shape, dtype=like.dtype, device=like.device)

    @staticmethod
    def _product_shape(func, args) -> tuple[tuple[int, ...], int, torch.Tensor] | None:  # noqa: ANN001
        """``(result shape, multiply-adds, an operand)`` of a dense product op, else None."""
        aten = torch.ops.aten
        packet = func.overloadpacket
        if packet in (aten.mm, aten.bmm):
            a, b = args[0], args[1]
        elif packet in (aten.addmm, aten.addmm_, aten.baddbmm, aten.baddbmm_):
            a, b = args[1], args[2]
        else:
            return None
        out_shape = (*a.shape[:-1], b.shape[-1])
        return out_shape, a.numel() * b.shape[-1], a


class PatchTargetMissing(RuntimeError):
    """A private name the gate patches is gone from the package: the gate must be updated."""


@contextlib.contextmanager
def _patched(module: ModuleType, name: str, value: Any) -> Iterator[None]:
    original = getattr(module, name, None)
    if not callable(original):
        raise PatchTargetMissing(
            f"{module.__name__}.{name} is gone (renamed or moved?): the static gate patches it to run "
            f"the Triton launchers on CPU tensors as on a {HOPPER_SMS}-SM GPU; update tools/sm90_record.py")
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _triton_backend_on_cpu() -> Iterator[None]:
    """Make the launchers take their GPU decisions for CPU tensors without the interpreter.

    * ``multi_lora.resolve_backend`` refuses ``"triton"`` for CPU tensors (the kernels could not
      run); here it returns the Triton backend: the gate never runs them, it only records launches.
    * Launchers that size grids by the GPU (split-K when the tiles would leave SMs idle) ask
      ``backends.triton._programs_wanted(device)``, which answers 1 off CUDA; here it is asked for a
      CUDA device with ``HOPPER_SMS`` multiprocessors.

    Raises ``PatchTargetMissing`` when one of these names is gone.
    """
    from fedhello.kernels import multi_lora
    from fedhello.kernels.backends import triton as triton_backend

    original = getattr(multi_lora, "resolve_backend", None)  # checked by _patched

    def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> Any:
        return triton_backend if name == "triton" else original(name, device, dtype)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(multi_lora, "resolve_backend", resolve))
        wanted = getattr(triton_backend, "_programs_wanted", None)
        stack.enter_context(_patched(triton_backend, "_programs_wanted",
                                     lambda device: wanted(torch.device("cuda", 0))))
        stack.enter_context(_patched(triton_backend, "_sm_count", lambda index: HOPPER_SMS))
        yield


def _public_api_inputs(dtype: torch.dtype, n: int, t: int, d_in: int, d_out: int, r: int,
                       contiguous: bool, seed: int, adapter_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """CPU inputs of one ``multi_lora_linear`` call; big operands are left uninitialised (only
    their shapes, strides, dtypes and alignment reach the compiler)."""
    from fedhello.kernels.plan import LoRAPlan

    gen = torch.Generator().manual_seed(seed)
    if contiguous:
        ids = torch.arange(t) * n // t
    else:
        ids = torch.randint(0, n, (t,), generator=gen)
    return {
        "x": torch.empty(t, d_in, dtype=dtype).requires_grad_(),
        "weight": torch.empty(d_out, d_in, dtype=dtype),
        "bias": torch.empty(d_out, dtype=dtype),
        "lora_a": torch.empty(n, r, d_in, dtype=adapter_dtype or dtype).requires_grad_(),
        "lora_b": torch.empty(n, d_out, r, dtype=adapter_dtype or dtype).requires_grad_(),
        "plan": LoRAPlan.build(ids, n),
        "scaling": torch.full((n,), 0.5),
        "ranks": torch.full((n,), r, dtype=torch.int32),
        "trainable": torch.ones(n, dtype=torch.bool),
        "dy": torch.empty(t, d_out, dtype=dtype),
    }


def record_public_api(dtype: str = "bf16", *, n: int = HEADLINE["n"], t: int = HEADLINE["t"],
                      d_in: int = HEADLINE["d_in"], d_out: int = HEADLINE["d_out"],
                      r: int = HEADLINE["r"], grad_sqnorm: bool = True, contiguous: bool = False,
                      extra: dict[str, Any] | None = None, seed: int = 0,
                      adapter_dtype: torch.dtype | None = None) -> list[Launch]:
    """Every Triton launch of one ``multi_lora_linear(backend="triton")`` forward + backward.

    Runs on CPU tensors with tensor ``ranks``/``trainable``/``scaling`` (as ``MultiLoRALinear``
    passes them) and, when ``grad_sqnorm``, a float32 ``[N]`` norm buffer. ``contiguous`` gives
    each client one block of rows (as the batched engine does) instead of scattered rows;
    ``extra`` holds further keyword arguments of the call (e.g. ``dropout_p``); ``adapter_dtype``
    (default: ``dtype``'s) is the dtype of ``lora_a``/``lora_b`` (float32 master adapters).
    """
    from fedhello.kernels import multi_lora
    from fedhello.kernels.backends import triton as triton_backend

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the gate needs the real @triton.jit kernels; "
                           "run it in a process started without TRITON_INTERPRET")
    s = _public_api_inputs(DTYPES[dtype], n, t, d_in, d_out, r, contiguous, seed, adapter_dtype)
    norms = torch.zeros(n, dtype=torch.float32) if grad_sqnorm else None
    phase = ["forward"]
    with _triton_backend_on_cpu(), record_launches(triton_backend, phase) as launches, _SkipDenseProducts():
        y = multi_lora.multi_lora_linear(
            s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["plan"], s["scaling"],
            ranks=s["ranks"], trainable=s["trainable"], grad_sqnorm=norms, backend="triton", **(extra or {}))
        phase[0] = "backward"
        torch.autograd.grad(y, [s["x"], s["lora_a"], s["lora_b"]], s["dy"])
    return launches
