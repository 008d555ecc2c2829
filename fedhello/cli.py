"""Command line: ``fedhello run | flower | suite | plot | doctor`` (also ``python -m fedhello``).

    fedhello run CONFIG.yaml [--set key=value ...] [--resume | --overwrite]   one federated run
                             [--time-rounds K]                  (or K rounds of it, timed and extrapolated)
    fedhello flower CONFIG.yaml --nodes N [--set key=value ...]  the same run as a Flower simulation
    fedhello suite SUITE.yaml [--set key=value ...] [--preset NAME] [--resume | --overwrite] [--publish DIR] [--jobs K]
                                                                 several methods, one table
    fedhello plot RUN_DIR [RUN_DIR ...] [--out DIR]              accuracy, allocation, Fisher plots
    fedhello doctor [--config RUN.yaml]                          backends, offline assets, what is missing
                                                                 (and the memory of that run's model)

Expected failures (a bad config, a missing file or package, a name the offline hub cannot
serve: ``fedhello.errors.UserError``) print one line on stderr and exit with status 2. Any other
exception is a bug: it keeps its traceback, followed by a line saying so, and exits with status 1.
The config and the names in it are checked before torch, transformers, datasets or flwr are
imported, so such errors come at once.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from fedhello import run_folder
from fedhello.errors import UserError, require_extra

__all__ = ["main"]


def _report_perplexity(initial: dict | None, records: list[dict]) -> None:
    """Causal LM runs: held-out perplexity of the untrained (``initial``: its metrics, if any) and
    the final global model."""
    if initial is not None:
        print(f"untrained model: held-out perplexity {initial['perplexity']:.3f}")
    evaluated = [r for r in records if r.get("test_perplexity") is not None]
    if evaluated:
        print(f"final held-out perplexity {evaluated[-1]['test_perplexity']:.3f} (token loss "
              f"{evaluated[-1]['test_loss']:.4f}) after {len(records)} rounds")


def _cmd_run(args: argparse.Namespace) -> int:
    from fedhello.config import load_config

    config = load_config(args.config, args.set or [])
    config.check_sources()
    if getattr(args, "time_rounds", None) is not None:
        if args.resume:
            raise UserError("--time-rounds: times the first rounds of a fresh run (into OUTPUT_DIR-timeK); "
                             "it does not continue a run, so --resume does not apply")
        return _time_rounds(config, args.time_rounds, progress=not args.no_progress)
    # Refuse a folder that holds a run (or a resume that does not fit it), or that another process
    # is writing, before loading any model (tens of seconds for a large one).
    from fedhello.fl.checkpoint import check_run_dir, hold_run_dir

    check_run_dir(config, resume=args.resume, overwrite=args.overwrite)
    with hold_run_dir(config.output_dir):
        # The training stack (seconds to import) only once the config and its names are known good.
        from fedhello.fl.server import FederatedRun

        if args.command == "flower":
            from fedhello.fl.flower import simulate
            from fedhello.fl.flower_processes import check_resources

            check_resources(args.num_cpus, args.num_gpus)
        else:
            records = FederatedRun(config, progress=not args.no_progress).run(resume=args.resume,
                                                                               overwrite=args.overwrite)
    if args.command == "flower":  # its server process takes the folder's lock itself
        records = simulate(config, args.nodes, resume=args.resume, overwrite=args.overwrite,
                           timeout=args.round_timeout, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    from fedhello.plots import plot_run

    evaluated = [r for r in records if r.get("test_accuracy") is not None]
    plots = plot_run(config.output_dir)
    initial = run_folder.read_initial_eval(config.output_dir)
    if config.task == "causal_lm":
        _report_perplexity(initial, records)
    elif initial is not None:
        print(f"untrained model: test accuracy {100 * initial['accuracy']:.2f}%")
    if evaluated:
        best = max(r["test_accuracy"] for r in evaluated)
        last = evaluated[-1]
        print(f"final test accuracy {100 * last['test_accuracy']:.2f}% (macro-F1 {100 * last['test_macro_f1']:.2f}%), "
              f"best {100 * best:.2f}% after {len(records)} rounds")
    print(f"metrics and checkpoint in {config.output_dir}; plots: {', '.join(str(p) for p in plots)}")
    return 0


def _time_rounds(config, k: int, progress: bool) -> int:
    """Run the first ``k`` rounds of ``config`` (into ``<output_dir>-time<k>``) and extrapolate the whole run."""
    import dataclasses

    from fedhello.fl.server import FederatedRun

    if k < 1:
        raise UserError(f"--time-rounds: expected >= 1, got {k}")
    timed = dataclasses.replace(config, rounds=min(k, config.rounds), output_dir=f"{config.output_dir}-time{k}")
    # A timing run is scratch: each one replaces the folder of the previous timing.
    records = FederatedRun(timed, progress=progress).run(overwrite=True)
    # Rounds after the first (which pays one-off costs: kernel compilation, allocator warm-up).
    steady = records[1:] or records
    train = sum(r["time_local"] + r["time_aggregate"] for r in steady) / len(steady)
    evals = [r["time_eval"] for r in records if r.get("test_loss") is not None]  # evaluated rounds, any task
    eval_s = sum(evals) / len(evals) if evals else 0.0
    n_evals = -(-config.rounds // config.eval_every)
    total = train * config.rounds + eval_s * n_evals
    print(f"{len(records)} rounds timed: {train:.2f} s per round of local training and aggregation "
          f"(first round {records[0]['wall_time']:.2f} s in all), {eval_s:.2f} s per evaluation")
    print(f"extrapolated whole run ({config.rounds} rounds, {n_evals} evaluations): {total:.0f} s = {total / 60:.1f} min")
    return 0


def _cmd_suite(args: argparse.Namespace) -> int:
    from fedhello.suite import load_suite, publish, run_suite

    suite = load_suite(args.suite, preset=args.preset, overrides=args.set or [])
    run_suite(suite, progress=not args.no_progress, resume=args.resume, overwrite=args.overwrite, jobs=args.jobs)
    if args.publish:
        print(f"published the table, plots and metrics to {publish(suite, args.publish)}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from fedhello.plots import is_causal_lm_run, plot_accuracy, plot_run

    out = Path(args.out) if args.out else None
    if len(args.run_dirs) == 1:
        paths = plot_run(args.run_dirs[0], out)
    else:
        target = out or Path(args.run_dirs[0]).parent
        lm = all(is_causal_lm_run(d) for d in args.run_dirs)
        paths = [plot_accuracy(args.run_dirs, target / run_folder.curve_plot(lm))]
        for d in args.run_dirs:
            paths.extend(plot_run(d, (out / Path(d).name) if out else None))
    print("\n".join(str(p) for p in paths))
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from fedhello.doctor import report

    lines, problems = report()
    if args.config is not None:
        from fedhello.config import load_config
        from fedhello.doctor import memory_lines

        config = load_config(args.config, args.set or [])
        config.check_sources()
        lines += memory_lines(config)
    print("\n".join(lines))
    return 1 if problems and args.strict else 0


_OVERWRITE_HELP = "delete the run already in the output folder and start over (default: refuse)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    # The module doc is reST; --help is plain text.
    parser = argparse.ArgumentParser(prog="fedhello", description=__doc__.split("\n\n")[0].replace("``", ""))
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one federated experiment from a YAML config")
    run.add_argument("config", help="path to a run config (see configs/)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key)")
    run.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    run.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--time-rounds", type=int, metavar="K",
                     help="run only K rounds (into OUTPUT_DIR-timeK) and print seconds per round and the "
                          "extrapolated whole run")
    run.set_defaults(func=_cmd_run)

    flower = sub.add_parser("flower", help="the same run as a Flower simulation (Ray), local training on N nodes")
    flower.add_argument("config", help="path to a run config (see configs/)")
    flower.add_argument("--nodes", type=int, required=True, help="Flower nodes (one per GPU worker)")
    flower.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (dotted key)")
    flower.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    flower.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    flower.add_argument("--num-cpus", type=int, default=1, help="whole CPUs per node (default 1)")
    flower.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per node (1: one node per GPU; default 0)")
    flower.add_argument("--round-timeout", type=float, help="seconds to wait for the nodes in a round (default: all)")
    flower.set_defaults(func=_cmd_run)

    suite = sub.add_parser("suite", help="run several methods/settings and print a comparison table")
    suite.add_argument("suite", help="path to a suite file (see configs/suites/)")
    suite.add_argument("--preset", help="a named size preset of the suite (e.g. gpu)")
    suite.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of every run")
    suite.add_argument("--resume", action="store_true", help="skip finished runs, resume unfinished ones")
    suite.add_argument("--overwrite", action="store_true", help="delete the suite's earlier runs and start them over")
    suite.add_argument("--publish", metavar="DIR",
                       help="afterwards copy the table, plots and every run's metrics (no weights) into DIR")
    suite.add_argument("--no-progress", action="store_true", help="no progress bars")
    suite.add_argument("--jobs", type=_positive_int, default=1, metavar="K",
                       help="run K runs at once, each in its own process with 1/K of the CPU threads (default 1)")
    suite.set_defaults(func=_cmd_suite)

    plot = sub.add_parser("plot", help="plot one or more run folders")
    plot.add_argument("run_dirs", nargs="+", help="run folders (with metrics.jsonl)")
    plot.add_argument("--out", help="folder for the images (default: the run folder)")
    plot.set_defaults(func=_cmd_plot)

    doctor = sub.add_parser("doctor", help="list the kernel backends, offline assets and what is missing")
    doctor.add_argument("--strict", action="store_true", help="exit 1 when something is missing")
    doctor.add_argument("--config", help="also build this run config's model and print its memory "
                                         "(frozen base, adapter banks, optimizer state)")
    doctor.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of --config")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


# The pip extra each command needs (doctor runs on the core install too).
_COMMAND_EXTRAS = {"run": "fl", "suite": "fl", "plot": "fl", "flower": "flower"}


def _interrupt(signum, frame) -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends a command as Ctrl-C does: runs keep their last
    checkpoint, write ``metrics.csv`` and release their folders; a suite stops its workers."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt) if args.command in ("run", "flower", "suite") else None
    try:
        if args.command in _COMMAND_EXTRAS:
            require_extra(_COMMAND_EXTRAS[args.command], f"fedhello {args.command}")
        return args.func(args)
    except UserError as err:  # a failure the user is expected to meet and can fix: one line
        message = " ".join(str(err).split())  # one line, whatever the library put in it
        print(f"fedhello {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = ("; what was checkpointed is kept: the same command with --resume continues from it"
                if args.command in ("run", "flower", "suite") else "")
        print(f"fedhello {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - anything else is a bug: keep its traceback and say so
        traceback.print_exc()
        print(f"fedhello {args.command}: internal error: this is a bug in fedhello, not a problem with the "
              "input; the traceback above shows where it happened", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
