"""CI smoke test of benchmarks/bench_kernels.py: its smallest CPU mode runs and writes sound JSON."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_kernels.py"
IMPLS = ("triton", "triton_nonorm", "torch", "bmm", "csrc", "delta", "base")
PHASES = ("fwd", "bwd", "fwd_bwd")


def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_metadata(smoke) -> None:
    doc, _ = smoke
    meta = doc["meta"]
    assert doc["complete"] is True
    for key in ("device", "device_slug", "python", "torch", "triton", "git_commit", "date", "timing"):
        assert key in meta, key
    assert meta["device_type"] == "cpu"
    assert meta["triton_interpret"] is True
    assert meta["git_commit"] == "unknown" or len(meta["git_commit"]) == 40
    assert doc["grid"] == {"n": [4], "t": [192], "d": [64], "r": [8],
                           "variant": ["frozen", "mixed", "uniform"], "dtype": "fp32", "routing": ["scattered"]}
    copy = meta["copy_bandwidth"]
    assert copy["bytes_per_s"] == pytest.approx(copy["bytes"] / copy["median_s"])


def test_cases_and_sizes(smoke) -> None:
    doc, _ = smoke
    cases = {c["variant"]: c for c in doc["cases"]}
    assert set(cases) == {"uniform", "mixed", "frozen"}
    for case in cases.values():
        assert case["status"] == "ok"
        assert (case["n"], case["t"], case["d_in"], case["d_out"], case["r"]) == (4, 192, 64, 64, 8)
    assert cases["mixed"]["rank_values"] == [1, 2, 4, 8]
    assert cases["uniform"]["rank_values"] == [8, 8, 8, 8]
    assert cases["frozen"]["frozen_clients"] == 2
    assert cases["uniform"]["frozen_clients"] == 0


def test_every_implementation_reported(smoke) -> None:
    doc, _ = smoke
    expected_ok = {"torch", "bmm", "delta", "base"} | ({"triton", "triton_nonorm"} if _triton_installed() else set())
    for case in doc["cases"]:
        assert set(case["impls"]) == set(IMPLS), case["name"]
        for name, entry in case["impls"].items():
            if name in expected_ok:
                assert entry["status"] == "ok", (case["name"], name, entry)
            if entry["status"] != "ok":
                assert entry["status"] == "skipped" and entry["note"], (name, entry)
                continue
            for phase in PHASES:
                stats = entry[phase]
                assert stats["median_ms"] > 0 and stats["reps"] >= 3
                assert stats["q20_ms"] <= stats["median_ms"] <= stats["q80_ms"]


def test_guard_agrees_tightly_in_fp32(smoke) -> None:
    doc, _ = smoke
    for case in doc["cases"]:
        guard = case["guard"]
        assert "bmm" in guard
        for name, report in guard.items():
            assert report["ok"]
            # fp32 on CPU: every implementation matches the loop far inside the 2e-2 guard.
            assert set(report["rel_err"]) >= {"y", "dx", "dA", "dB"}
            assert max(report["rel_err"].values()) < 1e-4, (case["name"], name, report)
        if "triton" in guard:
            assert "sqnorm" in guard["triton"]["rel_err"]
        assert "sqnorm" in guard["delta"]["rel_err"]  # lora_delta's fused norms, checked like the others


def test_derived_values_follow_their_definitions(smoke) -> None:
    doc, _ = smoke
    for case in doc["cases"]:
        impls, ratios = case["impls"], case["ratios"]
        base = {p: impls["base"][p]["median_ms"] for p in PHASES}
        for name, entry in impls.items():
            if entry["status"] != "ok" or name == "base":
                continue
            for p in PHASES:
                assert math.isclose(entry["lora_ms"][p], entry[p]["median_ms"] - base[p], rel_tol=1e-9)
        bmm = impls["bmm"]
        for p in PHASES:
            got = ratios["full_speedup_vs_torch_loop"]["bmm"][p]
            assert math.isclose(got, impls["torch"][p]["median_ms"] / bmm[p]["median_ms"], rel_tol=1e-9)
            overhead = ratios["lora_overhead_vs_base"]["torch"][p]
            lora = impls["torch"]["lora_ms"][p]
            assert overhead is None if lora <= 0 else math.isclose(overhead, lora / base[p], rel_tol=1e-9)
        if impls["triton"]["status"] == "ok":
            with_norm = impls["triton"]["bwd"]["median_ms"]
            without = impls["triton_nonorm"]["bwd"]["median_ms"]
            assert math.isclose(ratios["fused_norm_cost_frac_of_bwd"], (with_norm - without) / without,
                                rel_tol=1e-9)


def test_byte_model_rates_and_ceilings_recorded(smoke) -> None:
    doc, _ = smoke
    copy_bw = doc["meta"]["copy_bandwidth"]["bytes_per_s"]
    for case in doc["cases"]:
        model = case["bytes_model"]
        assert set(model) == {"multi_lora_linear", "lora_delta_out"}
        assert model["multi_lora_linear"]["phases"]["fwd_bwd"] < model["lora_delta_out"]["phases"]["fwd_bwd"]
        rates = case["ratios"]["effective_gbps_model"]
        for name, entry in case["impls"].items():
            if name == "base" or entry["status"] != "ok":
                continue
            for phase in PHASES:
                ms = entry["lora_ms"][phase]
                rate = rates[name][phase]
                if ms <= 0:
                    assert rate["gbps"] is None
                    continue
                # lora_delta on a caller's layer is rated against its own model (the add passes).
                expect = model["lora_delta_out" if name == "delta" else "multi_lora_linear"]["phases"][phase] / (
                    ms * 1e-3) / 1e9
                assert math.isclose(rate["gbps"], expect, rel_tol=1e-9)
                assert math.isclose(rate["frac_of_copy"], expect * 1e9 / copy_bw, rel_tol=1e-9)
        ceil = case["ceilings"]
        for name in ("base_fwd", "base_dgrad", "addmm_"):
            flops = 2 * case["t"] * case["d_in"] * case["d_out"]
            assert math.isclose(ceil[name]["tflops"], flops / (ceil[name]["median_ms"] * 1e-3) / 1e12,
                                rel_tol=1e-9)
        assert "profile" not in case  # kernel profiles need CUDA


def test_routings(bench_kernels) -> None:
    gen = torch.Generator().manual_seed(0)
    contiguous = bench_kernels.make_client_ids(4, 400, "contiguous", gen)
    assert bool((contiguous[1:] >= contiguous[:-1]).all()) and set(contiguous.tolist()) == {0, 1, 2, 3}
    counts = {s: torch.bincount(bench_kernels.make_client_ids(8, 8000, s, gen), minlength=8)
              for s in ("scattered", "zipf1", "zipf2")}
    # Zipf s: client 0 holds 1 / H(8, s) of the rows (0.368 for s=1, 0.655 for s=2); uniform 1/8.
    assert abs(counts["scattered"][0].item() / 8000 - 1 / 8) < 0.03
    assert abs(counts["zipf1"][0].item() / 8000 - 0.368) < 0.03
    assert abs(counts["zipf2"][0].item() / 8000 - 0.655) < 0.03
    assert bench_kernels.KernelCase(2, 8, 8, 8, routing="zipf2").name.endswith("-zipf2")
    with pytest.raises(ValueError, match="routing"):
        bench_kernels.KernelCase(2, 8, 8, 8, routing="zipf3")


def test_table_printed(smoke) -> None:
    _, stdout = smoke
    for case in ("n4-t192-d64-r8-uniform-fp32", "n4-t192-d64-r8-mixed-fp32", "n4-t192-d64-r8-frozen-fp32"):
        assert case in stdout
    assert "xLoop" in stdout and "wrote " in stdout


def test_report_prints_the_same_tables_from_the_saved_json(smoke, report, tmp_path, capsys) -> None:
    """Reporting is apart from measuring: report.py prints from the JSON what the run printed."""
    doc, stdout = smoke
    assert report.kernels_report(doc) in stdout
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps(doc))
    assert report.main([str(path)]) == 0
    assert capsys.readouterr().out.strip() == report.kernels_report(doc).strip()


def _sibling(name: str):
    """A module of benchmarks/, imported as the scripts import each other (their folder on sys.path)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(SCRIPT.parent))


@pytest.fixture(scope="module")
def bench_kernels():
    return _sibling("bench_kernels")


@pytest.fixture(scope="module")
def report():
    return _sibling("report")


def test_ratios_from_hand_made_medians(bench_kernels, report) -> None:
    def timed(fwd: float, bwd: float, fwd_bwd: float) -> dict:
        return {"status": "ok", **{p: {"median_ms": v} for p, v in zip(PHASES, (fwd, bwd, fwd_bwd))}}

    impls = {
        "base": timed(1.0, 2.0, 3.0),
        "triton": timed(1.2, 2.6, 3.6),          # LoRA path 0.2, 0.6, 0.6
        "triton_nonorm": timed(1.2, 2.5, 3.5),   # LoRA path 0.2, 0.5, 0.5
        "torch": timed(2.0, 4.4, 6.0),           # LoRA path 1.0, 2.4, 3.0
        "bmm": timed(1.4, 2.0, 4.2),             # LoRA path 0.4, 0.0, 1.2
        "csrc": {"status": "skipped", "note": "not built"},
    }
    ratios = bench_kernels.derive(impls)
    assert impls["torch"]["lora_ms"] == pytest.approx({"fwd": 1.0, "bwd": 2.4, "fwd_bwd": 3.0})
    assert "lora_ms" not in impls["csrc"]
    assert ratios["lora_speedup_vs_torch_loop"]["triton"] == pytest.approx(
        {"fwd": 5.0, "bwd": 4.0, "fwd_bwd": 5.0})
    assert ratios["full_speedup_vs_torch_loop"]["triton"]["fwd_bwd"] == pytest.approx(6.0 / 3.6)
    # A LoRA path of 0 ms (below noise) gives no ratio rather than a division by zero.
    assert ratios["lora_speedup_vs_torch_loop"]["bmm"]["bwd"] is None
    assert ratios["lora_speedup_vs_bmm"]["triton"] == pytest.approx(
        {"fwd": 2.0, "bwd": None, "fwd_bwd": 2.0})
    assert ratios["lora_overhead_vs_base"]["triton"]["fwd_bwd"] == pytest.approx(0.2)
    assert ratios["fused_norm_cost_frac_of_bwd"] == pytest.approx(0.1 / 2.5)
    assert ratios["fused_norm_cost_frac_of_lora_bwd"] == pytest.approx(0.1 / 0.5)
    record = {"name": "n32-t8192-d4096-r16-uniform-bf16", "impls": impls, "ratios": ratios}
    assert bench_kernels.headline_ratios(record) == pytest.approx({
        "lora_fwd_bwd_speedup_vs_torch_loop": 5.0,
        "lora_overhead_vs_base_fwd_bwd": 0.2,
        "fused_norm_cost_frac_of_bwd": 0.04,
    })
    doc = {"headline": {"case": record["name"], **bench_kernels.headline_ratios(record)}}
    goals = {k: {"op": op, "value": v} for k, (op, v) in bench_kernels.GOALS.items()}
    text = report.headline_report(doc["headline"], goals)
    assert text.count("MET") == 3 and "NOT MET" not in text


def test_size_lists_parse_k_suffix(bench_kernels) -> None:
    assert bench_kernels._int_list("1k,8K, 300") == [1024, 8192, 300]
    case = bench_kernels.KernelCase(6, 1024, 256, 16, "mixed", "bf16")
    assert case.ranks() == [2, 4, 8, 16, 2, 4]
    assert bench_kernels.KernelCase(3, 8, 8, 8, "frozen").trainable() == [True, False, True]
    with pytest.raises(ValueError, match="variant"):
        bench_kernels.KernelCase(3, 8, 8, 8, "sparse")


def test_kernel_table_from_a_hand_made_profile(report) -> None:
    launches = [{"name": "ampere_bf16_gemm", "median_us": 350.0}, {"name": "_shrink_kernel", "median_us": 25.0}]
    record = {"name": "case", "profile": {"triton": {
        "kernels": launches, "total_us": 375.0, "reps": 5, "matched": True,
        "lora_kernels": [{"name": "_shrink_kernel", "median_us": 25.0, "model": "F1_shrink",
                          "bytes": 71_900_000, "gbps": 2876.0, "frac_of_copy": 0.72}],
        "other_kernels": [{"name": "ampere_bf16_gemm", "median_us": 350.0}],
        "lora_total": {"device_us": 25.0, "vs_model": {"gbps": 15904.0, "frac_of_copy": None}}}},
        "host_vs_device": {"host_ms": 0.5, "device_ms": 1.25, "host_over_device": 0.4}}
    lines = report.kernel_table(record, {"bytes_per_s": 4.0e12})
    text = "\n".join(lines)
    assert "copy bandwidth 4000 GB/s" in text and "paired with the byte model: yes" in text
    assert "_shrink_kernel" in text and "71.9" in text and "2876" in text and "72 %" in text
    assert "ampere_bf16_gemm" in text and "350.0" in text
    assert "25.0 us = 15904 GB/s against the byte model" in text
    assert "host 0.500 ms to enqueue, device 1.250 ms" in text
    assert report.kernel_table({"name": "cpu-case"}, None) == []


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "benchmarks" / "results").glob("*.json")
                                        if not p.name.startswith("static-")))
def test_report_prints_every_saved_result(report, path: str, capsys) -> None:
    """The committed results print again from their JSON alone, one table line per case."""
    doc = json.loads((REPO / "benchmarks" / "results" / path).read_text())
    assert report.main([str(REPO / "benchmarks" / "results" / path)]) == 0
    out = capsys.readouterr().out
    for case in doc["cases"]:
        if "pattern" in case:  # a QLoRA patterns case: its (model, N, pattern) line
            assert re.search(rf"^{case['model']}\s+{case['n']}\s+{case['pattern']}\s", out, re.M), case
        else:
            assert case["name"] in out
