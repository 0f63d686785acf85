"""Per-example gradients and the gradient dispersion of a minibatch.

For a per-example loss ``ℓ(w, z)`` and a batch ``B = {z_1..z_b}`` with per-example
gradients ``g_i = ∇_w ℓ(w, z_i)`` and mean ``ḡ = (1/b) Σ_i g_i``:

    dispersion = (1/b) Σ_i ‖g_i − ḡ‖²      (trace of the per-example covariance)
    V_t        = dispersion / b             (variance of the minibatch mean gradient)

as in Wang & Mao, *On the Generalization of Models Trained with SGD: Information-Theoretic
Bounds and Implications*, ICLR 2022 (Theorem 1, where ``V_t`` enters the bound).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgen import _checks

PyTree = Any
LossFn = Callable[[PyTree, PyTree], jax.Array]

_METHODS = ("auto", "vmap", "ghost")


class DispersionStats(NamedTuple):
    """Gradient statistics of one minibatch of ``b`` examples.

    Attributes:
      loss: mean loss ``(1/b) Σ_i ℓ(w, z_i)``.
      grad: mean gradient ``ḡ`` (pytree like ``params``); a training step can reuse it.
      sq_norms: ``(b,)`` per-example squared gradient norms ``‖g_i‖²``.
      dispersion: ``(1/b) Σ_i ‖g_i − ḡ‖²``, the trace of the per-example gradient
        covariance (population normalisation, ``1/b``).
      layer_dispersion: the same sum restricted to each parameter leaf (pytree like
        ``params`` of scalars); its leaves add up to ``dispersion``.
    """

    loss: jax.Array
    grad: PyTree
    sq_norms: jax.Array
    dispersion: jax.Array
    layer_dispersion: PyTree

    @property
    def batch_size(self) -> int:
        return self.sq_norms.shape[0]

    @property
    def minibatch_variance(self) -> jax.Array:
        """``V_t = dispersion / b``: the variance of the minibatch mean gradient."""
        return self.dispersion / self.batch_size


class _Moments(NamedTuple):
    """Running moments of per-example gradients measured from a fixed ``shift``.

    ``mean`` is the mean of the residuals ``g_i − shift`` and ``m2`` (per leaf)
    ``Σ_i ‖g_i − ḡ‖²``. ``shift`` is the first microbatch's mean gradient: residuals are
    then small, so neither their means nor the merge of two microbatches lose precision
    to a large ``‖ḡ‖`` (the shifted-data form of Chan, Golub & LeVeque, 1983).
    """

    count: jax.Array
    loss_sum: jax.Array
    mean: PyTree
    m2: PyTree


def _per_example_values_and_grads(loss_fn: LossFn, params: PyTree, batch: PyTree):
    return jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0))(params, batch)


def _sq_norms(grads: PyTree) -> jax.Array:
    per_leaf = [
        jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree_util.tree_leaves(grads)
    ]
    return functools.reduce(jnp.add, per_leaf)


def _chunk_moments(loss_fn: LossFn, params: PyTree, chunk: PyTree, shift: PyTree | None):
    """Moments of one microbatch about ``shift`` (its own mean gradient when ``None``)."""
    losses, grads = _per_example_values_and_grads(loss_fn, params, chunk)
    if shift is None:
        shift = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
    residuals = jax.tree_util.tree_map(jnp.subtract, grads, shift)
    mean = jax.tree_util.tree_map(lambda r: jnp.mean(r, axis=0), residuals)
    # Squared residuals from the mean, never Σ‖g_i‖² − b‖ḡ‖²: every term is >= 0.
    m2 = jax.tree_util.tree_map(lambda r, m: jnp.sum(jnp.square(r - m)), residuals, mean)
    moments = _Moments(jnp.asarray(losses.shape[0], losses.dtype), jnp.sum(losses), mean, m2)
    return moments, _sq_norms(grads), shift


def _merge(a: _Moments, b: _Moments) -> _Moments:
    """Chan, Golub & LeVeque's pairwise update of the centred second moment."""
    count = a.count + b.count
    weight = b.count / count
    delta = jax.tree_util.tree_map(jnp.subtract, b.mean, a.mean)
    mean = jax.tree_util.tree_map(lambda m, d: m + d * weight.astype(d.dtype), a.mean, delta)
    cross = a.count * weight
    m2 = jax.tree_util.tree_map(
        lambda ma, mb, d: ma + mb + jnp.sum(jnp.square(d)) * cross.astype(d.dtype),
        a.m2,
        b.m2,
        delta,
    )
    return _Moments(count, a.loss_sum + b.loss_sum, mean, m2)


def _split(batch: PyTree, size: int, chunk: int):
    """``batch`` as (full chunks stacked on a new leading axis, remainder or None)."""
    num_full = size // chunk
    head = jax.tree_util.tree_map(
        lambda x: x[: num_full * chunk].reshape(num_full, chunk, *x.shape[1:]), batch
    )
    tail = None
    if num_full * chunk < size:
        tail = jax.tree_util.tree_map(lambda x: x[num_full * chunk :], batch)
    return head, tail


@functools.partial(jax.jit, static_argnames=("loss_fn", "microbatch_size"))
def _dispersion_vmap(loss_fn, params, batch, microbatch_size):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    chunk = size if microbatch_size is None else min(microbatch_size, size)
    head, tail = _split(batch, size, chunk)
    first = jax.tree_util.tree_map(lambda x: x[0], head)
    moments, first_norms, shift = _chunk_moments(loss_fn, params, first, None)
    norms = [first_norms]
    if jax.tree_util.tree_leaves(head)[0].shape[0] > 1:
        rest = jax.tree_util.tree_map(lambda x: x[1:], head)

        def body(carry, chunk_batch):
            chunk_moments, chunk_norms, _ = _chunk_moments(loss_fn, params, chunk_batch, shift)
            return _merge(carry, chunk_moments), chunk_norms

        moments, rest_norms = jax.lax.scan(body, moments, rest)
        norms.append(rest_norms.reshape(-1))
    if tail is not None:
        tail_moments, tail_norms, _ = _chunk_moments(loss_fn, params, tail, shift)
        moments = _merge(moments, tail_moments)
        norms.append(tail_norms)
    layer_dispersion = jax.tree_util.tree_map(lambda m: m / size, moments.m2)
    return DispersionStats(
        loss=moments.loss_sum / size,
        grad=jax.tree_util.tree_map(jnp.add, shift, moments.mean),
        sq_norms=jnp.concatenate(norms),
        dispersion=functools.reduce(jnp.add, jax.tree_util.tree_leaves(layer_dispersion)),
        layer_dispersion=layer_dispersion,
    )


def per_example_grads(
    loss_fn: LossFn, params: PyTree, batch: PyTree, *, microbatch_size: int | None = None
) -> PyTree:
    """Per-example gradients ``g_i = ∇_w ℓ(w, z_i)`` for every example of ``batch``.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the parameters ``w`` (any pytree of float arrays).
      batch: pytree whose leaves share a leading axis of size ``B``; ``example`` is one
        slice of it along that axis.
      microbatch_size: evaluate ``vmap(grad)`` this many examples at a time (bounds the
        memory of intermediate activations; the result is ``B×P`` either way).

    Returns:
      A pytree like ``params`` whose every leaf has a leading axis of size ``B``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * (z["y"] - z["x"] @ w) ** 2
      >>> batch = {"x": jnp.eye(3), "y": jnp.ones(3)}
      >>> jaxgen.per_example_grads(loss, jnp.zeros(3), batch).shape
      (3, 3)
    """
    _checks.batch_size("batch", batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    grad_one = functools.partial(jax.grad(loss_fn), params)
    if microbatch_size is None:
        return jax.vmap(grad_one)(batch)
    return jax.lax.map(grad_one, batch, batch_size=microbatch_size)


def gradient_dispersion(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    method: str = "auto",
    microbatch_size: int | None = None,
) -> DispersionStats:
    """Mean loss, mean gradient, per-example squared norms and gradient dispersion.

    ``dispersion = (1/b) Σ_i ‖g_i − ḡ‖²``; ``stats.minibatch_variance = dispersion / b`` is
    the ``V_t`` of Theorem 1 in Wang & Mao (ICLR 2022). The sum is accumulated from
    squared residuals about a shift near ``ḡ`` (per microbatch, merged with Chan et al.'s
    pairwise update), so it is never negative and stays accurate in float32 when ``‖ḡ‖``
    dominates the spread of the ``g_i``.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the parameters ``w``.
      batch: pytree whose leaves share a leading axis of size ``b``.
      method: ``"vmap"`` materialises per-example gradients (``microbatch_size`` at a
        time); ``"ghost"`` never materialises them (not available yet); ``"auto"`` picks
        the fastest exact method available, currently ``"vmap"``.
      microbatch_size: with ``"vmap"``, materialise at most this many per-example
        gradients at once (memory ``microbatch_size × P`` instead of ``b × P``).

    Returns:
      ``DispersionStats(loss, grad, sq_norms, dispersion, layer_dispersion)``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * (z["y"] - z["x"] @ w) ** 2
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([1.0, -1.0])}
      >>> float(jaxgen.gradient_dispersion(loss, jnp.zeros(2), batch).dispersion)
      0.5
    """
    _checks.choice("method", method, _METHODS)
    _checks.batch_size("batch", batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    if method == "ghost":
        raise NotImplementedError(
            "method='ghost' (per-example norms without materialising per-example gradients) "
            "is not implemented yet; use method='vmap' or 'auto'"
        )
    return _dispersion_vmap(loss_fn, params, batch, microbatch_size)
