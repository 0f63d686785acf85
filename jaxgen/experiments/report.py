"""Result files (written atomically: an interrupted run never leaves half a file) and
the figures of the paper (matplotlib figures drawn outside pyplot)."""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes 0600; files get the usual mode
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """``payload`` as JSON (NaN written as ``NaN``), atomically."""
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=True) + "\n"
    return write_text_atomic(path, text)


def write_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return write_bytes_atomic(path, buffer.getvalue())


def _figure(**kwargs: Any):
    """A figure outside pyplot: files are drawn without touching the global backend, so
    a notebook that runs jaxgen keeps plotting inline."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(figure, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return write_bytes_atomic(path, buffer.getvalue())


def dispersion_figure(epochs: Sequence[Any], path, *, title: str = "") -> Path:
    """Figure 2: gradient dispersion per epoch, with train and test accuracy.

    ``epochs``: rows with the fields of ``results.EpochMetrics``.
    """
    figure = _figure(figsize=(6, 3.5))
    left = figure.subplots()
    numbers = [row.epoch for row in epochs]
    left.plot(numbers, [row.dispersion for row in epochs], color="tab:red", label="dispersion")
    left.set_xlabel("epoch")
    left.set_ylabel("gradient dispersion (1/b) Σ‖g_i − ḡ‖²", color="tab:red")
    right = left.twinx()
    right.plot(
        numbers, [row.train_accuracy for row in epochs], color="tab:blue", label="train acc."
    )
    right.plot(numbers, [row.test_accuracy for row in epochs], color="tab:green", label="test acc.")
    if any(math.isfinite(row.train_accuracy_noisy) for row in epochs):
        right.plot(
            numbers,
            [row.train_accuracy_noisy for row in epochs],
            color="tab:blue",
            linestyle=":",
            label="train acc. (noisy labels)",
        )
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1.02)
    lines = left.get_lines() + right.get_lines()
    right.legend(lines, [line.get_label() for line in lines], loc="center right", fontsize=8)
    left.set_title(title)
    return _save(figure, path)


INSTRUMENT_LABELS = {
    "hessian_max": "top eigenvalue of H",
    "hessian_min": "smallest eigenvalue of H",
    "trace_per_parameter": "Tr H / P (SLQ)",
    "trace_sq_per_parameter": "Tr H² / P (SLQ)",
    "gsnr": "mean GSNR",
    "noise_scale": "noise scale B_simple",
    "norm_test": "norm test θ",
    "inner_product_test": "inner-product test θ",
    "tic": "TIC (diagonal)",
}


def instruments_figure(rows: Sequence[dict], path, *, title: str = "") -> Path:
    """One panel per measured instrument (``instruments.csv``'s columns) over epochs."""
    names = [name for name in INSTRUMENT_LABELS if name in rows[0]]
    columns = min(4, len(names))
    lines = -(-len(names) // columns)
    figure = _figure(figsize=(3.2 * columns, 2.6 * lines + 0.4), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).reshape(-1)
    epochs = [row["epoch"] for row in rows]
    for axis, name in zip(axes, names, strict=False):
        axis.plot(epochs, [row[name] for row in rows], "o-", markersize=3)
        axis.set_xlabel("epoch")
        axis.set_title(INSTRUMENT_LABELS[name], fontsize=9)
    for axis in axes[len(names) :]:
        axis.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def sweep_figure(
    values: Sequence[float],
    results: Sequence[Any],
    path,
    *,
    xlabel: str,
    title: str = "",
    log_x: bool = False,
) -> Path:
    """Figure 1: the Eq. 2 bound and the measured gap against a swept setting (log y).

    ``results``: ``RunResult`` values (or anything with ``eq2_bound`` and ``gap``).
    """
    figure = _figure(figsize=(5, 3.5))
    axis = figure.subplots()
    axis.plot(values, [r.eq2_bound for r in results], "o-", label="bound (Eq. 2)")
    axis.plot(values, [max(r.gap, 1e-6) for r in results], "s-", label="gap (test − train loss)")
    axis.set_yscale("log")
    if log_x:
        axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("generalization gap and bound (log scale)")
    axis.set_title(title)
    axis.legend()
    return _save(figure, path)


def result_table(result: Any):
    """A ``RunResult`` as a rich table: accuracies, losses, the gap and every bound."""
    from rich.table import Table

    table = Table(title=f"{result.model} on {result.dataset}, R = {result.R}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("optimizer", result.optimizer),
        ("train / test accuracy", f"{result.train_accuracy:.3f} / {result.test_accuracy:.3f}"),
        ("best test accuracy", f"{result.best_test_accuracy:.3f} (epoch {result.best_epoch})"),
        ("train / test loss", f"{result.train_loss:.4f} / {result.test_loss:.4f}"),
        ("generalization gap (test − train loss)", f"{result.gap:.4f}"),
        ("V_t", result.tracking),
    ]
    if result.sum_lr2_variance is not None:
        rows.append(("Σ_t λ_t² V_t  (V_t = dispersion / b)", f"{result.sum_lr2_variance:.4e}"))
    if result.hessian_trace is not None:
        rows.append(
            (
                f"Tr H on {result.hessian_trace_examples} train examples",
                f"{result.hessian_trace:.3f} ± {result.hessian_trace_stderr:.3f}",
            )
        )
    for name, label in (
        ("eq2_bound", "Eq. 2 bound"),
        ("eq2_time_varying_bound", "Eq. 2, time-varying σ_t"),
        ("theorem1_bound", "Theorem 1 at σ*, measured flatness"),
        ("neu2021_bound", "Neu et al. 2021 at σ*"),
        ("theorem2_bound", "Theorem 2"),
        ("theorem3_bound", "Theorem 3"),
    ):
        if getattr(result, name) is not None:
            rows.append((label, f"{getattr(result, name):.4f}"))
    for name, value in (result.instruments or {}).items():
        if name in INSTRUMENT_LABELS:
            epoch = result.instruments["epoch"]
            rows.append((f"{INSTRUMENT_LABELS[name]} (epoch {epoch})", f"{value:.4g}"))
    if result.privacy is not None:
        spent = result.privacy
        rows.append(
            (
                "privacy spent (Poisson sampling assumed, see result.json)",
                f"ε = {spent['epsilon']:.3g} at δ = {spent['delta']:g}",
            )
        )
    for row in rows:
        table.add_row(*row)
    return table


def comparison_figure(cells: Sequence[Any], path, *, title: str = "") -> Path:
    """Test (solid, mean ± std band over seeds) and train (dashed) accuracy per epoch, one
    panel per label-noise level, one colour per method (``compare.Cell`` values)."""
    levels = sorted({cell.label_noise for cell in cells})
    figure = _figure(figsize=(5 * len(levels), 3.5))
    axes = figure.subplots(1, len(levels), squeeze=False)
    labels = list(dict.fromkeys(cell.label for cell in cells))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for axis, level in zip(axes[0], levels, strict=True):
        for cell in (c for c in cells if c.label_noise == level):
            length = min(len(run.epochs) for run in cell.runs)
            test = np.array(
                [[row.test_accuracy for row in run.epochs[:length]] for run in cell.runs]
            )
            train = np.array(
                [[row.train_accuracy for row in run.epochs[:length]] for run in cell.runs]
            )
            epochs = np.arange(1, length + 1)
            colour = colours[cell.label]
            axis.plot(epochs, test.mean(0), color=colour, label=cell.label)
            axis.fill_between(
                epochs,
                test.mean(0) - test.std(0),
                test.mean(0) + test.std(0),
                color=colour,
                alpha=0.2,
                linewidth=0,
            )
            axis.plot(epochs, train.mean(0), color=colour, linestyle="--")
        axis.set_xlabel("epoch")
        axis.set_ylabel("accuracy (solid: test ± std, dashed: train)")
        axis.set_title(f"{title}, label noise {level}" if len(levels) > 1 else title)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(figure, path)
