"""The ``grad_fn`` that the perturbation transforms (``gmp``, ``amp``, optax's SAM) take."""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxgen import _checks
from jaxgen._per_example import mean_loss
from jaxgen._types import LossFn, PyTree


def batch_grad_fn(loss_fn: LossFn, batch: PyTree) -> Callable[..., PyTree]:
    """``params ↦ ∇L_B(params)`` with ``L_B = (1/b) Σ_{z ∈ batch} loss_fn(params, z)``.

    Build it inside the jitted training step, once per minibatch, and pass the same
    function as ``grad_fn=`` to ``jaxgen.gmp``, ``jaxgen.amp`` or
    ``optax.contrib.sam(..., opaque_mode=True)``; ``grad_fn(params)`` is the clean
    gradient those transforms expect as ``updates``. Arguments after ``params`` are
    accepted and ignored, so optax's ``grad_fn(params, i)`` protocol (SAM calls it with
    the index of its adversarial step) sees the same minibatch at every step.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> grad_fn = jaxgen.batch_grad_fn(lambda w, z: w * z, jnp.array([1.0, 3.0]))
      >>> float(grad_fn(jnp.float32(0.0))), float(grad_fn(jnp.float32(0.0), 1))
      (2.0, 2.0)
    """
    _checks.batch_size("batch", batch)
    grad = jax.grad(mean_loss, argnums=1)

    def grad_fn(params: PyTree, *_: object) -> PyTree:
        _checks.per_example_loss(loss_fn, params, batch)
        return grad(loss_fn, params, batch)

    return grad_fn
