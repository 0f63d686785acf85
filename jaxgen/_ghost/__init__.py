"""Exact per-example gradient norms without materialising per-example gradients.

For a parameter ``W`` that enters a per-example loss only through ``y = x W`` (a dense
layer; ``x`` of shape ``(T, K)`` per example, ``T = 1`` for plain vectors), the
per-example gradient is ``g_i = x_iᵀ δ_i`` with ``δ_i = ∂ℓ_i/∂y_i``, so

    ‖g_i‖² = ‖x_i‖² ‖δ_i‖²                     (T = 1; Goodfellow, 2015)
    ‖g_i‖² = ⟨x_i x_iᵀ, δ_i δ_iᵀ⟩               (T > 1, Gram form)

and for an embedding lookup ``y_t = E[k_t]``: ``‖g_i‖² = Σ_{t,s} 1[k_t = k_s] δ_t·δ_s``.
The ``δ_i`` come from the ordinary backward pass: a zero *probe* is added to the output
of every operation where a parameter meets example data, and the gradient with respect
to the probes is taken together with the gradient with respect to the parameters.

The places are found from the function itself: ``loss_fn(params, example)`` is traced
to a jaxpr and re-evaluated by a small interpreter, so Flax NNX, Equinox and
hand-written models need no changes (kfac-jax locates layers the same way). A bias
(a parameter added to example data) has ``g_i = δ_i`` summed over broadcast axes, read
straight from the probe; a convolution kernel has ``g_i[k] = Σ_p x_i[p·s + k·d] δ_i[p]ᵀ``,
one batched contraction per kernel offset over strided slices of the padded input;
an elementwise gain (a LayerNorm scale) has ``g_i = x_i ⊙ δ_i`` summed over broadcast
axes. Other elementwise and convolution operands get exact per-example gradients for
that parameter alone, from the vector-Jacobian product of the operation that uses it
(small for those parameters), as do parameters no rule covers (used in several places,
transformed before use, anything else), which ``method="ghost"`` names in a warning.
``RULES`` lists the rules in the order they are tried. A ``scan`` over stacked
parameters is opened (``interpreter``): a slice used in the body by a rule gets its
statistics per iteration, and the stacked leaf's are their sums,
``‖g_i‖² = Σ_l ‖g_{i,l}‖²`` (``Use.loops``). A leaf the body closes over (tied: a
recurrent cell, a block repeated by ``fori_loop``) has ``g_i = Σ_l g_{i,l}``: a dense
leaf's rows of all iterations form one product ``xmᵀ dm`` (``Rule.matrices``), a bias's
or gain's per-iteration gradients are summed. In an opened scan a fast use is *tapped*
(``_tap``): its statistic (``‖g_i‖²`` or ``g_i``) is the gradient of a probe of that
shape, computed by a ``custom_vjp`` in the backward pass from the operand it saves and
``δ_i``, so the loop does not stack operands and ``δ`` as extra outputs (a scanned
4-block transformer: 1.38× → 1.08–1.18× a plain gradient, ``benchmarks/README.md``); the
exact path reruns the backward pass with captures (``_backward(tapped=False)``), once for
all tapped leaves, only when one of them cancels (``_exact_where_cancelling``).

Then, per parameter leaf, ``Σ_i ‖g_i − ḡ‖² = Σ_i ‖g_i‖² − b ‖ḡ‖²`` (a leaf whose
per-example gradients are at hand is centred exactly instead, and so is a ghost leaf
whose difference cancels, see ``CANCELLATION_EPS``, behind one ``lax.cond`` for all
leaves: ``_exact_where_cancelling``). Constants, literals and closed-over
values may appear in any operand of any equation: the exact path passes them to the
equation's VJP unchanged.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgen._ghost.interpreter import Interpreter, Tap, Use
from jaxgen._ghost.materialise import LeafStats, centred, centred_in_chunks, materialise
from jaxgen._ghost.rules import Plan, accumulator, make_plan, product_sq_norm, rows_centred_m2
from jaxgen._per_example import DispersionStats
from jaxgen._sums import pairwise_sum
from jaxgen._types import LossFn, PyTree


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


class _Traced(NamedTuple):
    """``loss_fn`` as a jaxpr over flat parameter and example leaves."""

    jaxpr: Any
    consts: list
    treedef: Any


class _Backward(NamedTuple):
    """What the one backward pass with probes gives. A tapped use (``_tap``) has its
    statistic in ``stats`` and nothing in ``captured`` and ``deltas``; every other use the
    other way round."""

    losses: jax.Array  # (b,)
    mean_grad: list  # ḡ per leaf
    captured: list  # per use: the example operands, batched
    deltas: list  # per use: the output gradients δ_i, batched
    stats: list  # per use: the batched statistic of its Tap, or None


def _trace(loss_fn: LossFn, params: PyTree, batch: PyTree) -> _Traced:
    leaves, treedef = jax.tree_util.tree_flatten(params)
    example_leaves, example_def = jax.tree_util.tree_flatten(batch)

    def flat_loss(leaves, example_leaves):
        return loss_fn(
            jax.tree_util.tree_unflatten(treedef, leaves),
            jax.tree_util.tree_unflatten(example_def, example_leaves),
        )

    one = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in example_leaves]
    closed = jax.make_jaxpr(flat_loss)(leaves, one)
    return _Traced(closed.jaxpr, closed.consts, treedef)


def _discover(traced: _Traced, leaves: list, one_example: list) -> Plan:
    plans = []

    def discover(leaves, example_leaves):
        plans.append(make_plan(traced.jaxpr, traced.consts, leaves, example_leaves))
        return 0.0

    jax.eval_shape(discover, leaves, one_example)
    return plans[0]


def _tap(use: Use) -> Tap | None:
    """The statistic a fast leaf's use in an opened scan computes inside the backward
    pass: ``‖g_i‖²`` (``sq_norms``) or ``g_i`` (``grads``) per example and iteration,
    read where ``δ_i`` is made, so neither ``δ`` nor the operand is stacked as an extra
    output of the loops (outside loops both are values the backward pass holds anyway:
    the use captures them). ``None`` also for tied dense rows (``Rule.matrices``) and
    convolution kernels (``Rule.own_mean``). The caller taps only fast leaves' uses."""
    rule = use.rule
    if not use.loops or rule.own_mean:
        return None
    if rule.grads is not None:
        grads = rule.grads

        def statistic(operands, delta):
            x = operands[0][None] if operands else None
            return grads(use, x, delta[None])[0]

    elif rule.sq_norms is not None and not use.tied:
        sq_norms = rule.sq_norms

        def statistic(operands, delta):
            return sq_norms(use, operands[0], delta)

    else:
        return None
    return Tap(statistic, rule.reads_operand)


def _probe(use: Use, tap: Tap | None, size: int):
    """Zeros added to a use's outputs (with the batch axis after the loop axes), or the
    zero of its ``tap``'s statistic."""
    if tap is None:
        return [
            None if a is None else jnp.zeros((*use.loops, size, *a.shape), a.dtype)
            for a in use.probe_avals
        ]
    operands = [use.eqn.invars[i].aval for i in use.example_positions]
    stat = jax.eval_shape(tap.statistic, operands, use.probe_avals[0])
    return jnp.zeros((*use.loops, size, *stat.shape), stat.dtype)


def _backward(
    traced: _Traced,
    plan: Plan,
    leaves: list,
    example_leaves: list,
    tapped: bool = True,
    leaf_grads: bool = True,
) -> _Backward:
    """The backward pass with probes; ``tapped=False``: every use captures (``_tap``);
    ``leaf_grads=False``: the parameters' gradients are not formed (``mean_grad`` is
    ``None``), only the probes' (the output gradients ``δ``)."""
    size, own_mean = example_leaves[0].shape[0], plan.own_mean
    fast = set(plan.fast.values()) if tapped else set()
    taps = [_tap(use) if u in fast else None for u, use in enumerate(plan.uses)]

    def per_example(leaves, example_leaves, probes):
        leaves = [jax.lax.stop_gradient(x) if i in own_mean else x for i, x in enumerate(leaves)]
        interpreter = Interpreter(probes, plan.closed, taps)
        outs = interpreter.run(traced.jaxpr, traced.consts, leaves, example_leaves)
        return outs[0].value, interpreter.captured

    # A use in opened scans has its batch axis after the loop axes, where the batched
    # scan takes and gives it: its probes, captures and δs are not transposed.
    axes = [len(use.loops) for use in plan.uses]

    def summed(leaves, probes):
        batched = jax.vmap(per_example, in_axes=(None, 0, axes), out_axes=(0, axes))
        losses, captured = batched(leaves, example_leaves, probes)
        return jnp.sum(losses), (losses, captured)

    probes = [_probe(use, tap, size) for use, tap in zip(plan.uses, taps, strict=True)]
    if leaf_grads:
        (grad_sum, deltas), (losses, captured) = jax.grad(summed, argnums=(0, 1), has_aux=True)(
            leaves, probes
        )
        mean_grad = [g / size for g in grad_sum]
    else:
        deltas, (losses, captured) = jax.grad(summed, argnums=1, has_aux=True)(leaves, probes)
        mean_grad = None
    stats = [d if tap else None for d, tap in zip(deltas, taps, strict=True)]
    deltas = [[] if tap else d for d, tap in zip(deltas, taps, strict=True)]
    return _Backward(losses, mean_grad, captured, deltas, stats)


# A ghost leaf is recomputed exactly when Σ_i‖g_i − ḡ‖² < CANCELLATION · Σ_i‖g_i‖²,
# i.e. when b‖ḡ‖² cancels all but that fraction of Σ_i‖g_i‖². The two sums carry a
# relative rounding error of at most c·eps each (c ≈ 16 for the pairwise sums and products
# here), so the ghost difference keeps a relative error below c·eps·Σ‖g_i‖²/m2 ≤ c/1e5:
# 1.6e-4 with c = 16, in float32 and float64 alike.
CANCELLATION_EPS = 1e5


class _Exact(NamedTuple):
    """A leaf's way back to exact statistics, taken when its difference cancels:
    ``stats(b)`` from a backward pass ``b`` that captured its operands and ``δ`` (for a
    ``tapped`` leaf, one run again with captures; else the pass that made the ghost)."""

    cancels: jax.Array
    stats: Any
    tapped: bool


def _rows(use: Use, size: int):
    """In an opened scan, a batched array as one row per iteration and example
    (iteration-major); outside loops, unchanged."""
    iterations = math.prod(use.loops)

    def rows(a):
        return a.reshape(iterations * size, *a.shape[1 + len(use.loops) :]) if use.loops else a

    return rows


def _operands(use: Use, backward: _Backward, u: int):
    """The use's example operand and output gradient, as rows (``_rows``)."""
    rows = _rows(use, backward.losses.shape[0])
    (x,), (delta,) = backward.captured[u], backward.deltas[u]
    return rows(x), rows(delta)


def rule_grads(use: Use, backward: _Backward, u: int) -> jax.Array:
    """The batch of per-example gradients of a leaf whose rule has ``grads``, in the
    layout of the use's operand; in opened scans flattened to ``(b, n)``, summed over the
    iterations of a tied leaf and stacked over those of a stacked one."""
    size, iterations = backward.losses.shape[0], math.prod(use.loops)
    if backward.stats[u] is not None:  # tapped
        grads = _rows(use, size)(backward.stats[u])
    else:
        grads = use.rule.grads(use, *_operands(use, backward, u))
    if use.loops:  # a tied leaf's gradient is the sum over iterations, a stacked one's
        grads = grads.reshape(iterations, size, *grads.shape[1:])  # the stack of slices
        grads = pairwise_sum(grads) if use.tied else jnp.moveaxis(grads, 0, 1)
        grads = grads.reshape(size, -1)
    return grads


def rule_sq_norms(use: Use, backward: _Backward, u: int):
    """``(‖g_i‖², matrices)`` of a leaf whose rule has ``sq_norms``: ``matrices`` are the
    batched row matrices ``(xm, dm)`` of a tied dense leaf (every iteration's rows in one
    product ``xmᵀ dm``, ``Rule.matrices``), else ``None``."""
    size, iterations = backward.losses.shape[0], math.prod(use.loops)
    if use.loops and use.tied:
        xm, dm = jax.vmap(functools.partial(use.rule.matrices, use))(*_operands(use, backward, u))
        xm, dm = (
            jnp.moveaxis(a.reshape(iterations, size, *a.shape[1:]), 0, 1).reshape(
                size, iterations * a.shape[1], a.shape[2]
            )
            for a in (xm, dm)
        )
        return jax.vmap(product_sq_norm)(xm, dm), (xm, dm)
    if backward.stats[u] is not None:  # tapped
        norms = _rows(use, size)(backward.stats[u])
    else:
        norms = jax.vmap(functools.partial(use.rule.sq_norms, use))(*_operands(use, backward, u))
    if use.loops:  # the slices partition the leaf: their squared norms add up
        norms = jnp.sum(norms.reshape(iterations, size), axis=0)
    return norms, None


def _fast_leaf(
    use: Use, backward: _Backward, u: int, mean: jax.Array, in_chunks
) -> tuple[LeafStats, jax.Array | None, _Exact | None]:
    """A leaf by its rule; ``ḡ`` where the rule's per-example ``grads`` give it; and, for
    a tapped use, its ``_Exact``. When the ghost difference would lose digits
    (``CANCELLATION_EPS``), the statistics are recomputed exactly: by the rule's own
    ``centred_m2`` where it has one, else by ``in_chunks(backward)`` from per-example
    gradients, from this use's operands and ``δ`` (in ``_exact_where_cancelling``)."""
    size, iterations = backward.losses.shape[0], math.prod(use.loops)
    if use.rule.grads is not None:  # centred on their own mean: the operand's layout
        grads = rule_grads(use, backward, u)
        own_mean = pairwise_sum(grads) / grads.shape[0]
        return centred(grads, own_mean), own_mean, None

    exact = in_chunks
    norms, matrices = rule_sq_norms(use, backward, u)
    if matrices is not None:

        def exact(b):
            del b
            return LeafStats(norms, rows_centred_m2(*matrices).astype(norms.dtype))

    elif use.rule.centred_m2 is not None:  # exact, in blocks far smaller than the leaf

        def exact(b):
            x, delta = _operands(use, b, u)
            if use.loops:  # iteration by iteration: each slice centred on its own mean
                per_iteration = (a.reshape(iterations, size, *a.shape[1:]) for a in (x, delta))
                m2 = jax.lax.map(lambda xd: use.rule.centred_m2(use, *xd), tuple(per_iteration))
                return LeafStats(norms, jnp.sum(m2).astype(norms.dtype))
            return LeafStats(norms, use.rule.centred_m2(use, x, delta).astype(norms.dtype))

    dtype = norms.dtype
    total = jnp.sum(norms)
    m2 = total - norms.shape[0] * jnp.sum(jnp.square(mean.astype(dtype)))
    ghost = LeafStats(norms, jnp.maximum(m2, 0.0))
    cancels = m2 < CANCELLATION_EPS * jnp.finfo(dtype).eps * total
    return ghost, None, _Exact(cancels, exact, tapped=backward.stats[u] is not None)


def _exact_where_cancelling(
    stats: dict[int, LeafStats], exact: dict[int, _Exact], backward: _Backward, recapture
) -> dict[int, LeafStats]:
    """The leaves' statistics, exact where they cancel, behind one ``lax.cond`` taken only
    when some leaf cancels (a GPU waits on the host for each predicate: the common case
    pays for one). Inside it, a captured leaf is recomputed from ``backward`` in a
    ``lax.cond`` of its own; the tapped leaves share one backward pass with captures
    (``recapture()``), run only when one of them cancels (then every tapped leaf's exact
    statistics are formed and the cancelling ones kept)."""
    leaves = sorted(exact)
    tapped = [i for i in leaves if exact[i].tapped]

    def any_cancels(indices):
        return functools.reduce(jnp.logical_or, (exact[i].cancels for i in indices))

    def recomputed_tapped():
        b = recapture()
        return [jnp.where(exact[i].cancels, exact[i].stats(b).m2, stats[i].m2) for i in tapped]

    def recomputed():
        out = {
            i: jax.lax.cond(
                exact[i].cancels, functools.partial(exact[i].stats, backward), lambda i=i: stats[i]
            )
            for i in leaves
            if not exact[i].tapped
        }
        if tapped:
            m2s = jax.lax.cond(
                any_cancels(tapped), recomputed_tapped, lambda: [stats[i].m2 for i in tapped]
            )
            out |= {i: stats[i]._replace(m2=m2) for i, m2 in zip(tapped, m2s, strict=True)}
        return out

    return jax.lax.cond(any_cancels(leaves), recomputed, lambda: {i: stats[i] for i in leaves})


# Equations whose VJP, taken per example on the exact path, runs a loop: slower than
# materialising every per-example gradient at once (the vmap path).
LOOPS = ("scan", "while")


class Program(NamedTuple):
    """``loss_fn`` traced and planned for a batch (``prepare``)."""

    traced: _Traced
    plan: Plan
    leaves: list
    example_leaves: list
    loops_per_example: bool  # a materialised leaf's exact path would run a loop per example


def prepare(loss_fn: LossFn, params: PyTree, batch: PyTree, *, warn: bool) -> Program:
    """Trace and plan ``loss_fn``; with ``warn``, name the leaves no rule covers."""
    leaves = jax.tree_util.tree_leaves(params)
    example_leaves = jax.tree_util.tree_leaves(batch)
    traced = _trace(loss_fn, params, batch)
    one = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in example_leaves]
    plan = _discover(traced, leaves, one)
    loops = any(
        use.eqn.primitive.name in LOOPS for use in plan.uses if use.leaves & set(plan.materialised)
    )
    if warn and plan.unsupported:
        names = ", ".join(jax.tree_util.keystr(p) for p in _paths(params, plan.unsupported))
        _warn_once(
            "method='ghost': no ghost rule covers parameters "
            f"{names}; their per-example gradients are materialised (exactly)"
        )
    return Program(traced, plan, leaves, example_leaves, loops)


def ghost_dispersion(
    loss_fn: LossFn, params: PyTree, batch: PyTree, *, warn: bool, fallback=None
) -> DispersionStats:
    """``gradient_dispersion`` by ghost norms; see the module docstring.

    ``fallback()``, if given, is returned instead when a materialised parameter's exact
    path would run a loop per example (``LOOPS``).
    """
    prepared = prepare(loss_fn, params, batch, warn=warn)
    if fallback is not None and prepared.loops_per_example:
        return fallback()
    traced, plan, leaves, example_leaves = prepared[:4]
    size = example_leaves[0].shape[0]
    backward = _backward(traced, plan, leaves, example_leaves)

    program = (plan, traced.jaxpr, traced.consts, leaves)
    recapture = functools.partial(_backward, traced, plan, leaves, example_leaves, tapped=False)
    stats, exact = {}, {}
    mean_grad, own = list(backward.mean_grad), plan.own_mean
    for leaf, u in plan.fast.items():
        mean = backward.mean_grad[leaf]

        def in_chunks(b: _Backward, leaf=leaf, mean=mean):
            return centred_in_chunks(*program, b.captured, b.deltas, leaf, mean)

        stats[leaf], own_mean, exact[leaf] = _fast_leaf(plan.uses[u], backward, u, mean, in_chunks)
        if leaf in own:
            mean_grad[leaf] = own_mean.astype(leaves[leaf].dtype)
    exact = {leaf: e for leaf, e in exact.items() if e is not None}
    if exact:
        stats |= _exact_where_cancelling(stats, exact, backward, recapture)
    if plan.materialised:
        grads = materialise(*program, backward.captured, backward.deltas, plan.materialised)
        stats |= {leaf: centred(g, backward.mean_grad[leaf]) for leaf, g in grads.items()}

    dtype = accumulator(*leaves)
    zero = jnp.zeros((), dtype)
    layer = [stats[i].m2.astype(dtype) / size if i in stats else zero for i in range(len(leaves))]
    sq_norms = functools.reduce(
        jnp.add, (s.sq_norms.astype(dtype) for s in stats.values()), jnp.zeros((size,), dtype)
    )
    return DispersionStats(
        loss=jnp.mean(backward.losses),
        grad=jax.tree_util.tree_unflatten(traced.treedef, mean_grad),
        sq_norms=sq_norms,
        dispersion=functools.reduce(jnp.add, layer),
        layer_dispersion=jax.tree_util.tree_unflatten(traced.treedef, layer),
    )


def _paths(params: PyTree, leaves: set[int]):
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [paths[i] for i in sorted(leaves)]
