"""Exact per-example gradients of the leaves no ghost rule covers, use by use.

For such a leaf, each use's per-example cotangent on its parameter operands comes from the
VJP of that one equation at the example's operand and output gradient ``δ_i``; one
pullback through the parameter-only part of the program maps them to the leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen._ghost.interpreter import ParamOnly, Use, bind
from jaxgen._ghost.rules import Plan


def cotangents_for(use: Use, param_values, example_values, delta):
    """Per-example cotangents on a use's parameter operands, by the VJP of its equation."""

    def apply(*params):
        values = [None] * (len(use.param_positions) + len(use.example_positions))
        for i, v in zip(use.param_positions, params, strict=True):
            values[i] = v
        for i, v in zip(use.example_positions, example_values, strict=True):
            values[i] = v
        return bind(use.eqn, values)

    outs, vjp = jax.vjp(apply, *param_values)
    cotangent_out = [
        jnp.zeros_like(o) if d is None else d.astype(o.dtype)
        for o, d in zip(outs, delta, strict=True)
    ]
    return vjp(cotangent_out)


def materialise(
    plan: Plan, jaxpr, consts, leaves: list, captured: list, deltas: list
) -> dict[int, jax.Array]:
    """Per materialised leaf, its batch of per-example gradients.

    ``captured`` and ``deltas``: per use, the batched example operands and output
    gradients of the backward pass.
    """
    wanted = set(plan.materialised)
    relevant = [u for u, use in enumerate(plan.uses) if use.leaves & wanted]
    targets = sorted(wanted)

    def parameter_operands(target_leaves):
        full = list(leaves)
        for i, leaf in zip(targets, target_leaves, strict=True):
            full[i] = leaf
        interpreter = ParamOnly()
        interpreter.run(jaxpr, consts, full, None)
        return [interpreter.operands[u] for u in relevant]

    operands, pullback = jax.vjp(parameter_operands, [leaves[i] for i in targets])

    def one_example(example_values, example_deltas):
        cotangents = [
            list(cotangents_for(plan.uses[u], operands[k], example_values[k], example_deltas[k]))
            for k, u in enumerate(relevant)
        ]
        (grads,) = pullback(cotangents)
        return grads

    grads = jax.vmap(one_example)([captured[u] for u in relevant], [deltas[u] for u in relevant])
    return dict(zip(targets, grads, strict=True))
