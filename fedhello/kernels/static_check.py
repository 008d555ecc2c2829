"""Static sm_90 gate: compile every Triton kernel the public API launches for Hopper, on a CPU.

No GPU is needed. The gate

1. **records** the launches: every ``@triton.jit`` kernel of ``fedhello.kernels.triton_lora`` is
   swapped for a recorder whose ``kernel[grid](...)`` captures the arguments instead of launching,
   and ``multi_lora_linear(..., backend="triton")`` runs forward + backward on CPU tensors at the
   headline specialisation (N=32, T=8192, d_in=d_out=4096, r=16). Nothing the kernels would
   compute is needed, so the dense base GEMMs are skipped too (they would take minutes on a CPU);
2. **compiles** each distinct launch with Triton's own compiler for an explicit target,
   ``GPUTarget("cuda", 90, 32)``, deriving the signature and the divisibility-16 specialisation
   from the recorded arguments exactly as Triton's launcher does (``_pack_args`` of its
   ``JITFunction``: the same code path, so the same specialisation as a launch on a GPU);
3. **reads** the result: registers, spill bytes and stack frame from Triton's bundled ``ptxas -v``,
   shared memory from the kernel's metadata, the matrix instruction from the PTX (``wgmma`` or
   ``mma.sync`` and its shape) and from the SASS (``HGMMA``/``HMMA``), and the width of every
   global load in the PTX (``ld.global`` by type and vector length, ``cp.async`` sizes).

Patched for the duration of the recording only, and restored afterwards: the kernels of
``triton_lora`` (the recorders); ``multi_lora.resolve_backend`` (backend ``"triton"`` refuses CPU
tensors unless the interpreter is on, and under the interpreter the kernels are not
``JITFunction`` objects, so the gate must run *without* ``TRITON_INTERPRET`` and route
``"triton"`` to ``triton_lora`` by hand); ``triton_lora._programs_wanted`` / ``_sm_count`` when
present (grids sized for a GPU of ``HOPPER_SMS`` multiprocessors instead of the interpreter's
one); and a ``TorchDispatchMode`` that answers large dense matrix products with uninitialised
tensors of the right shape.

CLI (prints the table; re-executes itself without ``TRITON_INTERPRET`` and with a fresh Triton
cache directory, so nothing is reused between runs)::

    python -m fedhello.kernels.static_check [--dtype bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "GateResult",
    "HEADLINE",
    "KernelReport",
    "Launch",
    "analyse_ptx",
    "check_reports",
    "compile_launch",
    "format_table",
    "record_launches",
    "record_public_api",
    "run_gate",
]

# The headline specialisation of issue 12 (every launch's divisibility and constexprs follow it).
HEADLINE = {"n": 32, "t": 8192, "d_in": 4096, "d_out": 4096, "r": 16}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALF_DTYPES = ("bf16", "fp16")
HOPPER_SMS = 132  # multiprocessors of an H100 SXM / H200
# A product below this many multiply-adds runs for real inside the recording (plans, small
# reductions); above it its values cannot matter to which kernels are launched.
_SKIP_PRODUCT_MACS = 1 << 24


# ------------------------------------------------------------------------------------ recording


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


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    original = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, original)


@contextlib.contextmanager
def _triton_backend_on_cpu() -> Iterator[bool]:
    """Make the launchers take their GPU decisions for CPU tensors without the interpreter.

    * ``multi_lora.resolve_backend`` refuses ``"triton"`` for CPU tensors (the kernels could not
      run); here it returns ``triton_lora``: the gate never runs them, it only records launches.
    * Launchers that size grids by the GPU (split-K when the tiles would leave SMs idle) ask
      ``triton_lora._programs_wanted(device)``, which answers 1 off CUDA; when the module has it
      (and its ``_sm_count``), it is asked for a CUDA device with ``HOPPER_SMS`` multiprocessors.

    Yields whether the SM count was emulated.
    """
    from . import multi_lora, triton_lora

    original = multi_lora.resolve_backend

    def resolve(name: str, device: torch.device, dtype: torch.dtype | None = None) -> ModuleType:
        return triton_lora if name == "triton" else original(name, device, dtype)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(multi_lora, "resolve_backend", resolve))
        emulate = emulates_sm_count(triton_lora)
        if emulate:
            wanted = triton_lora._programs_wanted
            stack.enter_context(_patched(triton_lora, "_sm_count", lambda index: HOPPER_SMS))
            stack.enter_context(_patched(triton_lora, "_programs_wanted",
                                         lambda device: wanted(torch.device("cuda", 0))))
        yield emulate


def emulates_sm_count(module: ModuleType) -> bool:
    """Whether the gate can make ``module``'s launchers size their grids for ``HOPPER_SMS``."""
    return callable(getattr(module, "_programs_wanted", None)) and callable(getattr(module, "_sm_count", None))


def _public_api_inputs(dtype: torch.dtype, n: int, t: int, d_in: int, d_out: int, r: int,
                       contiguous: bool, seed: int, adapter_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """CPU inputs of one ``multi_lora_linear`` call; big operands are left uninitialised (only
    their shapes, strides, dtypes and alignment reach the compiler)."""
    from .plan import LoRAPlan

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
    from . import multi_lora, triton_lora

    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {tuple(DTYPES)}, got {dtype!r}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET is set: the gate needs the real @triton.jit kernels; "
                           "run it in a process started without TRITON_INTERPRET")
    s = _public_api_inputs(DTYPES[dtype], n, t, d_in, d_out, r, contiguous, seed, adapter_dtype)
    norms = torch.zeros(n, dtype=torch.float32) if grad_sqnorm else None
    phase = ["forward"]
    with _triton_backend_on_cpu(), record_launches(triton_lora, phase) as launches, _SkipDenseProducts():
        y = multi_lora.multi_lora_linear(
            s["x"], s["weight"], s["bias"], s["lora_a"], s["lora_b"], s["plan"], s["scaling"],
            ranks=s["ranks"], trainable=s["trainable"], grad_sqnorm=norms, backend="triton", **(extra or {}))
        phase[0] = "backward"
        torch.autograd.grad(y, [s["x"], s["lora_a"], s["lora_b"]], s["dy"])
    return launches


# ------------------------------------------------------------------------------------ compiling


def sm90_target() -> Any:
    """``GPUTarget("cuda", 90, 32)``: Hopper (H100/H200), 32-thread warps."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def _specialise(launch: Launch, backend: Any) -> tuple[Any, dict, dict, dict]:
    """``(options, signature, constexprs, attrs)`` of a launch, computed by Triton's own launcher
    code (``create_function_from_signature`` + ``JITFunction._pack_args``, present in triton
    3.6 to 3.8) for ``backend``'s target instead of the current device's."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    # As JITFunction.run does before binding.
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


@dataclass
class CompiledLaunch:
    """A distinct specialisation and what Triton compiled for it.

    Attributes:
        launch: the first recorded launch with this specialisation.
        signature: argument name -> Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``...).
        constexprs: the compile-time values (launch constexprs and Triton's ``== 1`` ints).
        divisible_by_16: names of the arguments Triton specialised as divisible by 16.
        kernel: Triton's ``CompiledKernel`` (``asm["ptx"]``, ``asm["cubin"]``, ``metadata``).
    """

    launch: Launch
    signature: dict
    constexprs: dict
    divisible_by_16: list[str]
    kernel: Any


def compile_launch(launch: Launch, target: Any | None = None) -> CompiledLaunch:
    """Compile one recorded launch for ``target`` (default sm_90) with ``triton.compile``."""
    import triton
    from triton.compiler import ASTSource, make_backend

    target = target or sm90_target()
    backend = make_backend(target)
    options, signature, constexprs, attrs = _specialise(launch, backend)
    kernel = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    names = launch.kernel.arg_names
    divisible = [names[path[0]] for path, values in attrs.items()
                 if any(v[0] == "tt.divisibility" for v in values)]
    constants = {names[path[0]]: getattr(value, "value", value) for path, value in constexprs.items()}
    return CompiledLaunch(launch, dict(signature), constants, sorted(divisible), kernel)


def _launch_key(launch: Launch, backend: Any) -> str:
    """Identity of a launch's compiled kernel: two launches with equal keys share one binary."""
    options, signature, constexprs, attrs = _specialise(launch, backend)
    return repr((launch.name, sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), sorted(options.__dict__.items())))


# ------------------------------------------------------------------------------------- analysis

_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[A-Za-z0-9_:]+)*)")
_ST_GLOBAL = re.compile(r"\bst\.global((?:\.[A-Za-z0-9_:]+)*)")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared(?:::cta)?\.global(?:\.[A-Za-z0-9_:]+)*\s+"
                       r"\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")
_CP_BULK = re.compile(r"\bcp\.async\.bulk\b")
_WGMMA = re.compile(r"\bwgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)\.\w+\.(\w+)\.\w+")
_MMA_SYNC = re.compile(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)\.row\.col\.\w+\.(\w+)\.\w+")
_ELEMENT = re.compile(r"^(?:[bsuf]|bf)(8|16|32|64)(?:x2)?$")
_SASS_OPS = ("HGMMA", "HMMA", "FFMA", "LDL", "STL", "LDGSTS", "UTMALDG")


def _access_kind(qualifiers: str) -> tuple[str, int] | None:
    """``".L1::evict_last.v4.b32"`` -> ``("v4.b32", 16)``: vector and element type, bytes."""
    vec, elem, bits = 1, None, 0
    for q in qualifiers.split(".")[1:]:
        if q in ("v2", "v4", "v8"):
            vec = int(q[1:])
        elif (m := _ELEMENT.match(q)) is not None:
            elem, bits = q, int(m.group(1)) * (2 if q.endswith("x2") else 1)
    if elem is None:
        return None
    return (f"v{vec}.{elem}" if vec > 1 else elem), vec * bits // 8


def _count_accesses(pattern: re.Pattern, ptx: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in pattern.finditer(ptx):
        kind = _access_kind(match.group(1))
        if kind is not None:
            counts[kind[0]] = counts.get(kind[0], 0) + 1
    return dict(sorted(counts.items()))


def analyse_ptx(ptx: str) -> dict[str, Any]:
    """What a kernel's PTX says about its memory accesses and matrix instructions.

    Returns ``loads`` / ``stores`` (global accesses by ``[vN.]type`` -> count, each a static
    instruction count), ``scalar_2byte_loads`` (non-vector 16-bit global loads: one bf16/fp16
    element per thread per instruction), ``cp_async`` (bytes per ``cp.async`` -> count),
    ``bulk_copies`` (TMA ``cp.async.bulk`` count) and ``mma`` (``"wgmma m64n16k16 bf16"``-style
    kinds -> count; empty when the dots became FMAs).
    """
    loads = _count_accesses(_LD_GLOBAL, ptx)
    cp_async: dict[str, int] = {}
    for match in _CP_ASYNC.finditer(ptx):
        size = f"{int(match.group(1), 0)}B"
        cp_async[size] = cp_async.get(size, 0) + 1
    mma: dict[str, int] = {}
    for kind, pattern in (("wgmma", _WGMMA), ("mma.sync", _MMA_SYNC)):
        for match in pattern.finditer(ptx):
            key = f"{kind} {match.group(1)} {match.group(2)}"
            mma[key] = mma.get(key, 0) + 1
    return {
        "loads": loads,
        "stores": _count_accesses(_ST_GLOBAL, ptx),
        "scalar_2byte_loads": sum(n for k, n in loads.items() if _access_kind("." + k)[1] == 2),
        "cp_async": dict(sorted(cp_async.items())),
        "bulk_copies": len(_CP_BULK.findall(ptx)),
        "mma": dict(sorted(mma.items())),
    }


def _nvidia_tool(name: str) -> str:
    """Path of a tool Triton ships (``ptxas``, ``cuobjdump``), honouring Triton's overrides."""
    from triton import knobs

    return getattr(knobs.nvidia, name).path


def _ptxas_report(ptx: str, arch: str) -> dict[str, int | None]:
    """Spill bytes and stack frame from Triton's bundled ``ptxas -v`` on the kernel's PTX."""
    with tempfile.TemporaryDirectory(prefix="fedhello-sm90-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([_nvidia_tool("ptxas"), "-v", f"--gpu-name={arch}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, timeout=120, check=True)
    log = done.stdout + done.stderr

    def number(pattern: str) -> int | None:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None

    return {"spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"),
            "stack_frame": number(r"(\d+) bytes stack frame")}


def _cubin_report(cubin: bytes) -> dict[str, Any]:
    """Registers / stack / local bytes (``cuobjdump -res-usage``) and SASS opcode counts of
    the cubin Triton built (``HGMMA`` = Hopper wgmma, ``HMMA`` = mma.sync, ``LDL``/``STL`` =
    local-memory traffic such as spills)."""
    with tempfile.TemporaryDirectory(prefix="fedhello-sm90-") as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        tool = _nvidia_tool("cuobjdump")
        usage = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True,
                               timeout=60, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True,
                              timeout=60, check=True).stdout

    def field_of(name: str) -> int | None:
        m = re.search(rf"\b{name}:(\d+)", usage)
        return int(m.group(1)) if m else None

    ops = {op: len(re.findall(rf"\b{op}\b", sass)) for op in _SASS_OPS}
    return {"registers": field_of("REG"), "stack": field_of("STACK"), "local": field_of("LOCAL"),
            "static_shared": field_of("SHARED"), "sass": ops}


@dataclass
class KernelReport:
    """One compiled specialisation of one kernel, as the gate reports it.

    ``uses`` lists ``"<scenario>/<phase>"`` for every recorded launch with this specialisation.
    ``shared_bytes`` is the shared memory Triton launches it with (``metadata.shared``).
    """

    dtype: str
    kernel: str
    uses: list[str]
    constexprs: dict
    divisible_by_16: list[str]
    num_warps: int
    num_stages: int
    shared_bytes: int
    registers: int | None
    stack: int | None
    spill_stores: int | None
    spill_loads: int | None
    sass: dict[str, int]
    ptx: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def mma(self) -> str:
        kinds = self.ptx["mma"]
        return ", ".join(kinds) if kinds else "none (FMA)"

    @property
    def loads(self) -> str:
        parts = [f"{k}x{n}" for k, n in sorted(self.ptx["loads"].items(), key=lambda kv: -kv[1])]
        parts += [f"cp{k}x{n}" for k, n in self.ptx["cp_async"].items()]
        if self.ptx["bulk_copies"]:
            parts.append(f"tma x{self.ptx['bulk_copies']}")
        return " ".join(parts) or "-"


def report_compiled(compiled: CompiledLaunch, dtype: str, uses: list[str]) -> KernelReport:
    """Read registers, spills, shared memory, MMA kind and load widths off one compiled kernel."""
    kernel = compiled.kernel
    meta = kernel.metadata
    arch = f"sm_{meta.target.arch}a" if meta.target.arch >= 90 else f"sm_{meta.target.arch}"
    ptxas = _ptxas_report(kernel.asm["ptx"], arch)
    cubin = _cubin_report(kernel.asm["cubin"])
    return KernelReport(
        dtype=dtype, kernel=compiled.launch.name, uses=uses, constexprs=compiled.constexprs,
        divisible_by_16=compiled.divisible_by_16, num_warps=meta.num_warps, num_stages=meta.num_stages,
        shared_bytes=meta.shared, registers=cubin["registers"], stack=cubin["stack"],
        spill_stores=ptxas["spill_stores"], spill_loads=ptxas["spill_loads"], sass=cubin["sass"],
        ptx=analyse_ptx(kernel.asm["ptx"]))


def check_reports(reports: Sequence[KernelReport]) -> list[str]:
    """Apply the gate; fill each report's ``failures`` and return every failure as one line.

    Half-precision kernels (bf16/fp16) must have no register spills (ptxas spill bytes and SASS
    local loads/stores all zero) and no scalar 2-byte global loads. Every kernel compiled (a
    compile error raises before this point).
    """
    lines = []
    for rep in reports:
        rep.failures = []
        if rep.dtype in HALF_DTYPES:
            spills = (rep.spill_stores or 0) + (rep.spill_loads or 0)
            if spills or rep.sass.get("LDL") or rep.sass.get("STL"):
                rep.failures.append(f"register spills: {rep.spill_stores} B stored, {rep.spill_loads} B loaded, "
                                    f"{rep.sass.get('STL')} STL / {rep.sass.get('LDL')} LDL in SASS")
            if rep.ptx["scalar_2byte_loads"]:
                rep.failures.append(f"{rep.ptx['scalar_2byte_loads']} scalar 2-byte global loads "
                                    f"(ld.global.b16) in the PTX")
        lines += [f"{rep.dtype} {rep.kernel} [{', '.join(rep.uses)}]: {f}" for f in rep.failures]
    return lines


# ----------------------------------------------------------------------------------------- gate


@dataclass(frozen=True)
class Scenario:
    """One public-API call whose launches the gate records (always the headline sizes)."""

    name: str
    contiguous: bool = False
    grad_sqnorm: bool = True
    dropout: bool = False
    fp32_adapters: bool = False  # float32 master adapters under the half-precision activations


SCENARIOS = (
    Scenario("scattered"),
    Scenario("contiguous-nonorm", contiguous=True, grad_sqnorm=False),
    Scenario("dropout", dropout=True),
    Scenario("fp32-adapters", fp32_adapters=True),
)


def _record_scenario(dtype: str, scenario: Scenario) -> list[Launch] | str:
    """The scenario's launches, or why it was skipped.

    The dropout scenario runs only when ``multi_lora_linear`` has ``dropout_p``; its seeds
    (int64 ``[N]``) are a guess at the new argument's contract, so a ``TypeError``/``ValueError``
    from that call skips the scenario (with the message) rather than failing the gate.
    """
    if scenario.fp32_adapters:
        return record_public_api(dtype, grad_sqnorm=scenario.grad_sqnorm, contiguous=scenario.contiguous,
                                 adapter_dtype=torch.float32)
    if not scenario.dropout:
        return record_public_api(dtype, grad_sqnorm=scenario.grad_sqnorm, contiguous=scenario.contiguous)
    from .multi_lora import multi_lora_linear

    if "dropout_p" not in inspect.signature(multi_lora_linear).parameters:
        return "multi_lora_linear has no dropout_p argument"
    kwargs = {"dropout_p": 0.1, "dropout_seeds": torch.arange(HEADLINE["n"], dtype=torch.int64) + 1}
    try:
        return record_public_api(dtype, grad_sqnorm=scenario.grad_sqnorm, contiguous=scenario.contiguous,
                                 extra=kwargs)
    except (TypeError, ValueError) as err:
        return f"the call with dropout_p=0.1 and int64 seeds [N] was refused: {err}"


@dataclass
class GateResult:
    """``reports`` (one per compiled specialisation), ``failures`` (empty when the gate passes)
    and ``skipped`` (scenarios not recorded, each with the reason)."""

    reports: list[KernelReport]
    failures: list[str]
    skipped: list[str]


def run_gate(dtypes: Sequence[str] = ("bf16", "fp16", "fp32"),
             scenarios: Sequence[Scenario] = SCENARIOS) -> GateResult:
    """Record, compile for sm_90 and check every kernel of every scenario and dtype.

    The first scenario runs for every dtype; the others (other routing, no norms, dropout:
    other constexpr paths) for the first half-precision dtype only, since the two half types
    share their code paths and CI time is short. fp32 kernels are reported, not gated.
    """
    from triton.compiler import make_backend

    target = sm90_target()
    backend = make_backend(target)
    reports: list[KernelReport] = []
    skipped: list[str] = []
    first_half = next((d for d in dtypes if d in HALF_DTYPES), None)
    for dtype in dtypes:
        launches: list[tuple[str, Launch]] = []
        for scenario in (scenarios if dtype == first_half else scenarios[:1]):
            recorded = _record_scenario(dtype, scenario)
            if isinstance(recorded, str):
                skipped.append(f"{dtype}/{scenario.name}: {recorded}")
                continue
            launches += [(scenario.name, launch) for launch in recorded]
        distinct: dict[str, tuple[CompiledLaunch, list[str]]] = {}
        for scenario_name, launch in launches:
            key = _launch_key(launch, backend)
            if key not in distinct:
                distinct[key] = (compile_launch(launch, target), [])
            use = f"{scenario_name}/{launch.phase}"
            if use not in distinct[key][1]:
                distinct[key][1].append(use)
        reports += [report_compiled(c, dtype, uses) for c, uses in distinct.values()]
    return GateResult(reports, check_reports(reports), skipped)


def format_table(reports: Sequence[KernelReport]) -> str:
    """The gate's table: one line per compiled specialisation."""
    head = (f"{'dtype':<5} {'kernel':<24} {'warps/stg':>9} {'regs':>5} {'spill':>7} {'smem KiB':>8}  "
            f"{'MMA':<44} {'global loads (PTX, static count)':<40} {'gate':<4}  used by")
    lines = [f"sm_90 static gate (Triton compile for GPUTarget('cuda', 90, 32)); headline "
             f"N={HEADLINE['n']} T={HEADLINE['t']} d_in={HEADLINE['d_in']} d_out={HEADLINE['d_out']} "
             f"r={HEADLINE['r']}", head, "-" * len(head)]
    for rep in reports:
        spill = f"{rep.spill_stores}/{rep.spill_loads}"
        gate = "FAIL" if rep.failures else "ok"
        lines.append(f"{rep.dtype:<5} {rep.kernel:<24} {f'{rep.num_warps}/{rep.num_stages}':>9} "
                     f"{rep.registers if rep.registers is not None else '?':>5} {spill:>7} "
                     f"{rep.shared_bytes / 1024:>8.1f}  {rep.mma:<44} {rep.loads:<40} {gate:<4}  "
                     f"{', '.join(rep.uses)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI


def _worker(args: argparse.Namespace) -> int:
    import triton

    from . import triton_lora

    result = run_gate(args.dtype)
    reports, failures = result.reports, result.failures
    print(format_table(reports))
    for note in result.skipped:
        print(f"skipped {note}")
    if emulates_sm_count(triton_lora):
        print(f"grids sized as on a GPU with {HOPPER_SMS} SMs (triton_lora._programs_wanted)")
    if failures:
        print("\nGATE FAILED:\n  " + "\n  ".join(failures))
    else:
        print("\ngate passed: every kernel compiled; half precision: no spills, no scalar 2-byte loads")
    if args.json is not None:
        doc = {"triton": triton.__version__, "target": {"backend": "cuda", "arch": 90, "warp_size": 32},
               "headline": HEADLINE, "dtypes": list(args.dtype),
               "sm_count_emulated": HOPPER_SMS if emulates_sm_count(triton_lora) else None,
               "scenarios": [dataclasses.asdict(s) for s in SCENARIOS],
               "passed": not failures, "failures": failures, "skipped": result.skipped,
               "kernels": [{**dataclasses.asdict(r), "mma_summary": r.mma} for r in reports]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 1 if failures else 0


def _dtype_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"expected names from {tuple(DTYPES)}, got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gate in a child process without ``TRITON_INTERPRET`` and with an empty Triton cache
    directory (removed afterwards), so every kernel is compiled afresh; exit status 1 on failure."""
    p = argparse.ArgumentParser(description="Compile every Triton kernel of the public API for sm_90 "
                                            "and report registers, spills, shared memory, MMA and loads.")
    p.add_argument("--dtype", type=_dtype_list, default=["bf16", "fp16", "fp32"],
                   help="comma-separated subset of bf16,fp16,fp32 (default all three)")
    p.add_argument("--json", type=Path, help="also write the reports to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    cache = tempfile.mkdtemp(prefix="fedhello-sm90-cache-")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    cmd = [sys.executable, "-m", "fedhello.kernels.static_check", "--worker", "--dtype", ",".join(args.dtype)]
    if args.json is not None:
        cmd += ["--json", str(args.json.resolve())]
    try:
        return subprocess.run(cmd, env=env).returncode
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
