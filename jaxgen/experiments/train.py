"""SGD training with the bounds of Wang & Mao (ICLR 2022) tracked online.

One jitted step computes the minibatch loss, the mean gradient and the gradient
dispersion in one call of ``jaxgen.gradient_dispersion`` and updates with that same
mean gradient, so tracking costs no extra gradient pass. ``V_t = dispersion / b`` at
``W_{t-1}`` is logged with the step's learning rate; with ``track_every = K`` it is
measured every K-th step and held constant in between.

At the end: ``Tr H`` on n/10 training examples, the Monte Carlo flatness term, and every
bound: Eq. 2, Theorem 1 at the optimal σ with the measured flatness, Neu et al. at the
same σ, and Theorems 2 and 3 for the models they are about. Runs checkpoint with orbax
and resume to the same numbers; a non-finite loss stops the run, keeping the last good
checkpoint.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgen
from jaxgen import bounds
from jaxgen._hessian import rademacher_like
from jaxgen._per_example import mean_loss
from jaxgen.experiments import data, models, report

METHODS = ("auto", "ghost", "vmap")
REGULARIZERS = ("none", "gmp", "dgc")


class ConfigError(ValueError):
    """A run's configuration cannot work (bad value, incompatible model and data)."""


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (and nothing else: resuming checks it matches)."""

    dataset: str = "mnist1d"
    model: str = "mlp"
    width: int = 512
    label_noise: float = 0.0
    always_wrong: bool = False
    epochs: int = 20
    batch_size: int = 60
    lr: float = 0.01
    lr_milestones: tuple[int, ...] = ()
    lr_factor: float = 0.1
    momentum: float = 0.0
    track_every: int = 1
    R: float = 0.1
    seed: int = 0
    data_seed: int = 42
    num_train: int | None = None
    checkpoint_every: int = 0
    hessian_probes: int = 100
    flatness_samples: int = 32
    method: str = "auto"
    data_dir: str | None = None
    regularizer: str = "none"
    gmp_samples: int = 3
    gmp_sigma: float = 0.03
    gmp_rho: float = 0.5
    dgc_initial_norm: float = 50.0
    dgc_alpha: float = 0.1
    dgc_start_epoch: int = 15

    def __post_init__(self):
        positive_ints = ("width", "epochs", "batch_size", "track_every", "hessian_probes")
        for name in (*positive_ints, "flatness_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "R"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0.0 <= self.label_noise <= 1.0:
            raise ConfigError(f"label_noise must lie in [0, 1], got {self.label_noise!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if self.dgc_start_epoch < 0:
            raise ConfigError(f"dgc_start_epoch must be >= 0, got {self.dgc_start_epoch!r}")
        if not self.lr_factor > 0:
            raise ConfigError(f"lr_factor must be > 0, got {self.lr_factor!r}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")
        if self.num_train is not None and self.num_train < 1:
            raise ConfigError(f"num_train must be >= 1, got {self.num_train!r}")
        if self.dataset not in data.DATASETS:
            raise ConfigError(
                f"dataset must be one of {', '.join(data.DATASETS)}, got {self.dataset!r}"
            )
        if self.model not in models.MODELS:
            raise ConfigError(
                f"model must be one of {', '.join(models.MODELS)}, got {self.model!r}"
            )
        if self.regularizer not in REGULARIZERS:
            raise ConfigError(
                f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}"
            )
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    @property
    def optimizer_description(self) -> str:
        if self.momentum == 0:
            text = "plain SGD (no momentum: the setting of the theory)"
        else:
            text = f"SGD with momentum {self.momentum} (the bounds assume plain SGD)"
        if self.regularizer == "gmp":
            text += (
                f", with GMP (k={self.gmp_samples}, σ={self.gmp_sigma}, ρ={self.gmp_rho}; "
                "V_t is that of the clean minibatch gradient)"
            )
        elif self.regularizer == "dgc":
            text += (
                f", with dynamic gradient clipping (α={self.dgc_alpha}, "
                f"G₀={self.dgc_initial_norm}, from epoch {self.dgc_start_epoch})"
            )
        return text

    def optimizer(self, steps_per_epoch: int) -> optax.GradientTransformation:
        """Plain SGD (``momentum`` and the milestones if set), after the regularizer.

        The step sizes are ``learning_rates``, the same array the logs and bounds use.
        """
        rates = jnp.asarray(learning_rates(self, steps_per_epoch), jnp.float32)

        def schedule(count):
            return rates[jnp.minimum(count, rates.size - 1)]

        sgd = optax.sgd(schedule, momentum=self.momentum or None)
        if self.regularizer == "gmp":
            key = jax.random.PRNGKey(self.seed + 3)
            gmp = jaxgen.gmp(
                self.gmp_samples, self.gmp_sigma, self.gmp_rho, key=key, mode="sequential"
            )
            return optax.chain(gmp, sgd)
        if self.regularizer == "dgc":
            start = self.dgc_start_epoch * steps_per_epoch
            return optax.chain(
                jaxgen.dynamic_clip(self.dgc_initial_norm, self.dgc_alpha, start), sgd
            )
        return optax.with_extra_args_support(sgd)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"lr_milestones": list(self.lr_milestones)}


def prepare_data(config: TrainConfig) -> data.Dataset:
    """Load, subsample, make the regression task (Theorems 2/3) and add label noise."""
    dataset = data.load(config.dataset, data_dir=config.data_dir, seed=config.data_seed)
    if config.num_train is not None:
        if config.num_train > dataset.num_train:
            raise ConfigError(
                f"num_train must be <= the {dataset.num_train} training examples of "
                f"{config.dataset}, got {config.num_train}"
            )
        keep = slice(0, config.num_train)
        dataset = dataset._replace(
            x_train=dataset.x_train[keep],
            y_train=dataset.y_train[keep],
            y_train_clean=dataset.y_train_clean[keep],
            noisy_mask=dataset.noisy_mask[keep],
        )
    if config.model in models.REGRESSION_MODELS:
        dataset = data.binary_unit_norm(dataset)
    if config.label_noise > 0:
        dataset = data.with_label_noise(
            dataset, config.label_noise, seed=config.data_seed + 1, always_wrong=config.always_wrong
        )
    if config.batch_size > dataset.num_train:
        raise ConfigError(
            f"batch_size must be <= the {dataset.num_train} training examples, "
            f"got {config.batch_size}"
        )
    return dataset


def learning_rates(config: TrainConfig, steps_per_epoch: int) -> np.ndarray:
    """``λ_t`` for every step: ``lr``, times ``lr_factor`` at each milestone epoch."""
    epochs = np.arange(config.epochs * steps_per_epoch) // steps_per_epoch
    drops = np.zeros(epochs.shape, np.float64)
    for milestone in config.lr_milestones:
        drops += epochs >= milestone
    return config.lr * config.lr_factor**drops


def epoch_order(config: TrainConfig, epoch: int, n: int, steps_per_epoch: int) -> np.ndarray:
    """The minibatches of an epoch, (steps_per_epoch, b), from the seed and epoch alone."""
    permutation = np.random.default_rng([config.seed, epoch]).permutation(n)
    return permutation[: steps_per_epoch * config.batch_size].reshape(steps_per_epoch, -1)


def _make_step(loss_fn, optimizer, track_every, method, active_fraction):
    """One SGD update; returns per-step loss, V_t and Theorem 3's weighted loss."""

    def step(carry, inputs, x, y):
        params, opt_state = carry
        index, indices = inputs
        batch = {"x": x[indices], "y": y[indices]}

        def tracked(params):
            stats = jaxgen.gradient_dispersion(loss_fn, params, batch, method=method)
            return stats.loss, stats.grad, stats.minibatch_variance

        def untracked(params):
            loss, grad = jax.value_and_grad(mean_loss, argnums=1)(loss_fn, params, batch)
            return loss, grad, jnp.full((), jnp.nan, loss.dtype)

        if track_every == 1:
            loss, grad, variance = tracked(params)
        else:
            measure = index % track_every == 0
            loss, grad, variance = jax.lax.cond(measure, tracked, untracked, params)
        weighted = jnp.zeros((), loss.dtype)
        if active_fraction is not None:
            losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
            weighted = jnp.mean(active_fraction(params, batch["x"]) * losses)
        grad_fn = jaxgen.batch_grad_fn(loss_fn, batch)  # used by GMP, ignored otherwise
        updates, opt_state = optimizer.update(grad, opt_state, params, grad_fn=grad_fn)
        return (optax.apply_updates(params, updates), opt_state), (loss, variance, weighted)

    return step


def _make_segment(step, *, scan: bool):
    """Run ``step`` over a segment of minibatches.

    ``scan``: one jitted ``lax.scan`` (no per-step dispatch: what small dense models
    need). Otherwise a Python loop over the jitted step: XLA:CPU runs convolutions inside
    loops up to 40x slower than outside (``benchmarks/README.md``), so models with
    convolutions step one jitted update at a time.
    """
    if scan:

        @jax.jit
        def scanned(carry, x, y, steps, order):
            return jax.lax.scan(lambda c, inputs: step(c, inputs, x, y), carry, (steps, order))

        return scanned
    jitted = jax.jit(step)

    def looped(carry, x, y, steps, order):
        outputs = []
        for index, indices in zip(steps, order, strict=True):
            carry, output = jitted(carry, (index, indices), x, y)
            outputs.append(output)
        return carry, tuple(jnp.stack(column) for column in zip(*outputs, strict=True))

    return looped


def uses_convolution(loss_fn, params, example) -> bool:
    """Whether ``loss_fn`` contains a convolution (decides scan against loop)."""
    return "conv_general_dilated" in str(jax.make_jaxpr(loss_fn)(params, example))


def _hessian_frobenius_sq(loss_fn, params, batch, key):
    """Monte Carlo ``E_z ‖H_z‖_F² = E_z E_v ‖H_z v‖²`` (one Rademacher probe per example)."""

    def one(example, probe_key):
        probe = rademacher_like(probe_key, params)
        grad = jax.grad(loss_fn)
        hv = jax.jvp(lambda p: grad(p, example), (params,), (probe,))[1]
        return sum(jnp.sum(jnp.square(h)) for h in jax.tree_util.tree_leaves(hv))

    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return jnp.mean(jax.vmap(one)(batch, jax.random.split(key, size)))


class _Evaluator:
    """Loss and per-example correctness over a whole split, in jitted chunks."""

    def __init__(self, loss_fn, graphdef, chunk=1000):
        self.chunk = chunk

        @jax.jit
        def evaluate(params, x, y):
            losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, {"x": x, "y": y})
            return losses, models.correct(graphdef, params, x, y)

        self._evaluate = evaluate

    def __call__(self, params, x, y) -> tuple[np.ndarray, np.ndarray]:
        losses, correct = [], []
        for start in range(0, x.shape[0], self.chunk):
            chunk_losses, chunk_correct = self._evaluate(
                params, x[start : start + self.chunk], y[start : start + self.chunk]
            )
            losses.append(np.asarray(chunk_losses))
            correct.append(np.asarray(chunk_correct))
        return np.concatenate(losses), np.concatenate(correct)


@dataclasses.dataclass
class _Logs:
    """Per-step and per-epoch records; what a checkpoint stores besides the weights."""

    losses: list[float] = dataclasses.field(default_factory=list)
    variances: list[float] = dataclasses.field(default_factory=list)
    weighted: list[float] = dataclasses.field(default_factory=list)
    frobenius: list[float] = dataclasses.field(default_factory=list)  # per epoch start
    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)


class _Checkpoints:
    """Orbax checkpoints of weights, optimizer state, step and logs under ``DIR/checkpoints``."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

    @staticmethod
    def _is_key(x) -> bool:
        return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)

    def save(self, step: int, state_leaves: list, logs: _Logs, config: TrainConfig) -> None:
        ocp = self._ocp
        # PRNG keys (GMP's) are stored as their raw key data.
        storable = [jax.random.key_data(x) if self._is_key(x) else x for x in state_leaves]
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(storable),
                logs=ocp.args.JsonSave(dataclasses.asdict(logs) | {"config": config.as_dict()}),
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, template_leaves: list, config: TrainConfig) -> tuple[int, list, _Logs] | None:
        ocp = self._ocp
        step = self.manager.latest_step()
        if step is None:
            return None
        stored = [jax.random.key_data(x) if self._is_key(x) else x for x in template_leaves]
        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in stored]
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), logs=ocp.args.JsonRestore()
            ),
        )
        saved = dict(restored["logs"])
        if saved.pop("config") != config.as_dict():
            raise ConfigError(
                "--resume: the checkpoint was written with a different configuration; "
                "use the same arguments or another --out"
            )
        leaves = [
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if self._is_key(t) else x
            for x, t in zip(restored["state"], template_leaves, strict=True)
        ]
        return step, leaves, _Logs(**saved)


def run(
    config: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train ``config`` and write ``result.json``, ``metrics.csv``, ``steps.npz`` and
    ``dispersion.png`` to ``out_dir``; returns the result dictionary."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    dataset = prepare_data(config)
    n, b = dataset.num_train, config.batch_size
    steps_per_epoch = n // b
    total_steps = config.epochs * steps_per_epoch
    lrs = learning_rates(config, steps_per_epoch)

    try:
        model = models.build(
            config.model,
            dataset.x_train.shape[1:],
            dataset.num_classes,
            config.width,
            seed=config.seed,
        )
        loss_fn, params, graphdef = models.classifier_loss(model)
    except ValueError as error:
        raise ConfigError(f"model {config.model}: {error}") from error
    active_fraction = None
    if isinstance(model, models.TwoLayerReLU):
        definition, rest = graphdef

        def active_fraction(params, x):
            from flax import nnx

            return nnx.merge(definition, params, rest).active_fraction(x)

    optimizer = config.optimizer(steps_per_epoch)
    opt_state = optimizer.init(params)
    state_def = jax.tree_util.tree_structure((params, opt_state))
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    step_fn = _make_step(loss_fn, optimizer, config.track_every, config.method, active_fraction)
    one_example = {"x": x_train[0], "y": y_train[0]}
    segment = _make_segment(step_fn, scan=not uses_convolution(loss_fn, params, one_example))
    evaluator = _Evaluator(loss_fn, graphdef)
    probe_rng = np.random.default_rng([config.seed, 7])
    sensitivity_batch_index = probe_rng.choice(n, size=min(64, n), replace=False)
    frobenius = jax.jit(
        lambda p, key: _hessian_frobenius_sq(
            loss_fn,
            p,
            {"x": x_train[sensitivity_batch_index], "y": y_train[sensitivity_batch_index]},
            key,
        )
    )

    checkpoints = _Checkpoints(out_dir / "checkpoints")
    logs, step = _Logs(), 0
    if not resume and checkpoints.manager.latest_step() is not None:
        raise ConfigError(
            f"{out_dir} already holds checkpoints of a run: pass --resume to continue it, "
            "or choose another --out"
        )
    if resume:
        restored = checkpoints.restore(jax.tree_util.tree_leaves((params, opt_state)), config)
        if restored is not None:
            step, leaves, logs = restored
            params, opt_state = jax.tree_util.tree_unflatten(state_def, leaves)
    if not logs.frobenius:
        logs.frobenius.append(float(frobenius(params, jax.random.key(config.seed + 1))))
    checkpoint_every = config.checkpoint_every or steps_per_epoch

    bar = _Progress(total_steps, enabled=progress)
    bar.advance(step)
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        end = min(steps_per_epoch, offset + checkpoint_every - (step % checkpoint_every))
        order = epoch_order(config, epoch, n, steps_per_epoch)[offset:end]
        indices = jnp.arange(step, step + len(order))
        (new_params, new_opt_state), (losses, variances, weighted) = segment(
            (params, opt_state), x_train, y_train, indices, jnp.asarray(order)
        )
        losses = np.asarray(losses, np.float64)
        weights_finite = all(
            bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(new_params)
        )
        if not (np.all(np.isfinite(losses)) and weights_finite):
            first = np.flatnonzero(~np.isfinite(losses))
            bad = step + (int(first[0]) + 1 if first.size else len(losses))
            raise TrainingDiverged(
                f"non-finite training loss or weights at step {bad} (epoch {epoch + 1}); the "
                f"last good checkpoint (step {checkpoints.manager.latest_step()}) is kept; "
                "lower --lr"
            )
        params, opt_state = new_params, new_opt_state
        logs.losses += losses.tolist()
        logs.variances += np.asarray(variances, np.float64).tolist()
        logs.weighted += np.asarray(weighted, np.float64).tolist()
        step += len(order)
        if end == steps_per_epoch:
            row = _epoch_metrics(evaluator, params, dataset, logs, epoch, steps_per_epoch, b)
            logs.epochs.append(row)
            logs.frobenius.append(
                float(
                    frobenius(
                        params, jax.random.fold_in(jax.random.key(config.seed + 1), epoch + 1)
                    )
                )
            )
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
        if step % checkpoint_every == 0 or step == total_steps:
            checkpoints.save(step, jax.tree_util.tree_leaves((params, opt_state)), logs, config)
        bar.advance(
            len(order),
            epoch=epoch + 1,
            loss=float(losses[-1]),
            dispersion=float(np.nanmean(np.asarray(variances)) * b),
        )
    bar.close()
    result = _finish(
        config,
        dataset,
        loss_fn,
        params,
        lrs,
        logs,
        active_fraction,
        steps_per_epoch,
    )
    result["seconds"] = time.perf_counter() - started
    _write_outputs(out_dir, config, result, lrs, logs)
    return result


def _epoch_metrics(evaluator, params, dataset, logs, epoch, steps_per_epoch, b) -> dict[str, float]:
    train_losses, train_correct = evaluator(params, dataset.x_train, dataset.y_train)
    test_losses, test_correct = evaluator(params, dataset.x_test, dataset.y_test)
    variances = np.asarray(logs.variances[-steps_per_epoch:])
    noisy = dataset.noisy_mask
    return {
        "epoch": epoch + 1,
        "train_loss": float(train_losses.mean()),
        "test_loss": float(test_losses.mean()),
        "train_accuracy": float(train_correct.mean()),
        "test_accuracy": float(test_correct.mean()),
        "train_accuracy_clean": float(train_correct[~noisy].mean()) if (~noisy).any() else math.nan,
        "train_accuracy_noisy": float(train_correct[noisy].mean()) if noisy.any() else math.nan,
        "dispersion": float(np.nanmean(variances) * b),
    }


def filled_variances(variances: np.ndarray) -> np.ndarray:
    """``V_t`` for every step: untracked steps (NaN) take the last tracked value."""
    values = np.asarray(variances, np.float64)
    index = np.where(np.isfinite(values), np.arange(values.size), 0)
    np.maximum.accumulate(index, out=index)
    return values[index]


def _finish(
    config,
    dataset,
    loss_fn,
    params,
    lrs,
    logs,
    active_fraction,
    steps_per_epoch,
) -> dict[str, Any]:
    n = dataset.num_train
    final = logs.epochs[-1]  # evaluated on the full splits at the final weights
    variances = jnp.asarray(filled_variances(np.asarray(logs.variances)))
    lrs_j = jnp.asarray(lrs)
    steps = len(lrs)
    subset_rng = np.random.default_rng([config.seed, 11])
    size = max(1, n // 10)
    train_index = subset_rng.choice(n, size=size, replace=False)
    test_index = subset_rng.choice(
        dataset.x_test.shape[0], size=min(size, dataset.x_test.shape[0]), replace=False
    )
    train_subset = {
        "x": jnp.asarray(dataset.x_train[train_index]),
        "y": jnp.asarray(dataset.y_train[train_index]),
    }
    test_subset = {
        "x": jnp.asarray(dataset.x_test[test_index]),
        "y": jnp.asarray(dataset.y_test[test_index]),
    }
    key_trace, key_flat = jax.random.split(jax.random.key(config.seed + 2))
    trace = jaxgen.hessian_trace(
        loss_fn, params, train_subset, key=key_trace, num_probes=config.hessian_probes
    )
    R = config.R
    sigma = bounds.optimal_sigma(lrs_j, variances, trace, R=R, n=n)
    sigma_value = float(sigma)
    flatness = jaxgen.flatness_term(
        loss_fn,
        params,
        train_subset,
        test_subset,
        key=key_flat,
        sigma=sigma_value * math.sqrt(steps) if math.isfinite(sigma_value) else 0.0,
        num_samples=config.flatness_samples,
    )
    frobenius = np.repeat(np.asarray(logs.frobenius[: config.epochs]), steps_per_epoch)
    sensitivities = 2.0 * np.arange(steps) * sigma_value**2 * frobenius
    result: dict[str, Any] = {
        "dataset": config.dataset,
        "model": config.model,
        "width": config.width,
        "label_noise": config.label_noise,
        "optimizer": config.optimizer_description,
        "R": R,
        "n": n,
        "batch_size": config.batch_size,
        "num_steps": steps,
        "track_every": config.track_every,
        "train_loss": final["train_loss"],
        "test_loss": final["test_loss"],
        "train_accuracy": final["train_accuracy"],
        "test_accuracy": final["test_accuracy"],
        "gap": final["test_loss"] - final["train_loss"],
        "sum_lr2_variance": float(np.sum(lrs**2 * np.asarray(variances))),
        "hessian_trace": float(trace.value),
        "hessian_trace_stderr": float(trace.stderr),
        "hessian_trace_examples": size,
        "optimal_sigma": sigma_value,
        "flatness": float(flatness.value),
        "flatness_stderr": float(flatness.stderr),
        "eq2_bound": float(bounds.eq2(lrs_j, variances, trace, R=R, n=n)),
        "eq2_time_varying_bound": float(bounds.eq2_time_varying(lrs_j, variances, trace, R=R, n=n)),
        "theorem1_bound": float(
            bounds.theorem1(lrs_j, sigma, variances, R=R, n=n, flatness=flatness)
        ),
        "neu2021_bound": float(
            bounds.neu2021(
                lrs_j, sigma, jnp.asarray(sensitivities), variances, R=R, n=n, flatness=flatness
            )
        ),
        "neu2021_sensitivity": "second order: Ψ_t = 2(t−1)σ*² E‖H_z‖_F², E‖H_z‖_F² by "
        "Hutchinson on 64 training examples at the start of each epoch",
        "dispersion_method": config.method,
    }
    if config.model == "linear":
        result["theorem2_bound"] = float(
            bounds.linear_network(lrs_j, jnp.asarray(logs.losses), R=R, n=n)
        )
    if active_fraction is not None:
        final_active = float(jnp.mean(active_fraction(params, jnp.asarray(dataset.x_train))))
        result["final_active_fraction"] = final_active
        result["theorem3_bound"] = float(
            bounds.two_layer_relu(lrs_j, jnp.asarray(logs.weighted), final_active, R=R, n=n)
        )
    result["config"] = config.as_dict()
    result["jaxgen_version"] = jaxgen.__version__
    return result


def _write_outputs(out_dir: Path, config: TrainConfig, result, lrs, logs: _Logs) -> None:
    report.write_json_atomic(out_dir / "result.json", result)
    buffer = io.StringIO()
    if logs.epochs:
        writer = csv.DictWriter(buffer, fieldnames=list(logs.epochs[0]))
        writer.writeheader()
        writer.writerows(logs.epochs)
    report.write_text_atomic(out_dir / "metrics.csv", buffer.getvalue())
    report.write_npz_atomic(
        out_dir / "steps.npz",
        lrs=lrs,
        losses=np.asarray(logs.losses),
        variances=np.asarray(logs.variances),
        weighted_losses=np.asarray(logs.weighted),
        hessian_frobenius_sq=np.asarray(logs.frobenius),
    )
    report.dispersion_figure(
        logs.epochs,
        out_dir / "dispersion.png",
        title=f"{config.model} on {config.dataset}, noise {config.label_noise}",
    )


class _Progress:
    """A rich progress bar showing epoch, loss and dispersion; silent when disabled."""

    def __init__(self, total: int, *, enabled: bool):
        self.progress = None
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  dispersion {task.fields[dispersion]:.3e}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.progress.add_task(
            "train", total=total, epoch=0, loss=math.nan, dispersion=math.nan
        )
        self.progress.start()

    def advance(self, steps: int, **fields) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=steps, **fields)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
