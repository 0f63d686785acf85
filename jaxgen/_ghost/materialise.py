"""Exact per-example gradients of the leaves no ghost rule covers, use by use.

For such a leaf, each use's per-example cotangent on its parameter operands comes from the
VJP of that one equation at the example's operand and output gradient ``δ_i``; one
pullback through the parameter-only part of the program maps them to the leaf.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen._ghost.interpreter import ParamOnly, Use, bind
from jaxgen._ghost.rules import Plan, accumulator
from jaxgen._sums import pairwise_sum

# The exact recomputation of a ghost leaf forms per-example gradients of it a few at a
# time: as many as fit in this many numbers (at least one).
CHUNK_ELEMENTS = 2**16


def apply_use(use: Use, param_values, constants, example_values):
    """The use's equation on its parameter operands, its constant operands (neither
    parameter nor example, by position) and one example's operands."""
    values = [constants.get(i) for i in range(len(use.eqn.invars))]
    for i, v in zip(use.param_positions, param_values, strict=True):
        values[i] = v
    for i, v in zip(use.example_positions, example_values, strict=True):
        values[i] = v
    return bind(use.eqn, values)


def cotangents_for(use: Use, param_values, constants, example_values, delta):
    """Per-example cotangents on a use's parameter operands, by the VJP of its equation.

    ``constants``: the equation's other operands (neither parameter nor example), by
    position.
    """

    def apply(*params):
        return apply_use(use, params, constants, example_values)

    outs, vjp = jax.vjp(apply, *param_values)
    cotangent_out = [
        jnp.zeros_like(o) if d is None else d.astype(o.dtype)
        for o, d in zip(outs, delta, strict=True)
    ]
    return vjp(cotangent_out)


class LeafStats(NamedTuple):
    sq_norms: jax.Array  # (b,) ‖g_i‖² restricted to the leaf
    m2: jax.Array  # Σ_i ‖g_i − ḡ‖² restricted to the leaf


def centred(grads: jax.Array, mean: jax.Array) -> LeafStats:
    """Statistics of a leaf whose per-example gradients are at hand, centred exactly."""
    size = grads.shape[0]
    dtype = accumulator(grads, mean)
    flat = grads.reshape(size, -1).astype(dtype)
    residuals = flat - mean.reshape(1, -1).astype(dtype)
    total = pairwise_sum(residuals)
    m2 = jnp.sum(jnp.square(residuals)) - jnp.sum(jnp.square(total)) / size
    return LeafStats(jnp.sum(jnp.square(flat), axis=1), jnp.maximum(m2, 0.0))


def _pullback(plan: Plan, jaxpr, consts, leaves: list, targets: list[int]):
    """``(relevant uses, one_example)``: ``one_example(operands, deltas)`` maps one
    example's operands and output gradients at those uses to its gradients of ``targets``."""
    relevant = [u for u, use in enumerate(plan.uses) if use.leaves & set(targets)]

    def parameter_operands(target_leaves):
        full = list(leaves)
        for i, leaf in zip(targets, target_leaves, strict=True):
            full[i] = leaf
        interpreter = ParamOnly(plan.closed)
        interpreter.run(jaxpr, consts, full, None)
        operands = [interpreter.operands[u] for u in relevant]
        return operands, [interpreter.constants[u] for u in relevant]

    operands, pullback, constants = jax.vjp(
        parameter_operands, [leaves[i] for i in targets], has_aux=True
    )

    def one_example(example_values, example_deltas):
        cotangents = [
            list(
                cotangents_for(
                    plan.uses[u], operands[k], constants[k], example_values[k], example_deltas[k]
                )
            )
            for k, u in enumerate(relevant)
        ]
        (grads,) = pullback(cotangents)
        return grads

    return relevant, one_example


def materialise(
    plan: Plan, jaxpr, consts, leaves: list, captured: list, deltas: list, targets: list[int]
) -> dict[int, jax.Array]:
    """Per leaf of ``targets``, its batch of per-example gradients.

    ``captured`` and ``deltas``: per use, the batched example operands and output
    gradients of the backward pass.
    """
    targets = sorted(targets)
    relevant, one_example = _pullback(plan, jaxpr, consts, leaves, targets)
    grads = jax.vmap(one_example)([captured[u] for u in relevant], [deltas[u] for u in relevant])
    return dict(zip(targets, grads, strict=True))


def centred_in_chunks(
    plan: Plan, jaxpr, consts, leaves: list, captured: list, deltas: list, leaf: int, mean
) -> LeafStats:
    """``centred`` for one leaf, its per-example gradients formed a few at a time
    (``CHUNK_ELEMENTS``; memory: a few leaves' worth, never b × the leaf)."""
    relevant, one_example = _pullback(plan, jaxpr, consts, leaves, [leaf])
    inputs = ([captured[u] for u in relevant], [deltas[u] for u in relevant])
    size = jax.tree_util.tree_leaves(inputs)[0].shape[0]
    chunk = min(size, max(1, CHUNK_ELEMENTS // max(mean.size, 1)))
    count = -(-size // chunk)

    def split(x):
        x = jnp.pad(x, [(0, count * chunk - size)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape(count, chunk, *x.shape[1:])

    dtype = accumulator(mean)
    mask = (jnp.arange(count * chunk) < size).reshape(count, chunk, 1)

    def body(carry, xs):
        chunk_inputs, keep = xs
        (grads,) = jax.vmap(one_example)(*chunk_inputs)
        flat = grads.reshape(chunk, -1).astype(dtype)
        residuals = (flat - mean.reshape(1, -1).astype(dtype)) * keep
        total, squares = carry
        carry = (total + pairwise_sum(residuals), squares + jnp.sum(jnp.square(residuals)))
        return carry, jnp.sum(jnp.square(flat), axis=1)

    init = (jnp.zeros(mean.size, dtype), jnp.zeros((), dtype))
    (total, squares), norms = jax.lax.scan(
        body, init, (jax.tree_util.tree_map(split, inputs), mask)
    )
    m2 = squares - jnp.sum(jnp.square(total)) / size
    return LeafStats(norms.reshape(-1)[:size], jnp.maximum(m2, 0.0))
