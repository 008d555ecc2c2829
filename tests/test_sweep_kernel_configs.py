"""benchmarks/sweep_kernel_configs.py without a GPU: the candidate grid covers every KernelConfig
field, the sweep keeps the fastest candidate, honours its time budget, survives candidates that
fail to compile, writes its JSON as it goes, and prints lines that paste back into tuning._GPU."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from fedhello.kernels import tuning

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
try:
    import sweep_kernel_configs as sweep_mod
finally:
    sys.path.remove(str(BENCH))


def test_grid_covers_every_config_field() -> None:
    assert list(sweep_mod.CANDIDATES) == [f.name for f in dataclasses.fields(tuning.KernelConfig)]
    grid = sweep_mod.candidate_grid()
    assert len(grid) == len(set(grid)) > 100
    assert {cfg.dy_block_n for cfg in grid} == set(sweep_mod.CANDIDATES["dy_block_n"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128])
def test_table_key_is_the_key_lookup_reads(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                           r_pad: int) -> None:
    sentinel = tuning.KernelConfig(16, 16, 16, 16, 16, 1, 1)
    monkeypatch.setitem(tuning._GPU, sweep_mod.table_key(dtype, r_pad), sentinel)
    assert tuning.lookup(dtype, r_pad, interpreting=False) is sentinel


def test_sweep_keeps_the_fastest_and_prints_a_table_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = dict(tuning._GPU)
    seen = []

    def fake_time(dtype: torch.dtype, r: int, cfg: tuning.KernelConfig) -> float:
        seen.append(cfg)
        if cfg.num_stages == 4:
            raise RuntimeError("out of resources: shared memory")
        return 1.0 + cfg.block_m / 128 + cfg.dy_block_n / 1024 + cfg.num_warps / 8

    out = tmp_path / "sweep.json"
    results = sweep_mod.sweep([("bf16", 16), ("fp32", 32)], fake_time, limit=20, budget_s=1e9, out=str(out))
    assert tuning._GPU == before  # the table is left as it was
    assert len(seen) == 2 * 21 and seen[0] == tuning._GPU[("half", 16)]
    for key, entry in results.items():
        ran = [t["ms"] for t in entry["timings"]]
        assert entry["tried"] == len(ran) and entry["failed"] == 21 - len(ran) and entry["failed"] > 0
        assert entry["best_ms"] == min(ran) and entry["default"] == entry["timings"][0]["config"]
        assert entry["default_ms"] == ran[0]
    assert json.loads(out.read_text()) == results
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "KernelConfig(" in ln]
    assert len(lines) == 2
    for line, (key, entry) in zip(lines, results.items()):
        fields = [int(v) for v in re.search(r"KernelConfig\(([^)]*)\)", line).group(1).split(",")]
        assert tuning.KernelConfig(*fields) == tuning.KernelConfig(**entry["config"])
        family, r = key.split(",")
        assert line.lstrip().startswith(f'("{family}", {r}):')


def test_sweep_stops_sampling_when_the_budget_is_spent(tmp_path: Path) -> None:
    clock = iter(range(1000)).__next__  # one "second" per reading
    calls = []
    results = sweep_mod.sweep([("bf16", 16), ("bf16", 32)], lambda d, r, c: calls.append(r) or 1.0, limit=40,
                              budget_s=5, clock=clock)
    first, second = results["half,16"], results["half,32"]
    assert first["stopped"] == "budget spent" and 1 < first["tried"] < 41
    # The next entry still gets its baseline (today's setting), nothing more.
    assert second["tried"] == 1 and second["default_ms"] == 1.0 and second["stopped"] == "budget spent"


def test_sweep_with_nothing_compiling_reports_it(capsys: pytest.CaptureFixture) -> None:
    def broken(dtype: torch.dtype, r: int, cfg: tuning.KernelConfig) -> float:
        raise RuntimeError("no")

    results = sweep_mod.sweep([("fp16", 64)], broken, limit=3, budget_s=1e9)
    assert "best_ms" not in results["half,64"] and results["half,64"]["failed"] == 4
    assert '("half", 64): no candidate ran' in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--dtypes", "bf8"], "--dtypes"), (["--ranks", "24"], "--ranks"),
                                           (["--ranks", "x"], "--ranks")])
def test_cli_rejects_bad_entries(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        sweep_mod.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
