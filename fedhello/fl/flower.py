"""Fed-HeLLo on Flower: the same allocation and aggregation, local training spread over Flower nodes.

Where one GPU is not enough, a run goes to Flower (``flwr``) instead of ``fedhello run``:

* server side, ``FedHelloStrategy`` is a Flower message-API ``Strategy`` around a
  ``FederatedRun``: ``configure_train`` calls ``FederatedRun.plan_round`` (cohort, allocation)
  and splits the round's participants over the connected nodes; ``aggregate_train`` rebuilds
  each participant's ``LocalResult`` from the replies and calls ``FederatedRun.finish_round``
  (layer-wise aggregation, Fisher bookkeeping, evaluation). Flower's stock FedAvg cannot do
  this: the participants return different tensor sets. The rounds are driven by
  ``FederatedRun.run`` itself, so the metrics, checkpoints and resume are those of
  ``fedhello run``, and with the same config and seed so is the global state (fp32 tolerance);
* client side, ``client_app`` hosts the batched engine: a node (one per GPU worker) keeps one
  resident ``FederatedRun`` (backbone, adapter banks, its clients' tensors) per process and
  trains its whole group of virtual clients in one batched pass.

Client-level differential privacy (the run config's ``privacy:`` section) is the same as in
``fedhello run``: ``finish_round`` clips each participant's update, adds the noise and accounts the
round (``fedhello.fl.privacy``), so a Flower run reports the same epsilon. Flower's own
``DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping`` wrappers do not apply: they
subtract the global arrays from each reply element by element, so every client must return the
same keys and shapes, while under heterogeneous allocation each participant returns only the
blocks it trained (and their noise would skip blocks nobody returned); their accounting also
assumes plain FedAvg.

A node that fails (an error reply: its ClientApp raised, or the SuperLink declared the node
unavailable; or no reply within the round's timeout) loses its clients for that round: the
failure is logged, the round's record lists those clients under ``lost``, the round aggregates
what arrived, the next round proceeds. Simulated failures (``clients.dropout``,
``over_selection``) are drawn by ``FederatedRun.plan_round``, as in ``fedhello run``: the clients
that fail or come late get no message, and the record's ``dropped``/``late`` are the same.

Wire format, one ``"train"`` message per node with work in a round:

* to the node: ``"global"`` (ArrayRecord: the global adapters and heads, float32, the names of
  ``MultiLoRAModel.client_state``); ``"config"`` (ConfigRecord ``{"run": str}``: the resolved
  ``RunConfig`` as YAML, so every node builds the same data partition and model); ``"tasks"``
  (ConfigRecord: ``round`` int; ``clients``, ``seeds`` list[int] [n]; ``blocks`` list[bool]
  [n * L], row-major, client i's trainable blocks; ``ranks`` list[int] [n], HetLoRA only);
* from the node, per client ``c``: ``"state.c"`` (ArrayRecord: the tensors of the blocks it
  trained and the heads, float32) and ``"metrics.c"`` (MetricRecord: ``num_samples``,
  ``num_steps`` int, ``loss`` float, ``fisher`` list[float] [L]).

Entry points: ``simulate(config, nodes)`` (a local Flower simulation, used by ``fedhello
flower``), ``server_app``/``client_app`` (``flwr run`` with the app folder ``flower-app/``,
simulation or deployment), ``run_on_grid(grid, config)`` (inside any ``ServerApp``; prints
one progress line per round).

``simulate`` takes the path flwr 1.41 documents in place of its deprecated ``run_simulation``
function: ``flwr run`` of the app folder against a SuperLink in simulation mode. Starting that
private SuperLink, streaming the run's log and stopping every process it started (Ray's included)
is ``fedhello.fl.flower_processes``.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedhello import run_folder
from fedhello.config import RunConfig, load_config, save_config
from fedhello.errors import UserError
from fedhello.fl.checkpoint import clear_run_dir, hold_run_dir
from fedhello.fl.engine import LocalResult, LocalTask
from fedhello.fl.flower_processes import check_app_dir, check_resources, run_simulation
from fedhello.fl.server import FederatedRun, RoundPlan

__all__ = [
    "FedHelloStrategy",
    "split_tasks",
    "train_group",
    "client_app",
    "server_app",
    "run_on_grid",
    "simulate",
]

logger = logging.getLogger(__name__)


def split_tasks(tasks: list[LocalTask], num_nodes: int) -> list[list[LocalTask]]:
    """Deal a round's tasks to ``num_nodes`` nodes: contiguous groups, sizes differing by at most one.

    Node i gets the i-th group (earlier groups are the larger ones); with more nodes than
    tasks the last nodes get none. The split does not change any client's result: each
    client's shuffling and dropout are seeded from ``(seed, round, client)``.
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int):
        raise TypeError(f"num_nodes: expected an int, got {type(num_nodes).__name__}")
    if num_nodes < 1:
        raise UserError(f"num_nodes: expected >= 1, got {num_nodes}")
    base, extra = divmod(len(tasks), num_nodes)
    groups, start = [], 0
    for i in range(num_nodes):
        size = base + (i < extra)
        groups.append(tasks[start:start + size])
        start += size
    return groups


# ---------------------------------------------------------------------------- server side
class FedHelloStrategy(Strategy):
    """A Flower strategy whose allocation and aggregation are those of a ``FederatedRun``.

    Args:
        run: the server's run (data, model for evaluation, allocation strategy, global state).
        timeout: seconds to wait for the nodes' replies in a round (None: wait for all).

    Flower's round ``r`` (from 1) is the run's round ``r - 1``. Evaluation is centralised
    (``finish_round`` evaluates the global model on the held-out test split), so
    ``configure_evaluate`` sends nothing.
    """

    def __init__(self, run: FederatedRun, timeout: float | None = None) -> None:
        if not isinstance(run, FederatedRun):
            raise TypeError(f"run: expected a FederatedRun, got {type(run).__name__}")
        if timeout is not None and not timeout > 0:
            raise UserError(f"timeout: expected seconds > 0 or None, got {timeout}")
        self.run, self.timeout = run, timeout
        self.config_yaml = yaml.safe_dump(run.config.to_dict(), sort_keys=False)
        self.last_record: dict[str, Any] | None = None
        self._plan: RoundPlan | None = None
        self._sent: dict[int, list[LocalTask]] = {}
        self._t0 = 0.0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """Plan round ``server_round - 1`` and send each node its group of participants.

        ``arrays`` is the global state (``ArrayRecord`` of float32 tensors); ``config`` is not
        used (every setting comes from the run's config).
        """
        self._t0 = time.perf_counter()
        self._plan = plan = self.run.plan_round(server_round - 1)
        nodes = sorted(grid.get_node_ids())
        groups = split_tasks(plan.tasks, len(nodes)) if nodes else []
        if not nodes and plan.tasks:
            logger.warning("round %d: no Flower node connected; clients %s get no update", plan.round,
                           [t.client for t in plan.tasks])
        self._sent = {node: group for node, group in zip(nodes, groups) if group}
        run_record = ConfigRecord({"run": self.config_yaml})
        return [
            Message(RecordDict({"global": arrays, "config": run_record, "tasks": _encode_tasks(plan.round, group)}),
                    dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(plan.round))
            for node, group in self._sent.items()
        ]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate what arrived with ``FederatedRun.finish_round``; log and skip failed nodes.

        Returns the new global state and the round's scalar metrics (train loss; test
        accuracy, loss and macro-F1 in evaluation rounds).
        """
        plan = self._plan
        if plan is None or server_round - 1 != plan.round:
            raise ValueError(f"server_round: round {server_round} was not configured by configure_train")
        arrived: dict[int, LocalResult] = {}
        lost: list[int] = []
        pending = dict(self._sent)
        for reply in replies:
            node = reply.metadata.src_node_id
            group = pending.pop(node, None)
            if group is None:
                continue  # not a reply to this round's messages
            if reply.has_error():
                logger.warning("round %d: node %d failed (%s); lost clients %s", plan.round, node,
                               reply.error.reason, [t.client for t in group])
                lost += [t.client for t in group]
                continue
            try:
                results = _decode_results(reply.content, group, self.run.global_state)
            except (KeyError, TypeError, ValueError) as err:
                logger.warning("round %d: node %d sent a malformed reply (%s); lost clients %s", plan.round,
                               node, err, [t.client for t in group])
                lost += [t.client for t in group]
                continue
            arrived.update({r.client: r for r in results})
        for node, group in pending.items():
            logger.warning("round %d: no reply from node %d; lost clients %s", plan.round, node,
                           [t.client for t in group])
            lost += [t.client for t in group]
        results = [arrived[t.client] for t in plan.tasks if t.client in arrived]
        self.last_record = record = self.run.finish_round(plan, results, self._t0)
        if lost:  # real failures, beside the simulated ones finish_round records (dropped, late)
            record["lost"] = sorted(lost)
        self._plan, self._sent = None, {}
        metrics = {k: float(v) for k, v in record.items()
                   if k in ("train_loss", "test_accuracy", "test_loss", "test_macro_f1", "test_perplexity")
                   and v is not None and not math.isnan(v)}
        metrics["participants"] = len(results)
        return ArrayRecord(self.run.global_state), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> list[Message]:
        """No federated evaluation: ``finish_round`` evaluates the global model centrally."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    def summary(self) -> None:
        """Log the run's allocation strategy and round settings."""
        cfg = self.run.config
        logger.info("FedHelloStrategy: allocation %r %s, %d rounds of %d clients, aggregation %s, output %s",
                    cfg.strategy.name, cfg.strategy.options, cfg.rounds, cfg.cohort_size,
                    cfg.aggregation.weighting, cfg.output_dir)

    def play_round(self, grid: Grid, rnd: int) -> dict[str, Any]:
        """One whole round over ``grid`` (the ``FederatedRun.run`` hook): configure, send, aggregate.

        Returns the round's metrics record, as ``FederatedRun.finish_round`` wrote it.
        """
        messages = self.configure_train(rnd + 1, ArrayRecord(self.run.global_state), ConfigRecord(), grid)
        replies = grid.send_and_receive(messages, timeout=self.timeout) if messages else []
        self.aggregate_train(rnd + 1, replies)
        return self.last_record


def _encode_tasks(rnd: int, tasks: list[LocalTask]) -> ConfigRecord:
    record = ConfigRecord({
        "round": rnd,
        "clients": [t.client for t in tasks],
        "seeds": [t.seed for t in tasks],
        "blocks": [bool(b) for t in tasks for b in t.trainable_blocks.tolist()],
    })
    if any(t.rank is not None for t in tasks):
        record["ranks"] = [int(t.rank) for t in tasks]
    return record


def _decode_results(content: RecordDict, tasks: list[LocalTask],
                    global_state: dict[str, torch.Tensor]) -> list[LocalResult]:
    """The ``LocalResult`` of each task from a node's reply; untrained tensors are the global ones."""
    results = []
    for task in tasks:
        trained = content.array_records[f"state.{task.client}"].to_torch_state_dict()
        metrics = content.metric_records[f"metrics.{task.client}"]
        unknown = set(trained) - set(global_state)
        if unknown:
            raise ValueError(f"client {task.client}: unknown tensor {sorted(unknown)[0]!r}")
        fisher = torch.tensor(metrics["fisher"], dtype=torch.float32)
        if fisher.shape != task.trainable_blocks.shape:
            raise ValueError(f"client {task.client}: fisher has shape {tuple(fisher.shape)}, expected "
                             f"{tuple(task.trainable_blocks.shape)}")
        results.append(LocalResult(
            client=task.client,
            state={**global_state, **{k: v.to(global_state[k].device) for k, v in trained.items()}},
            num_samples=int(metrics["num_samples"]),
            num_steps=int(metrics["num_steps"]),
            trainable_blocks=task.trainable_blocks.bool().clone(),
            fisher=fisher,
            loss=float(metrics["loss"]),
            rank=task.rank,
        ))
    return results


def run_on_grid(grid: Grid, config: RunConfig, *, min_nodes: int = 1, timeout: float | None = None,
                resume: bool = False, node_wait: float = 300.0) -> list[dict[str, Any]]:
    """Run ``config`` with local training on ``grid``'s nodes; every round's metrics record.

    Waits up to ``node_wait`` seconds until ``min_nodes`` nodes are connected (nodes joining
    later take part from the next round on).
    """
    if min_nodes < 1:
        raise UserError(f"min_nodes: expected >= 1, got {min_nodes}")
    deadline = time.monotonic() + node_wait
    while len(list(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"min_nodes: {min_nodes} nodes did not connect within {node_wait:.0f} s")
        time.sleep(0.5)
    run = FederatedRun(config, progress=False)
    strategy = FedHelloStrategy(run, timeout=timeout)
    strategy.summary()

    def play_round(rnd: int) -> dict[str, Any]:
        record = strategy.play_round(grid, rnd)
        # One line per round (a progress bar does not survive Flower's log streaming).
        accuracy, perplexity = record.get("test_accuracy"), record.get("test_perplexity")
        loss, epsilon = record["train_loss"], record.get("epsilon")
        print(f"round {rnd + 1}/{config.rounds}: train loss " + ("-" if loss is None else f"{loss:.4f}")
              + ("" if accuracy is None else f", test accuracy {100 * accuracy:.2f}%")
              + ("" if perplexity is None else f", held-out perplexity {perplexity:.3f}")
              + ("" if epsilon is None else f", epsilon {epsilon:.3f}")
              + f", {len(record['participants'])} participants", flush=True)
        return record

    return run.run(resume=resume, play_round=play_round)


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """``flwr run``: the settings come from the Flower run config (``flower-app/pyproject.toml``,
    ``--run-config``): ``config`` (path of the YAML run config, as for ``fedhello run``),
    ``overrides`` (``key=value`` pairs separated by ``;``, as ``--set``), ``min-nodes`` (wait
    until this many nodes are connected), ``round-timeout`` (seconds; 0 waits for every reply),
    ``resume`` (continue from the run folder's checkpoint)."""
    settings = context.run_config
    path = str(settings.get("config", ""))
    if not path:
        raise UserError("config: set the run config's path, e.g. flwr run --run-config \"config='/abs/run.yaml'\"")
    overrides = [o.strip() for o in str(settings.get("overrides", "")).split(";") if o.strip()]
    run_on_grid(grid, load_config(path, overrides), min_nodes=int(settings.get("min-nodes", 1)),
                timeout=float(settings.get("round-timeout", 0)) or None, resume=bool(settings.get("resume", False)))


# ---------------------------------------------------------------------------- client side
@functools.lru_cache(maxsize=1)
def _resident_run(config_yaml: str) -> FederatedRun:
    """This process's backbone, engine and client tensors for one run config (built once)."""
    return FederatedRun(RunConfig.from_dict(yaml.safe_load(config_yaml)), progress=False)


def train_group(msg: Message, context: Context) -> Message:
    """Train a node's group of virtual clients in one batched pass; the reply holds their updates.

    ``msg`` follows the module's wire format; the reply has, per client, the tensors of the
    blocks it trained plus the heads, and its sample count, step count, loss and Fisher
    vector ``[L]``.
    """
    run = _resident_run(str(msg.content.config_records["config"]["run"]))
    spec = msg.content.config_records["tasks"]
    global_state = msg.content.array_records["global"].to_torch_state_dict()
    clients, seeds = list(spec["clients"]), list(spec["seeds"])
    blocks = torch.tensor(list(spec["blocks"]), dtype=torch.bool).reshape(len(clients), run.num_blocks)
    ranks = list(spec["ranks"]) if "ranks" in spec else [None] * len(clients)
    tasks = [
        LocalTask(client=int(c), data=run.client_data["clients"][int(c)], trainable_blocks=blocks[i],
                  seed=int(seeds[i]), rank=ranks[i])
        for i, c in enumerate(clients)
    ]
    content = RecordDict()
    for res in run.engine.train(global_state, tasks):
        trained = set(res.trainable_blocks.nonzero().flatten().tolist())
        content[f"state.{res.client}"] = ArrayRecord({
            name: value.cpu() for name, value in res.state.items()
            if run.tensor_blocks[name] is None or run.tensor_blocks[name] in trained
        })
        content[f"metrics.{res.client}"] = MetricRecord({
            "num_samples": res.num_samples, "num_steps": res.num_steps, "loss": res.loss,
            "fisher": res.fisher.double().tolist(),
        })
    return Message(content, reply_to=msg)


client_app = ClientApp()
client_app.train()(train_group)


# ---------------------------------------------------------------------------- simulation
def simulate(config: RunConfig, nodes: int, *, resume: bool = False, overwrite: bool = False,
             timeout: float | None = None, num_cpus: int = 1, num_gpus: float = 0.0) -> list[dict[str, Any]]:
    """Run ``config`` as a local Flower simulation (Ray backend) with ``nodes`` virtual nodes.

    ``flwr run`` of ``flower-app/`` against a private SuperLink in simulation mode
    (``fedhello.fl.flower_processes``); its log, with one line per round, goes to this process's
    stdout. Each node is a Ray actor with ``num_cpus`` CPUs and ``num_gpus`` GPUs (1.0: one node
    per GPU) running ``client_app``. Returns every round's metrics record; the run folder is the
    one ``fedhello run`` writes. No Flower or Ray process outlives the call. ``overwrite`` deletes
    the run already in ``config.output_dir`` once the arguments are checked, under the folder's
    lock (refused while another process writes there).
    """
    if not isinstance(config, RunConfig):
        raise TypeError(f"config: expected a RunConfig, got {type(config).__name__}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise UserError(f"nodes: expected an int >= 1, got {nodes!r}")
    check_resources(num_cpus, num_gpus)
    if timeout is not None and not timeout > 0:
        raise UserError(f"timeout: expected seconds > 0 or None, got {timeout}")
    check_app_dir()
    if overwrite:
        with hold_run_dir(config.output_dir):
            clear_run_dir(config.output_dir)
    with tempfile.TemporaryDirectory(prefix="fedhello-flower-") as tmp:
        run_yaml = Path(tmp) / "run.yaml"
        save_config(config, run_yaml)
        settings = (f"config='{run_yaml}' min-nodes={nodes} round-timeout={timeout or 0.0} "
                    f"resume={'true' if resume else 'false'}")
        status = run_simulation(Path(tmp), settings, nodes, num_cpus=num_cpus, num_gpus=num_gpus)
    records = run_folder.read_records(config.output_dir)
    if status != 0 or len(records) < config.rounds:
        raise RuntimeError(f"the Flower run stopped after {len(records)} of {config.rounds} rounds "
                           f"(flwr run exit status {status}); its log is above")
    return records


