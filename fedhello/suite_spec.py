"""Suite files: ``load_suite`` reads one (its base config, seeds, settings, methods, presets) into a ``Suite``.

The file format is described in ``fedhello.suite``. Every problem raises ``ConfigError`` naming the
suite file's field; every run's config is checked before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedhello.config import ConfigError, load_config, parse_override_value
from fedhello.yaml_io import DuplicateKeyError, safe_load_strict

__all__ = ["Suite", "load_suite", "run_config"]


@dataclass
class Suite:
    """A resolved suite: the base config file, overrides, and the grid to run."""

    base: Path
    output_dir: Path
    seeds: list[int]
    settings: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    overrides: dict[str, Any] = field(default_factory=dict)
    name: str = "suite"

    def runs(self) -> list[tuple[str, str, int, Path]]:
        """(setting, method, seed, run folder) of every run, in execution order."""
        return [(s, m, seed, self.output_dir / s / m / f"seed-{seed}")
                for s in self.settings for m in self.methods for seed in self.seeds]


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping, got {type(value).__name__}")
    return dict(value)


# Setting and method names become folder names: keep them valid on every OS a results folder may
# be cloned to (Windows rejects these characters and names ending in a dot or space).
_UNPORTABLE = set('<>:"/\\|?*')


def _folder_names(name: str, value: dict[str, Any]) -> None:
    for key in value:
        if (not isinstance(key, str) or not key.strip() or key in (".", "..") or key[-1] in ". "
                or _UNPORTABLE & set(key)):
            raise ConfigError(f"{name}: {key!r} is not usable as a folder name on every OS "
                              f"(expected a non-empty name without any of {''.join(sorted(_UNPORTABLE))} "
                              "that does not end in '.' or ' ')")


def _flatten(prefix: str, value: Any) -> list[str]:
    """``{a: {b: 1}}`` -> ``["a.b=1"]``, except for the values of ``options`` mappings."""
    if isinstance(value, dict) and not prefix.endswith("options"):
        out = []
        for k, v in value.items():
            out.extend(_flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return [f"{prefix}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"]


def load_suite(path: str | Path, preset: str | None = None, overrides: list[str] | tuple = ()) -> Suite:
    """Read a suite file; ``preset`` picks one of its ``presets``; ``overrides`` apply to every run."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"suite: no such file {path}")
    try:
        raw = safe_load_strict(path.read_text()) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{err.key}: given twice in {path} (lines {err.lines[0]} and {err.lines[1]}); "
                          "keep one") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"suite: expected a mapping at the top of {path}")
    presets = _mapping("presets", raw.get("presets"))
    chosen: dict[str, Any] = {}
    if preset is not None:
        if preset not in presets:
            raise ConfigError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
        chosen = _mapping(f"presets.{preset}", presets[preset])
    if "base" not in raw:
        raise ConfigError("base: expected the path of a run config")
    base = (path.parent / raw["base"]).resolve()
    if not base.exists():
        raise ConfigError(f"base: no such file {base}")
    run_overrides = {**_mapping("overrides", raw.get("overrides")), **_mapping("overrides", chosen.get("overrides"))}
    for key in _SUITE_FIELDS:
        if key in run_overrides:
            raise ConfigError(f"overrides.{key}: {_SUITE_FIELDS[key]}")
    out = chosen.get("output_dir", raw.get("output_dir", f"runs/{path.stem}"))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set: expected KEY=VALUE, got {item!r}")
        if key == "output_dir":  # the suite's folder: every run goes below it
            out = parse_override_value(key, value)
            if not isinstance(out, str) or not out:
                raise ConfigError(f"output_dir: expected a folder path, got {out!r}")
            continue
        if key in _SUITE_FIELDS:
            raise ConfigError(f"{key}: {_SUITE_FIELDS[key]}")
        run_overrides[key] = parse_override_value(key, value)
    settings = _mapping("settings", chosen.get("settings", raw.get("settings"))) or {"default": {}}
    methods = _mapping("methods", chosen.get("methods", raw.get("methods")))
    _folder_names("settings", settings)
    _folder_names("methods", methods)
    if not methods:
        raise ConfigError("methods: expected at least one method")
    for group, entries in (("settings", settings), ("methods", methods)):
        for entry, value in entries.items():
            keys = {item.partition("=")[0] for item in _flatten("", _mapping(f"{group}.{entry}", value))}
            clash = sorted(keys & set(_SUITE_FIELDS))
            if clash:
                raise ConfigError(f"{group}.{entry}.{clash[0]}: {_SUITE_FIELDS[clash[0]]}")
    seeds = chosen.get("seeds", raw.get("seeds", [0]))
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise ConfigError(f"seeds: expected a non-empty list of ints, got {seeds!r}")
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:  # one run folder, counted as two seeds in the table
        raise ConfigError(f"seeds: {twice[0]} is given twice in {seeds}; each seed is one run")
    suite = Suite(base, Path(out), seeds, settings, methods, run_overrides,
                  name=f"{path.stem}" + (f" ({preset})" if preset else ""))
    # Validate every run up front, and check once per distinct model and data source that they can
    # load here (no torch import yet: a bad suite is reported in about a second).
    checked = set()
    same_run: dict[tuple[str, int, str], str] = {}
    for setting, method, seed, run_dir in suite.runs():
        config = run_config(suite, setting, method, seed, run_dir)
        settings_of_run = (setting, seed, repr({**config.to_dict(), "output_dir": None}))
        if settings_of_run in same_run:  # two names for one run: the table would count it twice
            raise ConfigError(f"methods: {same_run[settings_of_run]!r} and {method!r} give the same run "
                              f"(setting {setting!r}, seed {seed}); keep one")
        same_run[settings_of_run] = method
        sources = (config.task, repr(config.model.name), repr(config.data))
        if sources not in checked:
            config.check_sources()
            checked.add(sources)
    return suite


# Run fields a suite sets itself, which overrides must not set (they would be silently replaced).
_SUITE_FIELDS = {"seed": "set by the suite's seeds (one run per seed), not by an override",
                 "output_dir": "the suite's output_dir sets it (each run goes to "
                               "<output_dir>/<setting>/<method>/seed-<s>)"}


def run_config(suite: Suite, setting: str, method: str, seed: int, run_dir: Path):
    """The ``RunConfig`` of one run of ``suite``: the base config with the suite's overrides, the
    setting's and the method's, the seed and the run folder (``ConfigError`` naming the cell)."""
    items = (_flatten("", suite.overrides) + _flatten("", _mapping(f"settings.{setting}", suite.settings[setting]))
             + _flatten("", _mapping(f"methods.{method}", suite.methods[method]))
             + [f"seed={seed}", f"output_dir={run_dir}"])
    try:
        return load_config(suite.base, items)
    except ConfigError as err:
        raise ConfigError(f"{setting}/{method}: {err}") from err
