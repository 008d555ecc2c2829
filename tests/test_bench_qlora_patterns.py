"""benchmarks/qlora_patterns.py (bench_rounds.py --patterns): the three QLoRA round patterns on a tiny
random Llama, the block-by-block quantized builder, the analytic floor, and the CLI's JSON."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _bench_module(name: str):
    """A benchmarks/ script as a module (its siblings importable while it loads)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


qp = _bench_module("qlora_patterns")

CPU = torch.device("cpu")


def _case(pattern: str, n: int = 3, **kw) -> qp.PatternCase:
    values = dict(pattern=pattern, model="tiny-llama", n=n, quantize="nf4", dtype="float32", device="cpu", seq=8,
                  batch=1, steps=1, rank=4, alpha=8.0, lr=1e-2, seed=0, warmup=0)
    return qp.PatternCase(**{**values, **kw})


def _base(case: qp.PatternCase) -> torch.nn.Module:
    return qp.load_quantized(case, CPU)


def test_random_llama_is_quantized_block_by_block_with_own_copies() -> None:
    from fedhello.nn.quantized import quantization_of

    model = _base(_case("fedhello"))
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "cpu" for t in tensors)  # nothing left on the meta device
    layers = [m for m in model.modules() if quantization_of(m) == "nf4"]
    assert len(layers) == 7 * qp.RANDOM_LLAMAS["tiny-llama"]["num_hidden_layers"]
    q0, q1 = (model.model.layers[i].self_attn.q_proj.weight for i in (0, 1))
    assert q0.data_ptr() != q1.data_ptr()  # each block holds its own packed weight
    assert model.is_loaded_in_4bit and not any(p.requires_grad for p in model.parameters())
    out = model(input_ids=torch.randint(1, 100, (2, 8)))
    assert out.logits.shape == (2, 8, qp.RANDOM_LLAMAS["tiny-llama"]["vocab_size"])
    assert torch.isfinite(out.logits).all()


def test_copied_layers_own_one_quantization_state_and_drop_the_original() -> None:
    """A bare deepcopy of a bitsandbytes 4-bit layer keeps a second copy of its scales and a
    reference to the original layer; ``copy_quantized`` relinks both, so the copy holds what a
    loaded model holds."""
    import copy
    import gc
    import weakref

    from fedhello.nn.quantized import quantization_of, quantize_linear

    original = quantize_linear(torch.nn.Linear(64, 32, bias=False), "nf4", torch.float32)
    bare = copy.deepcopy(original)
    assert bare.weight.module is original and bare.quant_state is not bare.weight.quant_state  # the defect

    model = torch.nn.Sequential(original)
    copied = qp.copy_quantized(model)
    layer = copied[0]
    assert quantization_of(layer) == "nf4" and layer is not original
    assert layer.weight.module is layer and layer.quant_state is layer.weight.quant_state
    assert layer.weight.data_ptr() != original.weight.data_ptr()
    x = torch.randn(3, 64)
    torch.testing.assert_close(layer(x), original(x), atol=0, rtol=0)
    gone = weakref.ref(original)
    del model, original, bare
    gc.collect()
    assert gone() is None  # the copy keeps nothing of the original alive


def test_adapter_bytes_match_the_banks_fedhello_allocates() -> None:
    from fedhello.models.quantize import memory_report

    case = _case("fedhello", n=3)
    impl = qp.FedhelloRound(_base(case), case, qp.client_data(case, 128))
    report = memory_report(impl.model, optimizer_slots=2)
    assert report.banks == case.n * qp.adapter_bytes(impl.model.backbone.config, case.rank)


def test_fedhello_round_trains_every_client() -> None:
    case = _case("fedhello", n=3)
    impl = qp.FedhelloRound(_base(case), case, qp.client_data(case, 128))
    before = {k: v.clone() for k, v in impl.global_state.items()}
    assert impl.run() == 3
    after = impl.model.client_state(2)
    assert any(not torch.equal(after[k], before[k]) for k in before)


def test_peft_loop_keeps_every_clients_state_and_trains_only_the_ones_asked() -> None:
    case = _case("peft-loop", n=3, run_clients=2)
    impl = qp.PeftLoopRound(_base(case), case, qp.client_data(case, 128), CPU)
    assert len(impl.adapters) == len(impl.opt_states) == 3
    start = [[a.clone() for a in adapters] for adapters in impl.adapters]
    assert impl.run() == 2
    for c, moved in ((0, True), (1, True), (2, False)):
        changed = any(not torch.equal(a, s) for a, s in zip(impl.adapters[c], start[c]))
        assert changed is moved, c
        steps = {float(state["step"]) for state in impl.opt_states[c]}
        assert steps == ({1.0} if moved else {0.0}), c
    # Client 1 trained from its own state, not from client 0's result.
    assert all(not torch.equal(a0, a1) for a0, a1 in zip(impl.adapters[0], impl.adapters[1]))


def test_flowertune_holds_one_base_per_client() -> None:
    case = _case("flowertune", n=2)
    impl = qp.FlowerTuneRound(_base(case), case, qp.client_data(case, 128), CPU)
    weights = [m.base_model.model.model.layers[0].mlp.up_proj.weight for m in impl.models]
    assert weights[0].data_ptr() != weights[1].data_ptr()
    assert impl.run() == 2
    assert all(len(opt.state) > 0 and all(float(s["step"]) == 1.0 for s in opt.state.values())
               for opt in impl.optimizers)


def test_floor_terms_and_activations() -> None:
    assert qp.floor_terms("fedhello", 8, 16) == {"bases": 1, "states": 8, "grads": 8, "wave_tokens": 128}
    assert qp.floor_terms("peft-loop", 8, 16) == {"bases": 1, "states": 8, "grads": 1, "wave_tokens": 16}
    assert qp.floor_terms("flowertune", 8, 16) == {"bases": 8, "states": 8, "grads": 8, "wave_tokens": 16}
    from transformers import LlamaConfig

    config = LlamaConfig(**qp.RANDOM_LLAMAS["llama-7b"])
    # r = 16 on q/v of the 7B shape: 33.5 MB of adapters per client, 134 MB with gradients and AdamW.
    assert qp.adapter_bytes(config, 16) == 4 * 32 * 2 * 16 * (4096 + 4096)
    one = qp.activation_bytes(config, 1, torch.bfloat16, 0)
    assert one == 32 * (7 * 4096 + 3 * 11008) * 2 + 4096 * 2 + 32000 * 4
    assert qp.activation_bytes(config, 10, torch.float32, 5) == 5 + 10 * qp.activation_bytes(config, 1, torch.float32, 0)


def test_scaled_flowertune_record() -> None:
    n1 = {"pattern": "flowertune", "n": 1, "status": "ok", "peak_bytes": 100, "round_s": 2.0, "round_s_full": 2.0,
          "floor_bytes": 90, "peak_over_floor": 100 / 90, "round_s_extrapolated": False}
    scaled = qp.scaled_flowertune(n1, 8)
    assert scaled["n"] == 8 and scaled["peak_bytes"] == 800 and scaled["floor_bytes"] == 720
    assert scaled["status"] == "scaled" and scaled["round_s_extrapolated"] and scaled["round_s"] is None


def test_worker_measures_peak_and_floor() -> None:
    # In a fresh process, as the bench runs it: in this one, what earlier tests free while the base
    # is built can take the RSS below the baseline read before it.
    record = qp.run_case(replace(_case("fedhello", n=2), threads=1), timeout_s=300)
    assert record["status"] == "ok", record.get("note")
    assert record["clients_trained"] == 2 and record["round_s_extrapolated"] is False
    assert record["peak_bytes"] >= record["held_before_round_bytes"] > record["baseline_bytes"] > 0
    terms = record["floor_terms"]
    assert record["floor_bytes"] == (record["baseline_bytes"] + record["base_bytes"]
                                     + 3 * 2 * record["adapter_bytes_per_client"]
                                     + 2 * record["adapter_bytes_per_client"] + record["activation_floor_bytes"])
    assert terms == {"bases": 1, "states": 2, "grads": 2, "wave_tokens": 16}


def test_bench_rounds_patterns_cli(tmp_path) -> None:
    out = tmp_path / "qlora.json"
    done = subprocess.run([sys.executable, str(BENCH / "bench_rounds.py"), "--quantize", "nf4", "--patterns",
                           "fedhello,peft-loop,flowertune", "--models", "tiny-llama", "--n", "2", "--seq", "8",
                           "--rank", "4", "--loop-clients", "1", "--threads", "1", "--device", "cpu",
                           "--out", str(out)],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["meta"]["settings"]["quantize"] == "nf4"
    cases = {c["pattern"]: c for c in doc["cases"]}
    assert set(cases) == set(qp.PATTERNS) and all(c["status"] == "ok" for c in cases.values())
    assert all(c["peak_bytes"] > 0 and c["floor_bytes"] > 0 for c in cases.values())
    loop = cases["peft-loop"]
    assert loop["clients_trained"] == 1 and loop["round_s_extrapolated"] is True
    assert loop["round_s_full"] == pytest.approx(2 * loop["round_s"])
    assert "peak/floor" in done.stdout


def test_cli_refuses_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        qp.main(["--quantize", "nf4", "--n", "0"])
    assert "--n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        qp.main(["--quantize", "nf4", "--loop-clients", "0"])
    assert "--loop-clients" in capsys.readouterr().err
