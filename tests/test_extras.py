"""The pip extras: each layer names the extra it needs, and the extras match pyproject.toml."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from fedhello import cli
from fedhello.errors import EXTRA_MODULES, MissingExtraError, UserError, require_extra

ROOT = Path(__file__).resolve().parents[1]


def _without(monkeypatch, *absent: str) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else find_spec(name, *a))


def test_a_missing_module_names_its_extra(monkeypatch) -> None:
    require_extra("flower", "x")  # everything is installed here
    _without(monkeypatch, "peft", "safetensors")
    with pytest.raises(MissingExtraError) as err:
        require_extra("hf", "fedhello.nn")
    assert str(err.value) == ("fedhello.nn needs the [hf] extra (peft, safetensors not installed): "
                              "pip install 'fedhello[hf]'")
    assert isinstance(err.value, UserError) and isinstance(err.value, ImportError)
    with pytest.raises(MissingExtraError, match=r"^fedhello.fl needs the \[fl\] extra \(peft, safetensors"):
        require_extra("fl", "fedhello.fl")  # fl includes hf
    with pytest.raises(ValueError, match="^extra: expected one of"):
        require_extra("gpu", "x")


def test_the_command_names_the_missing_extra_in_one_line(monkeypatch, capsys) -> None:
    _without(monkeypatch, "flwr")
    assert cli.main(["flower", "configs/quickstart.yaml", "--nodes", "1"]) == 2
    assert capsys.readouterr().err == ("fedhello flower: error: fedhello flower needs the [flower] extra (flwr not "
                                       "installed): pip install 'fedhello[flower]'\n")


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_extra_modules_match_the_extras_of_pyproject() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    provided = importlib.metadata.packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        listed = {_dist(r) for r in extras[extra] if not r.startswith("fedhello[")}
        from_modules = {d.lower().replace("_", "-") for m in modules for d in provided[m]}
        assert from_modules == listed, (extra, from_modules, listed)
    assert set(EXTRA_MODULES) <= set(extras)
    core = {_dist(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert core == {"torch", "numpy", "triton"}
