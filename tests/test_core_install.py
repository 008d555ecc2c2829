"""The core install: ``pip install fedhello`` with no extra gives the kernels and nothing heavy.

A fresh virtual environment gets the torch build this test runs under (served by the local
package index) and ninja (to load or build the csrc extension on first use), then this project
without extras; pip resolves the core dependencies (numpy, triton) itself. In that environment
``multi_lora_linear`` runs forward and backward on the torch backend and the csrc extension, none
of the federated stack is installed or imported, and every layer that needs an extra names it in
one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("transformers", "peft", "flwr", "flwr_datasets", "datasets", "matplotlib", "sklearn", "scipy", "yaml")

# Runs inside the core environment; prints one JSON line.
_PROBE = r'''
import importlib, importlib.util, json, sys
import torch
from fedhello.kernels import LoRAPlan, extension, multi_lora_linear

torch.manual_seed(0)
T, N, d_in, d_out, r = 37, 3, 20, 12, 4
x0 = torch.randn(T, d_in, dtype=torch.float64)
w, b = torch.randn(d_out, d_in), torch.randn(d_out)
a0, b0 = torch.randn(N, r, d_in), torch.randn(N, d_out, r)
ids = torch.randint(-1, N, (T,))
plan = LoRAPlan.build(ids, N)
ranks, trainable = torch.tensor([4, 2, 3]), torch.tensor([True, False, True])

def run(backend, dtype):
    x, a, bb = (t.to(dtype).clone().requires_grad_() for t in (x0, a0, b0))
    norms = torch.zeros(N)
    y = multi_lora_linear(x, w.to(dtype), b.to(dtype), a, bb, plan, 0.5, ranks=ranks, trainable=trainable,
                          grad_sqnorm=norms, backend=backend)
    y.square().sum().backward()
    return [t.double() for t in (y, x.grad, a.grad, bb.grad, norms)]

exact = run("torch", torch.float64)
errors = {}
for backend in ("torch", "cpu"):
    got = run(backend, torch.float32)
    errors[backend] = max(float(((g - e).abs() / (e.abs() + 1)).max()) for g, e in zip(got, exact))

layers = {}
for module in ("fedhello.nn", "fedhello.models", "fedhello.data", "fedhello.fl", "fedhello.config"):
    try:
        importlib.import_module(module)
        layers[module] = None
    except ImportError as err:
        layers[module] = f"{type(err).__name__}: {err}"
heavy = sys.argv[1].split(",")
print(json.dumps({"errors": errors, "csrc": extension.load_error("cpu"), "layers": layers,
                  "installed": [m for m in heavy if importlib.util.find_spec(m) is not None],
                  "imported": sorted({m.split(".")[0] for m in sys.modules} & set(heavy))}))
'''


def _run(cmd: list[str], timeout: float, **env: str) -> subprocess.CompletedProcess:
    # The test process's own site-packages must not leak into the core environment.
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    environ.update(env)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environ, cwd=ROOT)
    assert done.returncode in (0, 2), f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler for the csrc extension")
def test_core_install_runs_the_kernels_without_the_federated_stack(tmp_path) -> None:
    start = time.monotonic()
    steps = []

    def step(name: str) -> None:
        steps.append(f"{name} {time.monotonic() - start:.0f} s")

    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    _run([*pip, f"torch=={torch.__version__.split('+')[0]}", "ninja"], timeout=900)
    step("torch")
    # No build isolation (torch and setuptools are there) and no build at install time: the csrc
    # extension comes from the source tree or the fedhello cache, as after a plain install.
    _run([*pip, "--no-build-isolation", "-e", str(ROOT)], timeout=600, FEDHELLO_BUILD_EXT="0")
    step("fedhello")

    done = _run([python, "-c", _PROBE, ",".join(HEAVY)], timeout=900)
    step("kernels")
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["csrc"] is None, f"the csrc cpu extension did not load: {probe['csrc']}"
    assert probe["errors"]["torch"] < 1e-4 and probe["errors"]["cpu"] < 1e-4, probe["errors"]  # fp32 vs fp64
    assert probe["installed"] == [] and probe["imported"] == [], probe
    for module, extra in (("fedhello.nn", "hf"), ("fedhello.models", "hf"), ("fedhello.data", "fl"),
                          ("fedhello.fl", "hf"), ("fedhello.config", "fl")):
        assert probe["layers"][module].startswith(f"MissingExtraError: {module} needs the [{extra}] extra"), probe
        assert f"pip install 'fedhello[{extra}]'" in probe["layers"][module]

    # The command: doctor runs on the kernels alone; run names the extra in one line (exit 2).
    fedhello = str(venv / "bin" / "fedhello")
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    doctor = _run([fedhello, "doctor"], timeout=300, **offline)
    assert doctor.returncode == 0 and "cpu     csrc extension loaded" in doctor.stdout, doctor.stdout
    assert "offline assets: not checked: fedhello.data needs the [fl] extra" in doctor.stdout
    run = _run([fedhello, "run", "configs/quickstart.yaml"], timeout=300, **offline)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("fedhello run: error: fedhello run needs the [fl] extra (")
    step("cli")
    print("core install test, seconds since the start:", ", ".join(steps))
