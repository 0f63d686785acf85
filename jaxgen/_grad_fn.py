"""The ``grad_fn`` that the perturbation transforms (``gmp``, ``amp``) take."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax

from jaxgen import _checks
from jaxgen._per_example import mean_loss

PyTree = Any


def batch_grad_fn(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], batch: PyTree
) -> Callable[[PyTree], PyTree]:
    """``params ↦ ∇L_B(params)`` with ``L_B = (1/b) Σ_{z ∈ batch} loss_fn(params, z)``.

    Build it inside the jitted training step, once per minibatch, and pass the same
    function as ``grad_fn=`` to ``jaxgen.gmp`` or ``jaxgen.amp``; ``grad_fn(params)`` is the
    clean gradient those transforms expect as ``updates``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> grad_fn = jaxgen.batch_grad_fn(lambda w, z: w * z, jnp.array([1.0, 3.0]))
      >>> float(grad_fn(jnp.float32(0.0)))
      2.0
    """
    _checks.batch_size("batch", batch)

    return functools.partial(jax.grad(mean_loss, argnums=1), loss_fn, batch=batch)
