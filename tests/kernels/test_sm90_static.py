"""The static sm_90 gate (tools/static_check.py, with tools/sm90_record.py and tools/sm90_analyse.py):
every Triton kernel the public API launches compiles for Hopper with Triton's own compiler, without
spills or scalar 2-byte loads.

The gate runs in a child process started without ``TRITON_INTERPRET`` (conftest sets it for this
process on machines without CUDA, and the interpreter replaces ``@triton.jit`` kernels); no GPU is
needed, Triton ships ``ptxas`` and ``cuobjdump``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fedhello.kernels import triton_available, triton_interpreting
from tools import sm90_analyse, sm90_record

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _child_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # fresh: nothing reused across runs
    return env


@needs_triton
def test_public_api_kernels_pass_the_sm90_gate(tmp_path) -> None:
    out = tmp_path / "gate.json"
    done = subprocess.run([sys.executable, "-m", "tools.static_check", "--json", str(out)],
                          cwd=ROOT, env=_child_env(tmp_path), capture_output=True, text=True, timeout=600)
    print(done.stdout)  # the table (shown with -s, and on failure)
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    doc = json.loads(out.read_text())
    kernels = doc["kernels"]
    for dtype in ("bf16", "fp16", "fp32"):
        uses = [u for k in kernels if k["dtype"] == dtype for u in k["uses"]]
        assert any(u.endswith("/forward") for u in uses), (dtype, uses)
        assert any(u.endswith("/backward") for u in uses), (dtype, uses)
    for k in kernels:
        assert k["registers"] is not None and k["registers"] > 0, k["kernel"]
        assert k["spill_stores"] is not None and k["spill_loads"] is not None, k["kernel"]
    assert doc["passed"] and done.returncode == 0, "sm_90 gate failed:\n" + "\n".join(doc["failures"])


# A kernel module for checking that the gate catches what it must: a bf16 copy whose loads are
# masked by a run-time bound along the contiguous dimension (one element per load), and the same
# copy with the bound as a constexpr (full 16-byte vectors).
_PROBE = '''
import torch
import triton
import triton.language as tl


@triton.jit
def masked_copy(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs % 16 < n, other=0.0))


@triton.jit
def vector_copy(src, dst, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs))


def launch(src, dst, n):
    masked_copy[(src.numel() // 1024,)](src, dst, n, BLOCK=1024, num_warps=4)
    vector_copy[(src.numel() // 1024,)](src, dst, BLOCK=1024, num_warps=4)
'''

_DRIVER = '''
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import probe
from tools.sm90_analyse import check_reports, compile_launch, report_compiled
from tools.sm90_record import record_launches
with record_launches(probe) as launches:
    probe.launch(torch.empty(4096, dtype=torch.bfloat16), torch.empty(4096, dtype=torch.bfloat16), 5)
reports = [report_compiled(compile_launch(l), "bf16", [l.name]) for l in launches]
failures = check_reports(reports)
print(json.dumps({"kernels": [r.kernel for r in reports], "failures": failures,
                  "loads": [r.ptx["loads"] for r in reports], "divisible": [r.divisible_by_16 for r in reports]}))
'''


@needs_triton
def test_gate_flags_scalar_half_loads_and_passes_vector_ones(tmp_path) -> None:
    (tmp_path / "probe.py").write_text(_PROBE)
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], cwd=ROOT,
                          env=_child_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["kernels"] == ["masked_copy", "vector_copy"]
    # Triton's launcher specialises the 16-aligned pointers; n = 5 is not a multiple of 16.
    assert doc["divisible"][0] == ["dst", "src"]
    masked, vector = doc["loads"]
    assert masked.get("b16", 0) > 0, masked
    assert vector and all(k.startswith("v") for k in vector), vector
    assert len(doc["failures"]) == 1 and doc["failures"][0].startswith("bf16 masked_copy")
    assert "scalar 2-byte global loads" in doc["failures"][0]


def test_analyse_ptx_counts_widths_and_mma_kinds() -> None:
    ptx = textwrap.dedent("""
        @%p1 ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
        ld.global.b16 { %rs2 }, [ %rd2 + 0 ];
        @%p2 ld.global.L1::evict_last.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd3 + 0 ];
        ld.global.v2.b16 { %rs3, %rs4 }, [ %rd4 + 0 ];
        st.global.v4.b32 [ %rd5 + 0 ], { %r1, %r2, %r3, %r4 };
        cp.async.cg.shared.global [ %r5 + 0 ], [ %rd6 + 0 ], 0x10, %r6;
        cp.async.ca.shared.global [ %r7 + 0 ], [ %rd7 + 0 ], 4, %r8;
        wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%f1}, %rd8, %rd9, %p3, 1, 1, 0, 1;
        mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f2}, {%r9}, {%r10}, {%f3};
    """)
    got = sm90_analyse.analyse_ptx(ptx)
    assert got["loads"] == {"b16": 2, "v2.b16": 1, "v4.b32": 1}
    assert got["scalar_2byte_loads"] == 2  # v2.b16 is 4 bytes per thread, not scalar
    assert got["stores"] == {"v4.b32": 1}
    assert got["cp_async"] == {"16B": 1, "4B": 1}
    assert got["mma"] == {"mma.sync m16n8k8 tf32": 1, "wgmma m64n16k16 bf16": 1}
    assert sm90_analyse.analyse_ptx("")["mma"] == {}


def _report(dtype: str, **changes) -> sm90_analyse.KernelReport:
    base = dict(dtype=dtype, kernel="k", uses=["scattered/forward"], constexprs={}, divisible_by_16=[],
                num_warps=4, num_stages=3, shared_bytes=0, registers=64, stack=0, spill_stores=0,
                spill_loads=0, sass={"LDL": 0, "STL": 0},
                ptx={"loads": {"v4.b32": 2}, "scalar_2byte_loads": 0, "cp_async": {}, "bulk_copies": 0,
                     "mma": {}, "stores": {}})
    return sm90_analyse.KernelReport(**{**base, **changes})


def test_check_reports_gates_half_precision_only() -> None:
    clean = _report("bf16")
    spilling = _report("fp16", spill_stores=8, spill_loads=8, sass={"LDL": 2, "STL": 2})
    local_only = _report("bf16", sass={"LDL": 1, "STL": 0})
    scalar = _report("bf16", ptx={**clean.ptx, "scalar_2byte_loads": 3})
    fp32 = _report("fp32", spill_stores=12, spill_loads=12, sass={"LDL": 4, "STL": 4})
    failures = sm90_analyse.check_reports([clean, spilling, local_only, scalar, fp32])
    assert len(failures) == 3
    assert not clean.failures and not fp32.failures
    assert "register spills" in spilling.failures[0] and "register spills" in local_only.failures[0]
    assert "3 scalar 2-byte global loads" in scalar.failures[0]
    assert "fp16 k [scattered/forward]" in failures[0]


def test_dense_products_skipped_only_when_large() -> None:
    small_a, small_b = torch.randn(4, 8), torch.randn(8, 3)
    big_a, big_b = torch.randn(512, 256), torch.randn(256, 512)  # 2^26 multiply-adds
    acc = torch.zeros(512, 512)
    with sm90_record._SkipDenseProducts():
        small = small_a @ small_b
        big = big_a @ big_b
        same = acc.addmm_(big_a, big_b)
    torch.testing.assert_close(small, small_a @ small_b)
    assert big.shape == (512, 512) and big.dtype == big_a.dtype
    assert same is acc and bool((acc == 0).all())


@needs_triton
def test_record_launches_swaps_and_restores_kernels() -> None:
    from fedhello.kernels.backends import triton as triton_backend

    before = dict(vars(triton_backend))
    if triton_interpreting():
        # Under the interpreter there is no JITFunction to record: the gate must say so.
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            with sm90_record.record_launches(triton_backend):
                pass
    else:
        with sm90_record.record_launches(triton_backend) as launches:
            swapped = [k for k, v in vars(triton_backend).items() if isinstance(v, sm90_record._LaunchRecorder)]
            assert swapped
        assert launches == []
    assert {k: v for k, v in vars(triton_backend).items()} == before


@needs_triton
@pytest.mark.parametrize("module, name", [("triton", "_sm_count"), ("triton", "_programs_wanted"),
                                          ("multi_lora", "resolve_backend")])
def test_a_patched_name_that_is_gone_stops_the_gate(monkeypatch, module, name) -> None:
    from fedhello.kernels import multi_lora
    from fedhello.kernels.backends import triton as triton_backend

    before = (multi_lora.resolve_backend, triton_backend._programs_wanted, triton_backend._sm_count)
    monkeypatch.delattr({"triton": triton_backend, "multi_lora": multi_lora}[module], name)
    with pytest.raises(sm90_record.PatchTargetMissing, match=f"{module}.{name} is gone"):
        with sm90_record._triton_backend_on_cpu():
            pass
    monkeypatch.undo()
    assert (multi_lora.resolve_backend, triton_backend._programs_wanted, triton_backend._sm_count) == before
