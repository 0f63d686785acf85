"""Methods side by side on the same data and seeds: the paper's GMP and clipping tables.

``run`` trains every method (and every label-noise level, if several) for every seed in
``OUT/<method>[/noise=<p>]/seed=<s>`` and writes ``compare.csv``, ``compare.md`` and
``compare.png``: best and final test accuracy as mean ± std over the seeds, time per
epoch, the paper's number where its table has the dataset, model and method, and each
method against ERM with the difference called unresolved when it is within twice its
standard error. A run already finished in its folder is reused, and one with
checkpoints is resumed, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxgen.experiments import loop, paper, report
from jaxgen.experiments.callbacks import Callback
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.errors import ConfigError
from jaxgen.experiments.methods import Method
from jaxgen.experiments.results import RunResult


class Cell(NamedTuple):
    """One method at one label-noise level, with a run per seed."""

    label: str  # as given in --methods, e.g. "gmp:samples=10"
    label_noise: float
    runs: list[RunResult]


class Row(NamedTuple):
    """A cell's line of ``compare.csv`` (accuracies in %)."""

    method: str
    label_noise: float
    seeds: int
    best_mean: float
    best_std: float
    final_mean: float
    final_std: float
    seconds_per_epoch: float
    paper_mean: float
    paper_std: float


def run_or_reuse(
    config: TrainConfig, folder: Path, *, callbacks: Sequence[Callback] = (), mesh: Any = None
) -> RunResult:
    """The finished run in ``folder`` if it has ``config``; else train (resuming)."""
    if (folder / "result.json").is_file():
        stored = RunResult.read(folder)
        if stored.config != config.as_dict():
            raise ConfigError(
                f"{folder} holds a finished run with other settings; use another --out"
            )
        return stored
    checkpoints = folder / "checkpoints"
    resume = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    return loop.run(config, folder, resume=resume, callbacks=callbacks, mesh=mesh)


def seeds(config: TrainConfig, count: int) -> list[int]:
    """``count`` seeds from ``config.seed`` on."""
    return [config.seed + i for i in range(count)]


def run_seeds(
    config: TrainConfig,
    count: int,
    out: Path,
    *,
    callbacks: Callable[[], Sequence[Callback]] = tuple,
    say: Callable[[str], None] = print,
    mesh: Any = None,
) -> list[RunResult]:
    """``config`` for ``count`` seeds, in ``out/seed=<s>``."""
    runs = []
    for seed in seeds(config, count):
        say(f"{out.name} seed {seed}")
        runs.append(
            run_or_reuse(
                dataclasses.replace(config, seed=seed), out / f"seed={seed}", callbacks=callbacks()
            )  # fmt: skip
        )
    return runs


def run(
    config: TrainConfig,
    entries: Sequence[tuple[str, Method]],
    count: int,
    out: str | Path,
    *,
    noise_levels: Sequence[float] | None = None,
    callbacks: Callable[[], Sequence[Callback]] = tuple,
    say: Callable[[str], None] = print,
    mesh: Any = None,
) -> list[Cell]:
    """Every method (× noise level) × seed; writes the table, CSV and figure."""
    out = Path(out)
    levels = list(noise_levels) if noise_levels else [config.label_noise]
    cells = []
    for label, method in entries:
        for noise in levels:
            folder = out / label.replace(":", "_")
            if noise_levels:
                folder = folder / f"noise={noise}"
            settings = dataclasses.replace(config, method=method, label_noise=noise)
            runs = run_seeds(settings, count, folder, callbacks=callbacks, say=say, mesh=mesh)
            cells.append(Cell(label, noise, runs))
    rows = [row(config, cell) for cell in cells]
    report.write_text_atomic(out / "compare.csv", _csv(rows))
    report.write_text_atomic(out / "compare.md", markdown(config, rows, count))
    report.comparison_figure(cells, out / "compare.png", title=_title(config))
    return cells


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    std = float(values.std(ddof=1)) if values.size > 1 else math.nan
    return float(values.mean()), std


def row(config: TrainConfig, cell: Cell) -> Row:
    best = _mean_std([100 * r.best_test_accuracy for r in cell.runs])
    final = _mean_std([100 * r.test_accuracy for r in cell.runs])
    per_epoch = float(np.nanmean([r.seconds_per_epoch for r in cell.runs]))
    reported = paper.reported(config.model, config.dataset, cell.label) or (math.nan, math.nan)
    return Row(cell.label, cell.label_noise, len(cell.runs), *best, *final, per_epoch, *reported)


def _csv(rows: Sequence[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(Row._fields)
    writer.writerows(rows)
    return buffer.getvalue()


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.2f}" if math.isnan(std) else f"{mean:.2f} ± {std:.2f}"


def versus(row: Row, baseline: Row) -> str:
    """The best-accuracy difference to ``baseline``, resolved only beyond 2 standard errors."""
    difference = row.best_mean - baseline.best_mean
    if row.seeds < 2 or baseline.seeds < 2:
        return f"{difference:+.2f} points (one seed: unresolved)"
    error = math.sqrt(row.best_std**2 / row.seeds + baseline.best_std**2 / baseline.seeds)
    if abs(difference) <= 2 * error:
        return f"{difference:+.2f} ± {error:.2f} points: within the seeds' spread, unresolved"
    direction = "better" if difference > 0 else "worse"
    return f"{difference:+.2f} ± {error:.2f} points: {direction} beyond two standard errors"


def _title(config: TrainConfig) -> str:
    return f"{config.model} (width {config.width}) on {config.dataset}"


def markdown(config: TrainConfig, rows: Sequence[Row], count: int) -> str:
    """``compare.md``: the setting, the table, each method against ERM."""
    schedule = ""
    if config.lr_milestones:
        milestones = ", ".join(map(str, config.lr_milestones))
        schedule = f" (×{config.lr_factor} at epochs {milestones})"
    lines = [
        f"# Comparison: {_title(config)}",
        "",
        f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}{schedule}, "
        f"{config.optimizer_description.split(', with ')[0]}, augmentation {config.augment}; "
        f"{count} seed(s) from {config.seed}. Test accuracy in %, mean ± std over the seeds "
        "(best: over the epochs' evaluations, the metric of the paper's tables).",
        "",
        "| method | label noise | seeds | best test acc. | final test acc. | s / epoch "
        "| paper (best, 10 runs) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.method} | {r.label_noise} | {r.seeds} | {_pm(r.best_mean, r.best_std)} | "
            f"{_pm(r.final_mean, r.final_std)} | {r.seconds_per_epoch:.2f} | "
            f"{_pm(r.paper_mean, r.paper_std)} |"
        )
    baselines = {r.label_noise: r for r in rows if r.method == "erm"}
    against = [
        f"- {r.method} (noise {r.label_noise}): {versus(r, baselines[r.label_noise])}"
        for r in rows
        if r.method != "erm" and r.label_noise in baselines
    ]
    if against:
        lines += ["", "Best test accuracy against ERM at the same label noise:", "", *against]
    return "\n".join([*lines, ""])


def summary(runs: Sequence[RunResult]) -> dict[str, Any]:
    """Mean ± std of best and final test accuracy (``jaxgen train --seeds``)."""
    best = _mean_std([r.best_test_accuracy for r in runs])
    final = _mean_std([r.test_accuracy for r in runs])
    return {
        "seeds": [r.config["seed"] for r in runs],
        "best_test_accuracy": {"mean": best[0], "std": best[1]},
        "test_accuracy": {"mean": final[0], "std": final[1]},
    }
