"""``run``: one training run with the bounds of Wang & Mao (ICLR 2022) tracked online.

The story of a run: prepare the data, build the model and the method's step, restore
or start the state, train segment by segment (a segment ends at a checkpoint or an
epoch's end; each epoch ends with an evaluation on the full splits and an estimate of
``E‖H_z‖_F²``), then measure the final weights and write every bound (``result.json`` last). A
non-finite loss or weight stops the run and keeps the last good checkpoint; SIGINT or
SIGTERM stops it at the next safe point with a checkpoint of that step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import jaxgen
from jaxgen._sharding import to_host
from jaxgen.experiments import (
    augment,
    data,
    instruments,
    interrupts,
    methods,
    models,
    results,
    rng,
    task,
)
from jaxgen.experiments.callbacks import Callback
from jaxgen.experiments.checkpoint import Checkpoints
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.errors import ConfigError, OutputError, RunWarning, TrainingDiverged
from jaxgen.experiments.estimates import Estimates
from jaxgen.experiments.placement import Placement
from jaxgen.experiments.results import EpochMetrics, RunResult, StepLogs
from jaxgen.experiments.step import Evaluator, TrainState, make_segment, make_train_step


def prepare_data(config: TrainConfig) -> data.Dataset:
    """Load, subsample, make the regression task (Theorems 2/3) and add label noise."""
    dataset = data.load(config.dataset, data_dir=config.data_dir, seed=config.data_seed)
    if config.num_train is not None:
        if config.num_train > dataset.num_train:
            raise ConfigError(
                f"num_train must be <= the {dataset.num_train} training examples of "
                f"{config.dataset}, got {config.num_train}"
            )
        dataset = data.first(dataset, config.num_train)
    if models.SPECS[config.model].regression:
        dataset = data.binary_unit_norm(dataset)
    if config.label_noise > 0:
        noise = rng.numpy_rng(config.data_seed, rng.Stream.LABEL_NOISE)
        dataset = data.with_label_noise(
            dataset, config.label_noise, seed=noise, always_wrong=config.always_wrong
        )
    if config.batch_size > dataset.num_train:
        raise ConfigError(
            f"batch_size must be <= the {dataset.num_train} training examples, "
            f"got {config.batch_size}"
        )
    return dataset


def epoch_order(config: TrainConfig, epoch: int, n: int, steps_per_epoch: int) -> np.ndarray:
    """The minibatches of an epoch, (steps_per_epoch, b), from the seed and epoch alone."""
    permutation = np.random.default_rng([config.seed, epoch]).permutation(n)
    return permutation[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)


def run(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
    mesh: Mesh | None = None,
) -> RunResult:
    """Train ``config``; write ``result.json``, ``metrics.csv``, ``steps.npz`` and
    ``dispersion.png`` to ``out_dir``; return the ``RunResult``.

    ``mesh``: split every batch over its ``data`` axis (and GMP's perturbations over
    ``perturb``); the numbers are those of one device, within float32 rounding.

    SIGINT or SIGTERM (in the main thread) stops the run at the next safe point: it
    checkpoints the step it reached and raises ``interrupts.Interrupted`` (a
    ``KeyboardInterrupt``); ``resume=True`` then continues to the numbers of an
    uninterrupted run. A second signal acts at once (``interrupts.handled``).
    """
    with interrupts.handled():
        return _run(config, Path(out_dir), resume, callbacks, mesh)


def _run(config, out_dir: Path, resume: bool, callbacks: Sequence[Callback], mesh) -> RunResult:
    started = time.perf_counter()
    interrupts.phase("prepare")
    for notice in config.notices():
        warnings.warn(notice, RunWarning, stacklevel=3)
    _check_writable(out_dir)
    dataset = prepare_data(config)
    steps_per_epoch = dataset.num_train // config.batch_size
    lrs = config.learning_rates(steps_per_epoch)
    place = Placement(mesh, dataset, config.batch_size)
    parts = _assemble(config, dataset, lrs, steps_per_epoch, place.mesh)
    interrupts.check()

    interrupts.phase("restore")
    checkpoints = Checkpoints(out_dir / "checkpoints")
    try:
        state = place.state(parts.state)
        state, logs = _start(checkpoints, state, config, resume=resume, out_dir=out_dir)
        if parts.estimates is not None and not logs.frobenius:
            logs.frobenius.append(parts.estimates.hessian_frobenius_sq(state.params, 0))
        interrupts.check()
        state = _train(config, parts, place, dataset, state, logs, checkpoints, callbacks)
        _stop_if_interrupted(checkpoints, state, logs, config)

        interrupts.phase("estimates")
        final = None if parts.estimates is None else parts.estimates.final(state.params, lrs, logs)
        result = results.summarize(
            config,
            lrs,
            logs,
            final,
            n=dataset.num_train,
            version=jaxgen.__version__,
            tracking=parts.tracking,
        )
        result = dataclasses.replace(result, seconds=time.perf_counter() - started)
        _stop_if_interrupted(checkpoints, state, logs, config)
        interrupts.phase("write")
        title = f"{config.model} on {config.dataset}, noise {config.label_noise}"
        if place.writes_files:
            with _writing(checkpoints):
                results.write(out_dir, result, lrs, logs, title=title)
        return result
    finally:
        checkpoints.close()


def _train(config, parts, place, dataset, state, logs, checkpoints, callbacks) -> TrainState:
    """Train from ``state`` to the last step, segment by segment; return the final state."""
    steps_per_epoch = dataset.num_train // config.batch_size
    for callback in callbacks:
        callback.on_start(config.epochs * steps_per_epoch, int(state.step))
    epoch_started = time.perf_counter()
    try:
        for segment in _segments(config, int(state.step), steps_per_epoch, dataset.num_train):
            order = segment.order
            interrupts.phase("segment")
            state, metrics = parts.segment(state, place.batches(order))
            metrics = jax.tree_util.tree_map(place.host, metrics)
            _stop_if_diverged(state, metrics, segment, config, checkpoints)
            logs.extend(metrics)
            if segment.ends_epoch:
                interrupts.phase("evaluate")
                variances = logs.variances[-steps_per_epoch:]
                row = _evaluate(parts.evaluator, state, dataset, variances, segment.epoch, config)
                logs.epochs.append(row)
                if parts.instruments is not None and instruments.due(config, segment.epoch):
                    logs.instruments.append(parts.instruments.measure(state.params, segment.epoch))
                logs.epoch_seconds.append(time.perf_counter() - epoch_started)
                if parts.estimates is not None:
                    frobenius = parts.estimates.hessian_frobenius_sq(state.params, row.epoch)
                    logs.frobenius.append(frobenius)
                for callback in callbacks:
                    callback.on_epoch(row)
                epoch_started = time.perf_counter()
            if segment.checkpoint:
                _save(checkpoints, state, logs, config)
            dispersion = _nanmean(metrics.variance) * config.batch_size
            for callback in callbacks:
                callback.on_steps(
                    len(order),
                    epoch=segment.epoch + 1,
                    loss=float(metrics.loss[-1]),
                    dispersion=dispersion,
                )
            _stop_if_interrupted(checkpoints, state, logs, config)
    finally:
        for callback in callbacks:
            callback.on_end()
    for callback in callbacks:
        callback.on_trained(state)
    return state


def _save(checkpoints: Checkpoints, state: TrainState, logs, config: TrainConfig) -> None:
    interrupts.phase("checkpoint")
    with _writing(checkpoints):
        checkpoints.save(int(state.step), state, logs, config.as_dict())


def _stop_if_interrupted(checkpoints: Checkpoints, state: TrainState, logs, config) -> None:
    """At a safe point: if SIGINT or SIGTERM came, checkpoint this step and stop."""
    try:
        interrupts.check()
    except interrupts.Interrupted:
        if checkpoints.latest_step() != int(state.step):
            _save(checkpoints, state, logs, config)
        raise


class _Parts(NamedTuple):
    state: TrainState  # the initial state
    segment: Callable  # segment(state, batches) -> (state, StepMetrics over the batches)
    evaluator: Evaluator
    estimates: Estimates | None  # None without bounds
    tracking: str  # whether and how V_t is measured, for result.json
    instruments: instruments.Instruments | None  # None without --instruments


def _assemble(
    config: TrainConfig, dataset: data.Dataset, lrs, steps_per_epoch: int, mesh
) -> _Parts:
    """The model, the method's optimizer and step, the evaluator and the estimators."""
    spec = models.SPECS[config.model]
    model = _model(config, dataset)
    active_fraction = None
    if config.model == "two-layer-relu":
        fixed = model.model_state

        def active_fraction(params, x):
            return model.merge(params, fixed).active_fraction(x)

    optimizer = methods.optimizer(
        config.method,
        lrs,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
        key=rng.key(config.seed, rng.Stream.GMP),
        steps_per_epoch=steps_per_epoch,
        mesh=mesh,
    )
    train_step = make_train_step(
        model,
        optimizer,
        config.method,
        num_classes=0 if spec.regression else dataset.num_classes,
        track_every=config.track_every,
        dispersion_method=config.dispersion_method,
        augmentation=augment.resolve(config.augment, config.dataset, dataset.x_train.shape[1:]),
        active_fraction=active_fraction,
    )
    state = TrainState(
        jnp.zeros((), jnp.int32),
        model.params,
        optimizer.init(model.params),
        rng.key(config.seed, rng.Stream.STEP),
        model.model_state,
    )
    if model.per_example:
        every = "every step" if config.track_every == 1 else f"every {config.track_every} steps"
        source = (
            "from the clean minibatch gradient (the update uses the method's clipped one)"
            if config.method.per_example
            else "from the gradient the update uses"
        )
        tracking = (
            f"V_t measured {every} by gradient_dispersion (method {config.dispersion_method}) "
            + source
        )
    else:
        tracking = (
            f"V_t not measured: {config.model} trains with BatchNorm batch statistics, which "
            "give no per-example loss"
        )
    estimates = None
    if config.bounds:
        estimates = Estimates(config, dataset, model.loss_fn, active_fraction, mesh)
    tracked = None
    if config.instruments:
        tracked = instruments.Instruments(config, dataset, model.loss_fn, mesh)
    return _Parts(
        state,
        make_segment(train_step, scan=not spec.convolutional),
        Evaluator(model.predict, model.pointwise, task.correct),
        estimates,
        tracking,
        tracked,
    )


class _Segment(NamedTuple):
    start: int  # the global step the segment starts at
    epoch: int  # 0-based
    order: np.ndarray  # (steps, b) example indices
    ends_epoch: bool
    checkpoint: bool  # a checkpoint is due after it


def _segments(config: TrainConfig, start: int, steps_per_epoch: int, n: int):
    """The segments from step ``start`` on: each ends at a checkpoint or an epoch's end."""
    total = config.epochs * steps_per_epoch
    every = config.checkpoint_every or steps_per_epoch
    step = start
    while step < total:
        epoch, offset = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, offset + every - step % every)
        order = epoch_order(config, epoch, n, steps_per_epoch)[offset:end]
        after = step + len(order)
        yield _Segment(
            step, epoch, order, end == steps_per_epoch, after % every == 0 or after == total
        )
        step = after


def _model(config: TrainConfig, dataset: data.Dataset) -> task.Trainable:
    spec = models.SPECS[config.model]
    if spec.regression and config.method.needs_classes:
        raise ConfigError(
            f"method {config.method.name} needs a classifier; {config.model} is a regression "
            "model (Theorems 2 and 3)"
        )
    if spec.batchnorm and config.method.per_example:
        raise ConfigError(
            f"method {config.method.name} needs per-example gradients; {config.model} trains "
            "with BatchNorm batch statistics, which give no per-example loss"
        )
    if spec.batchnorm and config.instruments:
        raise ConfigError(
            f"instruments need per-example losses; {config.model} trains with BatchNorm "
            "batch statistics, which give none"
        )
    if spec.batchnorm and config.bounds:
        raise ConfigError(
            f"model {config.model} trains with BatchNorm batch statistics, so it has no "
            "per-example loss: V_t and the bounds cannot be measured; train it with "
            "`jaxgen train` (or --no-bounds)"
        )
    try:
        model = models.build(
            config.model,
            dataset.x_train.shape[1:],
            dataset.num_classes,
            config.width,
            seed=config.seed,
            dropout=config.method.model_dropout,
        )
        return task.trainable(config.model, model)
    except ValueError as error:
        raise ConfigError(str(error)) from error  # it names the model


def _start(checkpoints: Checkpoints, state: TrainState, config: TrainConfig, *, resume, out_dir):
    """The initial state and logs, or those of the newest checkpoint with ``resume``."""
    if not resume and checkpoints.latest_step() is not None:
        raise ConfigError(
            f"{out_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose another --out"
        )
    if resume:
        restored = checkpoints.restore(state, config.as_dict())
        if restored is not None:
            return restored
    return state, StepLogs()


def _stop_if_diverged(state, metrics, segment, config, checkpoints: Checkpoints) -> None:
    losses = np.asarray(metrics.loss, np.float64)
    finite = jax.tree_util.tree_map(lambda leaf: jnp.all(jnp.isfinite(leaf)), state.params)
    weights_finite = all(bool(to_host(x)) for x in jax.tree_util.tree_leaves(finite))
    if np.all(np.isfinite(losses)) and weights_finite:
        return
    first = np.flatnonzero(~np.isfinite(losses))
    bad = segment.start + (int(first[0]) + 1 if first.size else len(losses))
    kept = checkpoints.latest_step()
    where = f"; its last finite checkpoint (step {kept}) stays in {checkpoints.directory}"
    raise TrainingDiverged(
        f"non-finite training loss or weights at step {bad} (epoch {segment.epoch + 1}). "
        "A run keeps one learning-rate schedule from its first step (the bounds sum over "
        f"it), so it cannot go on at a lower rate: start over with a lower --lr (this run: "
        f"{config.lr}) and another --out" + (where if kept is not None else "")
    )


def _check_writable(out_dir: Path) -> None:
    """Refuse, before training, an output folder that cannot be made or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as error:
        cause = error.strerror or type(error).__name__
        raise ConfigError(f"--out {out_dir}: cannot write there ({cause})") from error


@contextlib.contextmanager
def _writing(checkpoints: Checkpoints):
    """Turn a failed write into an ``OutputError`` that names the file and what survives."""
    try:
        yield
    except (OSError, ValueError) as error:
        where, cause = _os_failure(error)
        if cause is None:
            raise
        where = where or checkpoints.directory.parent
        kept = checkpoints.latest_step()
        survives = (
            f"the checkpoint of step {kept} in {checkpoints.directory} is intact: make room "
            "and run the same command with --resume"
            if kept is not None
            else "no checkpoint was written"
        )
        raise OutputError(f"could not write {where}: {cause}; {survives}") from error


def _os_failure(error: Exception) -> tuple[str | None, str | None]:
    """``(file, cause)`` of a failed write: an ``OSError``, or TensorStore's ``ValueError``
    that carries an OS error code; ``(None, None)`` for anything else."""
    if isinstance(error, OSError):
        return error.filename, error.strerror or str(error)
    code = re.search(r"os_error_code='(\d+)'", str(error))
    if code is None:
        return None, None
    path = re.search(r'"(/[^"]+)"', str(error))
    return (path.group(1) if path else None), os.strerror(int(code.group(1)))


def _nanmean(values) -> float:
    """The mean of the finite values (untracked steps are NaN); NaN if there are none."""
    values = np.asarray(values, np.float64)
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def _evaluate(evaluator, state, dataset, variances, epoch: int, config) -> EpochMetrics:
    """The full splits at the end of ``epoch``; ``variances``: the epoch's ``V_t``."""
    params, model_state = state.params, state.model_state
    train_losses, train_correct = evaluator(params, model_state, dataset.x_train, dataset.y_train)
    test_losses, test_correct = evaluator(params, model_state, dataset.x_test, dataset.y_test)
    noisy = dataset.noisy_mask
    return EpochMetrics(
        epoch=epoch + 1,
        train_loss=float(train_losses.mean()),
        test_loss=float(test_losses.mean()),
        train_accuracy=float(train_correct.mean()),
        test_accuracy=float(test_correct.mean()),
        train_accuracy_clean=float(train_correct[~noisy].mean()) if (~noisy).any() else math.nan,
        train_accuracy_noisy=float(train_correct[noisy].mean()) if noisy.any() else math.nan,
        dispersion=_nanmean(variances) * config.batch_size,
    )
