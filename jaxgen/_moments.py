"""Per-coordinate moments of the per-example gradients, and the gradient signal-to-noise
ratio.

For per-example gradients ``g_i`` of a batch of ``b`` examples, per coordinate ``j``:

    mean_j     = (1/b) Σ_i g_ij                       (the minibatch gradient ḡ)
    variance_j = (1/b) Σ_i (g_ij − mean_j)²           (BackPACK's ``Variance``)
    gsnr_j     = mean_j² / variance_j                 (Liu et al., ICLR 2020)

``Σ_j variance_j`` is ``gradient_dispersion``'s ``dispersion``. Liu et al., *Understanding
Why Neural Networks Generalize Well Through GSNR of Parameters* (ICLR 2020), tie a large
GSNR during training to a small generalization gap.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks
from jaxgen._per_example import default_microbatch, ghost_or_vmap, map_chunks
from jaxgen._sums import pairwise_sum
from jaxgen._types import LossFn, PyTree

_METHODS = ("auto", "vmap", "ghost")


class GradientMoments(NamedTuple):
    """Per-coordinate statistics of the per-example gradients of one batch.

    Attributes:
      loss: mean loss.
      mean: ``ḡ`` (pytree like ``params``).
      variance: ``(1/b) Σ_i (g_i − ḡ)²`` per coordinate (population normalisation, as
        BackPACK's ``Variance``; its sum is the dispersion).
      batch_size: ``b``.
    """

    loss: jax.Array
    mean: PyTree
    variance: PyTree
    batch_size: int

    @property
    def second_moment(self) -> PyTree:
        """``(1/b) Σ_i g_i²`` per coordinate (BackPACK's ``SumGradSquared`` over ``b``)."""
        return jax.tree_util.tree_map(lambda v, m: v + m * m, self.variance, self.mean)

    @property
    def gsnr(self) -> PyTree:
        """``ḡ² / variance`` per coordinate (``nan`` where the variance is 0)."""
        return jax.tree_util.tree_map(
            lambda m, v: jnp.where(v > 0, m * m / jnp.where(v > 0, v, 1), jnp.nan),
            self.mean,
            self.variance,
        )

    @property
    def layer_gsnr(self) -> PyTree:
        """Each leaf's mean GSNR over its coordinates (Liu et al.'s per-layer average;
        coordinates of zero variance left out)."""
        return jax.tree_util.tree_map(jnp.nanmean, self.gsnr)


def _moments_vmap(loss_fn, params, batch, microbatch_size):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if microbatch_size is None:
        microbatch_size = default_microbatch(loss_fn, params, batch)
    # Residuals about the first example's gradient (the shifted-data algorithm, as
    # ``gradient_dispersion``'s vmap path): no cancellation however large ḡ is.
    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    shift = jax.grad(loss_fn)(params, first)

    def sums(chunk):
        losses, grads = jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, chunk)
        residuals = optax.tree.sub(grads, jax.tree_util.tree_map(lambda s: s[None], shift))
        total = jax.tree_util.tree_map(pairwise_sum, residuals)
        squares = jax.tree_util.tree_map(lambda r: pairwise_sum(r * r), residuals)
        return jnp.sum(losses), total, squares

    _, (loss_sum, total, squares) = map_chunks(
        lambda chunk: ((), sums(chunk)), batch, size, microbatch_size
    )
    mean_residual = jax.tree_util.tree_map(lambda t: t / size, total)
    variance = jax.tree_util.tree_map(
        lambda q, m: jnp.maximum(q / size - m * m, 0), squares, mean_residual
    )
    mean = optax.tree.add(shift, mean_residual)
    return loss_sum / size, mean, variance


@functools.partial(jax.jit, static_argnames=("loss_fn", "microbatch_size"))
def _vmap_path(loss_fn, params, batch, microbatch_size):
    return _moments_vmap(loss_fn, params, batch, microbatch_size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "warn"))
def _ghost_path(loss_fn, params, batch, warn):
    from jaxgen._ghost import prepare
    from jaxgen._ghost.moments import ghost_moments

    program = prepare(loss_fn, params, batch, warn=warn)
    if any(program.plan.uses[u].loops for u in program.plan.fast.values()) or (
        program.loops_per_example
    ):
        return _moments_vmap(loss_fn, params, batch, None)
    loss, mean, variance = ghost_moments(program)
    treedef = jax.tree_util.tree_structure(params)
    return (
        loss,
        jax.tree_util.tree_unflatten(treedef, mean),
        jax.tree_util.tree_unflatten(treedef, variance),
    )


def gradient_moments(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    method: str = "auto",
    microbatch_size: int | None = None,
) -> GradientMoments:
    """Per-coordinate mean and variance of the per-example gradients, and from them the
    gradient signal-to-noise ratio ``GSNR = ḡ² / variance`` (Liu et al., ICLR 2020).

    Methods:

    - ``"ghost"``: one backward pass with probes (``jaxgen._ghost``). A dense layer on
      one row per example has ``g_i = x_i δ_iᵀ``, so ``Σ_i g_i ⊙ g_i = (X ⊙ X)ᵀ (Δ ⊙ Δ)``:
      one product, no per-example gradient. Every other parameter (biases, gains,
      convolution kernels, dense layers on sequences, those no rule covers) gets its
      per-example gradients exactly from the same pass (memory ``b ×`` that leaf).
      ``variance = (1/b) Σ g_i² − ḡ²``, whose relative rounding error grows as
      ``ḡ²/variance`` (a coordinate whose GSNR is 10⁴ keeps about three digits in
      float32); programs with scans over layers take ``"vmap"``.
    - ``"vmap"``: per-example gradients ``microbatch_size`` at a time, their residuals
      about the first example's gradient summed (no cancellation).
    - ``"auto"``: ``"ghost"``, or ``"vmap"`` where the interpreter cannot follow.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: z @ w                  # g_i = z_i
      >>> m = jaxgen.gradient_moments(loss, jnp.zeros(2), jnp.array([[1.0, 2.0], [3.0, 2.0]]))
      >>> m.mean.tolist(), m.variance.tolist()
      ([2.0, 2.0], [1.0, 0.0])
    """
    _checks.choice("method", method, _METHODS)
    size = _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    values = ghost_or_vmap(
        method,
        lambda: _ghost_path(loss_fn, params, batch, method == "ghost"),
        lambda: _vmap_path(loss_fn, params, batch, microbatch_size),
    )
    return GradientMoments(*values, size)
