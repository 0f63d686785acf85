"""Gaussian model perturbation (GMP) as an optax transform.

Wang & Mao (ICLR 2022), Algorithm 2: on a minibatch ``B`` draw ``Δ_j ~ N(0, σ² I)``,
``j = 1..k``, and descend along

    (1 − ρ) · ∇L_B(w) + ρ · (1/k) Σ_j ∇L_B(w + Δ_j)

the gradient of ``(1 − ρ) L_B(w) + ρ (1/k) Σ_j L_B(w + Δ_j)``, a stochastic version of
``L_B(w) + ρ E_Δ[L_B(w + Δ) − L_B(w)]``, which penalises the flatness term of Theorem 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks, _chunks
from jaxgen._random import as_key, gaussian_like
from jaxgen._sums import pairwise_sum
from jaxgen._types import PyTree

MODES = ("auto", "vmap", "sequential")


def _resolve(mode: str, sharded: bool) -> str:
    """``"auto"``: batched on accelerators (or when the perturbations are sharded), one at
    a time on a CPU, where ``benchmarks/gmp.py`` measures the sequential mode ~2× faster."""
    if mode != "auto":
        return mode
    return "vmap" if sharded or jax.default_backend() != "cpu" else "sequential"


class GMPState(NamedTuple):
    """State of ``gmp``: the PRNG key (split at every update) and the update count."""

    key: jax.Array
    count: jax.Array


def require_extra_args(name: str, params: Any, grad_fn: Any) -> None:
    """Raise a clear ``ValueError`` when a transform that re-evaluates gradients lacks them."""
    if params is None:
        raise ValueError(f"{name}.update needs params: call update(updates, state, params, ...)")
    if grad_fn is None or not callable(grad_fn):
        raise ValueError(
            f"{name}.update needs grad_fn=, a function params -> gradient of the minibatch "
            f"loss (see jaxgen.batch_grad_fn), got {grad_fn!r}"
        )


def gmp(
    num_samples: int = 3,
    sigma: float = 0.03,
    rho: float = 0.5,
    *,
    key: Any = 0,
    mode: str = "auto",
    perturbation_sharding: jax.sharding.Sharding | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gaussian model perturbation (Wang & Mao, ICLR 2022, Algorithm 2). ::

        update = (1 − ρ) · g + ρ · (1/k) Σ_{j=1..k} grad_fn(w + Δ_j),   Δ_j ~ N(0, σ² I)

    where ``g`` is the incoming (clean) minibatch gradient ``∇L_B(w)`` and ``grad_fn``
    returns ``∇L_B`` on the *same* minibatch. Fresh ``Δ_j`` are drawn at every update from
    the key kept in the state.

    Args:
      num_samples: ``k``, the number of perturbations per update (>= 1).
      sigma: ``σ``, the standard deviation of each coordinate of ``Δ_j`` (>= 0).
      rho: ``ρ`` in [0, 1], the weight of the perturbed gradients.
      key: integer seed or PRNG key (typed or raw) for the perturbations.
      mode: ``"vmap"`` evaluates the ``k`` perturbed gradients together (memory for ``k``
        gradients; fastest on accelerators); ``"sequential"`` evaluates them one at a
        time in a ``lax.scan`` (memory for one; fastest on a CPU), unrolled into
        straight-line code when the gradient has a convolution and the backend is a CPU
        (XLA:CPU runs convolutions far slower inside loops; XLA then keeps the ``k``
        gradients alive until they are summed); ``"auto"`` (default) picks the faster
        mode for the backend. All draw the same ``Δ_j`` for the same key.
      perturbation_sharding: with ``mode="vmap"``, a sharding of the ``k``
        perturbations' leading axis (e.g. ``NamedSharding(mesh, P("perturb"))`` on a mesh
        whose axis type is ``AxisType.Auto``) so that XLA spreads the perturbed passes
        over that mesh axis.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose
      ``update(updates, state, params, *, grad_fn, **extra_args)`` ignores other extra
      arguments.

    Example:
      >>> import jax, jax.numpy as jnp, optax, jaxgen
      >>> loss_fn = lambda w, z: 0.5 * jnp.sum((w - z) ** 2)
      >>> batch = jnp.ones((8, 3))
      >>> opt = optax.chain(jaxgen.gmp(num_samples=3, sigma=0.03, rho=0.5), optax.sgd(0.1))
      >>> params = jnp.zeros(3)
      >>> state = opt.init(params)
      >>> grad_fn = jaxgen.batch_grad_fn(loss_fn, batch)
      >>> updates, state = opt.update(grad_fn(params), state, params, grad_fn=grad_fn)
      >>> params = optax.apply_updates(params, updates)
    """
    _checks.count("num_samples", num_samples, minimum=1, static=True)
    num_samples = int(num_samples)
    _checks.non_negative("sigma", sigma)
    _checks.unit_interval("rho", rho)
    _checks.choice("mode", mode, MODES)
    key = as_key(key)

    def init_fn(params: PyTree) -> GMPState:
        del params
        return GMPState(key=key, count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: PyTree,
        state: GMPState,
        params: PyTree | None = None,
        *,
        grad_fn: Callable[[PyTree], PyTree] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, GMPState]:
        del extra_args
        require_extra_args("gmp", params, grad_fn)
        next_key, draw_key = jax.random.split(state.key)
        sample_keys = jax.random.split(draw_key, num_samples)

        def perturbed_grad(sample_key):
            delta = gaussian_like(sample_key, params, sigma)
            return grad_fn(optax.tree.add(params, delta))

        if _resolve(mode, perturbation_sharding is not None) == "vmap":
            if perturbation_sharding is not None:
                sample_keys = jax.lax.with_sharding_constraint(sample_keys, perturbation_sharding)
                total = functools.partial(jnp.sum, axis=0)  # one reduction across devices
            else:
                total = pairwise_sum
            perturbed_mean = jax.tree_util.tree_map(
                lambda g: total(g) / num_samples, jax.vmap(perturbed_grad)(sample_keys)
            )
        else:

            def accumulate(total, sample_key):
                return optax.tree.add(total, perturbed_grad(sample_key)), None

            # The first perturbed gradient starts the sum: no zeros and no first addition.
            total = perturbed_grad(sample_keys[0])
            if num_samples > 1:
                unroll = _chunks.loops_are_slow(grad_fn, params) or 1
                total, _ = jax.lax.scan(accumulate, total, sample_keys[1:], unroll=unroll)
            perturbed_mean = jax.tree_util.tree_map(lambda t: t / num_samples, total)
        new_updates = jax.tree_util.tree_map(
            lambda g, p: (1.0 - rho) * g + rho * p.astype(g.dtype), updates, perturbed_mean
        )
        return optax.tree.cast_like(new_updates, updates), GMPState(next_key, state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
