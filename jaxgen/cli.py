"""The ``jaxgen`` command line: parse, dispatch, print.

    jaxgen demo   [--out DIR] [--quick]          Figures 1 and 2 and a method comparison
    jaxgen bound  [training options] --out DIR   one run with online bound tracking
    jaxgen sweep  (--widths W,.. | --noise-levels P,..) [training options] --out DIR
    jaxgen dispersion [training options] --out DIR   Figure 2: dispersion per epoch
    jaxgen train  [--seeds N] [training options] --out DIR   any method, any model
    jaxgen compare --methods M,M:field=value,.. [--seeds N] [--noise-levels P,..] ...

Training options are the fields of ``experiments.config.TrainConfig`` (``--epochs``,
``--lr``, ...), ``--preset``, ``--method`` with its hyper-parameters (``--gmp-sigma``,
...), ``--resume`` and ``--no-progress`` (``experiments/flags.py``). Exit status: 0, 1
(stopped), 2 (bad arguments, one line on stderr), 130 (Ctrl-C), 143 (SIGTERM).
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from jaxgen import __version__


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from jaxgen.experiments.flags import add_training_flags
    from jaxgen.experiments.options import POSITIVE_INT, UNIT, argparse_type, list_of

    noise_levels = argparse_type(list_of(UNIT))
    parser = _Parser(prog="jaxgen", description="Generalization of SGD (Wang & Mao, ICLR 2022).")
    parser.add_argument("--version", action="version", version=f"jaxgen {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="Figures 1 and 2 and a comparison on MNIST-1D")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--quick", action="store_true", help="a tiny version (for tests)")
    for name, text in (
        ("bound", "one training run with online bound tracking"),
        ("sweep", "Figure 1: bound and gap over widths or noise"),
        ("dispersion", "Figure 2: dispersion per epoch"),
        ("train", "train with any method and model; V_t where the model allows"),
        ("compare", "several methods on the same data and seeds: the GMP tables"),
    ):
        command = commands.add_parser(name, help=text)
        add_training_flags(command, out_default=f"runs/{name}")
        if name in ("train", "compare"):
            seeds = "runs with seeds --seed, --seed + 1, ... (default 1)"
            command.add_argument("--seeds", type=argparse_type(POSITIVE_INT), default=1, help=seeds)
        if name == "sweep":
            swept = command.add_mutually_exclusive_group(required=True)
            swept.add_argument("--widths", type=argparse_type(list_of(POSITIVE_INT)))
            swept.add_argument("--noise-levels", type=noise_levels)
        if name == "compare":
            command.add_argument("--methods", required=True, help="e.g. erm,gmp,gmp:samples=10")
            command.add_argument("--noise-levels", type=noise_levels, help="a grid of label noise")
    return parser


def _progress(args) -> list:
    import jax

    from jaxgen.experiments.callbacks import ProgressBar

    return [] if args.no_progress or jax.process_index() > 0 else [ProgressBar()]


def _bound(args, console) -> None:
    from jaxgen.experiments import flags, loop, report

    config = flags.config_from_args(args)
    mesh = flags.mesh_from_args(args, config.batch_size)
    result = loop.run(config, args.out, resume=args.resume, callbacks=_progress(args), mesh=mesh)
    console.print(report.result_table(result))
    console.print(
        f"wrote {args.out}/result.json, metrics.csv, steps.npz, dispersion.png "
        f"({result.seconds:.1f} s)"
    )


def _sweep(args, console) -> None:
    from jaxgen.experiments import flags, sweep

    field, values = ("width", args.widths) if args.widths else ("label_noise", args.noise_levels)
    config = flags.config_from_args(args)
    sweep.run(
        config,
        field,
        values,
        args.out,
        resume=args.resume,
        callbacks=lambda: _progress(args),
        say=console.print,
        mesh=flags.mesh_from_args(args, config.batch_size),
    )
    console.print(f"wrote {Path(args.out) / 'figure1.png'}")


def _dispersion(args, console) -> None:
    from jaxgen.experiments import flags, loop
    from jaxgen.experiments.callbacks import EpochPrinter

    config = flags.config_from_args(args)
    mesh = flags.mesh_from_args(args, config.batch_size)
    printer = EpochPrinter(console.print)
    result = loop.run(config, args.out, resume=args.resume, callbacks=[printer], mesh=mesh)
    console.print(f"wrote {Path(args.out) / 'dispersion.png'} (gap {result.gap:.4f})")


def _train(args, console) -> None:
    from jaxgen.experiments import compare, flags, loop, report

    config = flags.config_from_args(args, defaults={"bounds": False})
    mesh = flags.mesh_from_args(args, config.batch_size)
    if args.seeds == 1:
        result = loop.run(
            config, args.out, resume=args.resume, callbacks=_progress(args), mesh=mesh
        )
        console.print(report.result_table(result))
        console.print(f"wrote {args.out}/result.json, metrics.csv ({result.seconds:.1f} s)")
        return
    runs = compare.run_seeds(
        config,
        args.seeds,
        Path(args.out),
        callbacks=lambda: _progress(args),
        say=console.print,
        mesh=mesh,
    )
    summary = compare.summary(runs)
    report.write_json_atomic(Path(args.out) / "seeds.json", summary)
    best, final = summary["best_test_accuracy"], summary["test_accuracy"]
    console.print(
        f"{args.seeds} seeds: best test accuracy {best['mean']:.4f} ± {best['std']:.4f}, "
        f"final {final['mean']:.4f} ± {final['std']:.4f}; wrote {args.out}/seeds.json"
    )


def _compare(args, console) -> None:
    from jaxgen.experiments import compare, flags

    config = flags.config_from_args(args, defaults={"bounds": False})
    entries = flags.parse_methods(args.methods, args)
    compare.run(
        config,
        entries,
        args.seeds,
        args.out,
        noise_levels=args.noise_levels,
        callbacks=lambda: _progress(args),
        say=console.print,
        mesh=flags.mesh_from_args(args, config.batch_size),
    )
    console.print((Path(args.out) / "compare.md").read_text())
    console.print(f"wrote {args.out}/compare.md, compare.csv, compare.png")


def _demo(args, console) -> None:
    from jaxgen.experiments import demo

    demo.run(Path(args.out), quick=args.quick, console=console)


COMMANDS = {
    "demo": _demo,
    "bound": _bound,
    "sweep": _sweep,
    "dispersion": _dispersion,
    "train": _train,
    "compare": _compare,
}


def main(argv: Sequence[str] | None = None, *, pending: Sequence[int] = ()) -> int:
    """Run one command; the status is 0, 1 (stopped), 2 (bad arguments), 130 (SIGINT)
    or 143 (SIGTERM).

    The first SIGINT or SIGTERM stops a run at its next safe point, with a checkpoint
    and one line saying how to resume; a second one exits at once. ``pending``: signals
    the launcher received before jaxgen was imported.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from jaxgen.experiments import interrupts

    at_once = functools.partial(_stop_at_once, args, argv)
    with interrupts.handled(at_once=at_once, pending=pending):
        status = _command(args, argv)
        if status == 0 and (signum := interrupts.received()):
            word = _signal_word(signum)
            _say(args)(f"{word} while the results were being written; they are complete")
    return status


def _say(args):
    return functools.partial(print, f"jaxgen {args.command}:", file=sys.stderr)


def _command(args, argv: list[str]) -> int:
    from rich.console import Console

    from jaxgen.experiments import data, errors, interrupts

    say = _say(args)
    try:
        interrupts.phase("start")
        interrupts.check()
        with errors.warnings_as_lines(say):
            quiet = False
            if args.command != "demo":
                from jaxgen.experiments import flags

                quiet = flags.start_distributed(args) > 0  # process 0 reports
            COMMANDS[args.command](args, Console(quiet=quiet))
    except (errors.ConfigError, data.DatasetUnavailable) as error:
        say(f"error: {error}")
        return 2
    except (errors.TrainingDiverged, errors.OutputError) as error:
        say(f"stopped: {error}")
        return 1
    except KeyboardInterrupt as error:  # interrupts.Interrupted, or SIGINT outside a run
        signum = getattr(error, "signum", signal.SIGINT)
        say(f"{_signal_word(signum)}; {_resume_hint(args, argv)}")
        return 128 + signum
    return 0


def _signal_word(signum: int) -> str:
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


def _stop_at_once(args, argv: list[str], signum: int) -> NoReturn:
    """A second signal: exit now, without a traceback (a save in flight is left unfinished,
    and ``--resume`` removes it)."""
    line = f"jaxgen {args.command}: {_signal_word(signum)} again: stopped at once; "
    os.write(2, (line + _resume_hint(args, argv) + "\n").encode())
    os._exit(128 + signum)


def _resume_hint(args, argv: list[str]) -> str:
    """Where the last checkpoint is and the command that resumes from it."""
    if args.command == "demo":
        return "run the same command again to start the demo over"
    command = shlex.join(["jaxgen", *argv, *([] if args.resume else ["--resume"])])
    if args.command in ("sweep", "compare") or getattr(args, "seeds", 1) > 1:
        return f"finished runs and checkpoints are in {args.out}; resume: {command}"
    folder = Path(args.out) / "checkpoints"
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
    if not steps:
        return "no checkpoint was written; run the same command again to start over"
    return f"the last checkpoint is step {max(steps)} in {folder}; resume: {command}"


def run_command(pending: Sequence[int] = ()) -> NoReturn:
    """``jaxgen`` as a process: ``main()``, then exit with its status. Signals are
    ignored while Python shuts down (orbax's and JAX's threads stopping): the run is
    over, and Python would otherwise die of a SIGINT that lands after its handlers are
    gone."""
    status = main(pending=pending)
    from jaxgen.experiments import interrupts

    interrupts.phase("exit")
    for signum in interrupts.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    run_command()
