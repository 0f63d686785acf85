"""The ``jaxgen`` command line: flags generated from the config, dispatch, print.

    jaxgen demo   [--out DIR] [--quick]          Figures 1 and 2 at small scale on MNIST-1D
    jaxgen bound  [training options] --out DIR   one run with online bound tracking
    jaxgen sweep  (--widths W,.. | --noise-levels P,..) [training options] --out DIR
    jaxgen dispersion [training options] --out DIR   Figure 2: dispersion per epoch

Training options are the fields of ``experiments.config.TrainConfig`` (``--epochs``,
``--lr``, ...), ``--preset``, ``--method`` with its hyper-parameters
(``--gmp-sigma``, ...), ``--resume`` and ``--no-progress``; ``jaxgen bound --help``
lists them. Bad arguments exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _training_flags(parser: argparse.ArgumentParser, *, out_default: str) -> None:
    from jaxgen.experiments import config, methods, options

    parser.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    presets = "; ".join(f"{name}: {p.setting}" for name, p in config.PRESETS.items())
    parser.add_argument("--preset", choices=sorted(config.PRESETS), help=presets)
    options.add_flags(parser.add_argument_group("run"), config.TrainConfig)
    described = "; ".join(f"{name}: {cls.description}" for name, cls in methods.REGISTRY.items())
    parser.add_argument("--method", choices=list(methods.REGISTRY), help=described)
    for name, cls in methods.REGISTRY.items():
        group = parser.add_argument_group(f"--method {name}")
        options.add_flags(group, cls, prefix=f"{name}-")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, **overrides):
    """The ``TrainConfig`` the flags describe: the preset, then the flags, then ``overrides``."""
    from jaxgen.experiments import config, methods, options
    from jaxgen.experiments.errors import RunWarning

    values = options.values_from(args, config.TrainConfig)
    preset = config.PRESETS[args.preset].values if args.preset else {}
    for name, value in values.items():
        if name in preset and preset[name] != value:
            warnings.warn(
                f"{options.flag_name(name)} {value} replaces the preset's {preset[name]}: the "
                f"run is no longer the setting of {args.preset}",
                RunWarning,
                stacklevel=2,
            )
    method = args.method or "erm"
    for name, cls in methods.REGISTRY.items():
        given = options.values_from(args, cls, prefix=f"{name}-")
        if name == method:
            values["method"] = methods.make(name, **given)
        elif given:
            flag = options.flag_name(next(iter(given)), f"{name}-")
            raise options.ConfigError(f"{flag} applies to --method {name}, not to {method}")
    return config.from_preset(args.preset, **values | overrides)


def _parser() -> argparse.ArgumentParser:
    from jaxgen.experiments.options import POSITIVE_INT, UNIT, argparse_type, list_of

    parser = _Parser(prog="jaxgen", description="Generalization of SGD (Wang & Mao, ICLR 2022).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="Figures 1 and 2 at small scale on MNIST-1D")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--quick", action="store_true", help="a tiny version (for tests)")
    bound = commands.add_parser("bound", help="one training run with online bound tracking")
    _training_flags(bound, out_default="runs/bound")
    sweep = commands.add_parser("sweep", help="Figure 1: bound and gap over widths or noise")
    _training_flags(sweep, out_default="runs/sweep")
    swept = sweep.add_mutually_exclusive_group(required=True)
    swept.add_argument("--widths", type=argparse_type(list_of(POSITIVE_INT)))
    swept.add_argument("--noise-levels", type=argparse_type(list_of(UNIT)))
    dispersion = commands.add_parser("dispersion", help="Figure 2: dispersion per epoch")
    _training_flags(dispersion, out_default="runs/dispersion")
    return parser


def _progress(args) -> list:
    from jaxgen.experiments.callbacks import ProgressBar

    return [] if args.no_progress else [ProgressBar()]


def _bound(args, console) -> None:
    from jaxgen.experiments import loop, report

    result = loop.run(
        config_from_args(args), args.out, resume=args.resume, callbacks=_progress(args)
    )
    console.print(report.result_table(result))
    console.print(
        f"wrote {args.out}/result.json, metrics.csv, steps.npz, dispersion.png "
        f"({result.seconds:.1f} s)"
    )


def _sweep(args, console) -> None:
    from jaxgen.experiments import sweep

    field, values = ("width", args.widths) if args.widths else ("label_noise", args.noise_levels)
    config = config_from_args(args)
    sweep.run(
        config,
        field,
        values,
        args.out,
        resume=args.resume,
        callbacks=lambda: _progress(args),
        say=console.print,
    )
    console.print(f"wrote {Path(args.out) / 'figure1.png'}")


def _dispersion(args, console) -> None:
    from jaxgen.experiments import loop
    from jaxgen.experiments.callbacks import EpochPrinter

    printer = EpochPrinter(console.print)
    result = loop.run(config_from_args(args), args.out, resume=args.resume, callbacks=[printer])
    console.print(f"wrote {Path(args.out) / 'dispersion.png'} (gap {result.gap:.4f})")


def _demo(args, console) -> None:
    from jaxgen.experiments import demo

    demo.run(Path(args.out), quick=args.quick, console=console)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the status is 0, 1 (stopped), 2 (bad arguments) or 130 (Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from rich.console import Console

    from jaxgen.experiments import data, errors

    commands = {"demo": _demo, "bound": _bound, "sweep": _sweep, "dispersion": _dispersion}
    say = functools.partial(print, f"jaxgen {args.command}:", file=sys.stderr)
    try:
        with errors.warnings_as_lines(say):
            commands[args.command](args, Console())
    except (errors.ConfigError, data.DatasetUnavailable) as error:
        say(f"error: {error}")
        return 2
    except (errors.TrainingDiverged, errors.OutputError) as error:
        say(f"stopped: {error}")
        return 1
    except KeyboardInterrupt:
        say(_interrupted(args, argv))
        return 130
    return 0


def _interrupted(args, argv: list[str]) -> str:
    """Where the last checkpoint is and the command that resumes from it."""
    if args.command == "demo":
        return "interrupted; run the same command again to start the demo over"
    command = shlex.join(["jaxgen", *argv, *([] if args.resume else ["--resume"])])
    if args.command == "sweep":
        return f"interrupted; finished runs and checkpoints are in {args.out}; resume: {command}"
    folder = Path(args.out) / "checkpoints"
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.is_dir() else []
    if not steps:
        return "interrupted before the first checkpoint; run the same command again to start over"
    return f"interrupted; the last checkpoint is step {max(steps)} in {folder}; resume: {command}"


if __name__ == "__main__":
    sys.exit(main())
