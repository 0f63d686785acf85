"""One training step for every method and model, its scanned segment, and the evaluator.

``train_step(state, batch) -> (state, metrics)``:

    batch   = augment(batch, key_t)                           # crop/flip, on device
    batch   = method.batch(params, batch, key_t', task)       # mixup, smoothing, ...
    stats   = gradient_dispersion(method.loss(loss_fn), params, batch)   # loss, ḡ, V_t
    grad    = method.gradient(loss_i, params, batch, stats.grad, key_t'')  # clipping, DP
    grad    = method.post(stats.loss, grad)
    updates = optimizer.update(grad, ..., grad_fn=∇L_B on the same batch)

Tracking ``V_t`` costs no extra gradient pass: the update uses the same mean gradient.
With ``track_every = K`` it is measured at every K-th step (``V_t = NaN`` in between, a
plain ``value_and_grad`` step). Models that train with BatchNorm batch statistics have
no per-example loss: their step differentiates the batch loss, updates the running
statistics from that clean pass only (the perturbed passes of GMP, AMP and SAM and the
adversarial inputs use the batch statistics and discard them), and logs ``V_t = NaN``.
Batches come from outside; the step never sees the dataset.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgen
from jaxgen._per_example import mean_loss
from jaxgen._sharding import to_host
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import augment, methods
from jaxgen.experiments.task import Trainable


class TrainState(NamedTuple):
    """What changes from step to step (and what a checkpoint stores).

    ``key`` is the run's step key: step ``t`` uses ``fold_in(key, t)``, so a resumed run
    draws the same augmentations and method randomness. ``model_state``: BatchNorm
    running statistics (empty for other models).
    """

    step: jax.Array  # int32 count of updates done
    params: PyTree
    opt_state: PyTree
    key: jax.Array
    model_state: PyTree = ()


class StepMetrics(NamedTuple):
    """Per-step records: the minibatch loss at ``W_{t−1}``, ``V_t`` (NaN when not
    measured) and Theorem 3's activation-weighted loss (0 for other models)."""

    loss: jax.Array
    variance: jax.Array
    weighted_loss: jax.Array


def make_train_step(
    model: Trainable | LossFn,
    optimizer: optax.GradientTransformationExtraArgs,
    method: methods.Method,
    *,
    num_classes: int = 0,
    track_every: int = 1,
    dispersion_method: str = "auto",
    augmentation: str = "none",
    active_fraction: Callable[[PyTree, jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, StepMetrics]]:
    """The step of ``method`` on ``model`` (a ``Trainable``, or a per-example loss).

    ``active_fraction(params, x)`` adds Theorem 3's weighting.
    """
    if isinstance(model, Trainable) and not model.per_example:
        return _batch_statistics_step(model, optimizer, method, num_classes, augmentation)
    loss_fn = model.loss_fn if isinstance(model, Trainable) else model
    method_loss = method.loss(loss_fn)

    def tracked(params, batch):
        stats = jaxgen.gradient_dispersion(method_loss, params, batch, method=dispersion_method)
        return stats.loss, stats.grad, stats.minibatch_variance

    def untracked(params, batch):
        loss, grad = jax.value_and_grad(mean_loss, argnums=1)(method_loss, params, batch)
        return loss, grad, jnp.full((), jnp.nan, loss.dtype)

    task = methods.Task(lambda params, batch: mean_loss(method_loss, params, batch), num_classes)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, StepMetrics]:
        params = state.params
        batch = _prepare(state, batch, method, task, augmentation)
        if track_every == 1:
            loss, grad, variance = tracked(params, batch)
        else:
            measure = state.step % track_every == 0
            loss, grad, variance = jax.lax.cond(measure, tracked, untracked, params, batch)
        weighted = jnp.zeros((), loss.dtype)
        if active_fraction is not None:
            losses = jax.vmap(method_loss, in_axes=(None, 0))(params, batch)
            weighted = jnp.mean(active_fraction(params, batch["x"]) * losses)
        grad = method.gradient(method_loss, params, batch, grad, _gradient_key(state))
        grad_fn = jaxgen.batch_grad_fn(method_loss, batch)  # for GMP, AMP, SAM
        state = _update(state, optimizer, method.post(loss, grad), grad_fn, state.model_state)
        return state, StepMetrics(loss, variance, weighted)

    return train_step


def _batch_statistics_step(model, optimizer, method, num_classes, augmentation):
    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, StepMetrics]:
        params, statistics = state.params, state.model_state

        def batch_loss(params, batch):  # batch statistics used, then discarded
            return model.batch_loss(params, statistics, batch)[0]

        batch = _prepare(state, batch, method, methods.Task(batch_loss, num_classes), augmentation)
        (loss, new_statistics), grad = jax.value_and_grad(model.batch_loss, has_aux=True)(
            params, statistics, batch
        )
        grad_fn = jax.grad(batch_loss)

        def grad_fn_any(params, *_):  # optax's grad_fn(params, i) protocol too
            return grad_fn(params, batch)

        state = _update(state, optimizer, method.post(loss, grad), grad_fn_any, new_statistics)
        nan = jnp.full((), jnp.nan, loss.dtype)
        return state, StepMetrics(loss, nan, jnp.zeros((), loss.dtype))

    return train_step


def _gradient_key(state: TrainState) -> jax.Array:
    """The key of ``Method.gradient`` at this step (DP-SGD's noise): a stream of its own
    beside the augmentation's and the batch hook's (``_prepare``)."""
    return jax.random.fold_in(jax.random.fold_in(state.key, state.step), GRADIENT_STREAM)


GRADIENT_STREAM = 3


def _prepare(state: TrainState, batch, method, task, augmentation):
    key_augment, key_method = jax.random.split(jax.random.fold_in(state.key, state.step))
    batch = augment.augment(batch, key_augment, augmentation)
    return method.batch(state.params, batch, key_method, task)


def _update(state: TrainState, optimizer, grad, grad_fn, model_state) -> TrainState:
    updates, opt_state = optimizer.update(grad, state.opt_state, state.params, grad_fn=grad_fn)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, opt_state, state.key, model_state)


def make_segment(
    train_step: Callable[[TrainState, PyTree], tuple[TrainState, StepMetrics]], *, scan: bool
) -> Callable[[TrainState, PyTree], tuple[TrainState, StepMetrics]]:
    """``segment(state, batches)``: ``train_step`` over batches stacked on a leading axis.

    ``scan``: one jitted ``lax.scan`` of the step (no per-step dispatch: what small dense
    models need). Otherwise a Python loop over the jitted step: XLA:CPU runs
    convolutions inside loops up to 40× slower than outside (``benchmarks/README.md``),
    so models with convolutions step one jitted update at a time. Either way the state
    is donated: the caller must use the returned state only.
    """
    if scan:
        return jax.jit(
            lambda state, batches: jax.lax.scan(train_step, state, batches), donate_argnums=0
        )
    jitted = jax.jit(train_step, donate_argnums=0)

    def looped(state, batches):
        size = jax.tree_util.tree_leaves(batches)[0].shape[0]
        outputs = []
        for i in range(size):
            state, metrics = jitted(state, jax.tree_util.tree_map(lambda x, i=i: x[i], batches))
            outputs.append(metrics)
        return state, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outputs)

    return looped


class Evaluator:
    """Per-example losses and correctness over a whole split, in jitted chunks."""

    def __init__(
        self,
        predict: Callable[[PyTree, PyTree, jax.Array], jax.Array],
        pointwise: Callable[[jax.Array, jax.Array], jax.Array],
        correct: Callable[[jax.Array, jax.Array], jax.Array],
        chunk: int = 1000,
    ):
        self.chunk = chunk

        @jax.jit
        def evaluate(params, model_state, x, y):
            outputs = predict(params, model_state, x)
            return jax.vmap(pointwise)(outputs, y), correct(outputs, y)

        self._evaluate = evaluate

    def __call__(
        self, params: PyTree, model_state: PyTree, x: Any, y: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        losses, correct = [], []
        for start in range(0, x.shape[0], self.chunk):
            chunk_losses, chunk_correct = self._evaluate(
                params, model_state, x[start : start + self.chunk], y[start : start + self.chunk]
            )
            losses.append(to_host(chunk_losses))
            correct.append(to_host(chunk_correct))
        return np.concatenate(losses), np.concatenate(correct)
