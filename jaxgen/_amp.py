"""Adversarial model perturbation (AMP) as an optax transform.

Zheng, Zhang & Mao, *Regularizing Neural Networks via Adversarial Model Perturbation*
(CVPR 2021), the strongest baseline of the GMP tables in Wang & Mao (ICLR 2022): ascend
the minibatch loss on the weights within an L2 ball of radius ε, then take the gradient
there, i.e. descend ``max_{‖Δ‖ <= ε} L_B(w + Δ)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgen import _checks
from jaxgen._gmp import require_extra_args
from jaxgen._types import PyTree


class AMPState(NamedTuple):
    """State of ``amp``: the update count and the norm of the last perturbation ``‖Δ‖``."""

    count: jax.Array
    perturbation_norm: jax.Array


def _project(delta: PyTree, epsilon: float) -> PyTree:
    """Scale ``delta`` back onto the ball ``‖Δ‖ <= ε`` (global L2 norm) when outside."""
    norm = optax.tree.norm(delta)
    scale = jnp.where(norm > epsilon, epsilon / jnp.where(norm > 0, norm, 1.0), 1.0)
    return jax.tree_util.tree_map(lambda d: (d * scale).astype(d.dtype), delta)


def amp(
    epsilon: float, inner_lr: float, inner_steps: int = 1
) -> optax.GradientTransformationExtraArgs:
    """Adversarial model perturbation (Zheng et al., CVPR 2021). ::

        Δ_0 = 0
        Δ_{s} = Π_ε(Δ_{s−1} + ζ · ∇L_B(w + Δ_{s−1})),   s = 1..N
        update = ∇L_B(w + Δ_N)

    with ``ζ = inner_lr``, ``N = inner_steps`` and ``Π_ε`` the projection onto the L2 ball
    of radius ``ε`` (norm over all parameters). The first ascent step reuses the incoming
    clean gradient ``∇L_B(w)``, so an update costs ``N`` gradient passes beyond it.
    Settings in Wang & Mao's tables: ε = 0.5, ζ = 1 (PreActResNet18); ε = 0.1, ζ = 0.2
    (VGG16); one inner step.

    Args:
      epsilon: radius ``ε`` of the perturbation ball (>= 0).
      inner_lr: ascent step size ``ζ`` (>= 0).
      inner_steps: number of ascent steps ``N`` (>= 1).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, grad_fn, **extra_args)`` expects the clean
      minibatch gradient as ``updates`` and ``grad_fn`` on the same minibatch.

    Example:
      >>> import jax.numpy as jnp, optax, jaxgen
      >>> loss_fn = lambda w, z: 0.5 * jnp.sum((w - z) ** 2)
      >>> grad_fn = jaxgen.batch_grad_fn(loss_fn, jnp.ones((4, 2)))
      >>> opt = jaxgen.amp(epsilon=0.1, inner_lr=1.0)
      >>> params = jnp.zeros(2)
      >>> g, state = opt.update(grad_fn(params), opt.init(params), params, grad_fn=grad_fn)
      >>> round(float(state.perturbation_norm), 6)
      0.1
    """
    _checks.non_negative("epsilon", epsilon)
    _checks.non_negative("inner_lr", inner_lr)
    _checks.count("inner_steps", inner_steps, minimum=1, static=False)

    def init_fn(params: PyTree) -> AMPState:
        del params
        return AMPState(
            count=jnp.zeros([], jnp.int32), perturbation_norm=jnp.zeros([], jnp.float32)
        )

    def update_fn(
        updates: PyTree,
        state: AMPState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AMPState]:
        del extra_args
        require_extra_args("amp", params, grad_fn)

        def ascend(delta, gradient):
            step = jax.tree_util.tree_map(
                lambda d, g: d + inner_lr * g.astype(d.dtype), delta, gradient
            )
            return _project(step, epsilon)

        def perturbed_grad(delta):
            return grad_fn(optax.tree.add(params, delta))

        delta = ascend(optax.tree.zeros_like(params), updates)
        if not isinstance(inner_steps, int | np.integer) or inner_steps > 1:  # may be traced
            delta = jax.lax.fori_loop(
                1, inner_steps, lambda _, d: ascend(d, perturbed_grad(d)), delta
            )
        new_updates = optax.tree.cast_like(perturbed_grad(delta), updates)
        norm = optax.tree.norm(delta).astype(jnp.float32)
        return new_updates, AMPState(state.count + 1, norm)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
