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
import optax
from jax import lax

from jaxgen import _checks
from jaxgen._chunks import loops_are_slow, map_in_rows
from jaxgen._hessian import _hvp_fn
from jaxgen._random import as_key, gaussian_like, rademacher_like
from jaxgen._types import LossFn, PyTree

WHICH = ("largest", "smallest")
SPECTRUM_BASIS_NUMBERS = 2**27  # 512 MiB of float32 Krylov bases for the probes side by side


class EigenEstimate(NamedTuple):
    """Extreme eigenvalues of the Hessian of the mean loss.

    Attributes:
      values: ``(k,)`` the eigenvalues, largest first (``which="largest"``) or smallest
        first (``"smallest"``).
      residuals: ``(k,)`` ``‖H v − λ v‖`` of each unit eigenvector estimate ``v``: an
        eigenvalue lies within it of ``λ`` (for symmetric ``H``), so it says how far
        Lanczos has converged. Lanczos's own ``|β_m s_m|``, equal to it up to rounding
        while the basis stays orthogonal: no product is spent on it.
      vectors: the unit eigenvectors as a pytree like ``params`` whose leaves have a
        leading axis of size ``k``, or ``None`` unless asked for.
      num_hvps: Hessian-vector products spent (one per iteration).
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


def _matvec(loss_fn: LossFn, params: PyTree, batch: PyTree):
    """``(v ↦ H v on pytrees like params in float32 at least, that dtype)``: the product
    prepared once, reverse over forward (``jaxgen._hvp``: its products come back in the
    parameters' layout). The basis stays a pytree: flattening every vector
    (``ravel_pytree``) cost more than the product itself on the benchmarks' MLP."""
    hvp = _hvp_fn(loss_fn, params, batch, outer="reverse")
    dtypes = jax.tree_util.tree_map(lambda x: jnp.promote_types(x.dtype, jnp.float32), params)

    def matvec(v):
        product = hvp(jax.tree_util.tree_map(lambda u, x: u.astype(x.dtype), v, params))
        return jax.tree_util.tree_map(lambda u, d: u.astype(d), product, dtypes)

    return matvec, dtypes


def _coefficients(basis: PyTree, w: PyTree) -> jax.Array:
    """``Q w``: the inner products of ``w`` with the basis rows."""
    rows = jax.tree_util.tree_leaves(basis)
    return sum(
        q.reshape(q.shape[0], -1) @ x.ravel()
        for q, x in zip(rows, jax.tree_util.tree_leaves(w), strict=True)
    )


def _combine(coefficients: jax.Array, basis: PyTree) -> PyTree:
    """``Qᵀ c``: the basis rows (leading axis of every leaf) weighted by ``c`` and summed."""
    return jax.tree_util.tree_map(lambda q: jnp.tensordot(coefficients, q, axes=1), basis)


def _reorthogonalised(w: PyTree, basis: PyTree, key: jax.Array, tiny: jax.Array):
    """``(w less its components along the basis rows, whether the Krylov space broke
    down)``: one classical Gram–Schmidt pass, enough while ``w`` is nearly orthogonal to
    the basis already (the three-term recurrence's job). Where the pass removed over half
    of ``w`` (the space nearly invariant), the rounding it left is of ``w``'s size, so it
    runs twice more (Daniel, Gragg, Kaufman & Stewart's criterion); where nothing is left
    (breakdown), a fresh Gaussian vector takes ``w``'s place, projected twice. Both are
    rare and sit in a ``cond``."""

    def project(x):
        return jax.tree_util.tree_map(jnp.subtract, x, _combine(_coefficients(basis, x), basis))

    projected = project(w)
    left = optax.tree.norm(projected)
    broke = left <= tiny

    def repair(x):
        fresh = gaussian_like(key, x, 1.0)
        x = jax.tree_util.tree_map(lambda f, y: jnp.where(broke, f, y), fresh, x)
        return project(project(x))

    again = broke | (left < 0.5 * optax.tree.norm(w))
    return lax.cond(again, repair, lambda x: x, projected), broke


def lanczos(
    matvec,
    start: PyTree,
    steps: int,
    key: jax.Array,
    *,
    unroll: bool = False,
    reorthogonalize: bool = True,
    keep_basis: bool = True,
):
    """``steps`` Lanczos iterations from ``start`` with full reorthogonalisation:
    ``(alphas (m,), betas (m,), basis)``, ``T = tridiag(betas[:-1], alphas, betas[:-1])``,
    ``basis`` a pytree like ``start`` whose leaves have a leading axis of ``m + 1`` rows
    (the last is the next Lanczos vector), and ``betas[-1]`` the norm of the step beyond
    (``‖H q − θ q‖ = |β_m s_m|`` for a Ritz pair ``(θ, q = Qᵀ s)``).

    Each step is the three-term recurrence ``w = H v − α v − β v₋₁`` and then one classical
    Gram–Schmidt pass ``w ← w − Qᵀ(Q w)`` against the basis (``v`` and ``v₋₁`` included, the
    rows not yet written are zeros), repeated where it cancelled (``_reorthogonalised``):
    the basis stays orthogonal to rounding. The pass reads
    the ``m × P`` numbers twice, which on a large model costs more than the product (a
    20-step run on the benchmarks' MLP: a step 7.9× a gradient, its product 2×).
    The new vector is written after the pass, into the next row: that it depends on the
    pass's reads lets XLA update the basis in place (written before them, or into the row
    just read, XLA:CPU copied all ``m × P`` numbers two or three times a step). On
    breakdown (the Krylov space is invariant: ``w`` vanishes) a fresh Gaussian vector
    takes ``w``'s place and ``β = 0``, so ``T`` splits into blocks whose eigenvalues are
    all eigenvalues of ``H`` (a ±1 vector would not do: it can be orthogonal to all that
    is left, e.g. for ``H = diag(1, 1, 1, 2, 2)``).

    ``reorthogonalize=False``: the pass is against ``v`` and ``v₋₁`` only (plain Lanczos,
    as PyHessian's power iteration keeps no basis either; ``basis`` is ``None`` unless
    ``keep_basis``). Orthogonality is then lost, in rounding, along the Ritz vectors that
    have converged, which come back as copies ("ghosts"): the extreme value and its
    residual stay right, the count of nearby values does not."""
    leaves = jax.tree_util.tree_leaves(start)
    dtype = functools.reduce(jnp.promote_types, [x.dtype for x in leaves])
    tiny = jnp.finfo(dtype).eps * 10

    def step(i, carry):
        basis, alphas, betas, v, previous, scale = carry
        w = matvec(v)
        alpha = optax.tree.vdot(v, w)
        beta = jnp.where(i > 0, betas[jnp.maximum(i - 1, 0)], 0)
        w = optax.tree.add_scale(optax.tree.add_scale(w, -alpha, v), -beta, previous)
        scale = jnp.maximum(scale, jnp.abs(alpha) + beta)
        fresh_key = jax.random.fold_in(key, i)
        if reorthogonalize:
            w, broke = _reorthogonalised(w, basis, fresh_key, tiny * scale)
        else:  # against v and v₋₁ only, again: what the recurrence left, and a fresh vector
            broke = optax.tree.norm(w) <= tiny * scale
            w = lax.cond(broke, lambda x: gaussian_like(fresh_key, x, 1.0), lambda x: x, w)
            w = optax.tree.add_scale(w, -optax.tree.vdot(v, w), v)
            w = optax.tree.add_scale(w, -optax.tree.vdot(previous, w), previous)
        length = optax.tree.norm(w)
        # After the last step of a run through all P dimensions nothing may be left: the
        # next row (never used, but weighted by 0 into the vectors) must not be 0/0.
        following = jax.tree_util.tree_map(lambda x: x / jnp.where(length > 0, length, 1), w)
        if basis is not None:
            basis = jax.tree_util.tree_map(
                lambda q, x: lax.dynamic_update_index_in_dim(q, x, i + 1, 0), basis, following
            )
        betas = betas.at[i].set(jnp.where(broke, 0, length))
        return basis, alphas.at[i].set(alpha), betas, following, v, scale

    start_length = optax.tree.norm(start)
    first = jax.tree_util.tree_map(lambda x: x / start_length, start)
    basis = None
    if reorthogonalize or keep_basis:
        basis = jax.tree_util.tree_map(
            lambda x: jnp.zeros((steps + 1, *x.shape), x.dtype).at[0].set(x), first
        )
    init = (
        basis,
        jnp.zeros(steps, dtype),
        jnp.zeros(steps, dtype),
        first,
        jax.tree_util.tree_map(jnp.zeros_like, start),
        jnp.zeros((), dtype),
    )
    basis, alphas, betas, *_ = lax.fori_loop(0, steps, step, init, unroll=unroll or 1)
    return alphas, betas, basis


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """``T`` from the diagonal ``alphas (m,)`` and the off-diagonal ``betas (m − 1,)``."""
    return jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)


@functools.partial(
    jax.jit,
    static_argnames=("loss_fn", "k", "num_iterations", "which", "vectors", "reorthogonalize"),
)
def _eigenvalues(loss_fn, params, batch, key, k, num_iterations, which, vectors, reorthogonalize):
    matvec, dtypes = _matvec(loss_fn, params, batch)
    start_key, restart_key = jax.random.split(key)
    start = gaussian_like(start_key, _zeros(dtypes, params), 1.0)
    # XLA:CPU runs convolutions ~40× slower inside loops (``jaxgen._chunks``): unrolled.
    unroll = loops_are_slow(matvec, start)
    alphas, betas, basis = lanczos(
        matvec, start, num_iterations, restart_key, unroll=unroll,
        reorthogonalize=reorthogonalize, keep_basis=vectors,
    )  # fmt: skip
    ritz, rotation = jnp.linalg.eigh(tridiagonal(alphas, betas[:-1]))  # ascending
    order = jnp.arange(k) if which == "smallest" else num_iterations - 1 - jnp.arange(k)
    values, rotation = ritz[order], rotation[:, order]
    residuals = jnp.abs(betas[-1] * rotation[-1])
    if not vectors:
        return values, residuals, None
    last_row = jnp.zeros((k, 1), rotation.dtype)  # the basis's next Lanczos vector
    ritz_vectors = _combine(jnp.concatenate([rotation.T, last_row], axis=1), basis)
    return (
        values,
        residuals,
        jax.tree_util.tree_map(lambda v, p: v.astype(p.dtype), ritz_vectors, params),
    )


def _zeros(dtypes: PyTree, params: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda d, p: jnp.zeros(p.shape, d), dtypes, params)


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
    reorthogonalize: bool = True,
) -> EigenEstimate:
    """The ``k`` largest (or smallest) eigenvalues of the Hessian of the mean loss
    ``L_B(w) = (1/b) Σ_i ℓ(w, z_i)``, by Lanczos with full reorthogonalisation.

    ``num_iterations`` Hessian-vector products (forward over reverse, or the VJP of the
    gradient for a loss with a ``custom_vjp``: ``jaxgen._hvp``) from a Gaussian start build
    a Krylov basis (``num_iterations × P`` numbers, in float32 at least); the Ritz values
    of its tridiagonal matrix are returned, each with its residual ``‖H v − λ v‖`` (read
    off the iteration, ``|β_m s_m|``), which bounds its distance to an eigenvalue of
    ``H``. The extreme eigenvalues converge first, at a rate set by their gap to the
    rest; the smallest (most negative) comes from the same iteration: negative curvature
    after training is ``which="smallest"``. With ``num_iterations = P`` the values are
    exact up to rounding.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the point ``w`` at which the Hessian is taken.
      batch: the examples whose mean loss is differentiated.
      key: PRNG key (or integer seed) for the start vector.
      k: how many eigenvalues (``1 <= k <= num_iterations <= P``).
      num_iterations: Lanczos steps ``m``; default ``min(P, max(30, 3k))``.
      which: ``"largest"`` or ``"smallest"``.
      vectors: also return the eigenvectors, as pytrees like ``params``.
      reorthogonalize: keep the Krylov basis orthogonal (default). ``False`` keeps no
        basis (plain Lanczos, three-term recurrence: on a large model each step costs
        little more than its product, where the full pass reads the whole basis twice);
        the largest (or smallest) value and its residual stay right, but converged
        values come back repeated ("ghosts"), so ``k > 1`` may list one twice.

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
    size = optax.tree.size(params)
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
        loss_fn, params, batch, as_key(key), k, num_iterations, which, vectors,
        reorthogonalize,
    )  # fmt: skip
    return EigenEstimate(values, residuals, out, num_iterations)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_probes", "num_iterations"))
def _spectrum(loss_fn, params, batch, key, num_probes, num_iterations):
    matvec, dtypes = _matvec(loss_fn, params, batch)

    zeros = _zeros(dtypes, params)
    unroll = loops_are_slow(matvec, zeros)

    def one(probe_key):
        start_key, restart_key = jax.random.split(probe_key)
        start = rademacher_like(start_key, zeros)
        alphas, betas, _ = lanczos(matvec, start, num_iterations, restart_key, unroll=unroll)
        nodes, rotation = jnp.linalg.eigh(tridiagonal(alphas, betas[:-1]))
        return jnp.stack([nodes, rotation[0] ** 2])

    keys = jax.random.split(key, num_probes)
    if unroll:  # probes side by side in rows (batched products), their bases within budget
        per_probe = (num_iterations + 1) * optax.tree.size(params)
        width = max(1, min(num_probes, SPECTRUM_BASIS_NUMBERS // per_probe))
        out = map_in_rows(one, keys, width)
    else:  # one after another: side by side was slower (the bases' reads add up)
        out = jax.lax.map(one, keys)
    return Spectrum(out[:, 0], out[:, 1])


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
    ``spectral_density`` smooths the nodes into a density on a grid. The probes run one
    after another in a loop (memory: one basis of ``num_iterations × P`` numbers), except
    on a CPU for a model with convolutions (XLA:CPU runs those ~40× slower inside loops):
    there the steps are unrolled and the probes run side by side (batched products), as
    many at a time as keep their bases within ``2²⁷`` numbers (512 MiB in float32), which
    costs compile time in proportion to the steps.

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
    size = optax.tree.size(params)
    if num_iterations > size:
        raise ValueError(
            f"num_iterations must be at most the number of parameters, {size}, got {num_iterations}"
        )
    return _spectrum(loss_fn, params, batch, as_key(key), num_probes, num_iterations)
