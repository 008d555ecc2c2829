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


def test_headline_count_by_hand() -> None:
    m = byte_model.lora_bytes(T, N, D, D, R, E, block_n=128)
    g_partials = (D // 128) * INTER
    # Forward: F1 reads X + A, writes H; F2 reads H + B + the bias, writes y.
    fwd = (ACT + ADAPTER + IDX + INTER) + (INTER + ADAPTER + D * E + IDX + ACT)
    # Backward: B1 reads dY + B + H, writes the G partials and dB; B1r moves nothing here (no
    # client has several row chunks) but the norms; B2 reduces the partials to G; B3 writes dx;
    # B4 reads X + G, writes dA; B4r the norms.
    norms = N * (D // 128) * 4
    bwd = ((ACT + ADAPTER + INTER + IDX) + (g_partials + ADAPTER) + norms + (g_partials + IDX + INTER)
           + (INTER + ADAPTER + IDX + ACT) + (ACT + INTER + IDX + ADAPTER) + norms)
    assert m["phases"] == {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}
    # The floor on an H100: 3.0 TB/s copy against a 733 us base fwd + dgrad at 750 TFLOP/s.
    f = byte_model.floors(byte_model.lora_bytes(T, N, D, D, R, E, block_n=256), 3.0e12, 750e12)
    assert f["lora_s"] * 1e6 == pytest.approx(127, abs=0.5)
    assert f["base_fwd_dgrad_s"] * 1e6 == pytest.approx(733, abs=1)


def test_outputs_written_once_and_one_pass_over_each_activation() -> None:
    m = byte_model.lora_bytes(T, N, D, D, R, E, block_n=128)
    k = m["kernels"]
    assert k["F2_expand"]["write"] == ACT and k["F2_expand"]["read"] < ACT / 10  # y written, never read
    assert k["B3_expand"]["write"] == ACT and k["B3_expand"]["read"] < ACT / 10
    g_partials = (D // 128) * INTER
    assert k["B1_dy_pass"]["write"] == g_partials + ADAPTER  # every client fits one chunk: dB final
    assert k["B2_g_reduce"]["read"] == g_partials + IDX
    assert k["B1r_reduce_dB"]["read"] == 0 and k["B4r_reduce_dA"]["read"] == 0
    # With one d_out tile (a single G partial) the kernels would move ~365 MB.
    single = byte_model.lora_bytes(T, N, D, D, R, E, block_n=D)
    assert single["phases"]["fwd_bwd"] / 1e6 == pytest.approx(365.1, abs=0.1)
    # Each extra partial is written by B1 and read by B2 (the norms' tile count changes a little).
    extra = m["phases"]["fwd_bwd"] - single["phases"]["fwd_bwd"]
    assert extra == pytest.approx(2 * (g_partials - INTER), abs=N * 2 * D // 128 * 4)


def test_partials_for_clients_with_several_row_chunks() -> None:
    rows = [5000] + [100] * 31  # one popular client: 10 chunks of 512 rows
    m = byte_model.lora_bytes(T, N, D, D, R, E, chunk_rows=512, client_rows=rows)
    chunk_part = 10 * D * 16 * 4
    k = m["kernels"]
    assert k["B1r_reduce_dB"]["read"] == chunk_part and k["B4r_reduce_dA"]["read"] == chunk_part
    assert k["B1_dy_pass"]["write"] - k["B2_g_reduce"]["read"] + IDX == pytest.approx(
        ADAPTER * (N - 1) / N + chunk_part, abs=2)
    # The reduces write the popular client's final dA and dB (1/N of each) plus the norms.
    assert k["B1r_reduce_dB"]["write"] == pytest.approx(ADAPTER / N + N * 32 * 4, abs=2)


@pytest.mark.parametrize("bad", [dict(t=0), dict(r=1.5), dict(op="delta"), dict(client_rows=[1] * 3)])
def test_bad_arguments_name_the_field(bad) -> None:
    args = dict(t=T, n=N, d_in=D, d_out=D, r=R, dtype_bytes=E)
    args.update(bad)
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        byte_model.lora_bytes(**args)


def test_kernel_bytes_assigned_in_launch_order() -> None:
    model = byte_model.lora_bytes(T, N, D, D, R, E)
    names = [f"k{i}" for i in range(len(model["kernels"]))]
    launches = [{"name": "gemm", "median_us": 300.0}] + [{"name": n, "median_us": 50.0} for n in names]
    got = kernel_profile.assign_model_bytes(launches, set(names), model, copy_bytes_per_s=3.0e12)
    assert got["matched"] is True
    assert [k["model"] for k in got["lora_kernels"]] == list(model["kernels"])
    second = got["lora_kernels"][1]  # F2_expand: 71.9 MB in 50 us
    assert second["gbps"] == pytest.approx(model["kernels"]["F2_expand"]["total"] / 50e-6 / 1e9)
    assert second["frac_of_copy"] == pytest.approx(second["gbps"] * 1e9 / 3.0e12)
    assert got["other_kernels"] == [{"name": "gemm", "median_us": 300.0}]
    assert got["lora_total"]["device_us"] == 50.0 * len(names)
    assert got["lora_total"]["vs_model"]["gbps"] == pytest.approx(
        model["phases"]["fwd_bwd"] / (50e-6 * len(names)) / 1e9)
    # A launch list of another length pairs with nothing.
    five = [{"name": f"k{i}", "median_us": 10.0} for i in range(5)]
    unmatched = kernel_profile.assign_model_bytes(five, {k["name"] for k in five}, model, None)
    assert unmatched["matched"] is False and "bytes" not in unmatched["lora_kernels"][0]


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
    """The delta op: the same kernels without the bias read; on a caller's base layer (out=y) also the
    in-place add into y and autograd's accumulation of the two dx shares: 3 activations each."""
    layer = byte_model.lora_bytes(T, N, D, D, R, E)
    delta = byte_model.lora_bytes(T, N, D, D, R, E, op="lora_delta")
    into = byte_model.lora_bytes(T, N, D, D, R, E, op="lora_delta_out")
    assert delta["op"] == "lora_delta" and layer["op"] == "multi_lora_linear"
    assert delta["phases"]["fwd"] == layer["phases"]["fwd"] - D * E  # no bias
    assert delta["phases"]["bwd"] == layer["phases"]["bwd"]
    assert into["kernels"]["F3_add_into_out"]["total"] == 3 * ACT
    assert into["kernels"]["B5_dx_accumulate"]["total"] == 3 * ACT
    assert into["phases"]["fwd_bwd"] == delta["phases"]["fwd_bwd"] + 6 * ACT
    with pytest.raises(ValueError, match="op: expected one of"):
        byte_model.lora_bytes(T, N, D, D, R, E, op="delta")
