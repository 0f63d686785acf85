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
from jaxgen.experiments import report

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

    def extend(self, metrics) -> None:
        """Append a segment's ``StepMetrics`` (arrays over its steps)."""
        self.losses += np.asarray(metrics.loss, np.float64).tolist()
        self.variances += np.asarray(metrics.variance, np.float64).tolist()
        self.weighted += np.asarray(metrics.weighted_loss, np.float64).tolist()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"epochs": [row._asdict() for row in self.epochs]}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> StepLogs:
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
    test − train loss. ``sum_lr2_variance = Σ_t λ_t² V_t``. ``epochs`` (the rows of
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
    sum_lr2_variance: float
    hessian_trace: float
    hessian_trace_stderr: float
    hessian_trace_examples: int
    optimal_sigma: float
    flatness: float
    flatness_stderr: float
    eq2_bound: float
    eq2_time_varying_bound: float
    theorem1_bound: float
    neu2021_bound: float
    neu2021_sensitivity: str
    dispersion_method: str
    config: dict[str, Any]
    jaxgen_version: str
    seconds: float = math.nan
    theorem2_bound: float | None = None  # linear model only
    theorem3_bound: float | None = None  # two-layer ReLU only
    final_active_fraction: float | None = None  # two-layer ReLU only
    epochs: tuple[EpochMetrics, ...] = dataclasses.field(default=(), compare=False)

    _OPTIONAL = ("theorem2_bound", "theorem3_bound", "final_active_fraction")

    def to_json(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del values["epochs"]
        return {k: v for k, v in values.items() if not (k in self._OPTIONAL and v is None)}

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
    config, learning_rates, logs: StepLogs, estimates: FinalEstimates, *, n: int, version: str
) -> RunResult:
    """Every bound of the run from its logs and final estimates (``config``: TrainConfig)."""
    final = logs.epochs[-1]  # the full splits at the final weights
    lrs = jnp.asarray(learning_rates)
    variances = jnp.asarray(filled_variances(logs.variances))
    R, steps = config.R, len(learning_rates)
    trace, flatness, sigma = estimates.hessian_trace, estimates.flatness, estimates.sigma
    steps_per_epoch = steps // config.epochs
    frobenius = np.repeat(np.asarray(logs.frobenius[: config.epochs]), steps_per_epoch)
    sensitivities = jnp.asarray(2.0 * np.arange(steps) * sigma**2 * frobenius)

    def second_order(bound, *args, **kwargs) -> float:
        """A bound that needs ``Tr H > 0`` (through σ* or directly); NaN otherwise."""
        return float(bound(*args, R=R, n=n, **kwargs)) if curved(trace) else math.nan

    theorem2 = theorem3 = None
    if config.model == "linear":
        theorem2 = float(bounds.linear_network(lrs, jnp.asarray(logs.losses), R=R, n=n))
    if estimates.active_fraction is not None:
        theorem3 = float(
            bounds.two_layer_relu(
                lrs, jnp.asarray(logs.weighted), estimates.active_fraction, R=R, n=n
            )
        )
    return RunResult(
        dataset=config.dataset,
        model=config.model,
        width=config.width,
        label_noise=config.label_noise,
        optimizer=config.optimizer_description,
        R=R,
        n=n,
        batch_size=config.batch_size,
        num_steps=steps,
        track_every=config.track_every,
        train_loss=final.train_loss,
        test_loss=final.test_loss,
        train_accuracy=final.train_accuracy,
        test_accuracy=final.test_accuracy,
        gap=final.test_loss - final.train_loss,
        sum_lr2_variance=float(np.sum(np.asarray(learning_rates) ** 2 * np.asarray(variances))),
        hessian_trace=float(trace.value),
        hessian_trace_stderr=float(trace.stderr),
        hessian_trace_examples=estimates.trace_examples,
        optimal_sigma=sigma,
        flatness=float(flatness.value),
        flatness_stderr=float(flatness.stderr),
        eq2_bound=second_order(bounds.eq2, lrs, variances, trace),
        eq2_time_varying_bound=second_order(bounds.eq2_time_varying, lrs, variances, trace),
        theorem1_bound=second_order(bounds.theorem1, lrs, sigma, variances, flatness=flatness),
        neu2021_bound=second_order(
            bounds.neu2021, lrs, sigma, sensitivities, variances, flatness=flatness
        ),
        neu2021_sensitivity=NEU2021_SENSITIVITY,
        dispersion_method=config.dispersion_method,
        config=config.as_dict(),
        jaxgen_version=version,
        theorem2_bound=theorem2,
        theorem3_bound=theorem3,
        final_active_fraction=estimates.active_fraction,
        epochs=tuple(logs.epochs),
    )


def write(out_dir: Path, result: RunResult, learning_rates, logs: StepLogs, *, title: str) -> None:
    """``result.json``, ``metrics.csv``, ``steps.npz`` and ``dispersion.png``, atomically."""
    report.write_json_atomic(out_dir / "result.json", result.to_json())
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
