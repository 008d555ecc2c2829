"""Causal language-model data: plain text or prompt/response pairs, as next-token targets.

``load_lm_dataset`` reads a run's data source into a ``datasets.Dataset`` with either a
``text`` column (plain text) or ``prompt`` + ``response`` columns (instructions), and a
``ClassLabel`` ``label`` column that only shapes the clients' partition (BBC News topics, or a
local file's label column; a single class ``all`` when there is none, where ``dirichlet``
partitions then skew the clients' quantities only). ``bbc_headlines`` is BBC News as
instructions: the first ``HEADLINE_STORY_WORDS`` words of each story after an instruction, and
its headline as the response. ``lm_tensors`` turns rows into fixed-length
model inputs with ``labels [n, S]``: the token ids the loss covers, ``-100`` elsewhere (padding,
and for instructions the prompt), the convention of ``transformers``' causal-LM losses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedhello.errors import UserError
from fedhello.nn.losses import IGNORE_INDEX

from .sources import LOCAL_FORMATS, load_labelled_dataset

if TYPE_CHECKING:
    import datasets

    from fedhello.config import DataConfig

__all__ = ["IGNORE_INDEX", "HEADLINE_INSTRUCTION", "HEADLINE_STORY_WORDS", "bbc_headlines", "load_lm_dataset",
           "standardize_lm_dataset", "lm_tensors", "instruction_rows", "text_rows"]

HEADLINE_INSTRUCTION = "Write the headline of this BBC News story."
HEADLINE_STORY_WORDS = 32  # about 50 SmolLM2 tokens: with the chat template and a headline, within 128


def bbc_headlines(news: "datasets.Dataset") -> "datasets.Dataset":
    """BBC News articles (``text``: the headline, a blank line, the story) as instructions.

    Returns:
        columns ``prompt`` (``HEADLINE_INSTRUCTION``, a blank line, the story's first
        ``HEADLINE_STORY_WORDS`` words), ``response`` (the headline) and ``label`` (the topic).
    """
    import datasets

    prompts, responses = [], []
    for i, text in enumerate(news["text"]):
        headline, _, story = text.strip().partition("\n")
        if not headline.strip() or not story.strip():
            raise UserError(f"data.name: bbc_headlines needs a headline line and a story; article {i} has "
                             f"{'no story' if headline.strip() else 'no headline'}")
        prompts.append(f"{HEADLINE_INSTRUCTION}\n\n{' '.join(story.split()[:HEADLINE_STORY_WORDS])}")
        responses.append(headline.strip())
    features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string"),
                                  "label": news.features["label"]})
    return datasets.Dataset.from_dict({"prompt": prompts, "response": responses, "label": list(news["label"])},
                                      features=features)


def _raw_dataset(config: "DataConfig", split: str) -> "datasets.Dataset":
    import datasets

    if config.name and config.path is None:
        return datasets.load_dataset(config.name, split=split)
    path = Path(os.path.expanduser(config.path))
    if split != "train":
        raise UserError(f"data.split: local files have a single split 'train', got {split!r}")
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"data.path: expected a {sorted(LOCAL_FORMATS)} file for task: causal_lm, got {str(path)!r}")
    extra = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    return datasets.load_dataset(fmt, data_files=str(path), split="train", **extra)


def load_lm_dataset(config: "DataConfig", split: str | None = None) -> "datasets.Dataset":
    """The rows of ``config``'s source for a causal-LM run.

    Args:
        config: the run's ``data`` section (``prompt_column``/``response_column`` for
            instructions, else ``text_column``, found by name ``text`` when None).
        split: the split to read (default ``config.split``).

    Returns:
        columns ``text`` or ``prompt`` + ``response`` (str), and ``label`` (``ClassLabel``).

    Raises:
        ValueError: naming the ``data.`` field of a missing column.
    """
    split = split or config.split
    if config.name in ("bbc_news", "bbc_headlines"):
        ds = load_labelled_dataset("bbc_news", config.path, split=split)
        if config.prompt_column is not None:
            raise UserError(f"data.prompt_column: {config.name} has fixed columns; leave data.prompt_column unset")
        return bbc_headlines(ds) if config.name == "bbc_headlines" else ds
    return standardize_lm_dataset(_raw_dataset(config, split), config)


def standardize_lm_dataset(raw: "datasets.Dataset", config: "DataConfig") -> "datasets.Dataset":
    """``raw``'s rows for a causal-LM run, read through ``config``'s column fields.

    Returns:
        columns ``text`` or ``prompt`` + ``response`` (str), and ``label`` (``ClassLabel``: the
        ``label_column``'s values in sorted order, or one class ``all`` without it).

    Raises:
        ValueError: naming the ``data.`` field of a missing column.
    """
    import datasets

    columns = raw.column_names
    if config.prompt_column is not None:
        inputs = {"prompt": config.prompt_column, "response": config.response_column}
    else:
        inputs = {"text": config.text_column or "text"}
    for target, source in inputs.items():
        if source not in columns:
            field = f"{target}_column"
            raise UserError(f"data.{field}: {source!r} is not a column of the data (columns: {', '.join(columns)})")
    label = config.label_column
    if label is not None and label not in columns:
        raise UserError(f"data.label_column: {label!r} is not a column of the data (columns: {', '.join(columns)})")
    out = {target: [str(v) if v is not None else "" for v in raw[source]] for target, source in inputs.items()}
    if label is None:
        names, ids = ["all"], np.zeros(len(raw), dtype=np.int64)
    else:
        values = np.asarray([str(v) for v in raw[label]])
        classes = np.unique(values)
        names, ids = [str(c) for c in classes], np.searchsorted(classes, values).astype(np.int64)
    features = datasets.Features({**{k: datasets.Value("string") for k in out},
                                  "label": datasets.ClassLabel(names=names)})
    return datasets.Dataset.from_dict({**out, "label": ids.tolist()}, features=features)


def text_rows(texts: list[str], tokenizer: Any, max_length: int, max_chunks: int | None = None) -> list[list[int]]:
    """Token rows of plain texts: each text (with its EOS) cut into consecutive pieces of at most
    ``max_length`` tokens, the first ``max_chunks`` of them (all when None; 1 truncates); a piece
    of one token (nothing to predict) is left out."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids) + eos
        pieces = [ids[i:i + max_length] for i in range(0, len(ids), max_length) if len(ids) - i > 1]
        rows.extend(pieces[:max_chunks])
    return rows


def instruction_rows(prompts: list[str], responses: list[str], tokenizer: Any, max_length: int,
                     chat_template: bool = False) -> tuple[list[list[int]], list[int]]:
    """Token rows of prompt/response pairs, and how many leading tokens of each are the prompt.

    The prompt (with the tokenizer's special tokens, or its chat template as a user turn) and
    the response (plus EOS) are tokenized apart and joined, then cut to ``max_length`` from the
    end of the response.

    Raises:
        ValueError: ``data.response_column`` when a response has no token left after truncation.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    rows, prompt_lengths = [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        if not r or len(p) >= max_length:
            why = "is empty" if not r else f"has no token left after truncation to data.max_length={max_length} " \
                                            f"(its prompt alone has {len(p)} tokens)"
            raise UserError(f"data.response_column: the response of row {i} {why}")
        rows.append((list(p) + list(r) + eos)[:max_length])
        prompt_lengths.append(len(p))
    return rows, prompt_lengths


def lm_tensors(dataset: "datasets.Dataset", tokenizer: Any, max_length: int,
               chat_template: bool = False, max_chunks: int | None = None) -> dict[str, torch.Tensor]:
    """Fixed-length causal-LM inputs of a ``load_lm_dataset`` data set (or a subset of it).

    Plain texts are cut into rows of ``max_length`` tokens (at most ``max_chunks`` per text);
    instructions are one row each (see ``instruction_rows``).

    Returns:
        ``input_ids`` int64 ``[n, S]`` (right-padded with the pad token), ``attention_mask``
        int64 ``[n, S]``, ``labels`` int64 ``[n, S]`` (``input_ids`` where the loss applies,
        ``IGNORE_INDEX`` at padding and prompt tokens) and ``group`` int64 ``[n]`` (the row's
        ``label``, for per-group evaluation). ``S = max_length``; ``n`` counts chunks for text.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise UserError(f"data.max_length: expected an int >= 2 for task: causal_lm, got {max_length!r}")
    groups = list(dataset["label"])
    if "prompt" in dataset.column_names:
        rows, prompt_lengths = instruction_rows(list(dataset["prompt"]), list(dataset["response"]), tokenizer,
                                                max_length, chat_template)
        row_groups = groups
    else:
        rows, prompt_lengths, row_groups = [], [], []
        for text, group in zip(dataset["text"], groups):
            pieces = text_rows([text], tokenizer, max_length, max_chunks)
            rows.extend(pieces)
            prompt_lengths.extend([0] * len(pieces))
            row_groups.extend([group] * len(pieces))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    n = len(rows)
    input_ids = torch.full((n, max_length), pad, dtype=torch.int64)
    attention = torch.zeros(n, max_length, dtype=torch.int64)
    labels = torch.full((n, max_length), IGNORE_INDEX, dtype=torch.int64)
    for i, (row, start) in enumerate(zip(rows, prompt_lengths)):
        ids = torch.tensor(row, dtype=torch.int64)
        input_ids[i, :len(row)] = ids
        attention[i, :len(row)] = 1
        labels[i, start:len(row)] = ids[start:]
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
            "group": torch.tensor(row_groups, dtype=torch.int64)}
