"""The run folder's readers and writers (fedhello.run_folder): what resume, suites and plots rely on."""

import json
import math

import numpy as np

from fedhello import run_folder


def test_records_round_trip_with_numpy_values_and_a_cut_last_line(tmp_path):
    run_folder.write_records(tmp_path, [{"round": 0, "loss": np.float32(0.5), "cohort": np.arange(2)}])
    run_folder.append_record(tmp_path, {"round": np.int64(1)})
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"round": 2, "lo')  # a run killed while appending
    assert run_folder.read_records(tmp_path) == [{"round": 0, "loss": 0.5, "cohort": [0, 1]}, {"round": 1}]


def test_write_records_leaves_an_identical_file_alone(tmp_path):
    run_folder.write_records(tmp_path, [{"round": 0}])
    path = tmp_path / "metrics.jsonl"
    before = path.stat().st_mtime_ns
    run_folder.write_records(tmp_path, [{"round": 0}])
    assert path.stat().st_mtime_ns == before
    run_folder.write_records(tmp_path, [])
    assert path.read_text() == ""


def test_keep_completions_drops_those_after_the_checkpoint(tmp_path):
    run_folder.append_completions(tmp_path, 0, [("p", "a"), ("q", "b")])
    run_folder.append_completions(tmp_path, 4, [("p", "c")])
    run_folder.keep_completions(tmp_path, 2)
    lines = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"round": 0, "prompt": "p", "completion": "a"},
                                                    {"round": 0, "prompt": "q", "completion": "b"}]
    run_folder.keep_completions(tmp_path / "absent", 2)  # no file: nothing to do


def test_missing_files_read_as_none_or_nan(tmp_path):
    assert run_folder.read_records(tmp_path) == []
    assert run_folder.read_initial_eval(tmp_path) is None
    assert run_folder.checkpoint_round(tmp_path) is None
    assert math.isnan(run_folder.read_wall_time(tmp_path))
    run_folder.write_wall_time(tmp_path, 1.5)
    run_folder.write_initial_eval(tmp_path, {"accuracy": 0.25})
    assert run_folder.read_wall_time(tmp_path) == 1.5 and run_folder.read_initial_eval(tmp_path) == {"accuracy": 0.25}


def test_metrics_csv_counts_participants(tmp_path):
    run_folder.write_metrics_csv(tmp_path, [{"round": 0, "participants": [3, 5], "train_loss": 1.0, "extra": 1}])
    header, row = (tmp_path / "metrics.csv").read_text().splitlines()
    assert header.split(",") == list(run_folder.CSV_FIELDS)
    assert dict(zip(header.split(","), row.split(",")))["participants"] == "2"


def test_json_floats_turns_nan_into_null():
    assert run_folder.json_floats(None) is None
    assert json.dumps(run_folder.json_floats(np.array([0.5, np.nan], dtype=np.float32))) == "[0.5, null]"
