"""Per-example clipped gradients: the mean of ``c_i g_i``, ``c_i = min(1, C/‖g_i‖)``.

Clipping each example's gradient bounds its influence on a step (Abadi et al., "Deep
learning with differential privacy", CCS 2016; the core of DP-SGD). The ghost path
(``jaxgen._ghost.clipping``) computes it exactly from the one backward pass that gives
the per-example norms, at about the cost of one gradient.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgen import _checks
from jaxgen._per_example import default_microbatch, ghost_or_vmap, map_chunks
from jaxgen._types import LossFn, PyTree

_METHODS = ("auto", "vmap", "ghost")


class ClippedGrad(NamedTuple):
    """A minibatch's clipped gradient and what it clipped.

    Attributes:
      loss: mean loss ``(1/b) Σ_i ℓ(w, z_i)``.
      grad: the clipped mean ``(1/b) Σ_i c_i g_i`` (pytree like ``params``): a mean over
        the batch, as ``jax.grad`` of the mean loss is; multiply by ``b`` for the sum
        DP-SGD adds its noise to.
      sq_norms: ``(b,)`` the unclipped ``‖g_i‖²``.
      layer_sq_norms: ``‖g_i‖²`` restricted to each leaf (pytree like ``params`` of
        ``(b,)`` arrays); they add up to ``sq_norms``.
      clipped_fraction: the fraction of examples scaled down (``c_i < 1``; with per-leaf
        thresholds, in any leaf).
    """

    loss: jax.Array
    grad: PyTree
    sq_norms: jax.Array
    layer_sq_norms: PyTree
    clipped_fraction: jax.Array


def clip_factors(norms: jax.Array, max_norm, normalize: float | None) -> jax.Array:
    """``c = min(1, C/‖g‖)``, or with ``normalize = γ``: ``c = C/(‖g‖ + γ)``."""
    if normalize is None:
        return max_norm / jnp.maximum(norms, max_norm)
    return max_norm / (norms + normalize)


class _Threshold(NamedTuple):
    """How the factors follow from the per-leaf squared norms. A pytree: the jitted
    functions take it traced (which fields are ``None`` is static), so a new threshold
    value compiles nothing."""

    max_norm: Any  # a scalar, or a list per leaf (per-leaf thresholds); None with quantile
    quantile: float | None
    normalize: float | None

    def factors(self, layer_sq_norms: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
        """Per leaf, the ``(b,)`` factors ``c``; and the fraction scaled down."""
        if isinstance(self.max_norm, list):
            per_leaf = [
                clip_factors(jnp.sqrt(n), jnp.asarray(c, n.dtype), self.normalize)
                for n, c in zip(layer_sq_norms, self.max_norm, strict=True)
            ]
            scaled = functools.reduce(jnp.logical_or, [c < 1 for c in per_leaf])
            return per_leaf, jnp.mean(scaled.astype(jnp.float32))
        norms = jnp.sqrt(functools.reduce(jnp.add, layer_sq_norms))
        if self.quantile is not None:
            threshold = jnp.quantile(norms, self.quantile)
        else:
            threshold = jnp.asarray(self.max_norm, norms.dtype)
        factors = clip_factors(norms, threshold, self.normalize)
        fraction = jnp.mean((factors < 1).astype(jnp.float32))
        return [factors] * len(layer_sq_norms), fraction


def _threshold(params: PyTree, max_norm, quantile, normalize) -> _Threshold:
    """Validated arguments; per-leaf thresholds as a list in ``params``' leaf order."""
    if (max_norm is None) == (quantile is None):
        raise ValueError("give exactly one of max_norm and quantile")
    if normalize is not None:
        _checks.positive("normalize", normalize)
    if quantile is not None:
        _checks.unit_interval("quantile", quantile)
        return _Threshold(None, quantile, normalize)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(max_norm)):
        _checks.positive("max_norm", max_norm)
        return _Threshold(max_norm, None, normalize)
    params_def = jax.tree_util.tree_structure(params)
    if jax.tree_util.tree_structure(max_norm) != params_def:
        raise ValueError(
            "max_norm as a pytree (per-leaf thresholds) must have the structure of params, "
            f"{params_def}; got {jax.tree_util.tree_structure(max_norm)}"
        )
    paths = jax.tree_util.tree_flatten_with_path(max_norm)[0]
    for path, value in paths:
        _checks.positive(f"max_norm{jax.tree_util.keystr(path)}", value)
    return _Threshold([value for _, value in paths], None, normalize)


def clipped_grad(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    max_norm: float | PyTree | None = None,
    quantile: float | None = None,
    normalize: float | None = None,
    method: str = "auto",
    microbatch_size: int | None = None,
) -> ClippedGrad:
    """The mean of the per-example gradients, each clipped to norm at most ``max_norm``.

    ``grad = (1/b) Σ_i c_i g_i`` with ``g_i = ∇_w ℓ(w, z_i)`` and

        c_i = min(1, C / ‖g_i‖)            (clipping; Abadi et al., CCS 2016)
        c_i = C / (‖g_i‖ + γ)              (``normalize=γ``: Bu et al., NeurIPS 2023)

    so every example contributes a vector of norm at most ``C`` (below ``C`` when
    normalised), and ``Σ_i c_i g_i`` changes by at most ``C`` when one example is added
    or removed: the sensitivity DP-SGD calibrates its noise to. With ``C = 1``,
    normalisation is Bu et al.'s ``g_i / (‖g_i‖ + γ)``.

    Methods:

    - ``"ghost"``: one forward and one backward pass that forms no parameter gradient,
      only the output gradients ``δ_i`` where parameters meet the example; the norms come
      from them as in ``gradient_dispersion``, then each layer's clipped gradient from
      its saved operands and ``c_i δ_i`` (book-keeping: Bu et al., ICML 2023), e.g.
      ``Xᵀ(c ⊙ Δ)`` for a dense layer; no second backward pass and no ``b × P`` buffer.
      Parameters whose per-example gradients are formed anyway (convolution kernels,
      and those no rule covers, with a warning naming them) are scaled and summed.
      Scans, ``jax.checkpoint`` blocks and calls are followed as for the dispersion.
    - ``"vmap"``: per-example gradients ``microbatch_size`` at a time (default as
      ``gradient_dispersion``'s), each scaled, then summed.
    - ``"auto"``: ``"ghost"``; ``"vmap"`` when a parameter's exact path would run a loop
      per example or the interpreter cannot follow the program.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the parameters ``w``.
      batch: pytree whose leaves share a leading axis of size ``b``.
      max_norm: the threshold ``C > 0``; or a pytree like ``params`` of thresholds, one
        per leaf ("per-layer clipping": each leaf's part of ``g_i`` clipped to its own
        ``C_l``, so the whole to ``√(Σ_l C_l²)``).
      quantile: instead of ``max_norm``, the threshold is this quantile of the batch's
        ``‖g_i‖`` (``0.5``: the median norm; the threshold then depends on the batch,
        which a privacy analysis must account for).
      normalize: ``γ > 0``: normalise instead of clipping.
      method: ``"auto"``, ``"ghost"`` or ``"vmap"``.
      microbatch_size: with ``"vmap"``, at most this many per-example gradients at once.

    Returns:
      ``ClippedGrad(loss, grad, sq_norms, layer_sq_norms, clipped_fraction)``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: z["x"] @ w
      >>> batch = {"x": jnp.array([[3.0, 4.0], [0.3, 0.4]])}   # ‖g_1‖ = 5, ‖g_2‖ = 0.5
      >>> clipped = jaxgen.clipped_grad(loss, jnp.zeros(2), batch, max_norm=1.0)
      >>> [round(g, 4) for g in clipped.grad.tolist()], float(clipped.clipped_fraction)
      ([0.45, 0.6], 0.5)
    """
    _checks.choice("method", method, _METHODS)
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    threshold = _threshold(params, max_norm, quantile, normalize)
    return ghost_or_vmap(
        method,
        lambda: _clipped_ghost(loss_fn, params, batch, threshold, warn=method == "ghost"),
        lambda: _clipped_vmap(loss_fn, params, batch, threshold, microbatch_size),
    )


def _result(treedef, losses, sums, layer_sq_norms, fraction, size) -> ClippedGrad:
    return ClippedGrad(
        loss=jnp.mean(losses),
        grad=jax.tree_util.tree_unflatten(treedef, [s / size for s in sums]),
        sq_norms=functools.reduce(jnp.add, layer_sq_norms),
        layer_sq_norms=jax.tree_util.tree_unflatten(treedef, layer_sq_norms),
        clipped_fraction=fraction,
    )


@functools.partial(jax.jit, static_argnames=("loss_fn", "warn"))
def _clipped_ghost(loss_fn, params, batch, threshold, warn):
    from jaxgen._ghost import prepare
    from jaxgen._ghost.clipping import ghost_clipped

    program = prepare(loss_fn, params, batch, warn=warn)
    if program.loops_per_example and not warn:
        return _clipped_vmap(loss_fn, params, batch, threshold, None)
    fraction = []

    def scales(layer_sq_norms):
        factors, scaled = threshold.factors(layer_sq_norms)
        fraction.append(scaled)
        return factors

    clipped = ghost_clipped(program, scales)
    size = clipped.losses.shape[0]
    treedef = jax.tree_util.tree_structure(params)
    return _result(treedef, clipped.losses, clipped.sums, clipped.layer_sq_norms, fraction[0], size)


@functools.partial(jax.jit, static_argnames=("loss_fn", "microbatch_size"))
def _clipped_vmap(loss_fn, params, batch, threshold, microbatch_size):
    """Per-example gradients ``microbatch_size`` at a time, each chunk's scaled sum
    added up. A quantile threshold needs every norm first: a norms pass runs before."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if microbatch_size is None:
        microbatch_size = default_microbatch(loss_fn, params, batch)
    treedef = jax.tree_util.tree_structure(params)

    def per_example(chunk):
        def one(example):
            loss, grads = jax.value_and_grad(loss_fn)(params, example)
            grads = jax.tree_util.tree_leaves(grads)
            return loss, grads, [jnp.sum(jnp.square(g)) for g in grads]

        return jax.vmap(one)(chunk)

    fixed = threshold
    if threshold.quantile is not None:
        (_, norms), _ = map_chunks(
            lambda chunk: ((per_example(chunk)[0], per_example(chunk)[2]), ()),
            batch,
            size,
            microbatch_size,
        )
        total = jnp.sqrt(functools.reduce(jnp.add, norms))
        fixed = _Threshold(jnp.quantile(total, threshold.quantile), None, threshold.normalize)

    def scaled_sums(chunk):
        losses, grads, norms = per_example(chunk)
        factors, _ = fixed.factors(norms)
        sums = [
            jnp.tensordot(c.astype(g.dtype), g, axes=1) for c, g in zip(factors, grads, strict=True)
        ]
        return (losses, norms), sums

    (losses, norms), sums = map_chunks(scaled_sums, batch, size, microbatch_size)
    _, fraction = fixed.factors(norms)
    return _result(treedef, losses, sums, norms, fraction, size)
