"""The paper-setting suite (configs/suites/mpnet.yaml) resolves into the grid the report describes.

Only the configs are built (no model is loaded); the suite's ``smoke`` preset runs the grid."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedhello.suite import load_suite
from fedhello.suite_spec import run_config

SUITE = Path(__file__).resolve().parents[1] / "configs" / "suites" / "mpnet.yaml"
KEY_METHODS = {"Full", "Fed-HeLLo", "Fed-HeLLo (proxy FIM)", "FIM-HLA", "RGD Bottleneck", "GD Bottleneck", "FedRA",
               "HetLoRA (norm)", "Exclusive", "Straggler (strided)"}


def _configs(suite):
    return {(s, m, seed): run_config(suite, s, m, seed, d) for s, m, seed, d in suite.runs()}


def test_cpu_track_is_the_paper_setting_with_three_seeds():
    suite = load_suite(SUITE)
    assert set(suite.methods) == KEY_METHODS and suite.seeds == [0, 1, 2]
    configs = _configs(suite)
    assert len(configs) == 3 * 10 * 3
    for (setting, method, seed), c in configs.items():
        assert c.model.name == "all-mpnet-base-v2" and c.seed == seed
        assert tuple(c.capacity_tiers().capacities(12)) == (6, 9, 12)
        # Every method holds the same proxy set out, so a seed gives all methods one partition.
        assert c.data.proxy_fraction == 0.05 and c.data.max_samples == 800
        kind = c.data.partition.kind
        assert (kind, c.data.partition.classes_per_client) == ("pathological", 2) or \
            (kind, c.data.partition.alpha) == ("dirichlet", 0.5)
    shares = {s: configs[(s, "Full", 0)].tiers.shares for s in suite.settings}
    assert shares == {"path2-tiers111": [1.0, 1.0, 1.0], "dir0.5-tiers111": [1.0, 1.0, 1.0],
                      "path2-tiers631": [6.0, 3.0, 1.0]}
    hetlora = configs[("path2-tiers111", "HetLoRA (norm)", 0)]
    assert (hetlora.strategy.name, hetlora.aggregation.weighting, hetlora.model.rank_scaling) == \
        ("hetlora", "norm", "client")
    assert configs[("path2-tiers111", "Straggler (strided)", 0)].strategy.options == {"pattern": "strided"}
    assert configs[("path2-tiers111", "Fed-HeLLo (proxy FIM)", 0)].strategy.options["fisher_source"] == "proxy"


def test_gpu_preset_is_the_papers_scale():
    suite = load_suite(SUITE, preset="gpu")
    assert KEY_METHODS <= set(suite.methods) and len(suite.settings) == 4
    for c in _configs(suite).values():
        assert (c.data.num_clients, c.cohort_size, c.rounds, c.data.max_samples) == (100, 10, 500, None)
    released = run_config(suite, "path2-tiers111", "Fed-HeLLo (released schedule)", 0, Path("x"))
    assert released.strategy.options["schedule"] == "released"


def test_smoke_preset_runs_one_round_of_every_method():
    suite = load_suite(SUITE, preset="smoke")
    configs = _configs(suite)
    assert set(suite.methods) == KEY_METHODS and len(configs) == 10 and all(c.rounds == 1 for c in configs.values())
    assert configs[("path2-tiers111", "Fed-HeLLo (proxy FIM)", 0)].strategy.options["warmup"] == 0


def test_released_code_ablation_switches_only_the_released_behaviours():
    """configs/suites/mpnet-released.yaml: Fed-HeLLo (proxy FIM) and Full as the mpnet track runs them,
    each with the released code's behaviours on together and each behaviour on alone; nothing else
    differs from the "off" cell."""
    suite = load_suite(SUITE.with_name("mpnet-released.yaml"))
    configs = _configs(suite)
    assert suite.seeds == [0, 1, 2] and len(configs) == 10 * 3
    mpnet = _configs(load_suite(SUITE))
    for method, estimator in (("Fed-HeLLo (proxy FIM)", "released"), ("Full", "standard")):
        off = configs[("path2-tiers111", method, 0)]
        quirks = method.replace(")", ", released quirks)") if "(" in method else f"{method} (released quirks)"
        on = configs[("path2-tiers111", quirks, 0)]
        # The "off" cell is the mpnet track's own run, so its published metrics can be reused.
        assert replace(off, output_dir="") == replace(mpnet[("path2-tiers111", method, 0)], output_dir="")
        assert (on.aggregation.heads, on.aggregation.weighting, on.strategy.options["released_freeze"],
                on.fisher.estimator) == ("keep_initial", "uniform", True, estimator)
        on.aggregation, on.fisher = off.aggregation, off.fisher
        on.strategy.options.pop("released_freeze")
        assert replace(on, output_dir="") == replace(off, output_dir="")
    singles = {  # method -> (the field it switches, its value there)
        "Fed-HeLLo (proxy FIM, head kept)": ("heads", "keep_initial"),
        "Fed-HeLLo (proxy FIM, uniform weights)": ("weighting", "uniform"),
        "Fed-HeLLo (proxy FIM, name-match freeze)": ("released_freeze", True),
        "Fed-HeLLo (proxy FIM, released estimator)": ("estimator", "released"),
        "Full (head kept)": ("heads", "keep_initial"),
        "Full (uniform weights)": ("weighting", "uniform"),
    }
    for method, (field, value) in singles.items():
        off = configs[("path2-tiers111", "Full" if method.startswith("Full") else "Fed-HeLLo (proxy FIM)", 0)]
        single = configs[("path2-tiers111", method, 0)]
        if field == "released_freeze":
            assert single.strategy.options.pop(field) is value
        elif field == "estimator":
            assert single.fisher.estimator == value
            single = replace(single, fisher=replace(single.fisher, estimator=off.fisher.estimator))
        else:
            assert getattr(single.aggregation, field) == value
            single = replace(single, aggregation=replace(single.aggregation, **{field: getattr(off.aggregation, field)}))
        assert replace(single, output_dir="") == replace(off, output_dir=""), method


def test_released_code_ablation_smoke_computes_released_fisher_scores_in_its_one_round():
    suite = load_suite(SUITE.with_name("mpnet-released.yaml"), preset="smoke")
    configs = _configs(suite)
    assert len(configs) == 10 and all(c.rounds == 1 for c in configs.values())
    quirks = configs[("path2-tiers111", "Fed-HeLLo (proxy FIM, released quirks)", 0)]
    assert quirks.strategy.options["warmup"] == 0 and quirks.fisher.estimator == "released"
