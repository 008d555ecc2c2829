"""benchmarks/byte_model.py (bytes of the LoRA path per kernel and phase) and the per-kernel
byte assignment of benchmarks/kernel_profile.py, checked against hand counts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
    import byte_model
    import kernel_profile
finally:
    sys.path.remove(str(BENCH))

T, N, D, R, E = 8192, 32, 4096, 16, 2
ACT = T * D * E            # one [T, d] bf16 activation: 67.1 MB
ADAPTER = N * R * D * E    # all clients' A (or B)
INTER = T * 16 * 4         # fp32 [T, R_PAD] rank intermediate
IDX = T * 4                # int32 sorted rows


def test_v1_headline_matches_the_issue_count() -> None:
    m = byte_model.lora_bytes(T, N, D, D, R, E, design="v1")
    # Forward: shrink reads X + A, writes H; expand reads H + B and y, writes y.
    fwd = (ACT + ADAPTER + IDX + INTER) + (INTER + ADAPTER + 2 * ACT + IDX)
    # Backward: the same for dY/dx, plus the two weight-gradient passes over X and dY.
    bwd = fwd + 2 * (INTER + ACT + IDX + ADAPTER)
    assert m["phases"] == {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}
    assert m["phases"]["fwd_bwd"] / 1e6 == pytest.approx(565.4, abs=0.1)
    # The issue's floor: 188 us at 3.0 TB/s, 25.7 % of a 733 us base fwd + dgrad.
    f = byte_model.floors(m, 3.0e12, 750e12)
    assert f["lora_s"] * 1e6 == pytest.approx(188.5, abs=0.5)
    assert f["base_fwd_dgrad_s"] * 1e6 == pytest.approx(733, abs=1)


def test_v2_removes_the_read_modify_writes_and_second_passes() -> None:
    m = byte_model.lora_bytes(T, N, D, D, R, E, design="v2", block_n=128)
    k = m["kernels"]
    assert k["F2_expand"]["write"] == ACT and k["F2_expand"]["read"] < ACT / 10  # y written, never read
    assert k["B3_expand"]["write"] == ACT and k["B3_expand"]["read"] < ACT / 10
    g_partials = (D // 128) * INTER
    assert k["B1_dy_pass"]["write"] == g_partials + ADAPTER  # every client fits one chunk: dB final
    assert k["B2_g_reduce"]["read"] == g_partials + IDX
    assert k["B1r_reduce_dB"]["read"] == 0 and k["B4r_reduce_dA"]["read"] == 0
    # With one d_out tile (a single G partial) the design moves ~365 MB: the issue's target.
    single = byte_model.lora_bytes(T, N, D, D, R, E, design="v2", block_n=D)
    assert single["phases"]["fwd_bwd"] / 1e6 == pytest.approx(365.1, abs=0.1)
    # Each extra partial is written by B1 and read by B2 (the norms' tile count changes a little).
    extra = m["phases"]["fwd_bwd"] - single["phases"]["fwd_bwd"]
    assert extra == pytest.approx(2 * (g_partials - INTER), abs=N * 2 * D // 128 * 4)


def test_v2_partials_for_clients_with_several_row_chunks() -> None:
    rows = [5000] + [100] * 31  # one popular client: 10 chunks of 512 rows
    m = byte_model.lora_bytes(T, N, D, D, R, E, design="v2", chunk_rows=512, client_rows=rows)
    chunk_part = 10 * D * 16 * 4
    k = m["kernels"]
    assert k["B1r_reduce_dB"]["read"] == chunk_part and k["B4r_reduce_dA"]["read"] == chunk_part
    assert k["B1_dy_pass"]["write"] - k["B2_g_reduce"]["read"] + IDX == pytest.approx(
        ADAPTER * (N - 1) / N + chunk_part, abs=2)
    # The reduces write the popular client's final dA and dB (1/N of each) plus the norms.
    assert k["B1r_reduce_dB"]["write"] == pytest.approx(ADAPTER / N + N * 32 * 4, abs=2)


@pytest.mark.parametrize("bad", [dict(t=0), dict(r=1.5), dict(design="v3"), dict(client_rows=[1] * 3)])
def test_bad_arguments_name_the_field(bad) -> None:
    args = dict(t=T, n=N, d_in=D, d_out=D, r=R, dtype_bytes=E)
    args.update(bad)
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        byte_model.lora_bytes(**args)


def test_kernel_bytes_assigned_in_launch_order() -> None:
    models = {d: byte_model.lora_bytes(T, N, D, D, R, E, design=d) for d in ("v1", "v2")}
    names = ["_shrink_kernel", "_expand_kernel", "_shrink_kernel", "_expand_kernel",
             "_weight_grad_kernel", "_weight_grad_kernel"]
    launches = [{"name": "gemm", "median_us": 300.0}] + [{"name": n, "median_us": 50.0} for n in names]
    got = kernel_profile.assign_model_bytes(launches, set(names), models, copy_bytes_per_s=3.0e12)
    assert got["matched_design"] == "v1"
    assert [k["model"] for k in got["lora_kernels"]] == [f"v1:{n}" for n in models["v1"]["kernels"]]
    first = got["lora_kernels"][1]  # expand_fwd: 139 MB in 50 us
    assert first["gbps"] == pytest.approx(models["v1"]["kernels"]["expand_fwd"]["total"] / 50e-6 / 1e9)
    assert first["frac_of_copy"] == pytest.approx(first["gbps"] * 1e9 / 3.0e12)
    assert got["other_kernels"] == [{"name": "gemm", "median_us": 300.0}]
    assert got["lora_total"]["device_us"] == 300.0
    # Eight unknown kernels pair with the v2 model; five do not pair with anything.
    eight = [{"name": f"k{i}", "median_us": 10.0} for i in range(8)]
    assert kernel_profile.assign_model_bytes(eight, {k["name"] for k in eight}, models, None)[
        "matched_design"] == "v2"
    five = eight[:5]
    unmatched = kernel_profile.assign_model_bytes(five, {k["name"] for k in five}, models, None)
    assert unmatched["matched_design"] is None and "bytes" not in unmatched["lora_kernels"][0]


class _Event:
    """Stands in for a profiler FunctionEvent: name, device type, time range."""

    def __init__(self, name: str, start: float, us: float, device: str = "CUDA") -> None:
        from types import SimpleNamespace

        self.name = name
        self.device_type = SimpleNamespace(name=device)
        self.time_range = SimpleNamespace(start=start, elapsed_us=lambda: us)


def test_launch_list_takes_medians_per_position() -> None:
    events = []
    for call, durations in enumerate(([10.0, 5.0], [30.0, 7.0], [20.0, 6.0])):
        base = 1000.0 * call
        events += [_Event("shrink", base + 1, durations[0]), _Event("expand", base + 2, durations[1]),
                   _Event("aten::mm", base + 0.5, 99.0, device="CPU")]
    got = kernel_profile.launch_list(list(reversed(events)), reps=3)
    assert got["kernels"] == [{"name": "shrink", "median_us": 20.0}, {"name": "expand", "median_us": 6.0}]
    assert got["total_us"] == 26.0
    assert "note" in kernel_profile.launch_list(events[:-1] + [_Event("x", 5000, 1.0)], reps=3)
    swapped = [_Event("expand", 1, 1.0), _Event("shrink", 2, 1.0), _Event("shrink", 3, 1.0),
               _Event("expand", 4, 1.0)]
    assert kernel_profile.launch_list(swapped, reps=2) == {"note": "calls launched different kernel sequences"}


def test_lora_delta_counts_its_own_output_and_the_add_passes() -> None:
    """The delta op: v2's kernels without the bias read; on a caller's base layer (out=y) also the
    in-place add into y and autograd's accumulation of the two dx shares: 3 activations each."""
    v2 = byte_model.lora_bytes(T, N, D, D, R, E)
    delta = byte_model.lora_bytes(T, N, D, D, R, E, op="lora_delta")
    into = byte_model.lora_bytes(T, N, D, D, R, E, op="lora_delta_out")
    assert delta["op"] == "lora_delta" and v2["op"] == "multi_lora_linear"
    assert delta["phases"]["fwd"] == v2["phases"]["fwd"] - D * E  # no bias
    assert delta["phases"]["bwd"] == v2["phases"]["bwd"]
    assert into["kernels"]["F3_add_into_out"]["total"] == 3 * ACT
    assert into["kernels"]["B5_dx_accumulate"]["total"] == 3 * ACT
    assert into["phases"]["fwd_bwd"] == delta["phases"]["fwd_bwd"] + 6 * ACT
    with pytest.raises(ValueError, match="design: lora_delta exists in the v2 design only"):
        byte_model.lora_bytes(T, N, D, D, R, E, design="v1", op="lora_delta")
    with pytest.raises(ValueError, match="op: expected one of"):
        byte_model.lora_bytes(T, N, D, D, R, E, op="delta")
