"""Per-example clipped gradients from one backward pass, by book-keeping.

Clipping rescales each example's loss: ``Σ_i c_i g_i = ∇_w Σ_i c_i ℓ_i`` with the ``c_i``
held fixed, so every output gradient of the rescaled loss is ``c_i δ_i`` (Bu, Wang, Zha
& Karypis, "Differentially private optimization on large model at small cost", ICML
2023). The backward pass with probes (``jaxgen._ghost``) gives each use's example operand
``x_i`` and ``δ_i`` and, from them, every example's squared norm per leaf; it forms no
parameter gradient. Then, per leaf:

- a leaf a fast rule covers gets ``Σ_i c_i J_iᵀ δ_i`` through the VJP of its one
  equation, batched over the examples with the weight shared (for a dense layer the
  single product ``Xᵀ (c ⊙ Δ)``), pulled back to the leaf through the parameter-only part
  of the program; inside opened scans, per iteration (a stacked leaf's slices, a tied
  leaf's sum). All of them are one ``jax.grad`` of the surrogate
  ``Σ_u ⟨f_u(x_u, W_u(w)), c ⊙ δ_u⟩`` with ``x``, ``δ`` and ``c`` constant
  (``_weighted_grads``): no second backward through the network.
- a leaf whose per-example gradients are at hand (those no rule covers, which are
  materialised; a convolution kernel's, which its rule forms) gets ``Σ_i c_i g_i``
  directly.

Nothing of size ``b × P`` is formed beyond what ``gradient_dispersion`` forms.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxgen._ghost import Program, _Backward, _backward, rule_grads, rule_sq_norms
from jaxgen._ghost.interpreter import ParamOnly, Use
from jaxgen._ghost.materialise import apply_use, materialise
from jaxgen._ghost.rules import accumulator, dense_matrices, is_dense


class Clipped(NamedTuple):
    losses: jax.Array  # (b,)
    sums: list  # per leaf: Σ_i c_i g_i, in the leaf's dtype
    layer_sq_norms: list  # per leaf: (b,) ‖g_i‖² restricted to it


def ghost_clipped(
    program: Program, scales: Callable[[list[jax.Array]], list[jax.Array]]
) -> Clipped:
    """``Σ_i c_i g_i`` per leaf, with ``c = scales(layer_sq_norms)`` (one ``(b,)`` factor
    per leaf) computed from the per-leaf squared norms of the same pass."""
    traced, plan, leaves, example_leaves = program[:4]
    size = example_leaves[0].shape[0]
    backward = _backward(traced, plan, leaves, example_leaves, tapped=False, leaf_grads=False)
    dtype = accumulator(*leaves)
    norms, grads = {}, {}
    for leaf, u in plan.fast.items():
        use = plan.uses[u]
        if use.rule.grads is None:
            norms[leaf] = rule_sq_norms(use, backward, u)[0].astype(dtype)
            continue
        g = rule_grads(use, backward, u)
        norms[leaf] = jnp.sum(jnp.square(g.reshape(size, -1).astype(dtype)), axis=1)
        if leaf in plan.own_mean:  # the operand is the leaf: g in its layout
            grads[leaf] = g
    if plan.materialised:
        exact = materialise(
            plan, traced.jaxpr, traced.consts, leaves, backward.captured, backward.deltas,
            plan.materialised,
        )  # fmt: skip
        for leaf, g in exact.items():
            norms[leaf] = jnp.sum(jnp.square(g.reshape(size, -1).astype(dtype)), axis=1)
            grads[leaf] = g
    zero = jnp.zeros((size,), dtype)
    layer_sq_norms = [norms.get(i, zero) for i in range(len(leaves))]
    factors = scales(layer_sq_norms)
    sums = [jnp.zeros_like(leaf) for leaf in leaves]
    for leaf, g in grads.items():
        summed = jnp.tensordot(factors[leaf].astype(dtype), g.astype(dtype), axes=1)
        sums[leaf] = summed.reshape(leaves[leaf].shape).astype(leaves[leaf].dtype)
    direct = {
        leaf for leaf, u in plan.fast.items() if leaf not in grads and _direct_dense(plan.uses[u])
    }
    for leaf in direct:
        u = plan.fast[leaf]
        sums[leaf] = _dense_sum(plan.uses[u], backward, u, factors[leaf], leaves[leaf])
    targets = sorted(leaf for leaf in plan.fast if leaf not in grads and leaf not in direct)
    if targets:
        weighted = _weighted_grads(program, backward, targets, factors)
        for leaf, g in zip(targets, weighted, strict=True):
            sums[leaf] = g
    return Clipped(backward.losses, sums, layer_sq_norms)


def _weighted_grads(program: Program, backward: _Backward, targets: list[int], factors):
    """``Σ_i c_i g_i`` for fast leaves ``targets`` (see the module docstring)."""
    traced, plan, leaves = program.traced, program.plan, program.leaves

    def surrogate(values):
        full = list(leaves)
        for leaf, value in zip(targets, values, strict=True):
            full[leaf] = value
        interpreter = ParamOnly(plan.closed, in_loops=True)
        interpreter.run(traced.jaxpr, traced.consts, full, None)
        total = jnp.zeros((), jnp.float32)
        for leaf in targets:
            u = plan.fast[leaf]
            use = plan.uses[u]
            outs = _outputs(
                use, interpreter.operands[u], interpreter.constants[u], backward.captured[u]
            )
            for out, delta in zip(outs, backward.deltas[u], strict=True):
                if delta is None:
                    continue
                loops = len(use.loops)
                shape = (1,) * loops + (-1,) + (1,) * (delta.ndim - loops - 1)
                c = factors[leaf].reshape(shape).astype(delta.dtype)
                weighted = jax.lax.stop_gradient(delta * c)
                total = total + jnp.sum(out * weighted).astype(jnp.float32)
        return total

    return jax.grad(surrogate)([leaves[leaf] for leaf in targets])


def _outputs(use: Use, param_values, constants, example_values):
    """The use's equation on the whole batch (and, in opened scans, every iteration),
    its parameter operands shared by the examples."""

    def over_batch(params, consts, examples):
        return jax.vmap(lambda x: apply_use(use, params, consts, x))(examples)

    batched = over_batch
    for _ in use.loops:
        batched = jax.vmap(batched)
    return batched(param_values, constants, example_values)


def _direct_dense(use: Use) -> bool:
    """A dense use outside loops whose parameter operand is the leaf itself, on the right
    of ``x @ W`` with ``W``'s contracted dimensions first: its clipped gradient is
    ``Σ_i xm_iᵀ (c_i dm_i)`` reshaped (``rules.dense_matrices``' order)."""
    if use.loops or not use.operand_is_leaf or not is_dense(use):
        return False
    (contract_lhs, contract_rhs), _ = use.eqn.params["dimension_numbers"]
    if use.example_positions[0] != 0:
        return False
    return tuple(contract_rhs) == tuple(range(len(contract_rhs)))


def _dense_sum(use: Use, backward: _Backward, u: int, factors, leaf):
    (x,), (delta,) = backward.captured[u], backward.deltas[u]
    xm, dm = jax.vmap(functools.partial(dense_matrices, use))(x, delta)
    weighted = dm * factors.reshape(-1, 1, 1).astype(dm.dtype)
    rows = xm.shape[0] * xm.shape[1]
    summed = xm.reshape(rows, -1).T @ weighted.reshape(rows, -1)
    return summed.reshape(leaf.shape).astype(leaf.dtype)
