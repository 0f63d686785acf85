"""Trace of the Hessian of the mean training loss.

``Tr H`` enters Eq. (2) of Wang & Mao (ICLR 2022) through the second-order expansion of
the flatness term, ``E[L_S(w + Δ) − L_S(w)] ≈ σ² Tr H / 2``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from jaxgen import _checks
from jaxgen._chunks import map_in_rows
from jaxgen._flatness import mean_and_stderr
from jaxgen._hvp import has_custom_vjp, hvp_fn
from jaxgen._per_example import mean_loss
from jaxgen._random import rademacher_like
from jaxgen._types import LossFn, PyTree

_METHODS = ("hutchinson", "hutch++", "exact")


class TraceEstimate(NamedTuple):
    """An estimate of ``Tr H`` with its Monte Carlo standard error.

    Attributes:
      value: the estimate.
      stderr: standard error of ``value`` (sample std / √num_probes); ``0`` for the exact
        method, ``nan`` for a single Hutchinson probe; for Hutch++, that of its residual
        Hutchinson term (the sample std of its probes over the square root of their number).
      num_probes: the number of Hessian-vector products (or quadratic forms) spent
        (``P`` when exact).
    """

    value: jax.Array
    stderr: jax.Array
    num_probes: int


def _shard_count(sharding: jax.sharding.NamedSharding) -> int:
    """How many pieces ``sharding`` cuts the leading axis of a vector into."""
    axes = sharding.spec[0] if len(sharding.spec) else None
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(sharding.mesh.shape[axis] for axis in axes)


def _quadratic_form_fn(loss_fn: LossFn, params: PyTree, batch: PyTree, hvp=None):
    """``v ↦ vᵀ H v`` at ``params`` (``hvp``: an ``H v`` at hand for the fallback below).

    The second directional derivative ``d²/dε² L_B(w + εv)`` at ``ε = 0``, by forward mode
    over forward mode: no backward pass and no stored activations, about 1.1–1.3× a
    gradient per probe (``benchmarks/hessian.py``; a forward-over-reverse ``H v`` costs
    about 2× and then needs a dot product). Losses that forward mode cannot differentiate
    (a ``jax.custom_vjp`` inside, at any depth) use ``vᵀ(H v)`` instead (``jaxgen._hvp``).
    """
    if has_custom_vjp(loss_fn, params, batch):
        hvp = hvp or _hvp_fn(loss_fn, params, batch)
        return lambda v: optax.tree.vdot(v, hvp(v))

    def directional(w, v):
        return jax.jvp(lambda u: mean_loss(loss_fn, u, batch), (w,), (v,))[1]

    def forward_over_forward(v):
        return jax.jvp(lambda w: directional(w, v), (params,), (v,))[1]

    return forward_over_forward


def _hvp_fn(loss_fn: LossFn, params: PyTree, batch: PyTree, *, outer: str = "forward"):
    """``v ↦ H v`` of the mean loss at ``params``, prepared once (``jaxgen._hvp.hvp_fn``)."""
    custom_vjp = has_custom_vjp(loss_fn, params, batch)
    return hvp_fn(
        lambda p: mean_loss(loss_fn, p, batch), params, custom_vjp=custom_vjp, outer=outer
    )


def _in_rows(fn, xs, chunk_size, probe_sharding):
    """``map_in_rows(fn, xs, chunk_size)``, each row spread over ``probe_sharding``'s
    devices (rows rounded up to a multiple of them) when it is given."""
    if probe_sharding is None:
        return map_in_rows(fn, xs, chunk_size)
    shards = _shard_count(probe_sharding)
    return map_in_rows(
        fn,
        xs,
        shards * -(-chunk_size // shards),
        row_constraint=lambda row: jax.lax.with_sharding_constraint(row, probe_sharding),
    )


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_probes", "chunk_size", "probe_sharding")
)
def _hutchinson(loss_fn, params, batch, key, num_probes, chunk_size, probe_sharding):
    quadratic_form = _quadratic_form_fn(loss_fn, params, batch)

    def sample(probe_key):
        return quadratic_form(rademacher_like(probe_key, params))

    samples = _in_rows(sample, jax.random.split(key, num_probes), chunk_size, probe_sharding)
    return mean_and_stderr(samples, num_probes)


@functools.partial(
    jax.jit, static_argnames=("loss_fn", "num_probes", "chunk_size", "probe_sharding")
)
def _hutch_plus_plus(loss_fn, params, batch, key, num_probes, chunk_size, probe_sharding):
    flat, unravel = ravel_pytree(params)
    hvp = _hvp_fn(loss_fn, params, batch)
    quadratic_form = _quadratic_form_fn(loss_fn, params, batch, hvp)  # one H v prepared
    sketch_size = num_probes // 3
    residual_size = num_probes - 2 * sketch_size
    keys = jax.random.split(key, num_probes - sketch_size)
    sketch_keys, residual_keys = keys[:sketch_size], keys[sketch_size:]

    def sketch(probe_key):
        return ravel_pytree(hvp(rademacher_like(probe_key, params)))[0]

    def deflated(column):
        return quadratic_form(unravel(column.astype(flat.dtype)))

    def residual(probe_key):
        probe = ravel_pytree(rademacher_like(probe_key, params))[0].astype(basis.dtype)
        return quadratic_form(unravel((probe - basis @ (basis.T @ probe)).astype(flat.dtype)))

    rows = functools.partial(_in_rows, chunk_size=chunk_size, probe_sharding=probe_sharding)
    sketched = rows(sketch, sketch_keys)  # orthonormalised in float32 at least
    basis = jnp.linalg.qr(sketched.T.astype(jnp.promote_types(flat.dtype, jnp.float32)))[0]
    value, stderr = mean_and_stderr(rows(residual, residual_keys), residual_size)
    return jnp.sum(rows(deflated, basis.T)) + value, stderr


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _exact(loss_fn, params, batch, chunk_size):
    flat, unravel = ravel_pytree(params)
    quadratic_form = _quadratic_form_fn(loss_fn, params, batch)

    def diagonal_entry(index):
        return quadratic_form(unravel(jax.nn.one_hot(index, flat.size, dtype=flat.dtype)))

    value = jnp.sum(map_in_rows(diagonal_entry, jnp.arange(flat.size), chunk_size))
    return value, jnp.zeros_like(value)


def hessian_trace(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Any = None,
    num_probes: int = 100,
    method: str = "hutchinson",
    chunk_size: int = 10,
    probe_sharding: jax.sharding.Sharding | None = None,
) -> TraceEstimate:
    """Trace of the Hessian of the mean loss ``L_B(w) = (1/b) Σ_i ℓ(w, z_i)``.

    Hutchinson: ``Tr H ≈ (1/m) Σ_j v_jᵀ H v_j`` with Rademacher probes ``v_j``
    (``E[v vᵀ] = I``); each ``v_jᵀ H v_j`` is the second directional derivative
    ``d²/dε² L_B(w + ε v_j)``, taken by forward mode over forward mode (about 1.1–1.6× a
    gradient per probe; losses containing a ``jax.custom_vjp``, which forward mode cannot
    differentiate, use ``vᵀ(H v)`` with ``H v`` the VJP of the gradient, ``jaxgen._hvp``).
    Probes are evaluated ``chunk_size`` at a time under ``vmap``, the rows of probes one
    after another: in straight-line code on a CPU (``jaxgen._chunks``: XLA:CPU runs
    convolutions inside loops ~40× slower), in a ``lax.map`` elsewhere. The standard
    error is the sample standard deviation of ``v_jᵀ H v_j`` over ``√m``. ``"exact"``
    sums the diagonal ``e_kᵀ H e_k`` over all ``P`` coordinates (``P`` quadratic forms):
    for small models and for checking the estimate.

    ``"hutch++"`` (Meyer, Musco, Musco & Woodruff, *Hutch++: Optimal Stochastic Trace
    Estimation*, SOSA 2021) spends the same ``m`` products in thirds: ``k = ⌊m/3⌋``
    products ``Y = H S`` with Rademacher ``S`` span the Hessian's dominant directions,
    ``Q = qr(Y)``; then ``Tr H ≈ Tr(Qᵀ H Q) + (1/r) Σ_j g_jᵀ (I − QQᵀ) H (I − QQᵀ) g_j``
    over ``r = m − 2k`` Rademacher ``g_j``. It is unbiased for every ``Q``, and its error
    is that of the residual term alone (``stderr`` is that term's sample error, given
    ``Q``), from which the sketched directions, mostly the largest eigenvalues', are
    gone. Its sketch products are forward-over-reverse ``H v`` (dearer than the quadratic
    forms); it holds ``k`` vectors of ``P`` numbers and needs ``m ≥ 3``. It pays where a
    few eigenvalues dominate: on a trained small CNN its error was 6.5× smaller than
    Hutchinson's for the same products; at initialisation and on a transformer block it
    was larger (``benchmarks/hessian.py``).

    Wang & Mao (ICLR 2022), Eq. (2), estimate ``Tr H`` at the final weights with up to
    100 Rademacher probes on ``n/10`` training examples.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the point ``w`` at which the Hessian is taken.
      batch: the examples whose mean loss is differentiated.
      key: PRNG key for the probes (required for ``"hutchinson"`` and ``"hutch++"``).
      num_probes: number of Rademacher probes ``m`` (Hutch++: of products, ``≥ 3``).
      method: ``"hutchinson"``, ``"hutch++"`` or ``"exact"``.
      chunk_size: probes (or basis vectors) evaluated together under ``vmap`` (memory);
        on a CPU, ``ceil(m / chunk_size)`` rows are compiled one after another (compile
        time), up to 32 rows, beyond which (and on other backends) they run in a loop.
      probe_sharding: a ``NamedSharding`` that spreads the Hutchinson probes over mesh
        axes, e.g. ``NamedSharding(mesh, PartitionSpec("data"))`` (``jaxgen.make_mesh``):
        the probes are evaluated in rows of ``chunk_size`` rounded up to a multiple of
        the devices on those axes, each device taking its share of a row. The same
        ``key`` draws the same probes, so the estimate equals the unsharded one up to
        the order of the final sum.

    Returns:
      ``TraceEstimate(value, stderr, num_probes)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * jnp.sum(z * w**2)
      >>> est = jaxgen.hessian_trace(loss, jnp.ones(3), jnp.ones((4, 3)), method="exact")
      >>> float(est.value)
      3.0
    """
    _checks.choice("method", method, _METHODS)
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.integer("num_probes", num_probes, minimum=1)
    _checks.integer("chunk_size", chunk_size, minimum=1)
    if method == "exact":
        size = optax.tree.size(params)
        value, stderr = _exact(loss_fn, params, batch, chunk_size)
        return TraceEstimate(value, stderr, size)
    if key is None:
        raise ValueError(f"key must be a PRNG key for method={method!r}, got None")
    _checks.key("key", key)
    if probe_sharding is not None and not isinstance(probe_sharding, jax.sharding.NamedSharding):
        raise ValueError(
            f"probe_sharding must be a jax.sharding.NamedSharding, got {probe_sharding!r}"
        )
    estimator = _hutchinson
    if method == "hutch++":
        if num_probes < 3:
            raise ValueError(
                f"num_probes must be an integer >= 3 for method='hutch++' (a third of the "
                f"products sketch, a third deflate, the rest estimate), got {num_probes}"
            )
        estimator = _hutch_plus_plus
    value, stderr = estimator(
        loss_fn, params, batch, key, num_probes, min(chunk_size, num_probes), probe_sharding
    )
    return TraceEstimate(value, stderr, num_probes)
