"""End-to-end benchmark of one federated round: N clients' local training on one frozen backbone.

A round trains N clients from the same global state (LoRA adapters on the model's q/v projections
plus a classification head): each client holds ``steps * batch`` synthetic samples (random token
ids of length ``seq``, labels in 5 classes), trains the blocks of its capacity tier (1/2, 3/4 or
all of the L blocks, seeded random tier and random blocks) for ``steps`` AdamW steps of ``batch``
samples (one local epoch), and ends with its adapters and head. Three implementations do exactly
that work:

* ``batched``     ``ClientParallelEngine``: waves of up to ``parallel`` clients (default all N), one
                  batched forward/backward per local step through one backbone, masked AdamW;
* ``sequential``  ``SequentialEngine``: the same engine, one client at a time;
* ``peft``        a PEFT-per-client loop as a Flower/FedML user writes it: one ``PeftModel``
                  (``get_peft_model`` once, LoRA on the same targets, the head in
                  ``modules_to_save``); for each client ``set_peft_model_state_dict`` with the
                  global state, ``requires_grad`` off for the blocks it does not train, a fresh
                  ``torch.optim.AdamW``, a shuffling ``DataLoader``, its steps, and
                  ``get_peft_model_state_dict`` to read back its update.

With ``--task causal_lm`` the round is federated language-model adaptation instead: the backbone
is a causal LM (SmolLM2-135M offline, or with ``--random-weights`` a random LLaMA of its shapes;
``tiny-llama`` for smoke runs) whose output head stays frozen, clients train LoRA only (no head,
no ``modules_to_save``), and the labels are the input ids: each client's loss is its mean
next-token cross-entropy over its target tokens in the step. The engines compute it as
``fedhello run`` with ``task: causal_lm`` does (``fedhello.nn.losses`` on ``labels [rows, S]``;
the model built with ``head_modules=None``); the PEFT loop wraps the ``AutoModelForCausalLM``
and takes ``transformers``' own loss from ``labels``. The guard compares the adapters.

Dropout is off everywhere (LoRA dropout 0, backbone in eval mode, as the engines keep it), so the
three compute the same function; the engines also accumulate the per-block squared gradient
norms (Fisher scores) that the PEFT loop does not.

Measured per implementation: wall time of a round (median over ``--repeats`` rounds after one
warm-up round, device synchronised around each; the implementations' timed rounds alternate,
so load from other processes falls on all of them alike), and memory. On CUDA
``max_memory_allocated`` over each round (reset before it), net of what the other
implementations alive at the time hold. On CPU the process RSS high-water mark cannot be reset
between implementations, so the CPU measure is the *training state held*: bytes of the model's
parameters (frozen backbone included), the peak of the gradients present during the round, and
the optimizer state; it is recorded on every device (``state_bytes``); activations are not in it.

Correctness guard: the warm-up round's client states of each implementation are compared with
those of the first one run (``sequential`` when requested): the largest relative Frobenius error
over clients and tensors must stay below ``--guard-tol`` (1e-3; 5e-3 for a causal LM, 2e-2 with a
half-precision backbone), or the implementation is reported
as ``mismatch`` instead of timed and the script exits with status 1.

Usage (from the repository root, with the package importable, e.g. ``PYTHONPATH=.``)::

    python benchmarks/bench_rounds.py --smoke                 # tiny random BERT, CPU, seconds
    python benchmarks/bench_rounds.py --models minilm --n 1,8 --out benchmarks/results/rounds.json
    python benchmarks/bench_rounds.py                         # GPU: MiniLM and SmolLM2, N in 1,8,32,100
    python benchmarks/bench_rounds.py --random-weights --preset gpu-check --out PATH   # no checkpoints needed
    python benchmarks/bench_rounds.py --task causal_lm --smoke                          # tiny random LLaMA LM
    python benchmarks/bench_rounds.py --task causal_lm --models smollm2 --n 1,8 --seq 32 --steps 1 --batch 4

With ``--patterns fedhello,peft-loop,flowertune`` (and ``--quantize``) the run is instead the
federated QLoRA comparison of ``qlora_patterns.py`` (its own options; one fresh process per case):
fedhello batched, a PEFT loop and the FlowerTune pattern over one bitsandbytes base each, time per
round and peak memory beside the analytic floor.

``--random-weights`` builds the backbones from configs (``_random_backbones.py``: the shapes of
MiniLM, SmolLM2-135M and BERT-base, random weights) and imports nothing outside torch, triton,
transformers, peft and numpy (and bitsandbytes with ``--quantize``). ``--quantize nf4|fp4|int8``
quantizes the blocks' linear layers of the backbone once (``fedhello.models.quantize``), and every
implementation trains over that one bitsandbytes base: the engines through ``MultiLoRALinear``'s
quantized path, the PEFT loop through PEFT's bitsandbytes LoRA layers. ``--dtype`` sets the compute dtype of the engines' frozen backbone
(the PEFT loop runs under ``torch.autocast`` in that dtype). ``--paper-rounds K`` also times K
rounds of the paper-size run through the library's server loop (``paper_slice.py``: ``FederatedRun``
on ``configs/paper-size.yaml``, random weights, synthetic clients; it needs the ``[fl]`` extra and
is recorded as skipped without it) and extrapolates its 500 rounds (classification only, as is
``--preset gpu-check``).

Writes a JSON file (default ``benchmarks/results/rounds-<device>-<date>.json``; ``--smoke``: a new
temporary folder), rewritten after every case, and prints a table; the task is recorded in ``meta``
and in every case, and named in the table's first line.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.util
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from _common import (finish_run, finite, int_list, name_list, package_versions, results_path,
                     run_metadata, write_json)
from _random_backbones import RANDOM_LM_MODELS, RANDOM_MODELS, random_backbone, random_causal_lm
import paper_slice
import report
from timing import round_stats, wall_time
from fedhello.fl.capacity import CapacityTiers
from fedhello.fl.engine import ClientParallelEngine, LocalTask, LocalTrainingConfig, SequentialEngine, resolve_dtype
from fedhello.nn.optim import make_masked_optimizer
from fedhello.kernels import BACKENDS, resolve_backend
from fedhello.models.quantize import quantize_backbone
from fedhello.nn import MultiLoRAModel, inject_multi_lora
from fedhello.nn.model import DEFAULT_TARGET_MODULES
from fedhello.nn.quantized import quantization_of
from fedhello.quantization import QUANTIZATIONS

# Run in this order: the first one run is the guard's reference. ``batched-full`` (not run by
# default) is the batched engine with the backward through every block (stop_backward=False).
IMPL_NAMES = ("sequential", "batched", "peft", "batched-full")
DEFAULT_IMPLS = IMPL_NAMES[:3]
MODEL_NAMES = ("tiny-bert", "tiny-llama", "minilm", "smollm2", "bert-base")
OFFLINE_MODELS = ("tiny-bert", "minilm", "smollm2")  # without --random-weights
TASKS = ("classification", "causal_lm")
# --task causal_lm: the decoder shapes. tiny-llama is a toy, random always (as tiny-bert is).
LM_MODELS = RANDOM_LM_MODELS
# Offline aliases understood by fedhello.models.load_backbone.
BACKBONES = {"minilm": "all-MiniLM-L6-v2", "smollm2": "SmolLM2-135M-Instruct"}
NUM_LABELS = 5
TIERS = CapacityTiers()  # 1/2, 3/4 and all of the blocks, shares 1:1:1
GUARD_TOL = 1e-3
GUARD_TOL_HALF = 2e-2  # default guard with a bfloat16/float16 backbone (8 or 11 mantissa bits)
# Default guard for a causal LM in float32. Adam's first step moves a coordinate by up to lr whatever
# its gradient's size, so fp32 reduction-order noise (the 49,152-way softmax backward of SmolLM2)
# in a near-zero gradient entry can flip one coordinate's step: on SmolLM2 at N = 8 (seq 32, batch 4)
# a single such coordinate in a [192, 8] v_proj.lora_b gave 8.2e-4 against the sequential
# engine. A wrong loss (labels unshifted) moves every coordinate: 2.3e-2 on the random SmolLM2 shape
# (N = 2, seq 16, batch 2), 3e-2 on tiny-llama.
GUARD_TOL_LM = 5e-3
BLOCK_CHOICES = ("random", "deep")
# --preset gpu-check: what benchmarks/gpu_check.sh runs within its ~2-minute step. Cases in order of
# value (SmolLM2 at N = 32 and 100 carry the GPU goals), new cases stop after budget_s, then
# the paper-size slice.
GPU_CHECK = {"models": ["smollm2", "minilm"], "n": [32, 100, 8, 1], "repeats": 1, "parallel": "auto",
             "paper_rounds": 3, "budget_s": 70.0}
GLOBAL_NOISE = 0.05  # the global state is the adapters' init plus N(0, 0.05^2): B != 0, a mid-training state
PEFT_PREFIX = "base_model.model."

ClientState = dict[str, torch.Tensor]


# --------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class RoundSettings:
    """Settings shared by every case of a run.

    Attributes:
        seq: tokens per sample; batch: samples per client per step; steps: local steps (each
            client holds ``steps * batch`` samples, so a round is one local epoch).
        rank, alpha: LoRA rank and alpha (scale alpha / rank); lr, weight_decay: AdamW's.
        parallel: most clients the batched engine trains at once (None: all N; "auto": the
            engine sizes its waves, ``ClientParallelEngine(parallel="auto")``).
        backend: the engines' ``multi_lora_linear`` backend.
        repeats: timed rounds per implementation (after one warm-up round).
        dtype: the dtype the frozen backbone computes in (adapters stay float32).
        stop_backward: the engines' ``stop_backward`` (False: backward through every block).
        blocks: which blocks a client trains: "random" (a random subset of its capacity) or
            "deep" (its top blocks, the Inverted-Triangle pattern).
        fractions: capacity tiers as fractions of the blocks (shares 1:1:1).
        task: "classification" (LoRA + a classification head per client) or "causal_lm" (LoRA
            only, next-token loss, the causal LM's output head frozen).
    """

    device: torch.device
    impls: tuple[str, ...]
    seq: int = 64
    batch: int = 8
    steps: int = 2
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    parallel: int | str | None = None
    backend: str = "auto"
    repeats: int = 3
    seed: int = 0
    guard_tol: float = GUARD_TOL
    dtype: str = "float32"
    stop_backward: bool = True
    blocks: str = "random"
    fractions: tuple[float, ...] = TIERS.fractions
    random_weights: bool = False
    task: str = "classification"
    quantize: str = "none"

    @property
    def causal_lm(self) -> bool:
        return self.task == "causal_lm"

    @property
    def head_modules(self) -> str | None:
        """``inject_multi_lora``'s ``head_modules``: a causal LM's output head stays frozen, as in
        ``fedhello run`` with ``task: causal_lm``."""
        return None if self.causal_lm else "auto"

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype, self.device)

    @property
    def tiers(self) -> CapacityTiers:
        return CapacityTiers(fractions=self.fractions, shares=(1.0,) * len(self.fractions))

    def local_config(self) -> LocalTrainingConfig:
        return LocalTrainingConfig(steps=self.steps, batch_size=self.batch, optimizer="adamw", lr=self.lr,
                                   weight_decay=self.weight_decay)

    def slots(self, n: int, impl: str) -> int:
        """Adapter slots the implementation's model holds for a round of ``n`` clients."""
        if impl in ("batched", "batched-full"):
            return n if self.parallel in (None, "auto") else min(n, self.parallel)
        return 1


# ------------------------------------------------------------------------------------- backbones


def load_model(name: str, seq: int, seed: int, random_weights: bool = False,
               task: str = "classification") -> nn.Module:
    """The backbone called ``name`` (``MODEL_NAMES``), fp32, eval, on CPU: with a ``NUM_LABELS``-class
    head, or for ``task="causal_lm"`` the causal LM (``LM_MODELS``) with its output head; the offline
    checkpoint, or with ``random_weights`` (and always for the toys) its shape with random weights."""
    random = random_weights or name in RANDOM_MODELS and name not in BACKBONES
    if task == "causal_lm":
        if random:
            return random_causal_lm(name, seq, seed)
    elif random:
        return random_backbone(name, seq, NUM_LABELS, seed)
    from fedhello.models import load_backbone

    if task == "causal_lm":  # as fedhello's server loads it for task: causal_lm
        model = load_backbone(BACKBONES[name], task="causal-lm").float().eval()
    else:
        model = load_backbone(BACKBONES[name], num_labels=NUM_LABELS).float().eval()
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq > limit:
        raise ValueError(f"--seq: {name} takes at most {limit} positions, got {seq}")
    return model


def target_modules(backbone: nn.Module) -> list[str]:
    """LoRA targets of the backbone's architecture (the server's defaults: q/v projections)."""
    model_type = backbone.config.model_type
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"model: no default LoRA targets for model type {model_type!r}")
    return DEFAULT_TARGET_MODULES[model_type]


# --------------------------------------------------------------------------------------- workload


@dataclass
class Workload:
    """The inputs of one round, identical for every implementation (all on the CPU).

    Attributes:
        tasks: N ``LocalTask`` s: ``input_ids`` / ``attention_mask`` int64 ``[steps*batch, seq]``,
            ``labels`` int64 ``[steps*batch]`` (classification) or ``[steps*batch, seq]`` equal to
            ``input_ids`` (causal LM: every next token is a target, as ``fedhello.data.lm_tensors``
            lays out unpadded text), ``trainable_blocks`` bool ``[L]``.
        global_state: the state every client starts from, keys as ``MultiLoRAModel.client_state``
            (``"<module>.lora_a"`` ``[r, d_in]``, ``"<module>.lora_b"`` ``[d_out, r]``, head tensors
            for classification only).
        tensor_blocks: state key -> block index (None for head tensors).
        targets: the LoRA target names given to ``inject_multi_lora``.
        num_blocks: L, the backbone's transformer blocks.
    """

    tasks: list[LocalTask]
    global_state: ClientState
    tensor_blocks: dict[str, int | None]
    targets: list[str]
    num_blocks: int

    @property
    def capacities(self) -> list[int]:
        """Number of blocks each client trains."""
        return [int(t.trainable_blocks.sum()) for t in self.tasks]


def make_workload(backbone: nn.Module, n: int, settings: RoundSettings) -> Workload:
    """N clients' data and block masks and a random global state for ``backbone`` (not modified)."""
    targets = target_modules(backbone)
    probe = inject_multi_lora(copy.deepcopy(backbone), targets, num_clients=1, rank=settings.rank,
                              alpha=settings.alpha, head_modules=settings.head_modules, backend="torch",
                              seed=settings.seed)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + n)
    global_state = {k: v + GLOBAL_NOISE * torch.randn(v.shape, generator=gen)
                    for k, v in probe.client_state(0).items()}
    num_blocks = probe.num_blocks
    capacities = settings.tiers.assign(n, num_blocks, seed=settings.seed + n).capacity
    vocab, pad = backbone.config.vocab_size, backbone.config.pad_token_id
    samples = settings.steps * settings.batch
    tasks = []
    for c in range(n):
        blocks = client_blocks(num_blocks, int(capacities[c]), settings.blocks, gen)
        ids = torch.randint(0, vocab, (samples, settings.seq), generator=gen)
        if pad is not None:
            ids[ids == pad] = (pad + 1) % vocab  # full-length sequences: no padding token inside
        labels = ids.clone() if settings.causal_lm else torch.randint(0, NUM_LABELS, (samples,), generator=gen)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        tasks.append(LocalTask(client=c, data=data, trainable_blocks=blocks, seed=settings.seed * 100_003 + c))
    return Workload(tasks, global_state, probe.tensor_blocks(), targets, num_blocks)


def client_blocks(num_blocks: int, capacity: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """bool ``[L]``: ``capacity`` random blocks ("random") or the top ``capacity`` blocks ("deep")."""
    blocks = torch.zeros(num_blocks, dtype=torch.bool)
    if kind == "deep":
        blocks[num_blocks - capacity:] = True
    else:
        blocks[torch.randperm(num_blocks, generator=gen)[:capacity]] = True
    return blocks


# ---------------------------------------------------------------------------------- memory meter


def tensor_bytes(obj: object, seen: set[int] | None = None) -> int:
    """Bytes of the distinct tensors inside ``obj`` (tensors, dicts, lists, tuples, dataclasses)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(tensor_bytes(getattr(obj, f.name), seen) for f in dataclasses.fields(obj))
    return 0


class StateMeter:
    """Training state held during a round: parameters, peak gradients, optimizer state (bytes).

    ``params`` counts every parameter of the model (frozen backbone included). Gradients are
    watched with post-accumulate hooks on ``tracked`` (the trainable tensors): after each
    accumulation the bytes of all ``.grad`` present are summed, and the peak is kept. The
    optimizer state is reported by the implementation (``saw_optimizer_state``).
    """

    def __init__(self, model: nn.Module, tracked: Sequence[nn.Parameter]) -> None:
        self.params = tensor_bytes(list(model.parameters()))
        self.grads = 0
        self.optimizer = 0
        self._tracked = list(tracked)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._tracked]

    def _on_grad(self, _param: torch.Tensor) -> None:
        self.grads = max(self.grads, tensor_bytes([p.grad for p in self._tracked if p.grad is not None]))

    def saw_optimizer_state(self, state: object) -> None:
        self.optimizer = max(self.optimizer, tensor_bytes(state))

    def close(self) -> dict[str, int]:
        """Remove the hooks (timed rounds run without them); the byte counts and their total."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return {"params": self.params, "grads": self.grads, "optimizer": self.optimizer,
                "total": self.params + self.grads + self.optimizer}


# ------------------------------------------------------------------------------- implementations


class EngineRound:
    """``batched`` / ``sequential``: a ``MultiLoRAModel`` with ``slots`` adapter slots and its engine.

    Args:
        backbone: a private copy of the backbone (injected in place), already on the device.
        slots: 1 for the sequential engine; up to N for the batched one.
    """

    def __init__(self, name: str, backbone: nn.Module, workload: Workload, settings: RoundSettings,
                 slots: int) -> None:
        self.name = name
        self.cfg = settings.local_config()
        self.model: MultiLoRAModel = inject_multi_lora(
            backbone, workload.targets, num_clients=slots, rank=settings.rank, alpha=settings.alpha,
            head_modules=settings.head_modules, backend=settings.backend, seed=settings.seed)
        dtype, stop = settings.torch_dtype, settings.stop_backward and name != "batched-full"
        self.engine = (SequentialEngine(self.model, self.cfg, dtype=dtype, stop_backward=stop) if name == "sequential"
                       else ClientParallelEngine(self.model, self.cfg, dtype=dtype, stop_backward=stop,
                                                 parallel="auto" if settings.parallel == "auto" else slots))
        device = settings.device
        self.global_state = {k: v.to(device) for k, v in workload.global_state.items()}
        self.banks = [p for _, _, p in self.model.lora_banks()] + [p for _, p in self.model.head_banks()]

    def run(self, tasks: list[LocalTask]) -> list[ClientState]:
        """One round; the clients' states (device tensors, keys as ``client_state``) in task order."""
        return [result.state for result in self.engine.train(self.global_state, tasks)]

    def measure(self, tasks: list[LocalTask]) -> tuple[list[ClientState], dict[str, int]]:
        """A round with the state meter on. The engine's optimizer lives inside ``train``, so its
        state is that of the same masked optimizer built over meta-device copies of the banks."""
        meter = StateMeter(self.model, self.banks)
        states = self.run(tasks)
        meta_banks = [torch.empty_like(p, device="meta") for p in self.banks]
        meter.saw_optimizer_state(make_masked_optimizer(self.cfg.optimizer, meta_banks, self.cfg.lr).state)
        return states, meter.close()

    def to_client_state(self, state: ClientState) -> ClientState:
        return state


class PeftRound:
    """``peft``: one ``PeftModel`` reused for every client, weights reloaded per client.

    Args:
        backbone: a private copy of the backbone (wrapped in place), already on the device.
    """

    name = "peft"

    def __init__(self, backbone: nn.Module, workload: Workload, settings: RoundSettings) -> None:
        from peft import LoraConfig, get_peft_model

        self.settings = settings
        lora_keys = [k for k, b in workload.tensor_blocks.items() if b is not None]
        head_keys = [k for k, b in workload.tensor_blocks.items() if b is None]
        modules = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in lora_keys))
        heads = list(dict.fromkeys(k.rsplit(".", 1)[0] for k in head_keys))
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0, target_modules=modules,
                            modules_to_save=heads or None, bias="none")
        self.model = get_peft_model(backbone, config).eval()
        inner = self.model.base_model.model
        # Eval mode keeps dropout off; bitsandbytes layers are put in training mode, as model.train()
        # leaves them while a PEFT user trains (their flag picks bitsandbytes' training matmul).
        for module in inner.modules():
            if quantization_of(module) is not None:
                module.train()
        # The LoRA factors of each block, to switch requires_grad per client.
        self.block_params: dict[int, list[nn.Parameter]] = {}
        for module in modules:
            layer = inner.get_submodule(module)
            block = workload.tensor_blocks[f"{module}.lora_a"]
            self.block_params.setdefault(block, []).extend(
                [layer.lora_A["default"].weight, layer.lora_B["default"].weight])
        self.head_params = [p for n, p in self.model.named_parameters() if ".modules_to_save." in n]
        self.to_peft = {key: self._peft_key(key) for key in workload.global_state}
        self.from_peft = {v: k for k, v in self.to_peft.items()}
        self.global_state = {self.to_peft[k]: v.to(settings.device) for k, v in workload.global_state.items()}

    @staticmethod
    def _peft_key(key: str) -> str:
        """``"<module>.lora_a"`` -> ``"base_model.model.<module>.lora_A.weight"`` (PEFT's saved
        form); head tensors keep their name under the prefix."""
        for ours, theirs in ((".lora_a", ".lora_A.weight"), (".lora_b", ".lora_B.weight")):
            if key.endswith(ours):
                return PEFT_PREFIX + key.removesuffix(ours) + theirs
        return PEFT_PREFIX + key

    def run(self, tasks: list[LocalTask], on_optimizer: Callable[[object], None] | None = None) -> list[ClientState]:
        """One round, client after client; the states in PEFT's keys (device tensors) in task order."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from torch.utils.data import DataLoader, RandomSampler, TensorDataset

        device, s = self.settings.device, self.settings
        states = []
        for task in tasks:
            set_peft_model_state_dict(self.model, self.global_state)
            for block, params in self.block_params.items():
                for p in params:
                    p.requires_grad_(bool(task.trainable_blocks[block]))
            optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                          lr=s.lr, weight_decay=s.weight_decay)
            keys = list(task.data)
            dataset = TensorDataset(*(task.data[k] for k in keys))
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(task.seed))
            loader = DataLoader(dataset, batch_size=s.batch, sampler=sampler)
            for tensors in loader:
                batch = {k: t.to(device) for k, t in zip(keys, tensors)}
                labels = batch.pop("labels")
                # Half precision the way a PEFT user gets it: autocast over fp32 weights (AMP).
                # A causal LM takes the labels: transformers' own shifted next-token loss (in float32),
                # the mean over the batch's target tokens.
                lm_labels = {"labels": labels} if s.causal_lm else {}
                with torch.autocast(device.type, dtype=s.torch_dtype, enabled=s.torch_dtype != torch.float32):
                    out = self.model(**batch, **lm_labels)
                loss = out.loss if s.causal_lm else F.cross_entropy(out.logits.float(), labels)
                loss.backward()
                optimizer.step()
                if on_optimizer is not None:
                    on_optimizer(optimizer.state)
                optimizer.zero_grad()
            states.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()})
        return states

    def measure(self, tasks: list[LocalTask]) -> tuple[list[ClientState], dict[str, int]]:
        """A round with the state meter on (optimizer state read after every step)."""
        tracked = [p for params in self.block_params.values() for p in params] + self.head_params
        meter = StateMeter(self.model, tracked)
        states = self.run(tasks, on_optimizer=meter.saw_optimizer_state)
        return states, meter.close()

    def to_client_state(self, state: ClientState) -> ClientState:
        return {self.from_peft[k]: v for k, v in state.items()}


IMPL_DESCRIPTIONS = {
    "sequential": "SequentialEngine: the engine with one client at a time, masked AdamW",
    "batched": "ClientParallelEngine: up to `slots` clients per batched forward/backward, masked AdamW",
    "peft": "one PeftModel; per client: set_peft_model_state_dict, requires_grad by block, torch AdamW, "
            "DataLoader, get_peft_model_state_dict",
    "batched-full": "the batched engine with stop_backward=False: backward through every block",
}


def build_impl(name: str, backbone: nn.Module, workload: Workload, settings: RoundSettings,
               n: int) -> EngineRound | PeftRound:
    """Implementation ``name`` on a private copy of ``backbone`` moved to the device."""
    copy_on_device = copy.deepcopy(backbone).to(settings.device)
    if name == "peft":
        return PeftRound(copy_on_device, workload, settings)
    return EngineRound(name, copy_on_device, workload, settings, settings.slots(n, name))


# ----------------------------------------------------------------------------------------- guard


def max_rel_err(got: list[ClientState], want: list[ClientState], base: ClientState | None = None) -> float:
    """Largest relative Frobenius error over clients and tensors; with ``base``, of the updates
    ``state - base`` instead of the states (tensors that no client moved are left out)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if set(g) != set(w):
            raise ValueError(f"states: different tensor names, {sorted(set(g) ^ set(w))[:3]}")
        for key, ref in w.items():
            value = g[key].double()
            ref = ref.double()
            if base is not None:
                value, ref = value - base[key].double(), ref - base[key].double()
            denom = float(ref.norm())
            diff = float((value - ref).norm())
            if denom == 0.0:
                if diff != 0.0:
                    return float("inf")
                continue
            worst = max(worst, diff / denom)
    return worst


# ---------------------------------------------------------------------------------------- timing


def time_round(impl: EngineRound | PeftRound, tasks: list[LocalTask], device: torch.device,
               own_resident: int) -> tuple[float, int | None]:
    """Wall time (s) of one round and, on CUDA, its peak memory (bytes) net of what the other
    implementations alive in the process hold: ``max_memory_allocated`` over the round (reset
    before it) minus ``memory_allocated`` at its start, plus this implementation's resident bytes."""
    cuda = device.type == "cuda"
    others = 0
    if cuda:
        others = torch.cuda.memory_allocated(device) - own_resident
        torch.cuda.reset_peak_memory_stats(device)
    states, elapsed = wall_time(lambda: impl.run(tasks), device)
    del states
    return elapsed, (torch.cuda.max_memory_allocated(device) - others if cuda else None)


# ----------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class RoundCase:
    """One benchmark configuration: a model and a number of clients N."""

    model: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.model}-n{self.n}"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def run_case(case: RoundCase, backbone: nn.Module, settings: RoundSettings) -> dict:
    """Warm-up + guard of every implementation, then their timed rounds; returns the case's JSON record.

    Each implementation is built on its own copy of the backbone and runs its warm-up round (with
    the state meter on); its client states are compared with the first implementation's. Those
    that pass stay alive and the timed rounds go round-robin over them (A, B, C, A, B, C, ...),
    so that load from other processes on a shared machine falls on all of them alike.
    """
    device = settings.device
    workload = make_workload(backbone, case.n, settings)
    record: dict = {
        "name": case.name, "model": case.model, "task": settings.task,
        "backbone": (f"random weights, {case.model} shape" if settings.random_weights or case.model not in BACKBONES
                     else BACKBONES[case.model]),
        "n": case.n, "num_blocks": workload.num_blocks, "capacities": workload.capacities,
        "samples_per_client": settings.steps * settings.batch, "targets": workload.targets,
        "impls": {}, "guard": {},
    }
    live: dict[str, EngineRound | PeftRound] = {}
    resident: dict[str, int] = {}
    reference: tuple[str, list[ClientState]] | None = None
    try:
        for name in (i for i in IMPL_NAMES if i in settings.impls):
            entry: dict = {"description": IMPL_DESCRIPTIONS[name], "slots": settings.slots(case.n, name)}
            record["impls"][name] = entry
            before = _allocated(device)
            try:
                impl = build_impl(name, backbone, workload, settings, case.n)
                (states, state_bytes), warmup_s = wall_time(lambda: impl.measure(workload.tasks), device)
            except torch.cuda.OutOfMemoryError:
                impl = states = None
                _free(device)
                entry.update(status="skipped", note="out of memory in the warm-up round (try a smaller --parallel)")
                continue
            entry.update(warmup_s=warmup_s, state_bytes=state_bytes)
            states = [{k: v.cpu() for k, v in impl.to_client_state(s).items()} for s in states]
            if reference is None:
                reference = (name, states)
            else:
                err = max_rel_err(states, reference[1])
                ok = err < settings.guard_tol  # NaN compares False: fails
                record["guard"][name] = {
                    "reference": reference[0], "state_max_rel_err": err,
                    "update_max_rel_err": max_rel_err(states, reference[1], workload.global_state), "ok": ok}
                if not ok:
                    entry.update(status="mismatch", note=f"client states differ from {reference[0]} "
                                                         f"(max rel err {err:.2e} >= {settings.guard_tol:g})")
                    impl = None
                    _free(device)
                    continue
            live[name], impl, states = impl, None, None
            resident[name] = _allocated(device) - before

        times: dict[str, list[float]] = {name: [] for name in live}
        peaks: dict[str, list[int]] = {name: [] for name in live}
        for _ in range(settings.repeats):
            for name in list(live):
                try:
                    elapsed, peak = time_round(live[name], workload.tasks, device, resident[name])
                except torch.cuda.OutOfMemoryError:
                    del live[name]
                    _free(device)
                    record["impls"][name].update(status="skipped", note="out of memory while timing")
                    continue
                times[name].append(elapsed)
                if peak is not None:
                    peaks[name].append(peak)
        for name in live:
            entry = record["impls"][name]
            entry.update(status="ok", round_s=round_stats(times[name]))
            if device.type == "cuda":
                entry.update(cuda_peak_bytes=max(peaks[name]), cuda_resident_bytes=resident[name])
    finally:
        live.clear()
        _free(device)
    record["ratios"] = derive(record["impls"], case.n)
    record["status"] = "ok" if any(e["status"] == "ok" for e in record["impls"].values()) else "skipped"
    return record


def derive(impls: dict[str, dict], n: int) -> dict:
    """Speedups of every timed implementation over ``sequential`` and over ``peft`` (ratios of
    median round times; None when one side is missing) and the median time per client (ms)."""

    def median(name: str) -> float | None:
        entry = impls.get(name, {})
        return entry["round_s"]["median_s"] if entry.get("status") == "ok" else None

    timed = [name for name in IMPL_NAMES if median(name) is not None]
    out: dict = {"ms_per_client": {name: 1e3 * median(name) / n for name in timed}}
    for ref in ("sequential", "peft", "batched-full"):
        out[f"speedup_vs_{ref}"] = {
            name: (median(ref) / median(name) if median(ref) is not None else None)
            for name in timed if name != ref}
    return out


# ---------------------------------------------------------------------------------------- output


def metadata(settings: RoundSettings, argv: Sequence[str]) -> dict:
    device = settings.device
    return {
        **run_metadata(device, argv),
        **package_versions(("transformers", "peft", "triton")),
        "engine_backend": resolve_backend(settings.backend, device).NAME,
        "settings": {k: v for k, v in asdict(settings).items() if k != "device"},
        "dtype": str(settings.torch_dtype).removeprefix("torch."),
        "tiers": {"fractions": list(settings.tiers.fractions), "shares": list(settings.tiers.shares)},
        "task": settings.task,
        "num_labels": None if settings.causal_lm else NUM_LABELS,
        "timing": {
            "method": "time.perf_counter around a whole round, device synchronised before and after",
            "warmup_rounds": 1,
            "order": "every implementation's warm-up first, then the timed rounds round-robin over them",
            "statistic": "median over `repeats` rounds (q20/q80/min alongside)",
        },
        "definitions": {
            "round": "local training of N clients from one global state: steps AdamW steps of batch "
                     "samples each (one local epoch), tier masks 1/2, 3/4, 1 of the blocks, read back states",
            "task": "classification: LoRA and a head per client, cross-entropy over NUM_LABELS classes; "
                    "causal_lm: LoRA only, the causal LM's output head frozen, labels = input_ids, each "
                    "client's loss the mean next-token cross-entropy over its target tokens in the step "
                    "(engines: fedhello.nn.losses as in `fedhello run` with task causal_lm; peft: "
                    "transformers' loss from labels)",
            "round_s": "wall time of one round, seconds",
            "state_bytes": "training state held: params = every model parameter (frozen backbone included); "
                           "grads = peak bytes of .grad present during the warm-up round; optimizer = "
                           "AdamW moments and step counts (PEFT: torch AdamW state, max over clients; engines: "
                           "the masked AdamW over the banks); activations are not included. The CPU memory "
                           "measure, since the process RSS high-water mark cannot be reset between runs",
            "cuda_peak_bytes": "torch.cuda.max_memory_allocated over a round (reset before it) minus what "
                               "the other live implementations hold, max over the timed rounds; "
                               "cuda_resident_bytes: what the implementation holds between rounds (model, "
                               "its global-state copy)",
            "guard.state_max_rel_err": "max over clients and tensors of ||s - s_ref|| / ||s_ref|| of the "
                                       "warm-up round's client states; must be < guard_tol",
            "guard.update_max_rel_err": "the same for the updates s - global (informational: Adam turns "
                                        "fp32 summation-order noise in near-zero gradients into lr-sized steps)",
            "speedup_vs_sequential": "median round_s(sequential) / median round_s(impl)",
            "speedup_vs_peft": "median round_s(peft) / median round_s(impl)",
            "ms_per_client": "1000 * median round_s / N",
        },
    }


# ------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Time one federated round (N clients' local training): batched engine, sequential engine, "
                    "PEFT-per-client loop.")
    p.add_argument("--task", choices=TASKS, default="classification",
                   help="classification (LoRA + a head per client; default) or causal_lm (LoRA only, next-token "
                        "loss, the LM's output head frozen; models tiny-llama, smollm2)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny random BERT (and LLaMA with --random-weights; --task causal_lm: a tiny random LLaMA "
                        "causal LM), N in 1,4, 1 step, seq 16, batch 4: seconds on CPU")
    p.add_argument("--random-weights", action="store_true",
                   help="build every backbone from its config with random weights (no checkpoints needed; "
                        "imports only torch, triton, transformers, peft, numpy)")
    p.add_argument("--preset", choices=("gpu-check",),
                   help="gpu-check: minilm and smollm2 shapes at N 1,8,32,100, parallel auto, 1 timed round, "
                        "and 3 rounds of the paper-size run (with --random-weights: for benchmarks/gpu_check.sh)")
    p.add_argument("--models", type=name_list(MODEL_NAMES),
                   help="minilm, smollm2, tiny-bert (default minilm,smollm2 on CUDA, minilm on CPU; "
                        "--task causal_lm: smollm2 or tiny-llama, default smollm2)")
    p.add_argument("--n", type=int_list, help="numbers of clients (default 1,8,32,100)")
    p.add_argument("--impls", type=name_list(IMPL_NAMES), default=list(DEFAULT_IMPLS),
                   help=f"subset of {','.join(IMPL_NAMES)} (default {','.join(DEFAULT_IMPLS)})")
    p.add_argument("--seq", type=int, help="tokens per sample (default 64)")
    p.add_argument("--steps", type=int, help="local steps per client (default 2)")
    p.add_argument("--batch", type=int, help="samples per client per step (default 8)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--parallel", type=_parallel,
                   help="most clients the batched engine trains at once, or 'auto' (default N)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
                   help="the dtype the frozen backbone computes in (default float32; auto: bfloat16 on CUDA)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                   help="bitsandbytes base: the blocks' linear layers quantized (nf4/fp4: 4-bit multiplying in "
                        "--dtype; int8), shared by every implementation (PEFT through its bitsandbytes LoRA layers)")
    p.add_argument("--no-stop-backward", action="store_true",
                   help="engines run the backward through every block, trained by the wave or not")
    p.add_argument("--blocks", choices=BLOCK_CHOICES, default="random",
                   help="blocks a client trains: a random subset of its capacity, or its top (deep) blocks")
    p.add_argument("--fractions", type=_fractions, default=TIERS.fractions,
                   help="capacity tiers as fractions of the blocks, comma-separated (default 0.5,0.75,1)")
    p.add_argument("--paper-rounds", type=int,
                   help="also time this many rounds of the paper-size run (BERT-base shape, random weights)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="the engines' multi_lora_linear backend")
    p.add_argument("--repeats", type=int, help="timed rounds per implementation (default 3)")
    p.add_argument("--guard-tol", type=float,
                   help=f"largest relative error of client states against the reference (default {GUARD_TOL:g}, "
                        f"{GUARD_TOL_LM:g} with --task causal_lm, {GUARD_TOL_HALF:g} with a half-precision backbone)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/rounds-<device>-<date>.json;"
                        " --smoke: a new temporary folder)")
    p.add_argument("--budget-s", type=float,
                   help="start no new case after this many seconds (the rest is recorded as skipped)")
    p.add_argument("--threads", type=int, help="CPU intra-op threads (default: torch's; --smoke uses 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _parallel(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {text!r}") from None


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected fractions in (0, 1], got {text!r}")
    return values


def check_causal_lm_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Exit with a usage error for options ``--task causal_lm`` does not take: models without a
    causal-LM form, and the classification-only preset and paper-size slice."""
    if args.models:
        bad = [m for m in args.models if m not in LM_MODELS]
        if bad:
            parser.error(f"--models: --task causal_lm takes the causal LMs {', '.join(LM_MODELS)}, got {bad[0]}")
    if args.preset is not None:
        parser.error(f"--preset: {args.preset} is a classification grid; give --task causal_lm its options instead")
    if args.paper_rounds is not None:
        parser.error("--paper-rounds: the paper-size run is classification (BERT-base); not with --task causal_lm")


def apply_preset(args: argparse.Namespace) -> None:
    """Fill the options that ``--preset`` sets and the command line left out, then the defaults."""
    preset = dict(GPU_CHECK, dtype="auto") if args.preset == "gpu-check" else {}
    for key, value in {**preset}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats is None:
        args.repeats = 3


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser,
                       device: torch.device) -> RoundSettings:
    defaults = {"seq": 16, "steps": 1, "batch": 4} if args.smoke else {"seq": 64, "steps": 2, "batch": 8}
    values = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    for key, low in (("seq", 2), ("steps", 1), ("batch", 1), ("rank", 1), ("repeats", 1)):
        value = values.get(key, getattr(args, key))
        if value < low:
            parser.error(f"--{key}: expected >= {low}, got {value}")
    if isinstance(args.parallel, int) and args.parallel < 1:
        parser.error(f"--parallel: expected >= 1 or 'auto', got {args.parallel}")
    if args.paper_rounds is not None and args.paper_rounds < 1:
        parser.error(f"--paper-rounds: expected >= 1, got {args.paper_rounds}")
    dtype = args.dtype or "float32"
    guard_tol = args.guard_tol if args.guard_tol is not None else (
        GUARD_TOL_HALF if resolve_dtype(dtype, device) != torch.float32
        else GUARD_TOL_LM if args.task == "causal_lm" else GUARD_TOL)
    for key, value in (("alpha", args.alpha), ("lr", args.lr), ("guard_tol", guard_tol)):
        if not value > 0:
            parser.error(f"--{key.replace('_', '-')}: expected > 0, got {value}")
    try:
        resolve_backend(args.backend, device)
    except ValueError as err:
        parser.error(f"--backend: {err}")
    impls = tuple(args.impls)
    if "peft" in impls and importlib.util.find_spec("peft") is None:
        # One missing package must not cost the other implementations' numbers (one GPU call).
        print("bench_rounds: peft is not installed: the PEFT-per-client loop is left out", flush=True)
        impls = tuple(i for i in impls if i != "peft") or ("batched",)
    return RoundSettings(device=device, impls=impls, rank=args.rank, alpha=args.alpha, lr=args.lr,
                         parallel=args.parallel, backend=args.backend, repeats=args.repeats, seed=args.seed,
                         guard_tol=guard_tol, dtype=dtype, stop_backward=not args.no_stop_backward,
                         blocks=args.blocks, fractions=args.fractions, random_weights=args.random_weights,
                         task=args.task, quantize=args.quantize, **values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--patterns" or a.startswith("--patterns=") for a in argv):
        # The QLoRA patterns side by side (fedhello batched, PEFT loop, FlowerTune): qlora_patterns.py's CLI.
        import qlora_patterns

        return qlora_patterns.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task == "causal_lm":
        check_causal_lm_args(args, parser)
    apply_preset(args)
    if args.models and not args.random_weights and args.task == "classification":
        offline_only = [m for m in args.models if m not in OFFLINE_MODELS and m != "bert-base"]
        if offline_only:
            parser.error(f"--models: {offline_only[0]} exists only with --random-weights")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    threads = args.threads or (1 if args.smoke else None)
    if threads is not None:
        if threads < 1:
            parser.error(f"--threads: expected >= 1, got {threads}")
        torch.set_num_threads(threads)
    settings = settings_from_args(args, parser, device)
    if args.task == "causal_lm":
        models = args.models or (["tiny-llama"] if args.smoke else ["smollm2"])
    else:
        smoke_models = ["tiny-bert", "tiny-llama"] if args.random_weights else ["tiny-bert"]
        models = args.models or (smoke_models if args.smoke else
                                 ["minilm", "smollm2"] if device.type == "cuda" else ["minilm"])
    ns = args.n or ([1, 4] if args.smoke else [1, 8, 32, 100])
    cases = [RoundCase(m, n) for m in models for n in ns]

    meta = metadata(settings, argv)
    out = args.out or results_path("rounds", meta["device_slug"], args.smoke)
    doc = {"schema": 1, "meta": meta, "grid": {"models": models, "n": ns, "impls": list(settings.impls)},
           "complete": False, "cases": []}
    print(f"{meta['device']} | torch {meta['torch']} | transformers {meta['transformers']} | peft {meta['peft']} | "
          f"task {settings.task} | {len(cases)} case(s) | seq {settings.seq} batch {settings.batch} "
          f"steps {settings.steps} | "
          f"backend {meta['engine_backend']} | -> {out}", flush=True)
    write_json(doc, out)  # a run killed in its first case still leaves its settings
    start = time.monotonic()
    backbones: dict[str, nn.Module] = {}
    for i, case in enumerate(cases, 1):
        if args.budget_s is not None and time.monotonic() - start > args.budget_s:
            record = {"name": case.name, **asdict(case), "task": settings.task, "status": "skipped",
                      "note": f"time budget of {args.budget_s:g} s spent"}
        else:
            if case.model not in backbones:
                backbones.clear()
                _free(device)
                try:
                    backbones[case.model] = load_model(case.model, settings.seq, settings.seed,
                                                       settings.random_weights, settings.task)
                    # Quantized once, on the CPU; each implementation's copy moves the packed weights.
                    quantize_backbone(backbones[case.model], settings.quantize, settings.torch_dtype, "--quantize")
                except ValueError as err:
                    parser.error(str(err))
            record = run_case(case, backbones[case.model], settings)
        doc["cases"].append(finite(record))
        write_json(doc, out)
        bad = [k for k, v in record.get("guard", {}).items() if not v["ok"]]
        times = ", ".join(f"{k} {e['round_s']['median_s']:.3f}s" for k, e in record.get("impls", {}).items()
                          if e.get("status") == "ok")
        print(f"[{i}/{len(cases)}] {case.name}: {record['status']}"
              + (f" ({record['note']})" if record.get("note") else "")
              + (f" | {times}" if times else "")
              + (f" GUARD FAILED: {','.join(bad)}" if bad else ""), flush=True)
    if args.paper_rounds:
        # The smoke run times the toy BERT on little data instead of BERT-base, on the same code path.
        small = {"model": "tiny-bert", "samples": 32, "seq": 16} if args.smoke else {}
        doc["paper_slice"] = finite(paper_slice.measure(args.paper_rounds, device, settings.dtype, settings.seed,
                                                        **small))
        write_json(doc, out)
        ps = doc["paper_slice"]
        print(f"paper-size slice ({ps['model']}): {ps['round_s']['median_s']:.2f} s per round, extrapolated "
              f"{ps['rounds']} rounds: {ps['extrapolated_run_s'] / 60:.1f} min" if ps["status"] == "ok"
              else f"paper-size slice: skipped ({ps['note']})", flush=True)
    return finish_run(doc, out, start, report.rounds_report)


if __name__ == "__main__":
    sys.exit(main())
