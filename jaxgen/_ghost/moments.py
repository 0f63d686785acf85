"""Per-coordinate gradient moments from the ghost backward pass (``gradient_moments``).

A dense layer on one row per example (``g_i = x_i δ_iᵀ``, rank one) has
``Σ_i g_i ⊙ g_i = Σ_i (x_i ⊙ x_i)(δ_i ⊙ δ_i)ᵀ``: the clipping module's batched VJP
(``_weighted_grads``) with the squared operands and output gradients. Every other leaf
gets its per-example gradients exactly (its rule's, or ``materialise``'s).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxgen._ghost import Program, _backward, rule_grads
from jaxgen._ghost.clipping import _weighted_grads
from jaxgen._ghost.interpreter import Use
from jaxgen._ghost.materialise import materialise
from jaxgen._ghost.rules import accumulator, dense_matrices, is_dense
from jaxgen._sums import pairwise_sum


def _one_row_dense(use: Use) -> bool:
    """A dense use whose per-example gradient is one outer product ``x_i δ_iᵀ``."""
    if use.loops or not is_dense(use):
        return False
    x = use.eqn.invars[use.example_positions[0]].aval
    xm, _ = jax.eval_shape(functools.partial(dense_matrices, use), x, use.probe_avals[0])
    return xm.shape[0] == 1


def ghost_moments(program: Program):
    """``(loss, mean, variance)``: lists per leaf (see ``jaxgen.gradient_moments``)."""
    traced, plan, leaves, example_leaves = program[:4]
    size = example_leaves[0].shape[0]
    backward = _backward(traced, plan, leaves, example_leaves, tapped=False)
    dtype = accumulator(*leaves)
    mean = [g.astype(dtype) for g in backward.mean_grad]
    second = [jnp.zeros(leaf.shape, dtype) for leaf in leaves]
    squared = sorted(leaf for leaf, u in plan.fast.items() if _one_row_dense(plan.uses[u]))
    grads = {
        leaf: rule_grads(plan.uses[u], backward, u)
        for leaf, u in plan.fast.items()
        if leaf in plan.own_mean  # the operand is the leaf: its grads in the leaf's layout
    }
    others = [leaf for leaf in sorted(plan.fast) if leaf not in squared and leaf not in grads]
    others += plan.materialised
    if others:
        grads |= materialise(
            plan, traced.jaxpr, traced.consts, leaves, backward.captured, backward.deltas,
            others,
        )  # fmt: skip
    for leaf, g in grads.items():
        g = g.reshape(size, *leaves[leaf].shape).astype(dtype)
        mean[leaf] = pairwise_sum(g) / size
        second[leaf] = pairwise_sum(g * g) / size
    if squared:
        uses = {plan.fast[leaf] for leaf in squared}
        captured = [[x * x for x in c] if u in uses else c for u, c in enumerate(backward.captured)]
        deltas = [
            [None if d is None else d * d for d in ds] if u in uses else ds
            for u, ds in enumerate(backward.deltas)
        ]
        ones = [jnp.ones((size,), dtype)] * len(leaves)
        sums = _weighted_grads(
            program, backward._replace(captured=captured, deltas=deltas), squared, ones
        )
        for leaf, total in zip(squared, sums, strict=True):
            second[leaf] = total.astype(dtype) / size
    variance = [jnp.maximum(s - m * m, 0) for s, m in zip(second, mean, strict=True)]
    return jnp.mean(backward.losses), mean, variance
