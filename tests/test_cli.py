"""The command line's failure behaviour: one line on stderr, exit 2, fast, before heavy imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedhello import cli
from fedhello.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# A hub endpoint that refuses connections at once: "hub unreachable" without depending on
# whether this machine has internet access.
DEAD_HUB = "http://127.0.0.1:9"


def _fedhello(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    environ.update(PYTHONPATH=str(ROOT), HF_ENDPOINT=DEAD_HUB, **env)
    return subprocess.run([sys.executable, "-m", "fedhello", *args], capture_output=True, text=True, env=environ,
                          cwd=ROOT, timeout=120)


def _one_line_error(result: subprocess.CompletedProcess, command: str, field: str) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"fedhello {command}: error: {field}:"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def test_missing_config_file_is_one_line():
    _one_line_error(_fedhello("run", "nope.yaml"), "run", "config")


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {}], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_unknown_model_name_offline(offline):
    line = _one_line_error(_fedhello("run", QUICKSTART, "--set", "model.name=not-a-model-xyz", **offline),
                           "run", "model.name")
    assert "HF_HUB_OFFLINE" in line if offline else "unreachable" in line
    # the offline aliases are listed, and how to use a local folder
    assert "minilm" in line and "smollm2" in line and "local folder" in line


@pytest.mark.parametrize("offline", [{"HF_HUB_OFFLINE": "1"}, {}], ids=["HF_HUB_OFFLINE", "unreachable"])
def test_unknown_data_name_offline(offline):
    line = _one_line_error(_fedhello("run", QUICKSTART, "--set", "data.name=not_a_dataset", **offline),
                           "run", "data.name")
    assert "bbc_news" in line and "fashion_mnist" in line and "data.path" in line


def test_fashion_mnist_without_its_files(tmp_path):
    line = _one_line_error(_fedhello("run", QUICKSTART, "--set", "data.name=fashion_mnist",
                                     "--set", f"data.path={tmp_path}"), "run", "data.name")
    assert "apt-get install dataset-fashion-mnist" in line and str(tmp_path) in line


def test_local_file_of_unknown_type_names_the_dotted_field():
    _one_line_error(_fedhello("run", QUICKSTART, "--set", "data.name=null", "--set", f"data.path={__file__}"),
                    "run", "data.path")


def test_missing_column_of_a_local_file(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,topic\nhello,a\n")
    line = _one_line_error(_fedhello("run", QUICKSTART, "--set", "data.name=null", "--set", f"data.path={data}",
                                     "--set", "data.label_column=label_id"), "run", "data.label_column")
    assert "topic" in line  # the columns that are there


def test_flower_checks_names_too():
    _one_line_error(_fedhello("flower", QUICKSTART, "--nodes", "1", "--set", "model.name=no/such-model",
                              HF_HUB_OFFLINE="1"), "flower", "model.name")


def test_checking_a_config_imports_no_heavy_library():
    code = (
        "import sys\n"
        "from fedhello.config import ConfigError, load_config\n"
        "config = load_config(sys.argv[1], ['strategy.options.warmup=2'])\n"
        "config.check_sources()\n"
        "try:\n"
        "    load_config(sys.argv[1], ['local.lr=-1'])\n"
        "except ConfigError:\n"
        "    pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'flwr') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, QUICKSTART], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_python_dash_m_is_the_fedhello_command(capsys):
    result = _fedhello("--help")
    assert result.returncode == 0
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert result.stdout == capsys.readouterr().out


def test_expected_errors_raised_later_are_one_line(monkeypatch, capsys):
    from fedhello.models.assets import MissingAssetError

    def missing(self):
        raise MissingAssetError("all-MiniLM-L6-v2 needs the package 'x', which is not installed: pip install x")

    monkeypatch.setattr(RunConfig, "check_sources", missing)
    assert cli.main(["run", QUICKSTART]) == 2
    err = capsys.readouterr().err
    assert err == "fedhello run: error: all-MiniLM-L6-v2 needs the package 'x', which is not installed: pip install x\n"


@pytest.mark.parametrize("error", [ValueError("model.rank: looks like a config message"), KeyError("step"),
                                   RuntimeError("boom")], ids=["ValueError", "KeyError", "RuntimeError"])
def test_any_other_exception_is_a_bug_with_its_traceback(monkeypatch, capsys, error):
    def broken(self):
        raise error

    monkeypatch.setattr(RunConfig, "check_sources", broken)
    assert cli.main(["run", QUICKSTART]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "in broken" in err
    assert f"{type(error).__name__}: " in err
    assert err.rstrip().splitlines()[-1].startswith("fedhello run: internal error: this is a bug in fedhello")


def test_the_user_facing_errors_are_user_errors():
    from fedhello.config import ConfigError
    from fedhello.errors import UserError
    from fedhello.fl.checkpoint import CheckpointError, RunFolderError
    from fedhello.fl.health import NonFiniteRoundError
    from fedhello.models.assets import MissingAssetError

    for cls in (ConfigError, CheckpointError, RunFolderError, NonFiniteRoundError, MissingAssetError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(MissingAssetError, ImportError)  # callers catching ImportError keep working


def test_a_plain_value_error_of_a_config_check_is_a_config_error(monkeypatch, capsys):
    from fedhello.config import ConfigError, load_config

    def check(self):
        raise ValueError("model.rank: expected a new kind of check to pass, got 3")

    monkeypatch.setattr(RunConfig, "_validate_model", check)
    with pytest.raises(ConfigError, match="^model.rank: expected a new kind"):
        load_config(QUICKSTART)
    assert cli.main(["run", QUICKSTART]) == 2
    assert capsys.readouterr().err == "fedhello run: error: model.rank: expected a new kind of check to pass, got 3\n"


def test_time_rounds_below_one_is_a_user_error(capsys):
    assert cli.main(["run", QUICKSTART, "--time-rounds", "0"]) == 2
    assert capsys.readouterr().err == "fedhello run: error: --time-rounds: expected >= 1, got 0\n"


def test_doctor_lists_backends_and_assets():
    result = _fedhello("doctor")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "'auto' picks: cpu tensors ->" in out
    assert "fallback where Triton is not installed" in out  # the extension's role is stated
    for name in ("triton", "cpu", "cuda", "bbc_news", "fashion_mnist", "minilm", "smollm2"):
        assert name in out
    assert ("nothing is missing" in out) != ("missing (" in out)
    strict = _fedhello("doctor", "--strict")
    assert strict.returncode == (1 if "missing (" in out else 0)


def test_suite_checks_names_before_heavy_imports():
    suite = str(ROOT / "configs" / "suites" / "quickstart.yaml")
    _one_line_error(_fedhello("suite", suite, "--set", "model.name=not-a-model-xyz", HF_HUB_OFFLINE="1"),
                    "suite", "model.name")
    code = ("import sys\nfrom fedhello.suite import load_suite\nload_suite(sys.argv[1])\n"
            "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'flwr', 'matplotlib') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code, suite], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
