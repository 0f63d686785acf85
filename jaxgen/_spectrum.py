"""The Hessian's extreme eigenvalues and its spectral density, by Lanczos iteration.

Lanczos builds an orthonormal basis ``Q`` of the Krylov space ``{v, Hv, H²v, ...}`` one
Hessian-vector product at a time, with ``Qᵀ H Q = T`` tridiagonal; the eigenvalues of
``T`` (Ritz values) converge to the extreme eigenvalues of ``H`` first. Every new vector
is orthogonalised against the whole basis, twice (full reorthogonalisation), so no
eigenvalue is found twice and none is missed, at ``m × P`` numbers of memory.

Stochastic Lanczos quadrature (Golub & Meurant; Ghorbani, Krishnan & Xiao, *An
Investigation into Neural Net Optimization via Hessian Eigenvalue Density*, ICML 2019;
PyHessian's ``density``) runs Lanczos from random unit probes ``v``: the eigenvalues
``θ_l`` of ``T`` and the squared first components ``w_l`` of its eigenvectors are the
nodes and weights of a Gauss quadrature of ``vᵀ f(H) v``, so ``Σ_l w_l δ(t − θ_l)``
estimates the spectral density ``(1/P) Σ_i δ(t − λ_i)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxgen import _checks
from jaxgen._chunks import loops_are_slow
from jaxgen._hvp import has_custom_vjp, hvp_fn
from jaxgen._per_example import mean_loss
from jaxgen._random import as_key
from jaxgen._types import LossFn, PyTree

WHICH = ("largest", "smallest")


class EigenEstimate(NamedTuple):
    """Extreme eigenvalues of the Hessian of the mean loss.

    Attributes:
      values: ``(k,)`` the eigenvalues, largest first (``which="largest"``) or smallest
        first (``"smallest"``).
      residuals: ``(k,)`` ``‖H v − λ v‖`` of each unit eigenvector estimate ``v``: an
        eigenvalue lies within it of ``λ`` (for symmetric ``H``), so it says how far
        Lanczos has converged.
      vectors: the unit eigenvectors as a pytree like ``params`` whose leaves have a
        leading axis of size ``k``, or ``None`` unless asked for.
      num_hvps: Hessian-vector products spent (the iterations and the ``k`` residuals).
    """

    values: jax.Array
    residuals: jax.Array
    vectors: PyTree | None
    num_hvps: int


class Spectrum(NamedTuple):
    """Stochastic Lanczos quadrature of the Hessian's spectrum.

    Attributes:
      nodes: ``(num_probes, m)`` Ritz values ``θ`` of each probe's run.
      weights: ``(num_probes, m)`` their quadrature weights ``w`` (each row sums to 1).
    """

    nodes: jax.Array
    weights: jax.Array

    def moment(self, order: int) -> tuple[jax.Array, jax.Array]:
        """``(estimate, stderr)`` of ``(1/P) Tr Hᵒʳᵈᵉʳ``: ``Σ_l w_l θ_lᵒʳᵈᵉʳ`` averaged
        over the probes (exact per probe for ``order < 2m``), with its standard error."""
        per_probe = jnp.sum(self.weights * self.nodes**order, axis=1)
        count = per_probe.shape[0]
        stderr = jnp.std(per_probe, ddof=1) / jnp.sqrt(count) if count > 1 else jnp.nan
        return jnp.mean(per_probe), stderr


def spectral_density(spectrum: Spectrum, grid: jax.Array, *, sigma: float) -> jax.Array:
    """The smoothed density ``ρ(t) = mean_probes Σ_l w_l N(t; θ_l, σ²)`` on ``grid``, for
    plotting (it integrates to 1; ``σ`` of about 1 % of the spectrum's range reads well).

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> spectrum = jaxgen.Spectrum(jnp.array([[0.0, 1.0]]), jnp.array([[0.5, 0.5]]))
      >>> grid = jnp.linspace(-1.0, 2.0, 301)
      >>> round(float(jnp.sum(jaxgen.spectral_density(spectrum, grid, sigma=0.1)) * 0.01), 3)
      1.0
    """
    _checks.positive("sigma", sigma)
    grid = jnp.asarray(grid)
    z = (grid[:, None, None] - spectrum.nodes[None]) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(spectrum.weights[None] * kernel, axis=2), axis=1)


def _flat_hvp(loss_fn: LossFn, params: PyTree, batch: PyTree):
    """``(v ↦ H v on flat vectors, flat params, unravel)``, the product prepared once."""
    flat, unravel = ravel_pytree(params)
    custom_vjp = has_custom_vjp(loss_fn, params, batch)
    hvp = hvp_fn(lambda p: mean_loss(loss_fn, p, batch), params, custom_vjp=custom_vjp)
    dtype = jnp.promote_types(flat.dtype, jnp.float32)

    def matvec(v):
        return ravel_pytree(hvp(unravel(v.astype(flat.dtype))))[0].astype(dtype)

    return matvec, flat.astype(dtype), unravel


def lanczos(matvec, start: jax.Array, steps: int, key: jax.Array, *, unroll: bool = False):
    """``steps`` Lanczos iterations from ``start`` with full reorthogonalisation:
    ``(alphas (m,), betas (m − 1,), basis (m, P))``, ``T = tridiag(betas, alphas, betas)``.

    On breakdown (the Krylov space is invariant: ``β`` vanishes) the next vector is a
    fresh random one orthogonal to the basis and ``β = 0``, so ``T`` splits into blocks
    whose eigenvalues are all eigenvalues of ``H``."""
    size, dtype = start.shape[0], start.dtype
    tiny = jnp.finfo(dtype).eps * 10

    def project(w, basis, v):
        # Against the basis so far (its rows not yet filled are zeros) and v, the row it
        # is about to take. ``basis`` is only read until it is written, last, and never
        # passed through a ``cond``: XLA then updates it in place (otherwise it copied
        # all ``m × P`` numbers twice per step, twice the cost of the product).
        w = w - basis.T @ (basis @ w)
        return w - jnp.vdot(v, w) * v

    def step(i, carry):
        basis, alphas, betas, v, scale = carry
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        w = project(w, basis, v)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        broke = beta <= tiny * scale
        fresh = jax.lax.cond(
            broke,
            lambda: jax.random.normal(jax.random.fold_in(key, i), (size,), dtype),
            lambda: jnp.zeros((size,), dtype),
        )
        w = project(jnp.where(broke, fresh, w), basis, v)  # Gram–Schmidt twice: orthogonal
        basis = basis.at[i].set(v)
        beta = jnp.where(broke, 0, beta)
        return basis, alphas.at[i].set(alpha), betas.at[i].set(beta), w / jnp.linalg.norm(w), scale

    init = (
        jnp.zeros((steps, size), dtype),
        jnp.zeros(steps, dtype),
        jnp.zeros(steps, dtype),
        start / jnp.linalg.norm(start),
        jnp.zeros((), dtype),
    )
    basis, alphas, betas, _, _ = jax.lax.fori_loop(0, steps, step, init, unroll=unroll or 1)
    return alphas, betas[:-1], basis


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


def _parameter_count(params: PyTree) -> int:
    return sum(leaf.size for leaf in jax.tree_util.tree_leaves(params))


@functools.partial(jax.jit, static_argnames=("loss_fn", "k", "num_iterations", "which", "vectors"))
def _eigenvalues(loss_fn, params, batch, key, k, num_iterations, which, vectors):
    matvec, flat, unravel = _flat_hvp(loss_fn, params, batch)
    start_key, restart_key = jax.random.split(key)
    start = jax.random.normal(start_key, flat.shape, flat.dtype)
    # XLA:CPU runs convolutions ~40× slower inside loops (``jaxgen._chunks``): unrolled.
    unroll = loops_are_slow(matvec, flat)
    alphas, betas, basis = lanczos(matvec, start, num_iterations, restart_key, unroll=unroll)
    ritz, rotation = jnp.linalg.eigh(tridiagonal(alphas, betas))  # ascending
    order = jnp.arange(k) if which == "smallest" else num_iterations - 1 - jnp.arange(k)
    values, rotation = ritz[order], rotation[:, order]
    ritz_vectors = rotation.T @ basis  # (k, P), unit norm
    residuals = jnp.linalg.norm(
        jax.vmap(matvec)(ritz_vectors) - values[:, None] * ritz_vectors, axis=1
    )
    out = jax.vmap(unravel)(ritz_vectors.astype(flat.dtype)) if vectors else None
    return values, residuals, out


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Any,
    k: int = 1,
    num_iterations: int | None = None,
    which: str = "largest",
    vectors: bool = False,
) -> EigenEstimate:
    """The ``k`` largest (or smallest) eigenvalues of the Hessian of the mean loss
    ``L_B(w) = (1/b) Σ_i ℓ(w, z_i)``, by Lanczos with full reorthogonalisation.

    ``num_iterations`` Hessian-vector products (forward over reverse, or the VJP of the
    gradient for a loss with a ``custom_vjp``: ``jaxgen._hvp``) from a Gaussian start build
    a Krylov basis (``num_iterations × P`` numbers, in float32 at least); the Ritz values
    of its tridiagonal matrix are returned, each with its residual ``‖H v − λ v‖`` from
    one more product, which bounds its distance to an eigenvalue of ``H``. The extreme
    eigenvalues converge first, at a rate set by their gap to the rest; the smallest
    (most negative) comes from the same iteration: negative curvature after training is
    ``which="smallest"``. With ``num_iterations = P`` the values are exact up to rounding.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the point ``w`` at which the Hessian is taken.
      batch: the examples whose mean loss is differentiated.
      key: PRNG key (or integer seed) for the start vector.
      k: how many eigenvalues (``1 <= k <= num_iterations <= P``).
      num_iterations: Lanczos steps ``m``; default ``min(P, max(30, 3k))``.
      which: ``"largest"`` or ``"smallest"``.
      vectors: also return the eigenvectors, as pytrees like ``params``.

    Returns:
      ``EigenEstimate(values, residuals, vectors, num_hvps)``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * jnp.sum(z * w**2)     # H = diag(mean z) = diag(1, 2, 3)
      >>> batch = jnp.array([[1.0, 2.0, 3.0]])
      >>> top = jaxgen.hessian_eigenvalues(loss, jnp.ones(3), batch, key=0, k=2)
      >>> [round(float(v), 4) for v in top.values]
      [3.0, 2.0]
    """
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.choice("which", which, WHICH)
    size = _parameter_count(params)
    _checks.integer("k", k, minimum=1)
    if k > size:
        raise ValueError(f"k must be at most the number of parameters, {size}, got {k}")
    if num_iterations is None:
        num_iterations = min(size, max(30, 3 * k))
    _checks.integer("num_iterations", num_iterations, minimum=1)
    if not k <= num_iterations <= size:
        raise ValueError(
            f"num_iterations must lie between k = {k} and the number of parameters, {size}, "
            f"got {num_iterations}"
        )
    values, residuals, out = _eigenvalues(
        loss_fn, params, batch, as_key(key), k, num_iterations, which, vectors
    )
    return EigenEstimate(values, residuals, out, num_iterations + k)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes", "num_iterations"))
def _spectrum(loss_fn, params, batch, key, num_probes, num_iterations):
    matvec, flat, _ = _flat_hvp(loss_fn, params, batch)

    def one(probe_key):
        start_key, restart_key = jax.random.split(probe_key)
        start = jax.random.rademacher(start_key, flat.shape, flat.dtype)
        alphas, betas, _ = lanczos(matvec, start, num_iterations, restart_key)
        nodes, rotation = jnp.linalg.eigh(tridiagonal(alphas, betas))
        return nodes, rotation[0] ** 2

    nodes, weights = jax.lax.map(one, jax.random.split(key, num_probes))
    return Spectrum(nodes, weights)


def hessian_spectrum(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: Any,
    num_probes: int = 10,
    num_iterations: int = 30,
) -> Spectrum:
    """The spectral density of the Hessian of the mean loss by stochastic Lanczos
    quadrature (Ghorbani, Krishnan & Xiao, ICML 2019; PyHessian's ``density``).

    Each of ``num_probes`` Rademacher probes runs ``num_iterations`` Lanczos steps (one
    Hessian-vector product each, full reorthogonalisation); its Ritz values and the
    squared first components of ``T``'s eigenvectors are the nodes and weights of a
    Gauss quadrature. ``Spectrum.moment(1)`` and ``moment(2)`` estimate ``Tr H / P`` and
    ``Tr H² / P`` (exactly ``vᵀHv/‖v‖²`` and ``‖Hv‖²/‖v‖²`` per probe);
    ``spectral_density`` smooths the nodes into a density on a grid. The probes run
    one after another in a loop (memory: one basis of ``num_iterations × P`` numbers);
    on a CPU a model with convolutions runs them slowly there (XLA:CPU runs convolutions
    ~40× slower inside loops), which ``hessian_eigenvalues`` avoids by unrolling.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * jnp.sum(z * w**2)     # eigenvalues 1, 2, 3
      >>> s = jaxgen.hessian_spectrum(loss, jnp.ones(3), jnp.array([[1.0, 2.0, 3.0]]),
      ...                             key=0, num_probes=4, num_iterations=3)
      >>> round(float(s.moment(1)[0]), 4)                 # Tr H / P
      2.0
    """
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.integer("num_probes", num_probes, minimum=1)
    _checks.integer("num_iterations", num_iterations, minimum=1)
    size = _parameter_count(params)
    if num_iterations > size:
        raise ValueError(
            f"num_iterations must be at most the number of parameters, {size}, got {num_iterations}"
        )
    return _spectrum(loss_fn, params, batch, as_key(key), num_probes, num_iterations)
