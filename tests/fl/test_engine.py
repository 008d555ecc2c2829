"""The client-parallel engine equals training the clients one after another."""

from __future__ import annotations

import copy

import pytest
import torch

from fedhello.fl.engine import ClientParallelEngine, LocalTask, LocalTrainingConfig, SequentialEngine
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
