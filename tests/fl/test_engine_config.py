"""The engine fields of a run config (parallel: auto, dtype) and their resolution."""

from __future__ import annotations

import pytest
import torch

from fedhello.config import ConfigError, RunConfig
from fedhello.fl.engine import resolve_dtype

BASE = {
    "model": {"name": "minilm"},
    "data": {"name": "bbc_news", "num_clients": 10},
    "cohort_size": 4,
}


def _engine(**fields) -> RunConfig:
    return RunConfig.from_dict({**BASE, "engine": fields})


def test_engine_fields_accept_auto_ints_and_dtypes():
    assert _engine().engine.dtype == "auto" and _engine().engine.parallel is None
    assert _engine(parallel="auto").engine.parallel == "auto"
    assert _engine(parallel=3, dtype="bfloat16").engine.parallel == 3


@pytest.mark.parametrize("fields, message", [
    ({"parallel": "max"}, r"^engine\.parallel: expected one of \('auto',\)"),
    ({"parallel": 0}, r"^engine\.parallel"),
    ({"dtype": "float64"}, r"^engine\.dtype: expected one of"),
])
def test_bad_engine_fields_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        _engine(**fields)


def test_resolve_dtype():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="dtype: expected 'auto'"):
        resolve_dtype("float64", torch.device("cpu"))
