"""One training step for every method, its scanned segment, and the evaluator.

``train_step(state, batch) -> (state, metrics)`` computes the minibatch loss, the mean
gradient and the gradient dispersion in one call of ``jaxgen.gradient_dispersion`` and
updates with that same mean gradient, so tracking ``V_t`` costs no extra gradient pass.
With ``track_every = K`` it is measured at every K-th step (``V_t = NaN`` in between, a
plain ``value_and_grad`` step). Batches come from outside; the step never sees the
dataset.
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
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import methods


class TrainState(NamedTuple):
    """What changes from step to step (and what a checkpoint stores).

    ``key`` is the run's step key: step ``t`` hands ``fold_in(key, t)`` to the method's
    batch hook, so a resumed run draws the same numbers.
    """

    step: jax.Array  # int32 count of updates done
    params: PyTree
    opt_state: PyTree
    key: jax.Array


class StepMetrics(NamedTuple):
    """Per-step records: the minibatch loss at ``W_{t−1}``, ``V_t`` (NaN when not
    measured) and Theorem 3's activation-weighted loss (0 for other models)."""

    loss: jax.Array
    variance: jax.Array
    weighted_loss: jax.Array


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformationExtraArgs,
    method: methods.Method,
    *,
    track_every: int = 1,
    dispersion_method: str = "auto",
    active_fraction: Callable[[PyTree, jax.Array], jax.Array] | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, StepMetrics]]:
    """The step of ``method``; ``active_fraction(params, x)`` adds Theorem 3's weighting."""
    method_loss = method.loss(loss_fn)

    def tracked(params, batch):
        stats = jaxgen.gradient_dispersion(method_loss, params, batch, method=dispersion_method)
        return stats.loss, stats.grad, stats.minibatch_variance

    def untracked(params, batch):
        loss, grad = jax.value_and_grad(mean_loss, argnums=1)(method_loss, params, batch)
        return loss, grad, jnp.full((), jnp.nan, loss.dtype)

    def train_step(state: TrainState, batch: PyTree) -> tuple[TrainState, StepMetrics]:
        params = state.params
        batch = method.batch(params, batch, jax.random.fold_in(state.key, state.step))
        if track_every == 1:
            loss, grad, variance = tracked(params, batch)
        else:
            measure = state.step % track_every == 0
            loss, grad, variance = jax.lax.cond(measure, tracked, untracked, params, batch)
        weighted = jnp.zeros((), loss.dtype)
        if active_fraction is not None:
            losses = jax.vmap(method_loss, in_axes=(None, 0))(params, batch)
            weighted = jnp.mean(active_fraction(params, batch["x"]) * losses)
        grad = method.post(loss, grad)
        grad_fn = jaxgen.batch_grad_fn(method_loss, batch)  # for GMP and the like
        updates, opt_state = optimizer.update(grad, state.opt_state, params, grad_fn=grad_fn)
        new_state = TrainState(
            state.step + 1, optax.apply_updates(params, updates), opt_state, state.key
        )
        return new_state, StepMetrics(loss, variance, weighted)

    return train_step


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
        loss_fn: LossFn,
        predict: Callable[[PyTree, jax.Array], jax.Array],
        correct: Callable[[jax.Array, jax.Array], jax.Array],
        chunk: int = 1000,
    ):
        self.chunk = chunk

        @jax.jit
        def evaluate(params, x, y):
            losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, {"x": x, "y": y})
            return losses, correct(predict(params, x), y)

        self._evaluate = evaluate

    def __call__(self, params: PyTree, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
        losses, correct = [], []
        for start in range(0, x.shape[0], self.chunk):
            chunk_losses, chunk_correct = self._evaluate(
                params, x[start : start + self.chunk], y[start : start + self.chunk]
            )
            losses.append(np.asarray(chunk_losses))
            correct.append(np.asarray(chunk_correct))
        return np.concatenate(losses), np.concatenate(correct)
