"""A run's records and its result: step logs → ``RunResult`` (every bound) → files.

At the end of a run: ``Tr H`` on n/10 training examples, the Monte Carlo flatness term,
and every bound of Wang & Mao (ICLR 2022): Eq. 2, its time-varying form, Theorem 1 at the
optimal σ with the measured flatness, Neu et al. (COLT 2021) at the same σ, and Theorems
2 and 3 for the models they are about. ``result.json`` holds the ``RunResult`` (its
keys are the field names), ``metrics.csv`` its per-epoch rows, ``steps.npz`` the logs.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxgen import bounds
from jaxgen.experiments import instruments, report

NEU2021_SENSITIVITY = (
    "second order: Ψ_t = 2(t−1)σ*² E‖H_z‖_F², E‖H_z‖_F² by "
    "Hutchinson on 64 training examples at the start of each epoch"
)


class EpochMetrics(NamedTuple):
    """One row of ``metrics.csv``: the full splits evaluated at the end of an epoch."""

    epoch: int
    train_loss: float
    test_loss: float
    train_accuracy: float
    test_accuracy: float
    train_accuracy_clean: float  # on the training examples whose label was kept
    train_accuracy_noisy: float  # on those whose label was changed (NaN without noise)
    dispersion: float  # the epoch's mean dispersion b·V_t over its tracked steps


@dataclasses.dataclass
class StepLogs:
    """Per-step and per-epoch records: what a checkpoint stores besides the state."""

    losses: list[float] = dataclasses.field(default_factory=list)
    variances: list[float] = dataclasses.field(default_factory=list)
    weighted: list[float] = dataclasses.field(default_factory=list)
    frobenius: list[float] = dataclasses.field(default_factory=list)  # per epoch start
    epochs: list[EpochMetrics] = dataclasses.field(default_factory=list)
    epoch_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time each
    instruments: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # measured

    def extend(self, metrics) -> None:
        """Append a segment's ``StepMetrics`` (arrays over its steps)."""
        self.losses += np.asarray(metrics.loss, np.float64).tolist()
        self.variances += np.asarray(metrics.variance, np.float64).tolist()
        self.weighted += np.asarray(metrics.weighted_loss, np.float64).tolist()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"epochs": [row._asdict() for row in self.epochs]}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StepLogs:
        values = {"instruments": []} | values  # checkpoints from before the instruments
        return cls(**values | {"epochs": [EpochMetrics(**row) for row in values["epochs"]]})


def filled_variances(variances: Any) -> np.ndarray:
    """``V_t`` for every step: untracked steps (NaN) take the last tracked value."""
    values = np.asarray(variances, np.float64)
    index = np.where(np.isfinite(values), np.arange(values.size), 0)
    np.maximum.accumulate(index, out=index)
    return values[index]


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The outcome of one run; ``to_json`` gives the keys of ``result.json``.

    Losses and accuracies are those of the final weights on the full splits; ``gap`` is
    test − train loss; ``best_test_accuracy`` is the best over the epochs' evaluations
    (the metric of the paper's GMP tables). ``tracking`` says whether and how ``V_t``
    was measured. ``sum_lr2_variance = Σ_t λ_t² V_t`` (``None`` when ``V_t`` was not
    measured) and the bound fields are ``None`` (absent from ``result.json``) when the
    run did not estimate them (``bounds`` off). ``epochs`` (the rows of
    ``metrics.csv``) is not part of ``result.json``.
    """

    dataset: str
    model: str
    width: int
    label_noise: float
    optimizer: str
    R: float
    n: int
    batch_size: int
    num_steps: int
    track_every: int
    train_loss: float
    test_loss: float
    train_accuracy: float
    test_accuracy: float
    gap: float
    best_test_accuracy: float
    best_epoch: int
    tracking: str
    dispersion_method: str
    config: dict[str, Any]
    jaxgen_version: str
    sum_lr2_variance: float | None = None
    hessian_trace: float | None = None
    hessian_trace_stderr: float | None = None
    hessian_trace_examples: int | None = None
    optimal_sigma: float | None = None
    flatness: float | None = None
    flatness_stderr: float | None = None
    eq2_bound: float | None = None
    eq2_time_varying_bound: float | None = None
    theorem1_bound: float | None = None
    neu2021_bound: float | None = None
    neu2021_sensitivity: str | None = None
    theorem2_bound: float | None = None  # linear model only
    theorem3_bound: float | None = None  # two-layer ReLU only
    final_active_fraction: float | None = None  # two-layer ReLU only
    privacy: dict[str, Any] | None = None  # DP-SGD: ε, δ, σ, q, steps, accountant, sampling
    instruments: dict[str, Any] | None = None  # the last measurement of each instrument
    seconds: float = dataclasses.field(default=math.nan, compare=False)
    seconds_per_epoch: float = dataclasses.field(default=math.nan, compare=False)
    epochs: tuple[EpochMetrics, ...] = dataclasses.field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["epochs"]
        return {k: v for k, v in values.items() if v is not None}

    @classmethod
    def read(cls, out_dir: str | Path) -> RunResult:
        """A finished run's result from its ``result.json`` and ``metrics.csv``."""
        out_dir = Path(out_dir)
        values = json.loads((out_dir / "result.json").read_text())
        with open(out_dir / "metrics.csv") as stream:
            rows = [
                EpochMetrics(int(float(row.pop("epoch"))), **{k: float(v) for k, v in row.items()})
                for row in csv.DictReader(stream)
            ]
        return cls(**values, epochs=tuple(rows))


class FinalEstimates(NamedTuple):
    """The curvature and flatness measured at the final weights (``loop.py``)."""

    hessian_trace: Any  # jaxgen.TraceEstimate
    trace_examples: int
    flatness: Any  # jaxgen.MonteCarloEstimate
    sigma: float  # the optimal σ of Eq. 2
    active_fraction: float | None  # Theorem 3's final Σ_r I{W_rᵀ x >= 0}/m, averaged


def curved(trace) -> bool:
    """Whether a ``Tr H`` estimate is > 0, as the second-order bounds need (a Hutchinson
    estimate at a saddle or from few probes can be <= 0: those bounds are then NaN)."""
    value = float(getattr(trace, "value", trace))
    return math.isfinite(value) and value > 0


def optimal_sigma(config, learning_rates, logs: StepLogs, trace, n: int) -> float:
    """σ* of Eq. 2 (NaN when ``Tr H`` is not positive)."""
    if not curved(trace):
        return math.nan
    variances = jnp.asarray(filled_variances(logs.variances))
    return float(
        bounds.optimal_sigma(jnp.asarray(learning_rates), variances, trace, R=config.R, n=n)
    )


def summarize(
    config,
    learning_rates,
    logs: StepLogs,
    estimates: FinalEstimates | None,
    *,
    n: int,
    version: str,
    tracking: str,
) -> RunResult:
    """The run's result from its logs (``config``: TrainConfig); with ``estimates`` (the
    final ``Tr H`` and flatness), every bound too."""
    final = logs.epochs[-1]  # the full splits at the final weights
    best = max(logs.epochs, key=lambda row: row.test_accuracy)
    lrs = jnp.asarray(learning_rates)
    variances = filled_variances(logs.variances)
    tracked = bool(np.isfinite(variances).all())
    result = RunResult(
        dataset=config.dataset,
        model=config.model,
        width=config.width,
        label_noise=config.label_noise,
        optimizer=config.optimizer_description,
        R=config.R,
        n=n,
        batch_size=config.batch_size,
        num_steps=len(learning_rates),
        track_every=config.track_every,
        train_loss=final.train_loss,
        test_loss=final.test_loss,
        train_accuracy=final.train_accuracy,
        test_accuracy=final.test_accuracy,
        gap=final.test_loss - final.train_loss,
        best_test_accuracy=best.test_accuracy,
        best_epoch=best.epoch,
        tracking=tracking,
        dispersion_method=config.dispersion_method,
        config=config.as_dict(),
        jaxgen_version=version,
        sum_lr2_variance=(
            float(np.sum(np.asarray(learning_rates) ** 2 * variances)) if tracked else None
        ),
        seconds_per_epoch=float(np.mean(logs.epoch_seconds)) if logs.epoch_seconds else math.nan,
        epochs=tuple(logs.epochs),
        privacy=config.method.privacy(n=n, batch_size=config.batch_size, steps=len(learning_rates)),
        instruments=instruments.final_values(logs.instruments) or None,
    )
    if estimates is None or not tracked:
        return result
    return dataclasses.replace(result, **_bounds(config, lrs, logs, estimates, n))


def _bounds(config, lrs, logs: StepLogs, estimates: FinalEstimates, n: int) -> dict[str, Any]:
    """Every bound from the logged ``λ_t``, ``V_t`` and losses and the final estimates."""
    variances = jnp.asarray(filled_variances(logs.variances))
    R, steps = config.R, lrs.shape[0]
    trace, flatness, sigma = estimates.hessian_trace, estimates.flatness, estimates.sigma
    frobenius = np.repeat(np.asarray(logs.frobenius[: config.epochs]), steps // config.epochs)
    sensitivities = jnp.asarray(2.0 * np.arange(steps) * sigma**2 * frobenius)

    def second_order(bound, *args, **kwargs) -> float:
        """A bound that needs ``Tr H > 0`` (through σ* or directly); NaN otherwise."""
        return float(bound(*args, R=R, n=n, **kwargs)) if curved(trace) else math.nan

    values = {
        "hessian_trace": float(trace.value),
        "hessian_trace_stderr": float(trace.stderr),
        "hessian_trace_examples": estimates.trace_examples,
        "optimal_sigma": sigma,
        "flatness": float(flatness.value),
        "flatness_stderr": float(flatness.stderr),
        "eq2_bound": second_order(bounds.eq2, lrs, variances, trace),
        "eq2_time_varying_bound": second_order(bounds.eq2_time_varying, lrs, variances, trace),
        "theorem1_bound": second_order(bounds.theorem1, lrs, sigma, variances, flatness=flatness),
        "neu2021_bound": second_order(
            bounds.neu2021, lrs, sigma, sensitivities, variances, flatness=flatness
        ),
        "neu2021_sensitivity": NEU2021_SENSITIVITY,
    }
    if config.model == "linear":
        losses = jnp.asarray(logs.losses)
        values["theorem2_bound"] = float(bounds.linear_network(lrs, losses, R=R, n=n))
    if estimates.active_fraction is not None:
        weighted, active = jnp.asarray(logs.weighted), estimates.active_fraction
        values["theorem3_bound"] = float(bounds.two_layer_relu(lrs, weighted, active, R=R, n=n))
        values["final_active_fraction"] = active
    return values


def write(out_dir: Path, result: RunResult, learning_rates, logs: StepLogs, *, title: str) -> None:
    """``metrics.csv``, ``steps.npz``, ``dispersion.png`` and ``result.json``, each
    atomically; ``result.json`` last, so that it marks a finished run."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(EpochMetrics._fields)
    writer.writerows(logs.epochs)
    report.write_text_atomic(out_dir / "metrics.csv", buffer.getvalue())
    report.write_npz_atomic(
        out_dir / "steps.npz",
        lrs=np.asarray(learning_rates),
        losses=np.asarray(logs.losses),
        variances=np.asarray(logs.variances),
        weighted_losses=np.asarray(logs.weighted),
        hessian_frobenius_sq=np.asarray(logs.frobenius),
    )
    report.dispersion_figure(logs.epochs, out_dir / "dispersion.png", title=title)
    if logs.instruments:
        write_instruments(out_dir, logs.instruments, title=title)
    report.write_json_atomic(out_dir / "result.json", result.to_json())


def read_instruments(out_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's ``instruments.csv`` (``[]`` when it measured none)."""
    path = Path(out_dir) / "instruments.csv"
    if not path.is_file():
        return []
    with open(path) as stream:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]


def write_instruments(out_dir: Path, rows: list[dict[str, Any]], *, title: str) -> None:
    """``instruments.csv`` (one row per measured epoch), ``instruments.npz`` (the SLQ
    nodes and weights per measured epoch, when measured) and ``instruments.png``."""
    names = instruments.columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(names)
    writer.writerows([[row.get(name, math.nan) for name in names] for row in rows])
    report.write_text_atomic(out_dir / "instruments.csv", buffer.getvalue())
    series = {k: np.asarray([row[k] for row in rows]) for k in instruments.SERIES if k in rows[0]}
    if series:
        epochs = np.asarray([row["epoch"] for row in rows])
        report.write_npz_atomic(out_dir / "instruments.npz", epochs=epochs, **series)
    report.instruments_figure(rows, out_dir / "instruments.png", title=title)
