"""Compiling and reading for the static sm_90 gate: each recorded launch compiled for Hopper by
Triton's own compiler, and its registers, spills, shared memory, MMA and load widths read back."""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tools.sm90_record import Launch

__all__ = ["CompiledLaunch", "KernelReport", "analyse_ptx", "check_reports", "compile_launch", "launch_key",
           "report_compiled", "sm90_target"]

HALF_DTYPES = ("bf16", "fp16")


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


def launch_key(launch: Launch, backend: Any) -> str:
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
