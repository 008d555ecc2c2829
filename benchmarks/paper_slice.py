"""The paper-size slice of ``bench_rounds.py --paper-rounds K``: the first rounds of the paper-size run, timed.

The run is ``configs/paper-size.yaml`` played by the library's own server loop (``FederatedRun``,
through ``fedhello.fl.run`` with objects in place of the Hub's model and data), so what is timed is
what ``fedhello run configs/paper-size.yaml --time-rounds K`` times: cohort sampling, Fed-HeLLo's
allocation, local training, aggregation. Only the inputs differ, so that no checkpoint or data set
is needed: a randomly initialised backbone of the model's shape (``_random_backbones.py``) and
synthetic data (``SAMPLES`` texts of ``max_length`` random token ids per client, ``NUM_LABELS``
classes, split over the clients by the config's partition as 20 Newsgroups is), read by
``IdTokenizer``.

The server loop needs the ``[fl]`` extra (``datasets``, ...); where it is missing (the lent GPU
machines) the slice is recorded as skipped with the reason. Imported as a sibling module (the
scripts run with ``benchmarks/`` first on ``sys.path``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from _random_backbones import random_backbone
from timing import round_stats

__all__ = ["CONFIG", "IdTokenizer", "measure"]

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper-size.yaml"
SAMPLES = 113  # training texts per client on average: 20 Newsgroups' 11,314 over 100 clients
NUM_LABELS = 20
TEST_SAMPLES = 64  # evaluation is not timed; a small test set keeps its untimed cost small


class IdTokenizer:
    """A tokenizer for synthetic texts that are token ids written out (``"17 4021 9 ..."``): the
    ids as they are, truncated or padded with ``pad_token_id`` 0 to ``max_length``."""

    pad_token = "[PAD]"
    pad_token_id = 0
    eos_token = None

    def __call__(self, texts: list[str], truncation: bool = True, max_length: int = 512,
                 padding: str = "max_length") -> dict[str, list[list[int]]]:
        ids = [[int(w) for w in text.split()][:max_length] for text in texts]
        return {"input_ids": [row + [0] * (max_length - len(row)) for row in ids],
                "attention_mask": [[1] * len(row) + [0] * (max_length - len(row)) for row in ids]}


def _texts(count: int, seq: int, vocab: int, gen: torch.Generator) -> dict[str, list]:
    ids = torch.randint(1, vocab, (count, seq), generator=gen)
    return {"text": [" ".join(map(str, row)) for row in ids.tolist()],
            "label": torch.randint(0, NUM_LABELS, (count,), generator=gen).tolist()}


def measure(rounds: int, device: torch.device, dtype: str, seed: int, *, model: str = "bert-base",
            samples: int = SAMPLES, seq: int | None = None) -> dict[str, Any]:
    """Play ``rounds + 1`` rounds of the paper-size run and time them (the first is a warm-up).

    Args:
        rounds: timed rounds (>= 1).
        device, dtype, seed: the run's ``engine.device``, ``engine.dtype`` and ``seed`` (the kernels'
            backend is the server loop's, ``auto``).
        model: the random backbone's shape (``_random_backbones.RANDOM_MODELS``); ``bert-base`` is
            the paper's, smaller ones serve smoke runs of the same code.
        samples, seq: training texts per client on average and tokens per text (default: the
            config's ``data.max_length``).

    Returns:
        the slice's record: ``status`` (``"ok"``, or ``"skipped"`` with a ``note`` where the
        ``[fl]`` extra is missing), the run's shape, ``round_s`` (the timed rounds' local training
        plus aggregation, s: median, q20, q80, min, every time) and ``extrapolated_run_s`` (the
        median times the config's rounds); on CUDA ``cuda_peak_bytes``.
    """
    try:
        from fedhello.config import load_config
        from fedhello.fl.api import run
        import datasets
    except ImportError as err:  # MissingExtraError included: the server loop's data stack is absent
        return {"status": "skipped", "note": f"the server loop needs the [fl] extra: {err}"}
    config = load_config(CONFIG)
    seq = seq or config.data.max_length
    backbone = random_backbone(model, seq, NUM_LABELS, seed)
    vocab = backbone.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    # One data set split by the config's partition (Dirichlet 0.5 over the clients), as 20 Newsgroups is.
    train = datasets.Dataset.from_dict(_texts(samples * config.data.num_clients, seq, vocab, gen))
    test = datasets.Dataset.from_dict(_texts(TEST_SAMPLES, seq, vocab, gen))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="paper-slice-") as out:
        # One warm-up round (kernel compilation, allocator); one checkpoint and evaluation, at the end.
        overrides = [f"rounds={rounds + 1}", f"output_dir={out}", f"checkpoint_every={rounds + 1}",
                     f"eval_every={rounds + 1}", f"seed={seed}", f"data.max_length={seq}",
                     f"engine.dtype={dtype}", f"engine.device={device.type}"]
        result = run(model=backbone, train=train, tokenizer=IdTokenizer(), test=test,
                     config=load_config(CONFIG, overrides), progress=False)
    times = [r["time_local"] + r["time_aggregate"] for r in result.records]
    stats = round_stats(times[1:])
    record = {"status": "ok", "config": CONFIG.name, "model": f"random weights, {model} shape",
              "num_blocks": result.run.num_blocks,
              "clients": config.data.num_clients, "cohort": config.cohort_size, "rounds": config.rounds,
              "samples": samples, "seq": seq, "batch": config.local.batch_size, "dtype": dtype,
              "warmup_round_s": times[0], "round_s": stats,
              "extrapolated_run_s": stats["median_s"] * config.rounds,
              "note": "FederatedRun rounds: local training + aggregation (time_local + time_aggregate); "
                      "evaluation not included"}
    if device.type == "cuda":
        record["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return record
