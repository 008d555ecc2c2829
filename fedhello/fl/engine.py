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

The same holds for causal LMs (``labels [n, S]``, -100 where no loss applies): a client's mean
is then over its target tokens in the step (``fedhello.nn.losses``), so rows with more target
tokens weigh more, exactly as when the client trains alone.

Nothing couples clients in a batch: the backbone stays in eval mode (its own dropout would
draw from one RNG for the whole batch; see ``MultiLoRAModel.train``), LoRA dropout draws
from a per-client generator, and the loss is a sum of per-client means.

Built for a GPU:

* no host syncs inside a local step: the batches, routing ids, loss weights and optimizer
  masks of every step of a wave are built on the host and copied before the first step; the
  routing is passed as trusted and contiguous (the engine lays each client out as one block of
  rows), the per-client loss sums and Fisher norms stay on the device, and the host reads them
  once at the end of the wave;
* mixed precision: with ``dtype`` the frozen backbone computes in bfloat16/float16 while the
  adapter and head banks, the optimizer state and everything sent to the server stay float32;
* ``parallel="auto"`` sizes waves from a token budget, and on CUDA from the free memory
  measured on the first wave;
* backward stops where training stops: the banks of blocks that no client of the wave trains
  take no gradient for that wave, so autograd runs nothing below the lowest trained block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from fedhello.errors import UserError
from fedhello.nn.optim import MaskedAdamW, MaskedSGD, make_masked_optimizer
from fedhello.nn import MultiLoRAModel
from fedhello.nn.losses import row_losses, row_terms
from fedhello.nn.model import COMPUTE_DTYPES

__all__ = ["LocalTask", "LocalResult", "LocalTrainingConfig", "ClientParallelEngine", "SequentialEngine",
           "DEFAULT_TOKEN_BUDGET", "resolve_device", "resolve_dtype", "wave_size_for_tokens", "wave_size_for_memory"]

Batch = dict[str, torch.Tensor]

# Tokens per local step that ``parallel="auto"`` aims for. CPU: a couple of thousand tokens
# already make GEMMs that fill the cores; bigger waves only add memory traffic (MiniLM, N = 32,
# one thread: waves of 2,048 tokens 1.07x the sequential engine, of 4,096 tokens 0.96x).
# CUDA: the size of the first, measuring wave; later waves are sized from memory.
DEFAULT_TOKEN_BUDGET = {"cpu": 2048, "cuda": 32768}
# Share of the free device memory later waves may fill (the rest absorbs fragmentation).
MEMORY_HEADROOM = 0.8


@dataclass(frozen=True)
class LocalTrainingConfig:
    """How each client trains in a round.

    Attributes:
        epochs: passes over the client's data (used when ``steps`` is None).
        steps: a fixed number of local steps instead (the data is cycled, reshuffled each pass).
        batch_size: samples per client per step; a client with fewer samples uses all of its
            samples in each step (never one sample twice in a batch).
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
        # A client with fewer samples than a batch trains on all of them each step: a longer batch
        # would hold some sample twice (and a huge batch_size would allocate for it).
        size = min(cfg.batch_size, n)
        gen = torch.Generator().manual_seed(task.seed)
        order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-steps * size // n) + 1)])
        batches = []
        pos = 0
        for _ in range(steps):
            if cfg.steps is None and pos % n + size > n:
                # Epoch mode: the last batch of an epoch is short, never wraps into the next.
                take = n - pos % n
            else:
                take = size
            batches.append(order[pos:pos + take])
            pos += take
        return cls(task, slot, steps, batches)


def resolve_device(name: str) -> torch.device:
    """``engine.device`` as a usable torch device (``auto``: the GPU when there is one).

    Raises:
        UserError: starting with ``engine.device``, for a malformed name or a GPU this machine lacks.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"engine.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"engine.device: {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA "
                            "GPU; use 'auto' or 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"engine.device: {name!r} asked for, but there are {torch.cuda.device_count()} CUDA GPUs")
    elif device.type != "cpu":
        raise UserError(f"engine.device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype called ``name`` ("float32", "bfloat16", "float16"; "auto": bfloat16 on
    CUDA, float32 elsewhere)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"dtype: expected 'auto', 'float32', 'bfloat16' or 'float16', got {name!r}")
    return dtype


def wave_size_for_tokens(tokens_per_client: int, budget: int, max_slots: int) -> int:
    """Clients per wave so that one step pushes about ``budget`` tokens (1 .. ``max_slots``)."""
    if tokens_per_client < 1 or budget < 1:
        raise ValueError(f"tokens_per_client/budget: expected >= 1, got {tokens_per_client}, {budget}")
    return max(1, min(max_slots, budget // tokens_per_client))


def wave_size_for_memory(available_bytes: int, bytes_per_client: float, max_slots: int,
                         headroom: float = MEMORY_HEADROOM) -> int:
    """Clients per wave that fit in ``headroom * available_bytes`` at ``bytes_per_client`` each.

    ``bytes_per_client`` is measured on a first wave (its peak memory above what was allocated
    before it, divided by its clients), so it also charges each client its share of that
    wave's fixed costs: an over-estimate, which errs on the side of fitting.
    """
    if bytes_per_client <= 0:
        return max_slots
    return max(1, min(max_slots, int(headroom * available_bytes // bytes_per_client)))


@dataclass
class _Step:
    """One local step of a wave, ready on the device.

    Attributes:
        inputs: model inputs, each ``[rows, ...]`` (clients' micro-batches one after another).
        labels: int64 ``[rows]`` (classification) or ``[rows, S]`` (causal LM).
        client_ids: int64 ``[rows]``, non-decreasing: the slot of each row.
        row_count: float32 ``[rows]``: the loss terms (rows, or target tokens) of the row's
            client in this step, at least 1.
        masks: per bank, bool ``[N]`` of the slots it updates, or None when none does.
    """

    inputs: Batch
    labels: torch.Tensor
    client_ids: torch.Tensor
    row_count: torch.Tensor
    masks: list[torch.Tensor | None]


class ClientParallelEngine:
    """Trains a cohort in waves of up to ``parallel`` clients, one batched pass per step.

    Args:
        model: the multi-client model; its slots ``0 .. parallel-1`` are used.
        cfg: local training settings.
        parallel: clients trained together: an int, None (``model.num_clients``) or "auto" (from
            ``token_budget`` on CPU; on CUDA from the free memory measured on the first wave).
        device: where batches go (default: the model's device).
        dtype: the dtype the frozen backbone computes in (None: as the model is); the model's
            backbone is cast in place (``MultiLoRAModel.set_compute_dtype``), banks stay float32.
            float16 runs without loss scaling (gradients below its range flush to zero):
            bfloat16, with float32's exponent range, is the one to use on GPUs.
        token_budget: tokens per step aimed at by ``parallel="auto"`` (default by device type,
            ``DEFAULT_TOKEN_BUDGET``).
        stop_backward: give no gradient to the banks of blocks that no client of a wave trains,
            so the backward pass stops at the lowest trained block (results are identical).
    """

    def __init__(self, model: MultiLoRAModel, cfg: LocalTrainingConfig,
                 parallel: int | Literal["auto"] | None = None, device: torch.device | str | None = None,
                 *, dtype: torch.dtype | None = None, token_budget: int | None = None,
                 stop_backward: bool = True) -> None:
        if parallel is None:
            parallel = model.num_clients
        if parallel != "auto" and (isinstance(parallel, bool) or not isinstance(parallel, int)
                                   or not 1 <= parallel <= model.num_clients):
            raise ValueError(f"parallel: expected 'auto' or an int in 1..{model.num_clients} (model slots), "
                             f"got {parallel!r}")
        if token_budget is not None and (isinstance(token_budget, bool) or not isinstance(token_budget, int)
                                         or token_budget < 1):
            raise ValueError(f"token_budget: expected an int >= 1 or None, got {token_budget!r}")
        self.model, self.cfg, self.parallel = model, cfg, parallel
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if dtype is not None:
            model.set_compute_dtype(dtype)
        self.token_budget = token_budget or DEFAULT_TOKEN_BUDGET.get(self.device.type, DEFAULT_TOKEN_BUDGET["cpu"])
        self.stop_backward = stop_backward
        self._memory_wave: int | None = None  # CUDA auto: wave size measured on the first wave

    def wave_size(self, tasks: list[LocalTask]) -> int:
        """Clients the next wave trains, from the head of ``tasks``."""
        if self.parallel != "auto":
            return self.parallel
        if self._memory_wave is not None:
            return self._memory_wave
        tokens = max(_tokens_per_sample(t, self.model.backbone.config) for t in tasks) * self.cfg.batch_size
        return wave_size_for_tokens(tokens, self.token_budget, self.model.num_clients)

    def train(self, global_state: dict[str, torch.Tensor], tasks: list[LocalTask]) -> list[LocalResult]:
        """Train every task starting from ``global_state``; results in the order of ``tasks``."""
        results: list[LocalResult] = []
        start = 0
        while start < len(tasks):
            wave = tasks[start:start + self.wave_size(tasks[start:])]
            measure = self.parallel == "auto" and self.device.type == "cuda" and self._memory_wave is None
            if measure:
                torch.cuda.synchronize(self.device)
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            results.extend(self._train_wave(global_state, wave))
            if measure:
                per_client = (torch.cuda.max_memory_allocated(self.device) - base) / len(wave)
                free, _ = torch.cuda.mem_get_info(self.device)
                # Memory the caching allocator holds but no tensor uses is free for the next wave too.
                cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
                self._memory_wave = wave_size_for_memory(free + cached, per_client, self.model.num_clients)
            start += len(wave)
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
        steps = self._prepare(schedules, trainable, [block for _, block, _ in lora], len(heads))
        loss_sum = torch.zeros(n_slots, dtype=torch.float64, device=self.device)

        # Banks of blocks nobody in the wave trains: no gradient, so no backward below the
        # lowest trained block (nothing under it requires grad) and no weight-gradient work.
        wave_trains = trainable.any(dim=1).tolist()
        idle = [p for _, block, p in lora if self.stop_backward and not wave_trains[block] and p.requires_grad]
        was_training = model.training
        model.train()  # adapters and heads only: the backbone stays in eval mode (MultiLoRAModel.train)
        try:
            for p in idle:
                p.requires_grad_(False)
            for step in steps:
                self._step(step, optimizer, loss_sum)
        finally:
            for p in idle:
                p.requires_grad_(True)
            model.train(was_training)

        # The wave's one read back to the host.
        fisher, losses = model.fisher_norms().cpu(), loss_sum.cpu()
        return [
            LocalResult(
                client=s.task.client,
                state=model.client_state(s.slot),
                num_samples=s.task.num_samples,
                num_steps=s.steps,
                trainable_blocks=s.task.trainable_blocks.bool().clone(),
                fisher=fisher[:, s.slot] / s.steps,
                loss=float(losses[s.slot]) / s.steps,
                rank=s.task.rank,
            )
            for s in schedules
        ]

    def _step(self, step: _Step, optimizer: MaskedAdamW | MaskedSGD, loss_sum: torch.Tensor) -> None:
        """One forward/backward/update of every active client; nothing is read back to the host."""
        model = self.model
        with model.route(step.client_ids, trusted=True, contiguous=True):
            logits = model(**step.inputs).logits
        per_row = row_losses(logits, step.labels)
        weighted = per_row / step.row_count  # each client's mean: the sum is sum_c mean_loss_c
        total = weighted.sum()
        # Nothing to train in this wave (e.g. causal-LM clients, which have no head, allotted no
        # block): the loss is still recorded, there is just no backward (a host-side flag, no sync).
        if total.requires_grad:
            total.backward()
            optimizer.step(step.masks)
            optimizer.zero_grad()
        loss_sum.index_add_(0, step.client_ids, weighted.detach().double())

    def _prepare(self, schedules: list[_Schedule], trainable: torch.Tensor, bank_blocks: list[int],
                 num_heads: int) -> list[_Step]:
        """Every step of the wave, collated on the host and copied to the device up front.

        Args:
            trainable: bool ``[L, N]`` on the host; bank_blocks: the block of each LoRA bank.
        """
        n_slots = self.model.num_clients
        pin = self.device.type == "cuda"
        out = []
        for step in range(max(s.steps for s in schedules)):
            active = [s for s in schedules if step < s.steps]  # slot order: ids are non-decreasing
            parts: dict[str, list[torch.Tensor]] = {}
            counts, terms = [], []
            for s in active:
                idx = s.batches[step]
                for key, value in s.task.data.items():
                    parts.setdefault(key, []).append(value[idx])
                counts.append(idx.numel())
                # A client with no target token in a step contributes 0 / 1: no gradient, no NaN.
                terms.append(max(1, int(row_terms(parts["labels"][-1]).sum())))
            batch = {k: _to(torch.cat(v), self.device, pin) for k, v in parts.items()}
            slots = torch.tensor([s.slot for s in active])
            sizes = torch.tensor(counts)
            ids = slots.repeat_interleave(sizes)
            row_count = torch.tensor(terms, dtype=torch.float32).repeat_interleave(sizes)
            stepping = torch.zeros(n_slots, dtype=torch.bool)
            stepping[slots] = True
            block_masks = {}
            for block in set(bank_blocks):
                mask = stepping & trainable[block]
                block_masks[block] = _to(mask, self.device, pin) if bool(mask.any()) else None
            head_mask = _to(stepping, self.device, pin)
            labels = batch.pop("labels")
            out.append(_Step(batch, labels, _to(ids, self.device, pin), _to(row_count, self.device, pin),
                             [block_masks[b] for b in bank_blocks] + [head_mask] * num_heads))
        return out


def _to(value: torch.Tensor, device: torch.device, pin: bool) -> torch.Tensor:
    """``value`` on ``device``; from pinned memory without blocking the host when ``pin``."""
    if pin:
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)


def _tokens_per_sample(task: LocalTask, config: object = None) -> int:
    """Positions one sample of the task feeds the backbone: ``input_ids`` per row; for images the
    patches of a ViT-style ``config`` (``(image_size / patch_size)^2 + 1``, not the pixel count);
    else the size of the first input."""
    data = task.data
    value = data.get("input_ids")
    if value is None and "pixel_values" in data:
        patch = getattr(config, "patch_size", None)
        if isinstance(patch, int) and patch > 0:
            height, width = data["pixel_values"].shape[-2:]
            return (height // patch) * (width // patch) + 1
    if value is None:
        value = next(v for k, v in data.items() if k != "labels")
    return max(1, value[0].numel()) if value.shape[0] else 1


class SequentialEngine(ClientParallelEngine):
    """One client at a time, each with a fresh optimizer: the reference for the batched engine."""

    def __init__(self, model: MultiLoRAModel, cfg: LocalTrainingConfig,
                 device: torch.device | str | None = None, *, dtype: torch.dtype | None = None,
                 stop_backward: bool = True) -> None:
        super().__init__(model, cfg, parallel=1, device=device, dtype=dtype, stop_backward=stop_backward)
