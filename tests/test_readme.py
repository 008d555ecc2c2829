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


def test_lora_delta_example_adds_into_a_users_base_layer(tmp_path):
    section = README.read_text().split("## The kernel API\n", 1)[1].split("\n## ", 1)[0]
    script = tmp_path / "delta_example.py"
    script.write_text(section.split("```python\n")[2].split("```", 1)[0])
    torch.manual_seed(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        namespace = runpy.run_path(str(script))
    assert out.getvalue().strip() == "True"
    assert namespace["delta"].abs().max() > 0  # the example is not a zero delta
    for name in ("x", "lora_a", "lora_b"):
        assert namespace[name].grad is not None and namespace[name].grad.abs().max() > 0, name
