"""JSON-lines records (``metrics.jsonl``, ``completions.jsonl``) read back the way a killed run left them.

A run appends one JSON record per line; a kill can cut the last line short. Resume, plots, stats
and suites all read through ``read_jsonl`` so they agree on what such a file holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedhello.errors import UserError

__all__ = ["read_jsonl"]


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (``metrics.jsonl``, ``completions.jsonl``), ``[]`` when it is
    missing; an unreadable last line (a run killed while appending it) is left out."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines[:-1]):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {i + 1} is not a JSON record ({err}); only the last line may be "
                             "cut short (a run killed while writing it)") from None
    try:
        return records + [json.loads(lines[-1])] if lines else records
    except json.JSONDecodeError:
        return records
