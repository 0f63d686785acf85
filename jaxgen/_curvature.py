"""Curvature per parameter: the Hessian's diagonal and its per-leaf block traces.

With Rademacher probes ``v`` (``E[v vᵀ] = I``), ``E[v ⊙ H v] = diag H`` (Bekas, Kokiopoulou
& Saad, 2007; BackPACK's ``DiagHessian`` computes it exactly for supported layers) and,
summing a leaf's entries, ``E[v_lᵀ (H v)_l] = Tr H_ll``, the trace of the leaf's diagonal
block: the curvature of each layer from the same probes. ``hessian_trace`` is the sum of
the block traces.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgen import _checks
from jaxgen._chunks import MAX_UNROLLED, loops_are_slow
from jaxgen._hessian import _hvp_fn
from jaxgen._per_example import mean_loss
from jaxgen._random import as_key, rademacher_like
from jaxgen._sums import pairwise_sum
from jaxgen._types import LossFn, PyTree


class HessianDiagonal(NamedTuple):
    """Hutchinson estimates of the Hessian's diagonal and of its per-leaf block traces.

    Attributes:
      diagonal: ``diag H`` (pytree like ``params``).
      diagonal_stderr: each entry's standard error (sample std over ``√m``).
      block_traces: ``Tr H_ll`` per leaf (pytree like ``params`` of scalars); they add up
        to the Hutchinson estimate of ``Tr H`` from the same probes.
      block_trace_stderr: their standard errors.
      num_probes: ``m``, the Hessian-vector products spent.
    """

    diagonal: PyTree
    diagonal_stderr: PyTree
    block_traces: PyTree
    block_trace_stderr: PyTree
    num_probes: int


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes", "chunk_size", "slow"))
def _diagonal(loss_fn, params, batch, key, num_probes, chunk_size, slow):
    hvp = _hvp_fn(loss_fn, params, batch, outer="reverse")  # products in params' layout
    dtype = jnp.promote_types(jax.tree_util.tree_leaves(params)[0].dtype, jnp.float32)

    def products(probe_key):
        v = rademacher_like(probe_key, params)
        d = jax.tree_util.tree_map(lambda a, b: (a * b).astype(dtype), v, hvp(v))
        return d, jax.tree_util.tree_map(jnp.sum, d)

    rows = -(-num_probes // chunk_size)
    keys = jax.random.split(key, rows * chunk_size).reshape(rows, chunk_size)
    keep = (jnp.arange(rows * chunk_size) < num_probes).reshape(rows, chunk_size)

    def row(carry, inputs):
        row_keys, row_keep = inputs
        d, blocks = jax.vmap(products)(row_keys)

        def masked(x):
            return x * row_keep.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)

        total, squares = carry
        total = jax.tree_util.tree_map(lambda t, x: t + pairwise_sum(masked(x)), total, d)
        squares = jax.tree_util.tree_map(lambda s, x: s + pairwise_sum(masked(x * x)), squares, d)
        return (total, squares), blocks

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, dtype), params)
    # XLA:CPU runs convolutions ~40× slower inside loops (``jaxgen._chunks``): unrolled.
    unroll = rows if rows <= MAX_UNROLLED and slow else 1
    (total, squares), blocks = jax.lax.scan(row, (zeros, zeros), (keys, keep), unroll=unroll)
    blocks = jax.tree_util.tree_map(lambda b: b.reshape(-1)[:num_probes], blocks)

    def mean_stderr(total, squares):
        mean = total / num_probes
        if num_probes == 1:
            return mean, jnp.full_like(mean, jnp.nan)
        variance = jnp.maximum(squares - num_probes * mean**2, 0) / (num_probes - 1)
        return mean, jnp.sqrt(variance / num_probes)

    pairs = jax.tree_util.tree_map(mean_stderr, total, squares)
    diagonal = jax.tree_util.tree_map(lambda _, pair: pair[0], params, pairs)
    diagonal_stderr = jax.tree_util.tree_map(lambda _, pair: pair[1], params, pairs)
    block_traces = jax.tree_util.tree_map(jnp.mean, blocks)
    if num_probes == 1:
        block_stderr = jax.tree_util.tree_map(lambda b: jnp.full((), jnp.nan, b.dtype), blocks)
    else:
        block_stderr = jax.tree_util.tree_map(
            lambda b: jnp.std(b, ddof=1) / math.sqrt(num_probes), blocks
        )
    return diagonal, diagonal_stderr, block_traces, block_stderr


def hessian_diagonal(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Any,
    num_probes: int = 100,
    chunk_size: int | None = None,
) -> HessianDiagonal:
    """The diagonal of the Hessian of the mean loss and each leaf's block trace
    ``Tr H_ll``, by Hutchinson: ``diag H ≈ (1/m) Σ_j v_j ⊙ H v_j`` over Rademacher ``v_j``.

    One Hessian-vector product per probe (``jaxgen._hvp``), ``chunk_size`` probes at a
    time under ``vmap`` (default: one at a time on a CPU, where batched products were
    slower per probe on the benchmarks' MLP; 10 for a model with convolutions there,
    whose rows are unrolled, and on other backends); the running sums of ``v ⊙ Hv`` and
    its square give each entry's standard error (memory: a few copies of ``params``, never
    ``m × P``). Each leaf's ``Tr H_ll = E[v_lᵀ (H v)_l]`` is the sum of its diagonal, with
    a standard error of its own from the per-probe sums: the curvature layer by layer, on
    any JAX program (a ``scan`` over stacked layers gives the stacked leaf's block).

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * jnp.sum(z * w**2)   # H = diag(1, 2): v ⊙ Hv is exact
      >>> d = jaxgen.hessian_diagonal(loss, jnp.ones(2), jnp.array([[1.0, 2.0]]),
      ...                             key=0, num_probes=4)
      >>> d.diagonal.tolist(), float(d.block_traces)
      ([1.0, 2.0], 3.0)
    """
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.integer("num_probes", num_probes, minimum=1)
    slow = loops_are_slow(functools.partial(mean_loss, loss_fn), params, batch)
    if chunk_size is None:
        chunk_size = 10 if slow or jax.default_backend() != "cpu" else 1
    _checks.integer("chunk_size", chunk_size, minimum=1)
    chunk_size = min(chunk_size, num_probes)
    values = _diagonal(loss_fn, params, batch, as_key(key), num_probes, chunk_size, slow)
    return HessianDiagonal(*values, num_probes)
