"""scripts/setup.sh says what it is doing, one line per step, with pip kept quiet (pip stubbed out)."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1" = "-c" ]; then echo 0.1.0; fi
"""


def test_one_line_per_step_and_quiet_pip(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "setup.sh")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    done = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    steps = [line for line in lines if line.startswith("setup [")]
    assert len(steps) == 7 and "reusing the virtual environment" in steps[0] and "done in" in steps[-1]
    assert any("torch 2.13.0" in s for s in steps) and any("csrc extension" in s for s in steps)
    assert lines[-1] == "fedhello is installed in .venv (0.1.0)"
    installs = [c for c in (python.parent / "calls.log").read_text().splitlines() if " install " in c]
    assert len(installs) == 5 and all(" -q " in c for c in installs)
    assert "torch==2.13.0" in installs[1] and "--no-build-isolation -e .[test,assets,quant]" in installs[3]
