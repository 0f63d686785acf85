"""Gradient-noise and curvature summaries: small pure functions of measured statistics.

Each takes what ``gradient_dispersion``, ``gradient_moments``, ``gradient_projections``
and ``hessian_diagonal`` return, so it costs nothing beyond them. For a batch of ``b``
per-example gradients ``g_i`` with mean ``ḡ``:

    tr Σ̂     = (1/(b−1)) Σ_i ‖g_i − ḡ‖²             unbiased trace of the covariance
    ‖G‖²^    = ‖ḡ‖² − tr Σ̂ / b                        unbiased squared true-gradient norm

Example:
  >>> import jax.numpy as jnp, jaxgen
  >>> from jaxgen import noise
  >>> loss = lambda w, z: z @ w
  >>> stats = jaxgen.gradient_dispersion(loss, jnp.zeros(2), jnp.array([[1.0, 0.0], [3.0, 0.0]]))
  >>> float(noise.norm_test(stats))      # sqrt(tr Σ̂ / (b ‖ḡ‖²)) = sqrt(2 / 8)
  0.5
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxgen import _checks
from jaxgen._grad_fn import batch_grad_fn
from jaxgen._per_example import DispersionStats
from jaxgen._types import LossFn, PyTree

__all__ = [
    "covariance_trace",
    "gradient_projections",
    "inner_product_test",
    "mean_gradient",
    "noise_scale",
    "noise_scale_from_two_batches",
    "norm_test",
    "tic_diag",
]


def _grad_sq_norm(grad: PyTree) -> jax.Array:
    return sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grad))


def covariance_trace(stats: DispersionStats) -> jax.Array:
    """``tr Σ̂ = (1/(b−1)) Σ_i ‖g_i − ḡ‖²``: the unbiased estimate of the trace of the
    per-example gradient covariance (``stats.dispersion`` is its ``1/b`` version)."""
    size = stats.batch_size
    return stats.dispersion * size / (size - 1)


def noise_scale(stats: DispersionStats) -> jax.Array:
    """The simple gradient noise scale ``B_simple = tr Σ / ‖G‖²`` (McCandlish, Kaplan,
    Amodei et al., *An Empirical Model of Large-Batch Training*, 2018), from one batch's
    per-example gradients with the unbiased ``tr Σ̂`` and ``‖G‖²^`` above. It estimates the
    batch size beyond which larger batches stop paying. ``‖G‖²^`` can come out ≤ 0 where
    noise dominates (then ``B_simple`` is reported as ``inf``): average the two terms over
    steps before dividing, as McCandlish et al. do, for a stable estimate."""
    trace = covariance_trace(stats)
    signal = _grad_sq_norm(stats.grad) - trace / stats.batch_size
    return jnp.where(signal > 0, trace / jnp.where(signal > 0, signal, 1), jnp.inf)


def noise_scale_from_two_batches(
    small_sq_norm: Any, small_size: int, big_sq_norm: Any, big_size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(B_simple, tr Σ, ‖G‖²)`` from the squared norms of two mean gradients taken at
    batch sizes ``B_small < B_big`` (McCandlish et al., 2018, Appendix A.1): since
    ``E‖G_B‖² = ‖G‖² + tr Σ / B``,

        ‖G‖² ≈ (B_big ‖G_big‖² − B_small ‖G_small‖²) / (B_big − B_small)
        tr Σ ≈ (‖G_small‖² − ‖G_big‖²) / (1/B_small − 1/B_big)

    each unbiased; what data-parallel training measures for free (one device's gradient
    and the all-reduced one)."""
    _checks.integer("small_size", small_size, minimum=1)
    _checks.integer("big_size", big_size, minimum=1)
    if small_size >= big_size:
        raise ValueError(f"small_size must be below big_size, got {small_size} and {big_size}")
    signal = (big_size * big_sq_norm - small_size * small_sq_norm) / (big_size - small_size)
    trace = (small_sq_norm - big_sq_norm) / (1 / small_size - 1 / big_size)
    return trace / signal, trace, signal


def norm_test(stats: DispersionStats) -> jax.Array:
    """The norm test of adaptive batch sizing (Byrd, Chin, Nocedal & Wu, 2012, Eq. 3.9)
    as Cockpit reports it: the largest ``θ`` for which ``tr Σ̂ / b ≤ θ² ‖ḡ‖²`` holds,
    ``θ = sqrt(tr Σ̂ / (b ‖ḡ‖²))``. A batch passes the test with parameter ``θ`` when
    this is at most ``θ``; a larger value asks for a larger batch."""
    return jnp.sqrt(covariance_trace(stats) / (stats.batch_size * _grad_sq_norm(stats.grad)))


def gradient_projections(
    loss_fn: LossFn, params: PyTree, batch: PyTree, direction: PyTree
) -> jax.Array:
    """``(b,)`` ``g_iᵀ d``: each example's gradient projected on ``direction`` (e.g. the
    mean gradient ``ḡ``), all at once by one forward-mode pass (a JVP of the per-example
    losses), with no per-example gradient formed."""
    losses = jax.vmap(loss_fn, in_axes=(None, 0))
    return jax.jvp(lambda p: losses(p, batch), (params,), (direction,))[1]


def inner_product_test(projections: jax.Array, grad: PyTree) -> jax.Array:
    """The inner product test (Bollapragada, Byrd & Nocedal, *Adaptive Sampling
    Strategies for Stochastic Optimization*, 2018, Eq. 2.6) as Cockpit reports it: with
    ``p_i = g_iᵀ ḡ`` (``gradient_projections(..., direction=ḡ)``) and
    ``Var̂ = (1/(b−1)) Σ_i (p_i − ‖ḡ‖²)²``, the largest ``θ`` with
    ``Var̂ / b ≤ θ² ‖ḡ‖⁴``: ``θ = sqrt(Var̂ / (b ‖ḡ‖⁴))``."""
    size = projections.shape[0]
    squared = _grad_sq_norm(grad)
    variance = jnp.sum(jnp.square(projections - squared)) / (size - 1)
    return jnp.sqrt(variance / (size * squared**2))


def tic_diag(second_moment: PyTree, hessian_diagonal: PyTree, *, epsilon: float = 1e-7):
    """The Takeuchi information criterion with diagonal curvature (Thomas, Pedregosa,
    van Merriënboer et al., *On the interplay between noise and curvature and its effect
    on optimization and generalization*, AISTATS 2020; Cockpit's ``TICDiag``):
    ``Σ_j M_j / (h_j + ε)`` with ``M = (1/b) Σ_i g_i²`` (``GradientMoments.second_moment``)
    and ``h = diag H`` (``HessianDiagonal.diagonal``). ``Tr(H⁻¹C)/n`` is TIC's estimate of
    the generalization gap; this is its numerator with ``H`` and ``C`` made diagonal."""
    _checks.non_negative("epsilon", epsilon)
    terms = jax.tree_util.tree_map(
        lambda m, h: jnp.sum(m / (h + epsilon)), second_moment, hessian_diagonal
    )
    return sum(jax.tree_util.tree_leaves(terms))


def mean_gradient(loss_fn: LossFn, params: PyTree, batch: PyTree) -> PyTree:
    """``ḡ``, for ``gradient_projections`` when no statistics are at hand."""
    return batch_grad_fn(loss_fn, batch)(params)
