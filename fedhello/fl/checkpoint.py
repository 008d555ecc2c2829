"""Run folders and checkpoints: never overwrite a run by accident, never trust a broken checkpoint.

A run folder (``config.output_dir``) holds the files of one run (``RUN_FILES``). Before a run
writes anything, ``check_run_dir`` decides whether it may:

* a folder without a run: start;
* a folder with a run and neither ``resume`` nor ``overwrite``: refuse (``RunFolderError``);
* ``overwrite``: start again from round 0 (the caller deletes the old files with ``clear_run_dir``);
* ``resume``: the new config may differ from the saved ``config.yaml`` only in the fields of
  ``RESUME_ALLOWED`` (nothing that changes what the run computes), and the checkpoint pair must
  be intact; it is returned, verified, as a ``Checkpoint``.

A checkpoint is a pair written by ``save_checkpoint``: ``checkpoint.safetensors`` (the global
adapters and heads; its metadata holds the round) and ``checkpoint.json`` (the same round, the
sha256 of the weights file, and the server's RNG and strategy state). Each file is written to a
temporary name, flushed to disk and renamed into place, weights first. A kill between the two
renames leaves the new weights beside the old ``checkpoint.json`` and the complete new
``checkpoint.json.tmp``; ``read_checkpoint`` finishes that rename. Any other inconsistency is a
``CheckpointError`` naming the file and what is wrong.

One process at a time writes a run folder: ``hold_run_dir`` takes an exclusive lock on its
``LOCK_FILE`` for as long as the run plays (released by the kernel if the process dies), and a
second process that tries to run there gets a ``RunFolderError`` naming the holder's pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml

from fedhello.errors import UserError
from fedhello.jsonl_io import read_jsonl
# The run folder's file names, re-exported here where the checkpoint API has always named them.
from fedhello.run_folder import CONFIG_FILE, LOCK_FILE, META_FILE, METRICS_FILE, RUN_FILES, WEIGHTS_FILE
from fedhello.fl.tracking import clear_tracking

__all__ = [
    "RUN_FILES",
    "RESUME_ALLOWED",
    "WEIGHTS_FILE",
    "META_FILE",
    "RunFolderError",
    "CheckpointError",
    "Checkpoint",
    "LOCK_FILE",
    "check_run_dir",
    "clear_run_dir",
    "hold_run_dir",
    "config_changes",
    "save_checkpoint",
    "read_checkpoint",
]

# The only config fields a resumed run may change, and why each cannot change what the run
# computes (the trained weights, the cohorts, the allocations). Everything else -- seed, model,
# data, tiers, strategy, aggregation, local training, cohort size, engine (its kind, device and
# parallelism change the floating-point result; even the evaluation batch size changes the
# metrics' last digits) -- must match the saved config.yaml.
RESUME_ALLOWED: dict[str, str] = {
    "rounds": "extends a run (not below the checkpoint's round)",
    "eval_every": "when the global model is evaluated; evaluation changes no state",
    "checkpoint_every": "when checkpoints are written; they hold the exact state",
    "output_dir": "where the folder is (a run may be moved)",
    "report_to": "which experiment trackers also receive the records (one added on resume gets the earlier ones)",
}

_ROUND_KEY = "fedhello.next_round"  # in the safetensors metadata
_META_KEYS = ("next_round", "weights", "rng", "strategy")


class RunFolderError(UserError):
    """The run folder holds a run that this start would overwrite or continue inconsistently."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, corrupt or does not match its partner."""


@dataclass
class Checkpoint:
    """A verified checkpoint pair.

    Attributes:
        next_round: the first round still to play (rounds ``0 .. next_round-1`` are done).
        meta: the parsed ``checkpoint.json`` (``rng``, ``strategy`` and the weights' checksum).
        weights: the bytes of ``checkpoint.safetensors`` whose sha256 was checked (load them
            with ``safetensors.torch.load``, so the checked bytes are the loaded ones).
        path: the weights file, for messages.
    """

    next_round: int
    meta: dict[str, Any]
    weights: bytes
    path: Path


def _holds_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()]


def check_run_dir(config: Any, resume: bool = False, overwrite: bool = False) -> Checkpoint | None:
    """Whether a run of ``config`` (a ``RunConfig``) may start in ``config.output_dir``; changes nothing.

    Returns the verified checkpoint to resume from, or None to start from round 0 (an empty
    folder, ``overwrite``, or ``resume`` of a run killed before its first checkpoint).
    Raises ``RunFolderError`` / ``CheckpointError`` (both ``ValueError``) otherwise.
    """
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite: expected at most one (continue the run, or start it over)")
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir: {out} is a file, expected a folder (or a path to create one at)")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # mkdir would fail with ENOTDIR only once the run starts writing
        raise RunFolderError(f"output_dir: {blocking} is a file, so the folder {out} cannot be made below it")
    found = _holds_run(out)
    if not found or overwrite:
        return None
    if not resume:
        raise RunFolderError(
            f"output_dir: {out} already holds a run ({', '.join(found)}); pass --resume to continue it, "
            f"--overwrite to delete it and start again, or choose another output_dir")
    saved = out / CONFIG_FILE
    if not saved.exists():
        raise RunFolderError(f"{saved}: missing, so --resume cannot check that the config is the run's own; "
                             f"restore it or start again with --overwrite")
    try:
        old = yaml.safe_load(saved.read_text())
    except yaml.YAMLError as err:
        raise RunFolderError(f"{saved}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(old, Mapping):
        raise RunFolderError(f"{saved}: expected a mapping of config fields, got {type(old).__name__}")
    new = yaml.safe_load(yaml.safe_dump(config.to_dict(), sort_keys=False))  # the same YAML round trip
    # A field added to the config after the run was saved is absent there; its default is what
    # that run computed with (a new field's default keeps the old behaviour).
    defaults = _flatten(yaml.safe_load(yaml.safe_dump(type(config)().to_dict(), sort_keys=False)))
    saved_flat = _flatten(old)
    changed = [c for c in config_changes(_alike(old), _alike(new)) if c[0] not in RESUME_ALLOWED
               and not (c[0] not in saved_flat and c[0] in defaults and defaults[c[0]] == c[2])]
    if changed:
        fields = "; ".join(f"{key}: {_show(a)} -> {_show(b)}" for key, a, b in changed)
        raise RunFolderError(
            f"--resume: the config differs from the run's {saved} in fields that change what the run computes: "
            f"{fields}. Only {', '.join(RESUME_ALLOWED)} may change on resume; to run this config, choose "
            f"another output_dir or pass --overwrite instead of --resume")
    checkpoint = read_checkpoint(out)
    if checkpoint is None:
        return None
    if config.rounds < checkpoint.next_round:
        raise RunFolderError(f"rounds: {config.rounds} is below the {checkpoint.next_round} rounds already done "
                             f"in {out}; expected >= {checkpoint.next_round}")
    _check_metrics(out / METRICS_FILE, checkpoint.next_round)
    return checkpoint


@contextlib.contextmanager
def hold_run_dir(out: str | os.PathLike, reuse: bool = False) -> Iterator[Path]:
    """Create ``out`` if needed and hold its ``LOCK_FILE`` exclusively until the block ends.

    ``reuse``: inside a block of this process that holds ``out`` already, go on under that hold
    (the command line takes the lock before the run loads its model; the run then reuses it).
    Without it a second hold is refused, in this process as in any other.

    Raises:
        RunFolderError: another process holds it (a run, a suite job or a Flower server playing
            rounds into the same folder), naming that process's pid.
    """
    import fcntl  # POSIX; fedhello runs on Linux

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = out.resolve()
    if reuse and key in _HELD:
        yield out
        return
    with open(out / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise RunFolderError(f"output_dir: {out} is being written by another process (pid {holder}); "
                                 f"wait for it to end or stop it, or choose another output_dir") from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        _HELD.add(key)
        try:
            yield out
        finally:
            _HELD.discard(key)
            fcntl.flock(lock, fcntl.LOCK_UN)


_HELD: set[Path] = set()  # run folders whose lock this process holds (hold_run_dir(reuse=True) reuses it)


def clear_run_dir(out: str | os.PathLike) -> list[Path]:
    """Delete the run files (``RUN_FILES``, unfinished checkpoint writes, and what experiment trackers
    wrote: ``fedhello.fl.tracking.OUTPUTS``) in ``out``; the removed paths.

    Only the files a run writes are removed, never the folder or anything else in it.
    """
    out = Path(out)
    names = list(RUN_FILES) + [f"{WEIGHTS_FILE}.tmp", f"{META_FILE}.tmp"]
    removed = [out / n for n in names if (out / n).exists()]
    for path in removed:
        path.unlink()
    return removed + clear_tracking(out)  # a new run must not continue the old one's tracked run


def _alike(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping with equal settings written alike, so that resume compares meanings: tier
    fractions as floats (``"3/4"`` = ``0.75``), strategy options with their defaults filled in (an
    option stated at its default = the option left out)."""
    out = dict(raw)
    tiers = out.get("tiers")
    if isinstance(tiers, Mapping) and isinstance(tiers.get("fractions"), list):
        try:
            out["tiers"] = {**tiers, "fractions": [float(Fraction(str(f))) for f in tiers["fractions"]]}
        except (ValueError, ZeroDivisionError):
            pass  # not a valid fraction: left as written (the config check names it)
    strategy = out.get("strategy")
    if isinstance(strategy, Mapping) and isinstance(strategy.get("options") or {}, Mapping):
        from fedhello.fl.strategies import available_strategies, strategy_options

        if strategy.get("name") in available_strategies():
            defaults = yaml.safe_load(yaml.safe_dump(strategy_options(strategy["name"])))  # as YAML reads them
            out["strategy"] = {**strategy, "options": {**defaults, **(strategy.get("options") or {})}}
    return out


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(dotted field, old, new)`` of every leaf where two nested config mappings differ.

    A field present on one side only is reported with ``_MISSING`` on the other.
    """
    flat_old, flat_new = _flatten(old), _flatten(new)
    keys = list(flat_old) + [k for k in flat_new if k not in flat_old]
    return [(k, flat_old.get(k, _MISSING), flat_new.get(k, _MISSING))
            for k in keys if flat_old.get(k, _MISSING) != flat_new.get(k, _MISSING)]


class _Missing:
    def __repr__(self) -> str:
        return "<absent>"


_MISSING = _Missing()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):  # an empty mapping (no options) adds no field
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, (str, _Missing)) else json.dumps(value)


def _check_metrics(path: Path, next_round: int) -> None:
    """``metrics.jsonl`` must hold one record for each of the rounds the checkpoint has done.

    An unreadable last line is tolerated: the run was killed while appending a round that came
    after the checkpoint (a round's record is written before its checkpoint).
    """
    if not path.exists():
        raise CheckpointError(f"{path}: missing, but the checkpoint is after {next_round} rounds; "
                              "resuming would lose their metrics")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rounds = set()
    for i, line in enumerate(lines):
        try:
            rounds.add(json.loads(line)["round"])
        except (json.JSONDecodeError, KeyError, TypeError):
            if i < len(lines) - 1:
                raise CheckpointError(f"{path}: line {i + 1} is not a JSON record with a 'round'") from None
    missing = sorted(set(range(next_round)) - rounds)
    if missing:
        raise CheckpointError(f"{path}: no record of rounds {missing} although the checkpoint is after "
                              f"{next_round} rounds; resuming would lose them")


def save_checkpoint(out: str | os.PathLike, tensors: Mapping[str, Any], next_round: int,
                    state: Mapping[str, Any], json_default: Callable[[Any], Any] | None = None) -> None:
    """Write the checkpoint pair for ``next_round`` into ``out`` (see the module doc for the protocol).

    Args:
        tensors: name -> CPU ``torch.Tensor`` (contiguous), the global adapters and heads.
        next_round: the first round a resumed run plays.
        state: server state (``rng``, ``strategy``); stored beside the round and checksum.
        json_default: ``json.dumps``'s ``default`` for values of ``state`` JSON does not know (numpy).
    """
    from safetensors.torch import save  # torch-backed; only a writer needs it

    out = Path(out)
    data = save(dict(tensors), metadata={_ROUND_KEY: str(next_round)})
    meta = {"next_round": next_round,
            "weights": {"file": WEIGHTS_FILE, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            **state}
    weights, meta_path = out / WEIGHTS_FILE, out / META_FILE
    tmp_w, tmp_m = out / f"{WEIGHTS_FILE}.tmp", out / f"{META_FILE}.tmp"
    _write_synced(tmp_w, data)
    _write_synced(tmp_m, json.dumps(meta, default=json_default).encode())
    os.replace(tmp_w, weights)
    os.replace(tmp_m, meta_path)


def _write_synced(path: Path, data: bytes) -> None:
    # Plain open(): the file gets the same mode (umask) as every other output of the run.
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint(out: str | os.PathLike) -> Checkpoint | None:
    """The verified checkpoint pair in ``out``, or None if neither file exists.

    Raises ``CheckpointError`` naming the file for: one file of the pair missing, JSON that does
    not parse or lacks keys, a truncated or corrupt weights file, a checksum or round mismatch.
    """
    out = Path(out)
    weights, meta_path = out / WEIGHTS_FILE, out / META_FILE
    if not weights.exists() and not meta_path.exists():
        return None
    if not meta_path.exists():
        raise CheckpointError(f"{meta_path}: missing beside {weights.name}, so the round and state of the weights "
                              "are unknown; restore it or start again with --overwrite")
    meta = _read_meta(meta_path)
    if not weights.exists():
        raise CheckpointError(f"{weights}: missing, but {meta_path.name} is after {meta['next_round']} rounds; "
                              "restore it or start again with --overwrite (nothing was changed)")
    data = weights.read_bytes()
    header_round = _weights_round(weights, data)
    if header_round != meta["next_round"]:
        pending = out / f"{META_FILE}.tmp"
        if pending.exists():  # killed between the two renames: finish the save
            try:
                finished = _read_meta(pending)
            except CheckpointError:
                finished = None
            if finished is not None and finished["next_round"] == header_round and _sha_ok(finished, data):
                os.replace(pending, meta_path)
                return Checkpoint(header_round, finished, data, weights)
        raise CheckpointError(f"{weights}: the weights are after {header_round} rounds but {meta_path.name} is "
                              f"after {meta['next_round']}; the pair does not belong together")
    if not _sha_ok(meta, data):
        raise CheckpointError(f"{weights}: sha256 differs from the one in {meta_path.name}; the file is corrupt "
                              "or was replaced")
    return Checkpoint(meta["next_round"], meta, data, weights)


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing keys {missing} (expected {list(_META_KEYS)}); not a complete "
                              "fedhello checkpoint")
    nxt, w = meta["next_round"], meta["weights"]
    if isinstance(nxt, bool) or not isinstance(nxt, int) or nxt < 0:
        raise CheckpointError(f"{path}: next_round: expected an int >= 0, got {nxt!r}")
    if not isinstance(w, dict) or not isinstance(w.get("sha256"), str):
        raise CheckpointError(f"{path}: weights: expected {{'sha256': ..., 'bytes': ...}}, got {w!r}")
    return meta


def _sha_ok(meta: Mapping[str, Any], data: bytes) -> bool:
    return meta["weights"]["sha256"] == hashlib.sha256(data).hexdigest()


def _weights_round(path: Path, data: bytes) -> int:
    """The round stored in a safetensors file's metadata, after checking its header and length.

    Layout: 8-byte little-endian header length n, n bytes of JSON header, then the tensor data,
    whose extent the header's ``data_offsets`` give.
    """
    if len(data) < 8:
        raise CheckpointError(f"{path}: truncated ({len(data)} bytes); not a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, "
                              f"file of {len(data)})")
    try:
        header = json.loads(data[8:8 + n])
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        stored = header.get("__metadata__", {}).get(_ROUND_KEY)
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    if 8 + n + end != len(data):
        raise CheckpointError(f"{path}: truncated or corrupt ({len(data)} bytes, the header describes "
                              f"{8 + n + end})")
    if stored is None or not str(stored).isdigit():
        raise CheckpointError(f"{path}: no round in its metadata ({_ROUND_KEY}); not written by this fedhello")
    return int(stored)
