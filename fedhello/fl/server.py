"""The server loop of a federated run: cohort, allocation, local training, aggregation, evaluation.

``FederatedRun(config).run()`` executes a whole run described by a ``RunConfig`` and writes,
under ``config.output_dir``:

* ``config.yaml``: the resolved configuration;
* ``initial_eval.json``: test accuracy, loss, macro-F1 and per-client accuracy of the untrained global model
  (``task: causal_lm``: held-out token loss and perplexity, overall and per client);
* ``completions.jsonl`` (``task: causal_lm``): greedy completions of a few fixed held-out
  prompts by the global model, at the start, every few evaluations and at the end;
* ``peft_adapter/`` (``task: causal_lm``): the final global adapters as a PEFT LoRA folder that
  ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)`` loads;
* ``metrics.jsonl`` / ``metrics.csv``: one record per round (train loss, test accuracy, loss and
  macro-F1 when evaluated, the allocation, Fisher scores, sampling probabilities, bytes that
  would travel up and down, wall time);
* ``tracking.json`` and the trackers' folders when ``report_to`` names experiment trackers
  (``fedhello.fl.tracking``: every record, the config and the plots);
* ``checkpoint.safetensors`` + ``checkpoint.json``: the global adapters and heads, and every
  piece of state the rest of the run depends on (round, the server's numpy generator, the
  strategy's state). Written every ``checkpoint_every`` rounds and at the end; ``run(resume=True)``
  continues from it and reproduces the uninterrupted run exactly (wall times aside).
  ``fedhello.fl.checkpoint`` writes and verifies the pair, and refuses to start over a folder
  that holds a run unless told to resume or overwrite it.

What differs per ``task`` (the backbone, the tensors, evaluation, completions, export) is a
``RunTask`` (``fedhello.fl.tasks``); the files' names and plain writers are ``fedhello.run_folder``'s.

A client whose update holds a NaN or Inf is left out of its round (``fedhello.fl.health``); the
round's record lists it under ``nonfinite_dropped``.

Determinism: all server-side randomness (cohorts, allocations) comes from one numpy generator
that is checkpointed (a ``privacy:`` run's noise from a second one, also checkpointed,
``fedhello.fl.privacy``); each client's shuffling and dropout in round t is seeded from
``(seed, t, client)``; nothing else draws random numbers after setup.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from tqdm.auto import tqdm

from fedhello.config import RunConfig, make_run_strategy, save_config
from fedhello.data import FederatedData, prepare_federated_data
from fedhello.errors import UserError
from fedhello.fl.aggregation import ClientUpdate, aggregate_layerwise, aggregate_rank_padded, lora_rank_dims
from fedhello import run_folder
from fedhello.fl.checkpoint import (Checkpoint, CheckpointError, check_run_dir, clear_run_dir, hold_run_dir,
                                   save_checkpoint)
from fedhello.fl.dropout import RoundReturns, cohort_draw_size, draw_returns
from fedhello.fl.engine import (ClientParallelEngine, LocalResult, LocalTask, LocalTrainingConfig, resolve_device,
                                resolve_dtype)
from fedhello.fl.health import NonFiniteRoundError, find_nonfinite
from fedhello.fl.privacy import PrivateAggregation, assigned_counts, from_config as private_aggregation
from fedhello.fl.proxy_fisher import proxy_fisher_scores
from fedhello.fl.tasks import make_task
from fedhello.fl.tasks.classification import evaluate
from fedhello.fl.tracking import Tracking
from fedhello.models import load_backbone, load_tokenizer
from fedhello.models.quantize import MemoryReport, memory_report
from fedhello.nn.inject import inject_multi_lora
from fedhello.nn.model import DEFAULT_TARGET_MODULES
from fedhello.seeds import purpose_seed

__all__ = ["FederatedRun", "RoundPlan", "DEFAULT_TARGET_MODULES", "evaluate"]


def _state_bytes(state: dict[str, torch.Tensor], names: list[str], rank_fraction: float = 1.0) -> int:
    return int(sum(state[n].numel() * state[n].element_size() for n in names) * rank_fraction)


@dataclass
class RoundPlan:
    """What the server decided for one round before any client trained.

    Attributes:
        round: the round index.
        cohort: int64 ``[n]``, the sampled clients (sorted ids).
        allocation: the strategy's ``Allocation`` for the cohort.
        members: positions in ``cohort`` of the clients that take part (and return, under dropout).
        tasks: one ``LocalTask`` per member, in the order of ``members``.
        returns: with ``clients.dropout``/``over_selection``, who failed to return or came late.
    """

    round: int
    cohort: np.ndarray
    allocation: Any
    members: list[int]
    tasks: list[LocalTask]
    returns: RoundReturns | None = None

    def sent_blocks(self) -> dict[int, list[int]]:
        """Client id -> the blocks whose adapters it sends back: all it was allotted, those frozen
        by the option ``released_freeze`` included (they come back as exact-zero deltas)."""
        return {int(self.cohort[i]): self.allocation.blocks(i) for i in self.members}


class FederatedRun:
    """One federated experiment, built from a ``RunConfig``.

    Args:
        config: the run's configuration (validated by ``fedhello.config``).
        progress: show a progress bar over rounds.
    """

    def __init__(self, config: RunConfig, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.output_dir)
        self.device = resolve_device(config.engine.device)
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg = self.config
        self.task = make_task(cfg, self.out)
        self.data = self.load_data()
        compute = cfg.model.compute_dtype if cfg.model.compute_dtype != "auto" else cfg.engine.dtype
        # A quantized base is quantized on the run's device (bitsandbytes quantizes where the weight is).
        base = dict(quantize=cfg.model.quantize, compute_dtype=resolve_dtype(compute, self.device),
                    device=self.device if cfg.model.quantize != "none" else None)
        try:
            backbone = self.task.load_backbone(self.load_backbone, self.data, **base)
        except ValueError as err:
            if str(err).startswith("quantize:"):  # a model this quantization cannot take (GPT-2's Conv1D)
                raise UserError(f"model.{err}") from None
            raise
        positions = getattr(backbone.config, "max_position_embeddings", None)
        if isinstance(positions, int) and cfg.data.max_length > positions:
            raise UserError(f"data.max_length: {cfg.model.name} reads at most {positions} tokens "
                            f"(max_position_embeddings), got {cfg.data.max_length}")
        # The task's tensors: "clients" (one batch per client), "test", "proxy", and the task's own.
        self.client_data = self.task.prepare(self.data, backbone, self.load_tokenizer)
        sizes = [next(iter(c.values())).shape[0] for c in self.client_data["clients"]]
        if cfg.local.batch_size > min(sizes):  # the engine then takes each such client's whole data per step
            tqdm.write(f"warning: local.batch_size {cfg.local.batch_size} exceeds the training samples of "
                       f"{sum(n < cfg.local.batch_size for n in sizes)} client(s) (smallest: {min(sizes)}); "
                       "their batches hold all of their samples, none twice", file=sys.stderr)
        model_type = getattr(backbone.config, "model_type", "")
        targets = cfg.model.target_modules or DEFAULT_TARGET_MODULES.get(model_type)
        if targets is None:
            raise UserError(f"model.target_modules: no default for model type {model_type!r}; name the modules")
        parallel = 1 if cfg.engine.kind == "sequential" else cfg.engine.parallel  # int, "auto" or None
        slots = cfg.cohort_size if parallel in (None, "auto") else min(parallel, cfg.cohort_size)
        self.model = inject_multi_lora(
            backbone, targets, num_clients=slots, rank=cfg.model.rank, alpha=cfg.model.alpha,
            dropout=cfg.model.dropout, head_modules=self.task.head_modules,
            seed=purpose_seed(cfg.seed, "adapters"),
        ).to(self.device)
        self.model.set_rank_scaling(cfg.model.rank_scaling)
        local = LocalTrainingConfig(**asdict(cfg.local))
        self.engine = ClientParallelEngine(self.model, local, parallel="auto" if parallel == "auto" else slots,
                                           device=self.device, dtype=resolve_dtype(cfg.engine.dtype, self.device))
        self.num_blocks = self.model.num_blocks
        self.tiers = cfg.capacity_tiers()
        self.capacities = self.tiers.assign(self.data.num_clients, self.num_blocks, purpose_seed(cfg.seed, "tiers"))
        # The config was checked before L was known: tier settings are checked again for this model.
        self.strategy = make_run_strategy(cfg, self.num_blocks, self.capacities.tier_capacities,
                                          population=self.capacities.capacity)
        self.tensor_blocks = self.model.tensor_blocks()
        self.global_state = self.model.client_state(0)
        self.rng = np.random.default_rng(purpose_seed(cfg.seed, "server"))
        # Its own noise generator: a private run draws the same cohorts and allocations as the
        # non-private run of its seed (paired comparisons).
        self.privacy: PrivateAggregation | None = None if cfg.privacy is None else private_aggregation(
            cfg.privacy, self.data.num_clients, cfg.cohort_size, cfg.rounds, purpose_seed(cfg.seed, "privacy"),
            client_fisher=self.strategy.uses_fisher and getattr(self.strategy, "fisher_source", None) == "client")
        self.start_round = 0
        self.checkpoint_round: int | None = None  # rounds done at the last checkpoint written or loaded

    # The run's inputs, loaded by the names in the config; ``fedhello.fl.api`` passes objects instead.
    def load_data(self) -> FederatedData:
        """The run's data set, split and partitioned (``fedhello.data.prepare_federated_data``)."""
        return prepare_federated_data(self.config.data, self.config.seed, causal_lm=self.config.task == "causal_lm")

    def load_backbone(self, **kwargs):
        """The backbone ``model.name`` (``fedhello.models.load_backbone`` with ``kwargs``: task, num_labels, seed)."""
        return load_backbone(self.config.model.name, **kwargs)

    def load_tokenizer(self):
        """The tokenizer of ``model.name``, with a padding token (``fedhello.models.load_tokenizer``)."""
        return load_tokenizer(self.config.model.name)

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, next_round: int) -> None:
        # Adapters and heads only; "base" records how the frozen backbone they belong to was quantized.
        base = {"name": self.config.model.name, "quantize": self.config.model.quantize,
                "compute_dtype": self.config.model.compute_dtype}
        state = {"rng": self.rng.bit_generator.state, "strategy": self.strategy.state_dict(), "base": base}
        if self.privacy is not None:
            state["privacy"] = self.privacy.state_dict()
        save_checkpoint(self.out, {k: v.contiguous().cpu() for k, v in self.global_state.items()}, next_round,
                        state, run_folder.json_default)
        self.checkpoint_round = next_round

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Load a verified checkpoint (``check_run_dir``) into the global state, RNG and strategy."""
        where = checkpoint.path
        try:
            state = load_safetensors(checkpoint.weights)
        except SafetensorError as err:
            raise CheckpointError(f"{where}: not readable as safetensors ({err})") from None
        if set(state) != set(self.global_state):
            differ = sorted(set(self.global_state) ^ set(state))
            raise CheckpointError(f"{where}: tensors do not match this model (e.g. {differ[:3]})")
        for name, tensor in state.items():
            if tensor.shape != self.global_state[name].shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, this model's "
                                      f"is {tuple(self.global_state[name].shape)}")
        try:
            self.rng.bit_generator.state = checkpoint.meta["rng"]
            self.strategy.load_state_dict(checkpoint.meta["strategy"])
            if self.privacy is not None:
                self.privacy.load_state_dict(checkpoint.meta["privacy"])
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{where.with_name(run_folder.META_FILE)}: server state not loadable "
                                  f"({type(err).__name__}: {err})") from None
        self.global_state = {k: state[k].to(self.global_state[k].device) for k in self.global_state}
        self.start_round = self.checkpoint_round = checkpoint.next_round

    # ------------------------------------------------------------------ the loop
    def run(self, resume: bool = False,
            play_round: Callable[[int], dict[str, Any]] | None = None,
            overwrite: bool = False) -> list[dict[str, Any]]:
        """Run the remaining rounds; returns every round's metrics record.

        A folder that already holds a run is refused (``RunFolderError``) unless ``resume``
        (continue from its checkpoint; the config may change only in
        ``fedhello.fl.checkpoint.RESUME_ALLOWED``) or ``overwrite`` (delete its files, start over),
        and so is a folder another process is running in (``hold_run_dir``).

        ``play_round(rnd)`` plays one round and returns its record; the default trains the
        participants on this process's engine. ``fedhello.fl.flower`` passes one that trains
        them on Flower nodes (same ``plan_round``/``finish_round``, same files).
        """
        check_run_dir(self.config, resume=resume, overwrite=overwrite)  # refuse before touching the folder
        # then, as its only writer, decide again and play (the trackers close however the run ends)
        with hold_run_dir(self.out, reuse=True), Tracking(self.config.report_to, self.out,
                                                          self.config.to_dict()) as tracking:
            self.tracking = tracking
            try:
                return self._run(resume, play_round, overwrite)
            except BaseException:  # stopped (Ctrl-C, SIGTERM, an error): the table of the rounds played
                if (self.out / run_folder.METRICS_FILE).exists():
                    run_folder.write_metrics_csv(self.out, run_folder.read_records(self.out))
                raise

    def _run(self, resume: bool, play_round: Callable[[int], dict[str, Any]] | None,
             overwrite: bool) -> list[dict[str, Any]]:
        checkpoint = check_run_dir(self.config, resume=resume, overwrite=overwrite)
        if overwrite and clear_run_dir(self.out):
            print(f"--overwrite: deleted the earlier run in {self.out}; starting from round 1", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        records: list[dict[str, Any]] = []
        if checkpoint is not None:
            self._restore(checkpoint)
            records = [r for r in run_folder.read_records(self.out) if r["round"] < self.start_round]
            self.task.resumed(self.start_round)
            left = "nothing left to play" if self.start_round >= self.config.rounds else \
                f"continuing with round {self.start_round + 1}"
            print(f"resumed {self.out} from its checkpoint after round {self.start_round} of {self.config.rounds}; "
                  f"{left}", flush=True)
        elif resume and (self.out / run_folder.METRICS_FILE).exists():
            print(f"resume: {self.out} has no checkpoint yet (stopped before the first one); "
                  "starting again from round 1", flush=True)
        elif resume:  # a mistyped output_dir shows up here, not as a silent new run
            print(f"resume: no run in {self.out} yet; starting a new one from round 1", flush=True)
        save_config(self.config, self.out / run_folder.CONFIG_FILE)
        print("\n".join(self.memory().lines()), flush=True)
        run_folder.write_records(self.out, records)
        self.tracking.start(self.start_round, records)
        if self.start_round == 0:  # the untrained model, the baseline every run is judged against
            run_folder.write_initial_eval(self.out, self.evaluate_global())
            self._evaluated(0)

        cfg = self.config
        rounds = range(self.start_round, cfg.rounds)
        bar = tqdm(rounds, desc="rounds", disable=not self.progress, initial=self.start_round, total=cfg.rounds)
        for rnd in bar:
            record = (play_round or self._round)(rnd)
            records.append(record)
            run_folder.append_record(self.out, record)
            self.tracking.log(record)
            if (cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0) or rnd + 1 == cfg.rounds:
                self._save_checkpoint(rnd + 1)
            times = {k: f"{record[f'time_{k}']:.1f}s" for k in ("local", "aggregate", "eval") if f"time_{k}" in record}
            evaluated = "test_accuracy" in record or "test_perplexity" in record
            if "test_accuracy" in record:
                times.update(acc=f"{record['test_accuracy']:.3f}")
            if "test_perplexity" in record:
                times.update(ppl=f"{record['test_perplexity']:.2f}")
            if evaluated and record["train_loss"] is not None:
                times.update(train_loss=f"{record['train_loss']:.3f}")
            if record.get("epsilon") is not None:
                times.update(eps=f"{record['epsilon']:.2f}")
            bar.set_postfix(times)
        run_folder.write_metrics_csv(self.out, records)
        self.task.export(self.model, self.global_state)
        self.tracking.finish()
        return records

    def memory(self) -> MemoryReport:
        """Bytes of the frozen base, of the adapter and head banks and of their optimizer state."""
        local = self.config.local
        slots = 2 if local.optimizer == "adamw" else int(local.momentum > 0)
        return memory_report(self.model, slots)

    def _round(self, rnd: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        plan = self.plan_round(rnd)
        results = self.engine.train(self.global_state, plan.tasks)
        return self.finish_round(plan, results, t0)

    def plan_round(self, rnd: int) -> "RoundPlan":
        """Server side, before local training: the cohort, its allocation and every participant's task."""
        cfg = self.config
        size = cohort_draw_size(cfg.cohort_size, cfg.clients.over_selection, self.data.num_clients)
        cohort = np.sort(self.rng.choice(self.data.num_clients, size=size, replace=False))
        if self.strategy.needs_proxy_scores(rnd):
            self.strategy.observe_proxy_scores(rnd, self.proxy_fisher_scores())
        alloc = self.strategy.allocate(rnd, cohort, self.capacities.of(cohort), self.rng)
        members = [i for i in range(len(cohort)) if alloc.participating[i]]
        trains = alloc.trainable if alloc.frozen is None else alloc.trainable & ~alloc.frozen
        returns = None
        if cfg.clients.active:  # only the participants that return train (their results are all that arrive)
            returns = draw_returns(members, cohort, self.capacities.tier[cohort], cfg.clients.dropout, cfg.cohort_size,
                                   np.random.default_rng(purpose_seed(cfg.seed, f"dropout/{rnd}")))
            members = returns.kept
        tasks = [
            LocalTask(
                client=int(cohort[i]),
                data=self.client_data["clients"][int(cohort[i])],
                trainable_blocks=torch.as_tensor(trains[:, i], dtype=torch.bool),
                seed=purpose_seed(cfg.seed, f"client/{rnd}/{int(cohort[i])}"),
                rank=None if alloc.ranks is None else int(alloc.ranks[i]),
            )
            for i in members
        ]
        return RoundPlan(rnd, cohort, alloc, members, tasks, returns)

    def finish_round(self, plan: "RoundPlan", results: list[LocalResult], t0: float) -> dict[str, Any]:
        """Server side, after local training: aggregate, update the strategy, evaluate; the round's record.

        ``results`` are the participants' results in the order of ``plan.tasks`` (some may be
        missing when a client failed; their blocks simply get no update this round). A result
        with a NaN/Inf loss or update is dropped the same way, with a warning; if all are,
        ``NonFiniteRoundError`` stops the run before anything is aggregated or saved.
        """
        cfg, rnd, cohort, alloc = self.config, plan.round, plan.cohort, plan.allocation
        t_local = time.perf_counter()  # everything before this call: planning and local training
        sent = results
        results, dropped = self._drop_nonfinite(rnd, results)
        if not plan.members:
            tqdm.write(f"warning: round {rnd + 1}: no client of the cohort {cohort.tolist()} trains a block "
                       f"(strategy {cfg.strategy.name!r}); the global model stays as it was", file=sys.stderr)
        sent_blocks = plan.sent_blocks()
        self._aggregate(results, plan, sent_blocks)
        position = {int(cohort[i]): i for i in plan.members}
        scores = np.zeros((self.num_blocks, len(cohort)), dtype=np.float64)
        trained = np.zeros((self.num_blocks, len(cohort)), dtype=bool)
        for res in results:
            scores[:, position[res.client]] = res.fisher.double().numpy()
            trained[:, position[res.client]] = res.trainable_blocks.numpy()
        if self.privacy is not None and self.privacy.fisher_clip is not None:
            # Client-side Fisher scores under DP: only noisy means of clipped scores reach the strategy.
            means = self.privacy.fisher_means(scores, trained, alloc.trainable[:, plan.members].sum(axis=1))
            self.strategy.observe_fisher(rnd, np.nan_to_num(means)[:, None], ~np.isnan(means)[:, None])
        else:
            self.strategy.observe_fisher(rnd, scores, trained)

        down, up = self._traffic(sent, sent_blocks)
        record: dict[str, Any] = {
            "round": rnd,
            "cohort": cohort.tolist(),
            "participants": [res.client for res in results],
            "num_blocks": self.num_blocks,
            "allocation": {str(res.client): res.trainable_blocks.nonzero().flatten().tolist() for res in results},
            # By client, like "allocation": a client dropped this round (failed, non-finite) has none.
            "ranks": None if alloc.ranks is None else {
                str(res.client): int(alloc.ranks[position[res.client]]) for res in results},
            "probabilities": run_folder.json_floats(alloc.probabilities),
            **({} if alloc.frozen is None else {"frozen": {
                str(res.client): np.flatnonzero(alloc.frozen[:, position[res.client]]).tolist() for res in results}}),
            "fisher_scores": run_folder.json_floats(self.strategy.fisher_scores),
            # None (JSON null) when nobody trained: NaN is not JSON.
            "train_loss": float(np.mean([r.loss for r in results])) if results else None,
            "bytes_down": down,
            "bytes_up": up,
            "nonfinite_dropped": dropped,
        }
        if self.privacy is not None:
            record.update(self.privacy.end_round())
        if plan.returns is not None:  # clients that never returned, and over-selected ones that came late
            record.update(dropped=plan.returns.dropped, late=plan.returns.late)
        t_aggregate = time.perf_counter()
        if (rnd + 1) % cfg.eval_every == 0 or rnd + 1 == cfg.rounds:
            metrics = self.evaluate_global()
            record.update({f"test_{k}": v for k, v in metrics.items()})
            self._evaluated(rnd + 1)
        t_end = time.perf_counter()
        record.update(wall_time=t_end - t0, time_local=t_local - t0, time_aggregate=t_aggregate - t_local,
                      time_eval=t_end - t_aggregate)
        return record

    def _drop_nonfinite(self, rnd: int, results: list[LocalResult]) -> tuple[list[LocalResult], list[dict]]:
        """The results without non-finite ones, and a record of each dropped one (warned on stderr)."""
        bad = find_nonfinite(results, self.tensor_blocks)
        if not bad:
            return results, []
        if len(bad) == len(results):
            kept = (f"the last good checkpoint (after round {self.checkpoint_round}) in {self.out} is kept"
                    if self.checkpoint_round else "no checkpoint was written before it")
            detail = "; ".join(f"client {b.client}: {b.describe()}" for b in bad.values())
            raise NonFiniteRoundError(f"round {rnd + 1}: every participant's update is non-finite ({detail}); "
                                      f"stopped without aggregating; {kept}. Lower local.lr or check the data")
        for b in bad.values():
            tqdm.write(f"warning: round {rnd + 1}: client {b.client} sent a non-finite update ({b.describe()}); "
                       "left out of this round's aggregation", file=sys.stderr)
        return [r for i, r in enumerate(results) if i not in bad], [b.to_record() for b in bad.values()]

    def _aggregate(self, results: list[LocalResult], plan: RoundPlan, sent_blocks: dict[int, list[int]]) -> None:
        """Fold the results into the global state; ``sent_blocks``: client id -> the blocks whose
        deltas count (``RoundPlan.sent_blocks``)."""
        updates = [
            ClientUpdate.from_states(r.state, self.global_state, r.num_samples, sent_blocks[r.client],
                                     self.tensor_blocks, rank=r.rank)
            for r in results
        ]
        if self.privacy is not None:  # noise on every assigned block, even when no update arrived
            if plan.members:
                self.global_state = self.privacy.aggregate(self.global_state, updates, self.tensor_blocks,
                                                           assigned_counts(plan.allocation.trainable[:, plan.members]))
            return
        if not results:
            return
        agg = self.config.aggregation
        if any(r.rank is not None for r in results):
            self.global_state = aggregate_rank_padded(
                self.global_state, updates, self.tensor_blocks, lora_rank_dims(self.global_state),
                weighting=agg.weighting, normalize=agg.rank_normalize, heads=agg.heads)
        else:
            self.global_state = aggregate_layerwise(self.global_state, updates, self.tensor_blocks,
                                                    weighting=agg.weighting, heads=agg.heads)

    def _traffic(self, results: list[LocalResult], sent_blocks: dict[int, list[int]]) -> tuple[int, int]:
        """Bytes the round would move: the whole global state down to each participant, and up
        the tensors of the blocks each sends back (rank-sliced for HetLoRA) plus its head (none
        with ``aggregation.heads: keep_initial``)."""
        names = list(self.global_state)
        down = _state_bytes(self.global_state, names) * len(results)
        sends_head = self.config.aggregation.heads == "average"
        up = 0
        for r in results:
            blocks = set(sent_blocks[r.client])
            lora = [n for n in names if self.tensor_blocks[n] in blocks]
            head = [n for n in names if self.tensor_blocks[n] is None and sends_head]
            fraction = 1.0 if r.rank is None else r.rank / self.config.model.rank
            up += _state_bytes(self.global_state, lora, fraction) + _state_bytes(self.global_state, head)
        return down, up

    def evaluate_global(self) -> dict[str, Any]:
        """The global model (slot 0, full rank) on the held-out test split (``RunTask.evaluate``).

        Classification: ``accuracy``, ``loss``, ``macro_f1``, ``client_accuracy`` (each client's
        accuracy on held-out data of its own label mix, ``fedhello.fl.client_eval``) and its
        ``client_accuracy_mean``, ``_worst`` and ``_p10`` (10th percentile) over the clients.
        Causal LM: ``loss`` (nats per target token), ``perplexity``, and ``client_perplexity``:
        for every client, the perplexity on the held-out rows of its own mix of groups (topics),
        weighted by its training tokens per group.
        """
        self._load_global()
        return self.task.evaluate(self.model, self.device)

    def _evaluated(self, rounds_done: int) -> None:
        """After an evaluation: the task's outputs of the global model (causal LM: completions)."""
        self._load_global()
        self.task.evaluated(self.model, rounds_done)

    def _load_global(self) -> None:
        self.model.load_client_state(0, self.global_state)
        self.model.set_ranks({0: self.config.model.rank})

    def proxy_fisher_scores(self) -> np.ndarray:
        """Per-block Fisher scores of the global model on the proxy set, float64 ``[L]``
        (``fedhello.fl.proxy_fisher``; ``fisher.estimator: released``: the released code's estimate)."""
        proxy = self.client_data["proxy"]
        if proxy is None:
            raise UserError("data.proxy_fraction: proxy-set Fisher scores need a proxy split (> 0)")
        return proxy_fisher_scores(self.model, proxy, self.global_state, self.config.model.rank,
                                   self.config.fisher.estimator, self.config.local.batch_size, self.device)
