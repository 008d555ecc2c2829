"""Local training of a cohort of clients over one shared backbone.

``ClientParallelEngine`` trains up to ``parallel`` clients at once: every local step takes
the next micro-batch of each still-active client, concatenates them, routes each sample to
its client's adapter slot (one ``LoRAPlan`` per step), runs one forward/backward with loss
``sum_c mean_loss_c`` — so each client's gradient is exactly its own — and steps a masked
batched optimizer that touches a client's slice of a bank only if the client had rows in
this step and trains that block (heads: every participant). Clients with more data simply
stay active for more steps.

``SequentialEngine`` is the same engine with one client at a time: the reference the batched
engine must match (same code path, nothing shared between clients but the frozen backbone).

Nothing couples clients in a batch: the backbone stays in eval mode (its own dropout would
draw from one RNG for the whole batch; see ``MultiLoRAModel.train``), LoRA dropout draws
from a per-client generator, and the loss is a sum of per-client means.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedhello.fl.optim import make_masked_optimizer
from fedhello.nn import MultiLoRAModel

__all__ = ["LocalTask", "LocalResult", "LocalTrainingConfig", "ClientParallelEngine", "SequentialEngine"]

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How each client trains in a round.

    Attributes:
        epochs: passes over the client's data (used when ``steps`` is None).
        steps: a fixed number of local steps instead (the data is cycled, reshuffled each pass).
        batch_size: samples per client per step.
        optimizer: "adamw" or "sgd"; lr, weight_decay, momentum as in torch.
    """

    epochs: int = 1
    steps: int | None = None
    batch_size: int = 16
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if self.steps is None and self.epochs < 1:
            raise ValueError(f"epochs: expected >= 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps: expected >= 1 or None, got {self.steps}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {self.batch_size}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer: expected 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.lr <= 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")

    def num_steps(self, num_samples: int) -> int:
        if self.steps is not None:
            return self.steps
        return self.epochs * -(-num_samples // self.batch_size)


@dataclass
class LocalTask:
    """One client's work in a round.

    Attributes:
        client: the client's global id.
        data: the client's training examples, tensors with a common leading dim ``n``
            (e.g. ``input_ids [n, S]``, ``attention_mask [n, S]``, ``labels [n]``).
        trainable_blocks: bool ``[L]``, the blocks this client trains.
        seed: seeds the client's shuffling and LoRA-dropout RNG for this round.
        rank: the client's LoRA rank (HetLoRA); ``None`` keeps the model's rank.
    """

    client: int
    data: Batch
    trainable_blocks: torch.Tensor
    seed: int
    rank: int | None = None

    @property
    def num_samples(self) -> int:
        return next(iter(self.data.values())).shape[0]


@dataclass
class LocalResult:
    """What a client sends back after local training.

    Attributes:
        state: the client's adapters and head after training (``MultiLoRAModel.client_state``).
        fisher: float32 ``[L]``: squared gradient norms of each trained block, summed over the
            client's steps and divided by their number (0 for blocks it did not train).
        loss: mean training loss over its steps.
    """

    client: int
    state: dict[str, torch.Tensor]
    num_samples: int
    num_steps: int
    trainable_blocks: torch.Tensor
    fisher: torch.Tensor
    loss: float
    rank: int | None = None


@dataclass
class _Schedule:
    """The order in which one client visits its samples, one micro-batch per step."""

    task: LocalTask
    slot: int
    steps: int
    batches: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def build(cls, task: LocalTask, slot: int, cfg: LocalTrainingConfig) -> "_Schedule":
        n = task.num_samples
        if n == 0:
            raise ValueError(f"data: client {task.client} has no training samples")
        steps = cfg.num_steps(n)
        gen = torch.Generator().manual_seed(task.seed)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps * cfg.batch_size // n) + 1)])
        batches = []
        pos = 0
        for _ in range(steps):
            if cfg.steps is None and pos % n + cfg.batch_size > n:
                # Epoch mode: the last batch of an epoch is short, never wraps into the next.
                take = n - pos % n
            else:
                take = cfg.batch_size
            batches.append(order[pos:pos + take])
            pos += take
        return cls(task, slot, steps, batches)


class ClientParallelEngine:
    """Trains a cohort in waves of up to ``parallel`` clients, one batched pass per step.

    Args:
        model: the multi-client model; its slots ``0 .. parallel-1`` are used.
        cfg: local training settings.
        parallel: clients trained together (default: ``model.num_clients``).
        device: where batches go (default: the model's device).
    """

    def __init__(self, model: MultiLoRAModel, cfg: LocalTrainingConfig, parallel: int | None = None,
                 device: torch.device | str | None = None) -> None:
        parallel = model.num_clients if parallel is None else parallel
        if not 1 <= parallel <= model.num_clients:
            raise ValueError(f"parallel: expected 1..{model.num_clients} (model slots), got {parallel}")
        self.model, self.cfg, self.parallel = model, cfg, parallel
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def train(self, global_state: dict[str, torch.Tensor], tasks: list[LocalTask]) -> list[LocalResult]:
        """Train every task starting from ``global_state``; results in the order of ``tasks``."""
        results: list[LocalResult] = []
        for start in range(0, len(tasks), self.parallel):
            results.extend(self._train_wave(global_state, tasks[start:start + self.parallel]))
        return results

    def _train_wave(self, global_state: dict[str, torch.Tensor], tasks: list[LocalTask]) -> list[LocalResult]:
        model, cfg = self.model, self.cfg
        n_slots, n_blocks = model.num_clients, model.num_blocks
        slots = list(range(len(tasks)))
        model.broadcast_state(global_state, slots)
        trainable = torch.zeros(n_blocks, n_slots, dtype=torch.bool)
        for slot, task in zip(slots, tasks):
            if task.trainable_blocks.shape != (n_blocks,):
                raise ValueError(f"trainable_blocks: expected bool [{n_blocks}] for client {task.client}, "
                                 f"got {tuple(task.trainable_blocks.shape)}")
            trainable[:, slot] = task.trainable_blocks.bool()
        model.set_trainable(trainable)
        ranks = [task.rank for task in tasks]
        if any(r is not None for r in ranks):
            model.set_ranks({slot: r for slot, r in zip(slots, ranks) if r is not None})
        model.reset_fisher_norms()
        model.seed_dropout({slot: task.seed for slot, task in zip(slots, tasks)})

        lora = model.lora_banks()
        heads = model.head_banks()
        banks = [p for _, _, p in lora] + [p for _, p in heads]
        optimizer = make_masked_optimizer(cfg.optimizer, banks, cfg.lr, cfg.weight_decay, cfg.momentum)
        schedules = [_Schedule.build(t, s, cfg) for s, t in zip(slots, tasks)]
        loss_sum = torch.zeros(n_slots, dtype=torch.float64)

        was_training = model.training
        model.train()  # adapters and heads only: the backbone stays in eval mode (MultiLoRAModel.train)
        try:
            for step in range(max(s.steps for s in schedules)):
                active = [s for s in schedules if step < s.steps]
                batch, client_ids = self._collate(active, step)
                with model.route(client_ids):
                    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                per_sample = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
                counts = torch.bincount(client_ids, minlength=n_slots).to(per_sample.dtype)
                loss = (per_sample / counts[client_ids]).sum()  # sum over clients of their mean loss
                loss.backward()
                loss_sum += torch.zeros(n_slots, dtype=torch.float64).index_add_(
                    0, client_ids.cpu(), (per_sample.detach() / counts[client_ids]).double().cpu())
                stepping = torch.zeros(n_slots, dtype=torch.bool, device=client_ids.device)
                stepping[client_ids] = True
                masks = [stepping & trainable[block].to(stepping.device) for _, block, _ in lora]
                masks += [stepping] * len(heads)
                optimizer.step(masks)
                optimizer.zero_grad()
        finally:
            model.train(was_training)

        fisher = model.fisher_norms().cpu()
        return [
            LocalResult(
                client=s.task.client,
                state=model.client_state(s.slot),
                num_samples=s.task.num_samples,
                num_steps=s.steps,
                trainable_blocks=s.task.trainable_blocks.bool().clone(),
                fisher=fisher[:, s.slot] / s.steps,
                loss=float(loss_sum[s.slot]) / s.steps,
                rank=s.task.rank,
            )
            for s in schedules
        ]

    def _collate(self, active: list[_Schedule], step: int) -> tuple[Batch, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        ids = []
        for s in active:
            idx = s.batches[step]
            for key, value in s.task.data.items():
                parts.setdefault(key, []).append(value[idx])
            ids.append(torch.full((idx.numel(),), s.slot, dtype=torch.long))
        batch = {k: torch.cat(v).to(self.device) for k, v in parts.items()}
        return batch, torch.cat(ids).to(self.device)


class SequentialEngine(ClientParallelEngine):
    """One client at a time, each with a fresh optimizer: the reference for the batched engine."""

    def __init__(self, model: MultiLoRAModel, cfg: LocalTrainingConfig,
                 device: torch.device | str | None = None) -> None:
        super().__init__(model, cfg, parallel=1, device=device)
