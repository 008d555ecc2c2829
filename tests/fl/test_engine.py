"""The client-parallel engine equals training the clients one after another."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fedhello
from fedhello.fl.engine import (ClientParallelEngine, LocalTask, LocalTrainingConfig, SequentialEngine,
                                wave_size_for_memory, wave_size_for_tokens)
from fedhello.nn import inject_multi_lora

VOCAB, LABELS, SEQ = 50, 3, 12


def _tiny_bert(layers: int = 4):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=SEQ, num_labels=LABELS, pad_token_id=0)).eval()


def _client_data(n: int, gen: torch.Generator, seq: int = SEQ, vocab: int = VOCAB, labels: int = LABELS):
    lengths = torch.randint(3, seq + 1, (n,), generator=gen)
    ids = torch.randint(1, vocab, (n, seq), generator=gen)
    mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, labels, (n,), generator=gen)}


def _tasks(num_blocks: int, sizes: list[int], gen: torch.Generator, **data_kw) -> list[LocalTask]:
    tasks = []
    for c, n in enumerate(sizes):
        k = [num_blocks // 2, (3 * num_blocks) // 4, num_blocks][c % 3]
        blocks = torch.zeros(num_blocks, dtype=torch.bool)
        blocks[torch.randperm(num_blocks, generator=gen)[:k]] = True
        tasks.append(LocalTask(client=100 + c, data=_client_data(n, gen, **data_kw), trainable_blocks=blocks,
                               seed=1000 + c))
    return tasks


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of one tensor (the max over tensors is what the tests bound)."""
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _compare(backbone, targets, tasks, cfg, dropout=0.0):
    n = len(tasks)
    batched = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=n, rank=4, alpha=8, dropout=dropout,
                                backend="torch", seed=3)
    single = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=1, rank=4, alpha=8, dropout=dropout,
                               backend="torch", seed=3)
    # A non-trivial global state: random B (a fresh bank has B = 0) and a random head.
    gen = torch.Generator().manual_seed(5)
    global_state = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in batched.client_state(0).items()}
    got = ClientParallelEngine(batched, cfg).train(global_state, tasks)
    want = SequentialEngine(single, cfg).train(global_state, tasks)
    assert [r.client for r in got] == [t.client for t in tasks] == [r.client for r in want]
    for g, w in zip(got, want):
        assert g.num_steps == w.num_steps and g.num_samples == w.num_samples
        for name in w.state:
            assert _max_rel(g.state[name], w.state[name]) < 1e-4, (g.client, name)
            # training really moved what the client trains
        assert _max_rel(g.fisher, w.fisher) < 1e-4, g.client
        assert abs(g.loss - w.loss) < 1e-4 * max(1.0, abs(w.loss))
        untrained = (~g.trainable_blocks).nonzero().flatten().tolist()
        assert all(g.fisher[b] == 0 for b in untrained)
        assert all(g.fisher[b] > 0 for b in g.trainable_blocks.nonzero().flatten().tolist())
    return got, global_state, batched


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_batched_equals_sequential_adamw(dropout):
    gen = torch.Generator().manual_seed(0)
    backbone = _tiny_bert()
    tasks = _tasks(4, [5, 13, 2, 9, 17, 4, 11, 7], gen)  # mixed sizes: clients finish at different steps
    cfg = LocalTrainingConfig(epochs=2, batch_size=4, optimizer="adamw", lr=1e-2, weight_decay=0.01)
    got, global_state, model = _compare(backbone, ["query", "value"], tasks, cfg, dropout)
    # Frozen blocks and the untrained adapters of every client are exactly the global ones.
    blocks = model.tensor_blocks()
    for res in got:
        for name, block in blocks.items():
            moved = not torch.equal(res.state[name], global_state[name])
            if block is not None and not res.trainable_blocks[block]:
                assert not moved, (res.client, name)
            elif block is None:
                assert moved, (res.client, name)  # every participant trains its head


def test_batched_equals_sequential_sgd_fixed_steps():
    gen = torch.Generator().manual_seed(1)
    tasks = _tasks(4, [6, 3, 10], gen)
    cfg = LocalTrainingConfig(steps=5, batch_size=4, optimizer="sgd", lr=5e-2, momentum=0.9)
    _compare(_tiny_bert(), ["query", "value"], tasks, cfg)


def test_real_minilm_batched_equals_sequential():
    from fedhello.models import load_backbone

    backbone = load_backbone("all-MiniLM-L6-v2", num_labels=5)
    gen = torch.Generator().manual_seed(2)
    tasks = _tasks(6, [4, 7, 3, 6, 5, 2, 8, 4], gen, seq=10, vocab=1000, labels=5)
    # Adam's first steps move every coordinate by about lr whatever the gradient's size, so
    # fp32 summation-order noise of the backbone GEMMs (batched vs alone) in near-zero gradient
    # entries shows up scaled by lr: 1e-3 keeps it well inside the 1e-4 bound.
    cfg = LocalTrainingConfig(steps=2, batch_size=3, optimizer="adamw", lr=1e-3)
    _compare(backbone, ["query", "value"], tasks, cfg)


def test_task_with_wrong_block_mask_is_rejected():
    model = inject_multi_lora(_tiny_bert(), ["query"], num_clients=2, rank=2, backend="torch")
    task = LocalTask(client=0, data=_client_data(3, torch.Generator().manual_seed(0)),
                     trainable_blocks=torch.ones(3, dtype=torch.bool), seed=0)
    with pytest.raises(ValueError, match=r"trainable_blocks: expected bool \[4\]"):
        ClientParallelEngine(model, LocalTrainingConfig()).train(model.client_state(0), [task])


def test_local_config_errors():
    with pytest.raises(ValueError, match="batch_size"):
        LocalTrainingConfig(batch_size=0)
    with pytest.raises(ValueError, match="optimizer"):
        LocalTrainingConfig(optimizer="adam")
    with pytest.raises(ValueError, match="steps"):
        LocalTrainingConfig(steps=0)


# --------------------------------------------------------------------- engine v2: GPU-shaped steps

FEDHELLO = Path(fedhello.__file__).resolve().parent
# The code a step's host reads are counted in: the engine and the model layer it drives. The
# kernels and MultiLoRALinear (the lead's side) are reported separately, not asserted on.
ENGINE_CODE = (FEDHELLO / "fl", FEDHELLO / "nn" / "model.py", FEDHELLO / "nn" / "heads.py",
               FEDHELLO / "nn" / "routing.py", FEDHELLO / "nn" / "losses.py")
HOST_READS = ("item", "tolist", "cpu", "__int__", "__bool__", "__float__")


class _HostReadSpy:
    """Counts ``Tensor`` host reads by the file that calls them, while ``active``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.calls: list[tuple[str, str]] = []
        for name in HOST_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        spy = self

        def wrapper(tensor, *args, **kwargs):
            if spy.active:
                caller = Path(sys._getframe(1).f_code.co_filename).resolve()
                if caller.is_relative_to(FEDHELLO):
                    spy.calls.append((name, str(caller.relative_to(FEDHELLO))))
            return original(tensor, *args, **kwargs)

        return wrapper

    def engine_reads(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if any((FEDHELLO / c[1]).is_relative_to(p) for p in ENGINE_CODE)]


def _watch_steps(monkeypatch: pytest.MonkeyPatch, spy: _HostReadSpy) -> list[int]:
    """Run every engine step with ``spy`` active; the returned list grows by one per step."""
    steps: list[int] = []
    original = ClientParallelEngine._step

    def spied_step(self, *args):
        spy.active = True
        try:
            original(self, *args)
        finally:
            spy.active = False
        steps.append(1)

    monkeypatch.setattr(ClientParallelEngine, "_step", spied_step)
    return steps


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_local_step_reads_nothing_back_to_the_host(monkeypatch, backend):
    """The engine's code reads nothing back in a step. With the Triton kernels (the GPU path; the
    interpreter here) nothing in fedhello does, the kernel layer included; the torch loop backend
    reads its plan's offsets by design."""
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(4)
    tasks = _tasks(4, [6, 9, 3], gen)
    model = inject_multi_lora(_tiny_bert(), ["query", "value"], num_clients=3, rank=4, alpha=8, backend=backend,
                              dropout=0.1)
    engine = ClientParallelEngine(model, LocalTrainingConfig(epochs=1, batch_size=4, lr=1e-2))
    spy = _HostReadSpy(monkeypatch)
    steps = _watch_steps(monkeypatch, spy)
    engine.train(model.client_state(0), tasks)
    assert len(steps) == 3  # ceil(9 / 4) steps of the wave ran under the spy
    assert spy.engine_reads() == [], spy.engine_reads()
    if backend == "triton":
        assert spy.calls == [], spy.calls
    # The spy does see reads from that code: an untrusted routing checks the ids' range on the host.
    spy.active = True
    with model.route(torch.tensor([0, 1, 2])):
        pass
    spy.active = False
    assert any(path == "nn/routing.py" for _, path in spy.engine_reads())


def test_a_causal_lm_step_reads_nothing_back_to_the_host(monkeypatch):
    """Token-level losses (labels [rows, S], -100 masked) keep the step free of host reads too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=SEQ)).eval()
    gen = torch.Generator().manual_seed(4)
    tasks = _tasks(2, [6, 9, 3], gen)
    for task in tasks:  # next-token targets: the ids themselves, masked at padding and a 2-token prompt
        ids, mask = task.data["input_ids"], task.data["attention_mask"]
        keep = mask.bool() & (torch.arange(SEQ) >= 2)
        task.data["labels"] = ids.where(keep, torch.full_like(ids, -100))
    model = inject_multi_lora(lm, ["q_proj", "v_proj"], num_clients=3, rank=4, alpha=8, head_modules=None,
                              backend="torch")
    engine = ClientParallelEngine(model, LocalTrainingConfig(epochs=1, batch_size=4, lr=1e-2))
    spy = _HostReadSpy(monkeypatch)
    _watch_steps(monkeypatch, spy)
    results = engine.train(model.client_state(0), tasks)
    assert all(math.isfinite(r.loss) and r.loss > 0 for r in results)
    assert spy.engine_reads() == [], spy.engine_reads()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (sync debug mode is CUDA-only)")
def test_a_wave_makes_no_device_syncs_from_engine_code_on_cuda(monkeypatch):
    """Sync debug mode "warn" reports every synchronising op with the Python line that called it;
    none may come from the engine's code or the kernel layer (transformers' own code is not ours)."""
    gen = torch.Generator().manual_seed(4)
    tasks = _tasks(4, [6, 9, 3], gen)
    model = inject_multi_lora(_tiny_bert(), ["query", "value"], num_clients=3, rank=4, alpha=8).cuda()
    engine = ClientParallelEngine(model, LocalTrainingConfig(epochs=1, batch_size=4, lr=1e-2), dtype=torch.bfloat16)
    original = ClientParallelEngine._step
    syncs, steps = [], []

    def watched_step(self, *args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                original(self, *args)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs.extend(Path(w.filename).resolve() for w in caught if "synchroniz" in str(w.message))
        steps.append(1)

    monkeypatch.setattr(ClientParallelEngine, "_step", watched_step)
    results = engine.train(model.client_state(0), tasks)
    assert len(steps) == 3 and all(math.isfinite(r.loss) for r in results)
    ours = [f for f in syncs if f.is_relative_to(FEDHELLO)]
    assert ours == [], ours


def test_bfloat16_training_tracks_float32():
    gen = torch.Generator().manual_seed(6)
    tasks = _tasks(4, [8, 12, 5], gen)
    cfg = LocalTrainingConfig(epochs=2, batch_size=4, lr=1e-2)
    backbone = _tiny_bert()
    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = inject_multi_lora(copy.deepcopy(backbone), ["query", "value"], num_clients=3, rank=4, alpha=8,
                                  backend="torch", seed=3)
        global_state = {k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
                        for k, v in model.client_state(0).items()}
        engine = ClientParallelEngine(model, cfg, dtype=dtype)
        runs[dtype] = engine.train(global_state, tasks)
        assert model.compute_dtype == dtype
        # Master weights stay float32 whatever the backbone computes in.
        assert all(p.dtype == torch.float32 for _, _, p in model.lora_banks())
        assert all(p.dtype == torch.float32 for _, p in model.head_banks())
        assert all(v.dtype == torch.float32 for r in runs[dtype] for v in r.state.values())
    # Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 2e-3 per op); after a few
    # steps through 4 blocks the trained tensors agree to a few percent, the losses to 2e-2.
    for lo, hi in zip(runs[torch.bfloat16], runs[torch.float32]):
        assert abs(lo.loss - hi.loss) < 2e-2 * max(1.0, abs(hi.loss))
        delta_lo = torch.cat([(lo.state[k] - global_state[k]).flatten() for k in hi.state])
        delta_hi = torch.cat([(hi.state[k] - global_state[k]).flatten() for k in hi.state])
        assert _max_rel(delta_lo, delta_hi) < 0.1, hi.client
        assert _max_rel(lo.fisher, hi.fisher) < 0.1, hi.client


def test_compute_dtype_is_checked():
    model = inject_multi_lora(_tiny_bert(), ["query"], num_clients=1, rank=2, backend="torch")
    with pytest.raises(ValueError, match="dtype: expected one of"):
        ClientParallelEngine(model, LocalTrainingConfig(), dtype=torch.float64)


def _deep_tasks(num_blocks: int, sizes: list[int], gen: torch.Generator) -> list[LocalTask]:
    """Inverted-Triangle-like allocations: every client trains only its top blocks (block 0 never)."""
    tasks = []
    for c, n in enumerate(sizes):
        blocks = torch.zeros(num_blocks, dtype=torch.bool)
        blocks[num_blocks - 1 - c % (num_blocks - 1):] = True
        tasks.append(LocalTask(client=c, data=_client_data(n, gen), trainable_blocks=blocks, seed=50 + c))
    return tasks


def test_backward_stops_at_the_lowest_trained_block():
    gen = torch.Generator().manual_seed(7)
    tasks = _deep_tasks(4, [6, 9, 5], gen)  # blocks 3, 2-3, 1-3: block 0 is trained by nobody
    cfg = LocalTrainingConfig(epochs=2, batch_size=4, lr=1e-2, weight_decay=0.01)
    backbone = _tiny_bert()
    runs = {}
    for stop in (True, False):
        model = inject_multi_lora(copy.deepcopy(backbone), ["query", "value"], num_clients=3, rank=4, alpha=8,
                                  backend="torch", seed=3)
        graph = []  # does the output of block 0's adapted layers enter autograd?
        for name, layer in model.lora_modules:
            if model.blocks.block_of(name) == 0:
                layer.register_forward_hook(lambda mod, inp, out: graph.append(out.requires_grad))
        runs[stop] = ClientParallelEngine(model, cfg, stop_backward=stop).train(model.client_state(0), tasks)
        assert graph and all(g is not stop for g in graph)
        assert all(p.requires_grad for _, _, p in model.lora_banks())  # restored after the wave
    for a, b in zip(runs[True], runs[False]):  # bit-exact: the skipped work fed nothing trained
        assert a.loss == b.loss and torch.equal(a.fisher, b.fisher)
        assert all(torch.equal(a.state[k], b.state[k]) for k in b.state)
    _compare(backbone, ["query", "value"], tasks, cfg)  # and still equal to the sequential engine


def test_wave_sizes():
    assert wave_size_for_tokens(512, 4096, 32) == 8
    assert wave_size_for_tokens(512, 100, 32) == 1
    assert wave_size_for_tokens(10, 4096, 32) == 32
    assert wave_size_for_memory(10_000, 1_000, 100, headroom=0.8) == 8
    assert wave_size_for_memory(10_000, 1_000, 5) == 5
    assert wave_size_for_memory(10, 1_000, 5) == 1
    with pytest.raises(ValueError, match="tokens_per_client"):
        wave_size_for_tokens(0, 10, 3)


def test_auto_waves_follow_the_token_budget(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    tasks = _tasks(4, [5, 7, 4, 6, 3], gen)
    cfg = LocalTrainingConfig(epochs=1, batch_size=2, lr=1e-2)
    model = inject_multi_lora(_tiny_bert(), ["query", "value"], num_clients=5, rank=4, alpha=8, backend="torch",
                              seed=3)
    engine = ClientParallelEngine(model, cfg, parallel="auto", token_budget=2 * 2 * SEQ)  # 2 clients a wave
    waves = []
    original = ClientParallelEngine._train_wave
    monkeypatch.setattr(ClientParallelEngine, "_train_wave",
                        lambda self, state, wave: waves.append(len(wave)) or original(self, state, wave))
    got = engine.train(model.client_state(0), tasks)
    assert waves == [2, 2, 1]
    assert [r.client for r in got] == [t.client for t in tasks]
    with pytest.raises(ValueError, match="parallel: expected 'auto' or an int"):
        ClientParallelEngine(model, cfg, parallel="max")


def test_causal_lm_client_allotted_no_block_trains_nothing_in_either_engine():
    """A causal LM has no head: a client with no block has nothing to train. Both engines record its
    loss and return the global state (before: the sequential engine, or a wave of such clients,
    failed in backward), and the other clients are unaffected."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=SEQ)).eval()
    gen = torch.Generator().manual_seed(6)
    tasks = _tasks(2, [6, 5], gen)
    tasks[1].trainable_blocks.zero_()
    for task in tasks:
        task.data["labels"] = task.data["input_ids"].where(task.data["attention_mask"].bool(), -100)
    cfg = LocalTrainingConfig(steps=2, batch_size=4, lr=1e-2)
    results = {}
    for name, slots, engine in (("batched", 2, ClientParallelEngine), ("sequential", 1, SequentialEngine),
                                ("alone", 2, ClientParallelEngine)):
        model = inject_multi_lora(copy.deepcopy(lm), ["q_proj", "v_proj"], num_clients=slots, rank=4, alpha=8,
                                  head_modules=None, backend="torch", seed=3)
        global_state = model.client_state(0)
        run = tasks[1:] if name == "alone" else tasks
        results[name] = (engine(model, cfg).train(global_state, run), global_state)
    for name, (res, global_state) in results.items():
        idle = res[-1]
        assert math.isfinite(idle.loss) and (idle.fisher == 0).all(), name
        assert all(torch.equal(idle.state[k], global_state[k]) for k in global_state), name
    for g, w in zip(results["batched"][0], results["sequential"][0]):
        assert all(_max_rel(g.state[k], w.state[k]) < 1e-4 for k in w.state)
        assert abs(g.loss - w.loss) < 1e-4 * max(1.0, abs(w.loss))


def test_auto_waves_count_image_patches_not_pixels():
    from types import SimpleNamespace

    from fedhello.fl.engine import _tokens_per_sample

    images = LocalTask(client=0, data={"pixel_values": torch.zeros(4, 3, 224, 224), "labels": torch.zeros(4)},
                       trainable_blocks=torch.ones(2, dtype=torch.bool), seed=0)
    assert _tokens_per_sample(images, SimpleNamespace(patch_size=16)) == 14 * 14 + 1  # ViT-B/16: 197
    assert _tokens_per_sample(images, SimpleNamespace()) == 3 * 224 * 224  # no patches known: the input size


@pytest.mark.parametrize("steps", [None, 3])
def test_a_batch_larger_than_the_clients_data_holds_each_sample_once(steps):
    """Never a sample twice in one step's batch, and no allocation for a batch_size the client cannot fill."""
    from fedhello.fl.engine import _Schedule

    task = LocalTask(client=0, data={"labels": torch.arange(5)}, trainable_blocks=torch.ones(2, dtype=torch.bool),
                     seed=1)
    for batch_size in (8, 100_000):
        schedule = _Schedule.build(task, 0, LocalTrainingConfig(steps=steps, batch_size=batch_size))
        assert len(schedule.batches) == (steps or 1)
        for batch in schedule.batches:
            assert sorted(batch.tolist()) == [0, 1, 2, 3, 4]
