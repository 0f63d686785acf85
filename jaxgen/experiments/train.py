"""Plain SGD with the trajectory term of the bounds tracked online.

Each step computes the minibatch loss, mean gradient and gradient dispersion in one
call of ``jaxgen.gradient_dispersion`` and descends along that same mean gradient:
tracking costs no extra gradient pass. ``V_t = dispersion / b`` at ``W_{t-1}`` is
recorded with the step's learning rate, so that ``Σ_t λ_t² V_t`` (Wang & Mao, ICLR
2022, Theorem 1 and Eq. 2) can be formed exactly afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import _checks
from jaxgen._per_example import gradient_dispersion


class StepLog(NamedTuple):
    """Per-step values, one entry per SGD step ``t = 1..T`` (host arrays)."""

    lrs: np.ndarray
    losses: np.ndarray  # minibatch mean loss at W_{t-1}
    variances: np.ndarray  # V_t = dispersion / b at W_{t-1}


@functools.partial(jax.jit, static_argnames=("loss_fn", "method"))
def _epoch(loss_fn, method, params, x, y, order, lr):
    """One epoch of SGD over the minibatches ``order`` (num_batches, batch_size)."""

    def step(params, indices):
        stats = gradient_dispersion(
            loss_fn, params, {"x": x[indices], "y": y[indices]}, method=method
        )
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, stats.grad)
        return params, (stats.loss, stats.minibatch_variance)

    params, (losses, variances) = jax.lax.scan(step, params, order)
    return params, losses, variances


def sgd_with_tracking(
    loss_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    method: str = "auto",
    on_epoch: Callable[[int, Any, StepLog], None] | None = None,
) -> tuple[Any, StepLog]:
    """Train with plain SGD (no momentum, constant ``lr``), shuffling every epoch.

    The last incomplete minibatch of an epoch is dropped so that every step has batch
    size ``b`` and one compiled step serves the whole run.

    Returns:
      The final parameters and the ``StepLog`` of every step.
    """
    _checks.integer("epochs", epochs, minimum=1)
    _checks.integer("batch_size", batch_size, minimum=1)
    _checks.positive("lr", lr)
    if batch_size > x.shape[0]:
        raise ValueError(
            f"batch_size must be <= the {x.shape[0]} training examples, got {batch_size}"
        )
    rng = np.random.default_rng(seed)
    num_batches = x.shape[0] // batch_size
    x_device, y_device = jnp.asarray(x), jnp.asarray(y)
    losses, variances = [], []
    for epoch in range(epochs):
        order = rng.permutation(x.shape[0])[: num_batches * batch_size].reshape(num_batches, -1)
        params, epoch_losses, epoch_variances = _epoch(
            loss_fn, method, params, x_device, y_device, jnp.asarray(order), lr
        )
        epoch_losses = np.asarray(epoch_losses)
        if not np.all(np.isfinite(epoch_losses)):
            step = len(np.concatenate(losses)) if losses else 0
            bad = step + int(np.argmin(np.isfinite(epoch_losses))) + 1
            raise FloatingPointError(
                f"non-finite training loss at step {bad} (epoch {epoch + 1}); lower lr={lr}"
            )
        losses.append(epoch_losses)
        variances.append(np.asarray(epoch_variances))
        if on_epoch is not None:
            log = StepLog(
                np.full(sum(map(len, losses)), lr),
                np.concatenate(losses),
                np.concatenate(variances),
            )
            on_epoch(epoch + 1, params, log)
    losses_all = np.concatenate(losses)
    return params, StepLog(
        np.full(losses_all.shape, lr, np.float64), losses_all, np.concatenate(variances)
    )
