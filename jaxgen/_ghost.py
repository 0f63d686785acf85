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
straight from the probe. Elementwise gains and convolution kernels get exact per-example
gradients for that parameter alone, from the vector-Jacobian product of the operation
that uses it (small for those parameters), as do parameters no rule covers (used in
several places, transformed before use, anything else), which ``method="ghost"`` names
in a warning.

Then, per parameter leaf, ``Σ_i ‖g_i − ḡ‖² = Σ_i ‖g_i‖² − b ‖ḡ‖²`` (a leaf whose
per-example gradients are materialised is centred exactly instead).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

from jaxgen._per_example import DispersionStats, LossFn, PyTree

_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint")
_VIEWS = (
    "convert_element_type",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
)
# Uses covered by exact per-parameter materialisation, without a warning.
_MATERIALISED_RULES = ("add", "add_any", "sub", "mul", "conv_general_dilated")
_FAST_RULES = ("dense", "embedding", "bias")
PARAM, EXAMPLE, CONST = "param", "example", "const"


@dataclasses.dataclass
class _Use:
    """An equation where parameter-derived values meet example data."""

    eqn: Any
    example_positions: tuple[int, ...]
    param_positions: tuple[int, ...]
    leaves: frozenset[int]  # leaves the parameter operands depend on
    view_leaf: int | None  # the leaf, when the only parameter operand is a pure view of it
    probe_avals: tuple[Any, ...]  # one per output; None for non-float outputs
    rule: str = "generic"


@dataclasses.dataclass
class _Plan:
    uses: list[_Use]
    derived: set[int]  # leaves consumed by non-view parameter-only computations
    fast: dict[int, int] = dataclasses.field(default_factory=dict)  # leaf -> use id
    materialised: list[int] = dataclasses.field(default_factory=list)
    unsupported: set[int] = dataclasses.field(default_factory=set)


class _Interpreter:
    """Evaluates a per-example jaxpr, tracking which values depend on parameters.

    With ``probes`` set, adds ``probes[u]`` to the outputs of use ``u`` and records the
    example operands of every use in ``captured``.
    """

    def __init__(self, num_leaves: int, probes=None):
        self.num_leaves = num_leaves
        self.probes = probes
        self.uses: list[_Use] = []
        self.derived: set[int] = set()
        self.captured: list[list[Any]] = []

    def run(self, jaxpr, consts, leaves, example_leaves):
        """Evaluate; ``example_leaves=None`` marks the example inputs without values."""
        if example_leaves is None:
            example_leaves = [None] * (len(jaxpr.invars) - len(leaves))
        args = [(v, PARAM, frozenset([i]), i) for i, v in enumerate(leaves)]
        args += [(v, EXAMPLE, frozenset(), None) for v in example_leaves]
        return self._eval(jaxpr, [(c, CONST, frozenset(), None) for c in consts], args)

    def _eval(self, jaxpr, consts, args):
        env: dict[Any, tuple] = {}

        def read(atom):
            if isinstance(atom, jcore.Literal):
                return (atom.val, CONST, frozenset(), None)
            return env[atom]

        for var, entry in zip(jaxpr.constvars, consts, strict=True):
            env[var] = entry
        for var, entry in zip(jaxpr.invars, args, strict=True):
            env[var] = entry
        for eqn in jaxpr.eqns:
            entries = [read(a) for a in eqn.invars]
            for var, entry in zip(eqn.outvars, self._apply(eqn, entries), strict=True):
                env[var] = entry
        return [read(a) for a in jaxpr.outvars]

    def _apply(self, eqn, entries):
        statuses = [e[1] for e in entries]
        name = eqn.primitive.name
        if EXAMPLE in statuses and PARAM in statuses:
            inner = _inlinable(eqn)
            if inner is not None:
                jaxpr, consts = inner
                return self._eval(jaxpr, [(c, CONST, frozenset(), None) for c in consts], entries)
        values = [e[0] for e in entries]
        outs = _bind(eqn, values)
        if EXAMPLE in statuses and PARAM in statuses:
            return self._use(eqn, entries, outs)
        if PARAM in statuses:
            deps = frozenset().union(*(e[2] for e in entries))
            params = [e for e in entries if e[1] == PARAM]
            view = None
            if len(params) == 1 and len(eqn.outvars) == 1:
                origin = params[0][3]
                if name in _VIEWS:
                    view = origin
                elif name == "broadcast_in_dim" and origin is not None:
                    view = ("broadcast", origin if isinstance(origin, int) else origin[1])
            if view is None:
                self.derived |= deps
            return [(o, PARAM, deps, view) for o in outs]
        status = EXAMPLE if EXAMPLE in statuses else CONST
        return [(o, status, frozenset(), None) for o in outs]

    def _use(self, eqn, entries, outs):
        use_id = len(self.uses)
        params = tuple(i for i, e in enumerate(entries) if e[1] == PARAM)
        examples = tuple(i for i, e in enumerate(entries) if e[1] == EXAMPLE)
        view_leaf = None
        if len(params) == 1 and isinstance(entries[params[0]][3], int):
            view_leaf = entries[params[0]][3]
        avals = tuple(
            v.aval if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None for v in eqn.outvars
        )
        deps = frozenset().union(*(entries[i][2] for i in params))
        use = _Use(eqn, examples, params, deps, view_leaf, avals)
        use.rule = _rule(use, entries)
        self.uses.append(use)
        self.captured.append([entries[i][0] for i in examples])
        if self.probes is not None:
            outs = [
                o if p is None else o + p for o, p in zip(outs, self.probes[use_id], strict=True)
            ]
        return [(o, EXAMPLE, frozenset(), None) for o in outs]


def _inlinable(eqn):
    """``(jaxpr, consts)`` of a plain call (``jit`` and the like), else ``None``."""
    if eqn.primitive.name not in _CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner.jaxpr, inner.consts
    if isinstance(inner, jcore.Jaxpr) and not inner.constvars:
        return inner, []
    return None


def _bind(eqn, values):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(bind_params, tuple):  # jax < 0.8 returns (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


def _rule(use: _Use, entries) -> str:
    eqn, name = use.eqn, use.eqn.primitive.name
    if use.view_leaf is not None and len(use.example_positions) == 1:
        if name == "dot_general":
            (_, _), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
            if not lhs_batch and not rhs_batch:
                return "dense"
        if name == "gather" and use.param_positions == (0,) and _is_embedding(eqn):
            return "embedding"
        operand = eqn.invars[use.param_positions[0]].aval
        if name in ("add", "add_any", "sub") and operand.ndim == eqn.outvars[0].aval.ndim:
            return "bias"  # the per-example gradient is ±δ_i, summed over broadcast axes
    if name in _MATERIALISED_RULES:
        return name
    return "generic"


def _is_embedding(eqn) -> bool:
    """``table[indices]`` with a 2-D table: one row per index, the row as the last axis."""
    table, indices = (v.aval for v in eqn.invars)
    dims = eqn.params["dimension_numbers"]
    out_ndim = len(eqn.outvars[0].aval.shape)
    return (
        table.ndim == 2
        and tuple(dims.collapsed_slice_dims) == (0,)
        and tuple(dims.start_index_map) == (0,)
        and tuple(dims.offset_dims) == (out_ndim - 1,)
        and tuple(eqn.params["slice_sizes"]) == (1, table.shape[1])
        and indices.shape[-1] == 1
        and not getattr(dims, "operand_batching_dims", ())
    )


def _plan(jaxpr, consts, leaves, example_leaves, num_leaves) -> _Plan:
    interpreter = _Interpreter(num_leaves)
    outs = interpreter.run(jaxpr, consts, leaves, example_leaves)
    if outs[0][1] != EXAMPLE:
        raise ValueError("loss_fn(params, example) must depend on both params and example")
    plan = _Plan(interpreter.uses, interpreter.derived)
    uses_of: dict[int, list[int]] = {}
    for u, use in enumerate(plan.uses):
        for leaf in use.leaves:
            uses_of.setdefault(leaf, []).append(u)
    for leaf, ids in sorted(uses_of.items()):
        use = plan.uses[ids[0]]
        if len(ids) == 1 and leaf not in plan.derived and use.rule in _FAST_RULES:
            plan.fast[leaf] = ids[0]
            continue
        plan.materialised.append(leaf)
        if len(ids) > 1 or leaf in plan.derived or any(plan.uses[u].rule == "generic" for u in ids):
            plan.unsupported.add(leaf)
    return plan


def _dense_sq_norm(eqn, x_position: int, x: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖xᵀ δ‖²`` for one example, in the Goodfellow or Gram form, or materialised."""
    (contract_lhs, contract_rhs), _ = eqn.params["dimension_numbers"]
    x_contract = contract_lhs if x_position == 0 else contract_rhs
    x_free = [d for d in range(x.ndim) if d not in x_contract]
    w_aval = eqn.invars[1 - x_position].aval
    w_contract = contract_rhs if x_position == 0 else contract_lhs
    num_w_free = w_aval.ndim - len(w_contract)
    rows = math.prod(x.shape[d] for d in x_free)
    xm = jnp.transpose(x, x_free + list(x_contract)).reshape(rows, -1)
    # dot_general output: lhs free dims, then rhs free dims.
    if x_position == 0:
        delta_order = list(range(delta.ndim))
    else:
        delta_order = list(range(num_w_free, delta.ndim)) + list(range(num_w_free))
    dm = jnp.transpose(delta, delta_order).reshape(rows, -1)
    return _product_sq_norm(xm, dm)


def _product_sq_norm(xm: jax.Array, dm: jax.Array) -> jax.Array:
    """``‖xmᵀ dm‖²`` for ``xm (T, K)``, ``dm (T, N)``, by the cheapest exact form."""
    xm, dm = xm.astype(jnp.float32), dm.astype(jnp.float32)
    rows, k, n = xm.shape[0], xm.shape[1], dm.shape[1]
    if rows == 1:
        return jnp.sum(jnp.square(xm)) * jnp.sum(jnp.square(dm))
    if rows * (k + n) <= k * n:
        return jnp.sum((xm @ xm.T) * (dm @ dm.T))
    return jnp.sum(jnp.square(xm.T @ dm))


def _embedding_sq_norm(indices: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖Σ_t e_{k_t} δ_tᵀ‖² = Σ_{t,s} 1[k_t = k_s] δ_t·δ_s`` for one example."""
    keys = indices.reshape(-1)
    rows = delta.reshape(keys.shape[0], -1).astype(jnp.float32)
    same = keys[:, None] == keys[None, :]
    return jnp.sum(jnp.where(same, rows @ rows.T, 0.0))


def _cotangents_for(use: _Use, param_values, example_values, delta):
    """Per-example cotangents on a use's parameter operands, by the VJP of its equation."""

    def apply(*params):
        values = [None] * (len(use.param_positions) + len(use.example_positions))
        for i, v in zip(use.param_positions, params, strict=True):
            values[i] = v
        for i, v in zip(use.example_positions, example_values, strict=True):
            values[i] = v
        return _bind(use.eqn, values)

    outs, vjp = jax.vjp(apply, *param_values)
    cotangent_out = [
        jnp.zeros_like(o) if d is None else d.astype(o.dtype)
        for o, d in zip(outs, delta, strict=True)
    ]
    return vjp(cotangent_out)


@functools.lru_cache(maxsize=64)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def ghost_dispersion(
    loss_fn: LossFn, params: PyTree, batch: PyTree, *, warn: bool
) -> DispersionStats:
    """``gradient_dispersion`` by ghost norms; see the module docstring."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    example_leaves, example_def = jax.tree_util.tree_flatten(batch)
    size = example_leaves[0].shape[0]
    num_leaves = len(leaves)

    def flat_loss(leaves, example_leaves):
        return loss_fn(
            jax.tree_util.tree_unflatten(treedef, leaves),
            jax.tree_util.tree_unflatten(example_def, example_leaves),
        )

    one = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in example_leaves]
    closed = jax.make_jaxpr(flat_loss)(leaves, one)
    jaxpr, consts = closed.jaxpr, closed.consts
    plan_holder = []

    def discover(leaves, example_leaves):
        plan_holder.append(_plan(jaxpr, consts, leaves, example_leaves, num_leaves))
        return 0.0

    jax.eval_shape(discover, leaves, one)
    plan = plan_holder[0]
    if warn and plan.unsupported:
        names = ", ".join(jax.tree_util.keystr(p) for p in _paths(params, plan.unsupported))
        _warn_once(
            "method='ghost': no ghost rule covers parameters "
            f"{names}; their per-example gradients are materialised (exactly)"
        )

    def per_example(leaves, example_leaves, probes):
        interpreter = _Interpreter(num_leaves, probes)
        outs = interpreter.run(jaxpr, consts, leaves, example_leaves)
        return outs[0][0], interpreter.captured

    def summed(leaves, probes):
        losses, captured = jax.vmap(per_example, in_axes=(None, 0, 0))(
            leaves, example_leaves, probes
        )
        return jnp.sum(losses), (losses, captured)

    probes = [
        [None if a is None else jnp.zeros((size, *a.shape), a.dtype) for a in use.probe_avals]
        for use in plan.uses
    ]
    (grad_sum, deltas), (losses, captured) = jax.grad(summed, argnums=(0, 1), has_aux=True)(
        leaves, probes
    )
    mean_grad = [g / size for g in grad_sum]

    leaf_sq_norms: dict[int, jax.Array] = {}
    leaf_m2: dict[int, jax.Array] = {}

    def exact(leaf: int, grads: jax.Array) -> None:
        """Norms and centred sum of a leaf whose per-example gradients are at hand."""
        flat = grads.reshape(size, -1).astype(jnp.float32)
        residuals = flat - mean_grad[leaf].reshape(1, -1).astype(jnp.float32)
        leaf_sq_norms[leaf] = jnp.sum(jnp.square(flat), axis=1)
        total = jnp.sum(residuals, axis=0)
        leaf_m2[leaf] = jnp.maximum(
            jnp.sum(jnp.square(residuals)) - jnp.sum(jnp.square(total)) / size, 0.0
        )

    for leaf, u in plan.fast.items():
        use = plan.uses[u]
        (x,) = captured[u]
        (delta,) = deltas[u]
        if use.rule == "bias":
            operand = use.eqn.invars[use.param_positions[0]].aval.shape
            axes = tuple(
                i + 1
                for i, (p, o) in enumerate(zip(operand, delta.shape[1:], strict=True))
                if p < o
            )
            grads = jnp.sum(delta, axis=axes) if axes else delta
            negative = use.eqn.primitive.name == "sub" and use.param_positions == (1,)
            exact(leaf, -grads if negative else grads)
            continue
        if use.rule == "dense":
            rule = functools.partial(_dense_sq_norm, use.eqn, use.example_positions[0])
        else:
            rule = _embedding_sq_norm
        norms = jax.vmap(rule)(x, delta)
        leaf_sq_norms[leaf] = norms
        centre = size * jnp.sum(jnp.square(mean_grad[leaf].astype(jnp.float32)))
        leaf_m2[leaf] = jnp.maximum(jnp.sum(norms) - centre, 0.0)

    if plan.materialised:
        per_example_grads = _materialise(plan, jaxpr, consts, leaves, captured, deltas, num_leaves)
        for leaf, grads in per_example_grads.items():
            exact(leaf, grads)

    zero = jnp.zeros((), jnp.float32)
    layer = [leaf_m2.get(i, zero) / size for i in range(num_leaves)]
    sq_norms = functools.reduce(jnp.add, leaf_sq_norms.values(), jnp.zeros((size,), jnp.float32))
    return DispersionStats(
        loss=jnp.mean(losses),
        grad=jax.tree_util.tree_unflatten(treedef, mean_grad),
        sq_norms=sq_norms,
        dispersion=functools.reduce(jnp.add, layer),
        layer_dispersion=jax.tree_util.tree_unflatten(treedef, layer),
    )


def _materialise(plan, jaxpr, consts, leaves, captured, deltas, num_leaves):
    """Exact per-example gradients of the materialised leaves, use by use."""
    wanted = set(plan.materialised)
    relevant = [u for u, use in enumerate(plan.uses) if use.leaves & wanted]
    targets = sorted(wanted)

    def parameter_operands(target_leaves):
        full = list(leaves)
        for i, leaf in zip(targets, target_leaves, strict=True):
            full[i] = leaf
        interpreter = _ParamOnly(num_leaves)
        interpreter.run(jaxpr, consts, full, None)
        return [interpreter.operands[u] for u in relevant]

    operands, pullback = jax.vjp(parameter_operands, [leaves[i] for i in targets])

    def one_example(example_values, example_deltas):
        cotangents = [
            list(_cotangents_for(plan.uses[u], operands[k], example_values[k], example_deltas[k]))
            for k, u in enumerate(relevant)
        ]
        (grads,) = pullback(cotangents)
        return grads

    per_use_examples = [captured[u] for u in relevant]
    per_use_deltas = [deltas[u] for u in relevant]
    grads = jax.vmap(one_example)(per_use_examples, per_use_deltas)
    return dict(zip(targets, grads, strict=True))


class _ParamOnly(_Interpreter):
    """Evaluates only the parameter-derived part; records each use's parameter operands."""

    def __init__(self, num_leaves):
        super().__init__(num_leaves)
        self.operands: list[list[Any]] = []

    def _apply(self, eqn, entries):
        statuses = [e[1] for e in entries]
        if EXAMPLE in statuses and PARAM in statuses and _inlinable(eqn) is not None:
            return super()._apply(eqn, entries)
        if EXAMPLE in statuses:
            if PARAM in statuses:
                self.operands.append([e[0] for e in entries if e[1] == PARAM])
                self.uses.append(None)
            return [(None, EXAMPLE, frozenset(), None) for _ in eqn.outvars]
        return super()._apply(eqn, entries)


def _paths(params: PyTree, leaves: set[int]):
    paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [paths[i] for i in sorted(leaves)]
