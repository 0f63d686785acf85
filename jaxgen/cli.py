"""The ``jaxgen`` command line.

    jaxgen demo   [--out DIR] [--quick]     Figures 1 and 2 at small scale on MNIST-1D
    jaxgen bound  [training options] --out DIR   one run with online bound tracking
    jaxgen sweep  (--widths W,.. | --noise-levels P,..) [training options] --out DIR
    jaxgen dispersion [training options] --out DIR   Figure 2: dispersion per epoch

Training options: --preset, --dataset, --data-dir, --model, --width, --label-noise,
--always-wrong, --epochs, --batch-size, --lr, --lr-milestones, --lr-factor, --momentum,
--track-every, --R, --seed, --num-train, --checkpoint-every, --hessian-probes,
--flatness-samples, --method, --resume, --no-progress. Bad arguments exit with status 2
and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

PRESETS: dict[str, dict[str, Any]] = {
    # Wang & Mao (ICLR 2022), Figure 1: MLP 784-512-10 on MNIST, 500 epochs, batch 60, lr 0.01.
    "paper-mnist-mlp": {
        "dataset": "mnist",
        "model": "mlp",
        "width": 512,
        "epochs": 500,
        "batch_size": 60,
        "lr": 0.01,
    },
    # Figure 1: AlexNet-style CNN on CIFAR-10, 200 epochs, batch 60, lr 0.001.
    "paper-cifar10-alexnet": {
        "dataset": "cifar10",
        "model": "alexnet",
        "width": 64,
        "epochs": 200,
        "batch_size": 60,
        "lr": 0.001,
    },
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _list_of(parse):
    def parse_list(text: str) -> list:
        items = [item for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        return [parse(item.strip()) for item in items]

    return parse_list


def _training_options(parser: argparse.ArgumentParser, *, out_default: str) -> None:
    from jaxgen.experiments import data, models, train

    parser.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the paper's exact settings")
    parser.add_argument("--dataset", choices=data.DATASETS)
    parser.add_argument("--data-dir", help="TFDS data directory (prepared datasets)")
    parser.add_argument("--model", choices=models.MODELS)
    parser.add_argument("--width", type=_positive_int, help="hidden units / base channels")
    parser.add_argument("--label-noise", type=_unit, help="probability of a random label")
    parser.add_argument(
        "--always-wrong",
        action="store_true",
        default=None,
        help="noisy labels are always wrong (default: uniform, may be right)",
    )
    parser.add_argument("--epochs", type=_positive_int)
    parser.add_argument("--batch-size", type=_positive_int)
    parser.add_argument("--lr", type=_positive_float)
    parser.add_argument(
        "--lr-milestones",
        type=_list_of(_positive_int),
        help="epochs at which the learning rate is multiplied by --lr-factor",
    )
    parser.add_argument("--lr-factor", type=_positive_float)
    parser.add_argument("--momentum", type=float, help="0 (default) is the plain SGD of the theory")
    parser.add_argument(
        "--track-every",
        type=_positive_int,
        help="measure V_t every K steps (held constant in between)",
    )
    parser.add_argument(
        "--R",
        type=_positive_float,
        help="sub-Gaussian constant of the loss (default 0.1, the authors' choice)",
    )
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-train", type=_positive_int, help="use the first N training examples")
    parser.add_argument("--checkpoint-every", type=_positive_int, help="steps (default: one epoch)")
    parser.add_argument("--hessian-probes", type=_positive_int)
    parser.add_argument("--flatness-samples", type=_positive_int)
    parser.add_argument("--method", choices=train.METHODS, help="dispersion method")
    parser.add_argument(
        "--regularizer",
        choices=train.REGULARIZERS,
        help="GMP (Algorithm 2) or dynamic gradient clipping (Algorithm 1)",
    )
    parser.add_argument("--gmp-samples", type=_positive_int, help="GMP: k (default 3)")
    parser.add_argument("--gmp-sigma", type=_positive_float, help="GMP: σ (default 0.03)")
    parser.add_argument("--gmp-rho", type=_unit, help="GMP: ρ (default 0.5)")
    parser.add_argument("--dgc-alpha", type=_positive_float, help="clipping: α (default 0.1)")
    parser.add_argument("--dgc-initial-norm", type=_positive_float, help="clipping: G (default 50)")
    parser.add_argument("--dgc-start-epoch", type=int, help="clipping: T_c in epochs (default 15)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_CONFIG_FIELDS = (
    "dataset",
    "data_dir",
    "model",
    "width",
    "label_noise",
    "always_wrong",
    "epochs",
    "batch_size",
    "lr",
    "lr_milestones",
    "lr_factor",
    "momentum",
    "track_every",
    "R",
    "seed",
    "num_train",
    "checkpoint_every",
    "hessian_probes",
    "flatness_samples",
    "method",
    "regularizer",
    "gmp_samples",
    "gmp_sigma",
    "gmp_rho",
    "dgc_alpha",
    "dgc_initial_norm",
    "dgc_start_epoch",
)


def _config(args: argparse.Namespace, **overrides: Any):
    from jaxgen.experiments import train

    values: dict[str, Any] = dict(PRESETS.get(args.preset, {}))
    for name in _CONFIG_FIELDS:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = tuple(value) if name == "lr_milestones" else value
    values.update(overrides)
    return train.TrainConfig(**values)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxgen", description="Generalization of SGD (Wang & Mao, ICLR 2022).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = commands.add_parser("demo", help="Figures 1 and 2 at small scale on MNIST-1D")
    demo.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    demo.add_argument("--quick", action="store_true", help="a tiny version (for tests)")
    bound = commands.add_parser("bound", help="one training run with online bound tracking")
    _training_options(bound, out_default="runs/bound")
    sweep = commands.add_parser("sweep", help="Figure 1: bound and gap over widths or noise")
    _training_options(sweep, out_default="runs/sweep")
    swept = sweep.add_mutually_exclusive_group(required=True)
    swept.add_argument("--widths", type=_list_of(_positive_int))
    swept.add_argument("--noise-levels", type=_list_of(_unit))
    dispersion = commands.add_parser("dispersion", help="Figure 2: dispersion per epoch")
    _training_options(dispersion, out_default="runs/dispersion")
    return parser


def _print_result(console, result: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{result['model']} on {result['dataset']}, R = {result['R']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("optimizer", result["optimizer"]),
        (
            "train / test accuracy",
            f"{result['train_accuracy']:.3f} / {result['test_accuracy']:.3f}",
        ),
        ("train / test loss", f"{result['train_loss']:.4f} / {result['test_loss']:.4f}"),
        ("generalization gap (test − train loss)", f"{result['gap']:.4f}"),
        ("Σ_t λ_t² V_t  (V_t = dispersion / b)", f"{result['sum_lr2_variance']:.4e}"),
        (
            f"Tr H on {result['hessian_trace_examples']} train examples",
            f"{result['hessian_trace']:.3f} ± {result['hessian_trace_stderr']:.3f}",
        ),
        ("Eq. 2 bound", f"{result['eq2_bound']:.4f}"),
        ("Eq. 2, time-varying σ_t", f"{result['eq2_time_varying_bound']:.4f}"),
        ("Theorem 1 at σ*, measured flatness", f"{result['theorem1_bound']:.4f}"),
        ("Neu et al. 2021 at σ*", f"{result['neu2021_bound']:.4f}"),
    ]
    for key, label in (("theorem2_bound", "Theorem 2"), ("theorem3_bound", "Theorem 3")):
        if key in result:
            rows.append((label, f"{result[key]:.4f}"))
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(
        f"wrote {out}/result.json, metrics.csv, steps.npz, dispersion.png "
        f"({result['seconds']:.1f} s)"
    )


def _bound(args, console) -> None:
    from jaxgen.experiments import train

    config = _config(args)
    result = train.run(config, args.out, resume=args.resume, progress=not args.no_progress)
    _print_result(console, result, Path(args.out))


def _sweep(args, console) -> None:
    from jaxgen.experiments import report, train

    name, values = ("width", args.widths) if args.widths else ("label_noise", args.noise_levels)
    results = []
    for value in values:
        config = _config(args, **{name: value})
        out = Path(args.out) / f"{name}={value}"
        console.print(f"[bold]{name} = {value}[/bold]")
        result = train.run(config, out, resume=args.resume, progress=not args.no_progress)
        console.print(f"  gap {result['gap']:.4f}   Eq. 2 bound {result['eq2_bound']:.4f}")
        results.append(result)
    xlabel = "width" if name == "width" else "label noise"
    figure = report.sweep_figure(
        values,
        results,
        Path(args.out) / "figure1.png",
        xlabel=xlabel,
        title=f"{results[0]['model']} on {results[0]['dataset']}",
        log_x=name == "width",
    )
    summary = [
        {name: v, "gap": r["gap"], "eq2_bound": r["eq2_bound"]}
        for v, r in zip(values, results, strict=True)
    ]
    report.write_json_atomic(Path(args.out) / "sweep.json", {"swept": name, "runs": summary})
    console.print(f"wrote {figure}")


def _dispersion(args, console) -> None:
    from jaxgen.experiments import train

    config = _config(args)

    def on_epoch(epoch, row):
        console.print(
            f"epoch {epoch:4d}  dispersion {row['dispersion']:.4e}  "
            f"train acc {row['train_accuracy']:.3f}"
            f"  test acc {row['test_accuracy']:.3f}"
        )

    result = train.run(config, args.out, resume=args.resume, progress=False, on_epoch=on_epoch)
    console.print(f"wrote {Path(args.out) / 'dispersion.png'} (gap {result['gap']:.4f})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from rich.console import Console

    from jaxgen.experiments import data, train

    console = Console()
    commands = {"bound": _bound, "sweep": _sweep, "dispersion": _dispersion}
    try:
        if args.command == "demo":
            from jaxgen.experiments import demo

            demo.run(Path(args.out), quick=args.quick, console=console)
        else:
            commands[args.command](args, console)
    except (train.ConfigError, data.DatasetUnavailable) as error:
        print(f"jaxgen {args.command}: error: {error}", file=sys.stderr)
        return 2
    except train.TrainingDiverged as error:
        print(f"jaxgen {args.command}: stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
