"""The ghost rules, tried in order, and the plan that assigns one to every leaf."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.lax import GatherScatterMode

from jaxgen._ghost.interpreter import EXAMPLE, Interpreter, Use
from jaxgen._sums import pairwise_sum

# On a CPU, a convolution's per-example kernel gradients are formed a chunk of examples
# at a time (each chunk's input and output gradient about CONV_CHUNK_ELEMENTS numbers,
# read from cache by the kh·kw window contractions) when the whole batch's exceed
# CONV_CACHED_ELEMENTS. Measured on the benchmark CNN (benchmarks/README.md): chunks win
# at batch 256 (both convolutions above this size) and lose at batch 128 (below it).
CONV_CHUNK_ELEMENTS = 2**18
CONV_CACHED_ELEMENTS = 3 * 2**20
BLOCK_ELEMENTS = 2**16  # the exact dense recomputation's residual block, whole batch


@dataclasses.dataclass(frozen=True)
class Rule:
    """How a leaf used once, in an equation ``matches`` accepts, gets its statistics.

    ``sq_norms(use, x, delta)`` gives ``‖g_i‖²`` from one example's operand ``x`` and
    output gradient ``delta`` without ``g_i`` (a ghost rule); ``grads(use, x, delta)``
    gives the batch of ``g_i`` for the leaf (in the layout of the equation's operand)
    from the batched operands and output gradients. A rule with neither
    materialises ``g_i`` from the equation's VJP; ``warn`` names such leaves in the
    warning of ``method="ghost"``. ``centred_m2(use, x, delta)`` (batched), where given,
    is the exact ``Σ_i ‖g_i − ḡ‖²`` used when the ghost difference cancels.
    ``matrices(use, x, delta)``, where given, writes one example's ``g_i`` as ``xmᵀ dm``
    of row matrices, so that a tied use in a loop (``Use.tied``) stacks the iterations'
    rows into one product. With ``own_mean``, a leaf that is itself the operand (no view,
    outside loops) takes ``ḡ`` from its ``grads``, and the backward pass does not form it
    (for convolution kernels, XLA's kernel-gradient convolution is not run).
    ``reads_operand=False``: ``sq_norms``/``grads`` use ``delta`` only (``x`` is ``None``).
    """

    matches: Callable[[Use], bool]
    sq_norms: Callable[[Use, jax.Array, jax.Array], jax.Array] | None = None
    grads: Callable[[Use, jax.Array, jax.Array], jax.Array] | None = None
    centred_m2: Callable[[Use, jax.Array, jax.Array], jax.Array] | None = None
    warn: bool = False
    own_mean: bool = False
    reads_operand: bool = True
    matrices: Callable[[Use, jax.Array, jax.Array], tuple[jax.Array, jax.Array]] | None = None

    @property
    def fast(self) -> bool:
        return self.sq_norms is not None or self.grads is not None


def is_dense(use: Use) -> bool:
    if not use.single_view or use.eqn.primitive.name != "dot_general":
        return False
    (_, _), (lhs_batch, rhs_batch) = use.eqn.params["dimension_numbers"]
    return not lhs_batch and not rhs_batch


def dense_matrices(use: Use, x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One example's operand and output gradient as ``xm (T, K)``, ``dm (T, N)``, so that
    the leaf's gradient is ``xmᵀ dm`` (in the order contracted, then free, dimensions)."""
    eqn, x_position = use.eqn, use.example_positions[0]
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
    return xm, dm


def dense_sq_norm(use: Use, x: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖xᵀ δ‖²`` for one example, in the Goodfellow or Gram form, or materialised."""
    return product_sq_norm(*dense_matrices(use, x, delta))


def dense_centred_m2(use: Use, x: jax.Array, delta: jax.Array) -> jax.Array:
    """``Σ_i ‖g_i − ḡ‖²`` for a dense leaf, exactly: residuals formed a column block of
    the leaf at a time (at most ``BLOCK_ELEMENTS`` numbers for the whole batch), centred
    on the block's mean over the batch, so memory stays far below one leaf."""
    return rows_centred_m2(*jax.vmap(functools.partial(dense_matrices, use))(x, delta))


def rows_centred_m2(xm: jax.Array, dm: jax.Array) -> jax.Array:
    """``Σ_i ‖xm_iᵀ dm_i − ḡ‖²`` for batched row matrices ``xm (b, T, K)``, ``dm (b, T, N)``
    (see ``dense_centred_m2``)."""
    dtype = accumulator(xm, dm)
    xm, dm = xm.astype(dtype), dm.astype(dtype)
    size, k, n = xm.shape[0], xm.shape[2], dm.shape[2]
    width = max(1, min(n, BLOCK_ELEMENTS // (size * k)))
    blocks = -(-n // width)
    dm = jnp.pad(dm, [(0, 0), (0, 0), (0, blocks * width - n)])
    dm = jnp.moveaxis(dm.reshape(size, dm.shape[1], blocks, width), 2, 0)

    def block(m2, d):  # d: (b, T, width)
        grads = jnp.einsum("btk,btn->bkn", xm, d)
        residuals = grads - pairwise_sum(grads) / size
        return m2 + jnp.sum(jnp.square(residuals)), None

    m2, _ = jax.lax.scan(block, jnp.zeros((), dtype), dm)
    return m2


def accumulator(*arrays: jax.Array) -> jnp.dtype:
    """The parameters' precision or float32, whichever is wider."""
    return jnp.result_type(jnp.float32, *(a.dtype for a in arrays))


def opaque(*arrays: jax.Array):
    """The arrays, behind ``lax.optimization_barrier``: XLA:CPU (jaxlib 0.10.2) computes a
    ``vmap``ped ``a @ a.T`` wrongly when it can see that the rows of ``a`` are one
    broadcast row, which is what ``δ`` is under mean pooling (every token gets the same
    output gradient; on the benchmark transformer block the squared norms came out 20×
    too small, and ``tests/test_ghost.py`` has the four-line reproduction). The barrier
    hides where the values came from."""
    return jax.lax.optimization_barrier(arrays)


def product_sq_norm(xm: jax.Array, dm: jax.Array) -> jax.Array:
    """``‖xmᵀ dm‖²`` for ``xm (T, K)``, ``dm (T, N)``, by the cheapest exact form."""
    dtype = accumulator(xm, dm)
    xm, dm = xm.astype(dtype), dm.astype(dtype)
    rows, k, n = xm.shape[0], xm.shape[1], dm.shape[1]
    if rows == 1:
        return jnp.sum(jnp.square(xm)) * jnp.sum(jnp.square(dm))
    if rows * (k + n) <= k * n:
        xm, dm = opaque(xm, dm)
        return jnp.sum((xm @ xm.T) * (dm @ dm.T))
    return jnp.sum(jnp.square(xm.T @ dm))


# How the gradient of a gather treats an index out of range: JAX's transpose (a
# scatter-add) drops it unless the gather clips it into range.
_GATHER_MODES = (
    GatherScatterMode.CLIP,
    GatherScatterMode.FILL_OR_DROP,
    GatherScatterMode.PROMISE_IN_BOUNDS,
)


def is_embedding(use: Use) -> bool:
    """``table[indices]`` with a 2-D table: one row per index, the row as the last axis,
    in a mode whose gradient ``embedding_sq_norm`` reproduces."""
    eqn = use.eqn
    if not use.single_view or eqn.primitive.name != "gather" or use.param_positions != (0,):
        return False
    if eqn.params.get("mode") not in _GATHER_MODES:
        return False
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


def embedding_sq_norm(use: Use, indices: jax.Array, delta: jax.Array) -> jax.Array:
    """``‖Σ_t e_{k_t} δ_tᵀ‖² = Σ_{t,s} 1[k_t = k_s] δ_t·δ_s`` for one example.

    Out-of-range ids follow the gather's mode, as JAX's gradient does: clipped into range
    (``CLIP``), or contributing nothing (``FILL_OR_DROP``, ``PROMISE_IN_BOUNDS``).
    """
    vocabulary = use.eqn.invars[0].aval.shape[0]
    keys = indices.reshape(-1)
    rows = delta.reshape(keys.shape[0], -1)
    rows = rows.astype(accumulator(rows))
    if use.eqn.params["mode"] == GatherScatterMode.CLIP:
        keys = jnp.clip(keys, 0, vocabulary - 1)
    else:
        in_range = (keys >= 0) & (keys < vocabulary)
        rows = jnp.where(in_range[:, None], rows, 0)
    same = keys[:, None] == keys[None, :]
    (rows,) = opaque(rows)
    return jnp.sum(jnp.where(same, rows @ rows.T, 0.0))


def is_bias(use: Use) -> bool:
    """A leaf added to (or subtracted from) example data of the same rank."""
    if not use.single_view or use.eqn.primitive.name not in ("add", "add_any", "sub"):
        return False
    operand = use.eqn.invars[use.param_positions[0]].aval
    return operand.ndim == use.eqn.outvars[0].aval.ndim


def broadcast_axes(use: Use, delta: jax.Array) -> tuple[int, ...]:
    """The axes of the batched ``delta`` along which the leaf's operand was broadcast
    (size 1 in the operand, larger in the output)."""
    operand = use.eqn.invars[use.param_positions[0]].aval.shape
    return tuple(
        i + 1 for i, (p, o) in enumerate(zip(operand, delta.shape[1:], strict=True)) if p < o
    )


def bias_grads(use: Use, x: jax.Array, delta: jax.Array) -> jax.Array:
    """``g_i = ±δ_i`` summed over the axes the bias was broadcast along."""
    del x
    axes = broadcast_axes(use, delta)
    grads = jnp.sum(delta, axis=axes) if axes else delta
    negative = use.eqn.primitive.name == "sub" and use.param_positions == (1,)
    return -grads if negative else grads


def is_gain(use: Use) -> bool:
    """A leaf multiplying example data elementwise (a LayerNorm or RMSNorm scale); each
    operand's axes match the output's or are of size 1 there (broadcast)."""
    if not use.single_view or use.eqn.primitive.name != "mul":
        return False
    out = use.eqn.outvars[0].aval.shape
    return all(
        len(operand.shape) == len(out)
        and all(d in (1, o) for d, o in zip(operand.shape, out, strict=True))
        for operand in (v.aval for v in use.eqn.invars)
    )


def gain_grads(use: Use, x: jax.Array, delta: jax.Array) -> jax.Array:
    """``g_i = x_i ⊙ δ_i`` (``x_i`` broadcast) summed over the axes the gain was
    broadcast along."""
    axes = broadcast_axes(use, delta)
    dtype = accumulator(x, delta)
    products = x.astype(dtype) * delta.astype(dtype)
    return jnp.sum(products, axis=axes) if axes else products


def is_conv_kernel(use: Use) -> bool:
    """A leaf as the kernel of a convolution of example data (any layout, stride,
    padding, dilation, transposed convolutions and feature groups; not batch groups)."""
    eqn = use.eqn
    return (
        use.single_view
        and eqn.primitive.name == "conv_general_dilated"
        and use.param_positions == (1,)
        and use.example_positions == (0,)
        and eqn.params["batch_group_count"] == 1
    )


def conv_kernel_grads(use: Use, x: jax.Array, delta: jax.Array) -> jax.Array:
    """Per-example kernel gradients ``g_i[k] = Σ_{n,p} x_i[n, p·s + k·d] δ_i[n, p]ᵀ``.

    For every kernel offset ``k`` (``kh·kw`` of them in 2-D), a strided slice of the
    padded (and, for transposed convolutions, interior-dilated) input meets the output
    gradient in one batched contraction over the example's positions: the work of the
    kernel's part of backpropagation, without XLA:CPU's grouped convolution. On a CPU, a
    batch whose inputs and output gradients outgrow the cache (``CONV_CACHED_ELEMENTS``)
    goes through in chunks of examples (``in_example_chunks``), so that the kh·kw
    contractions read each chunk from cache rather than the whole batch from memory.
    """
    p = use.eqn.params
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    spatial = len(lhs_spec) - 2
    groups = p["feature_group_count"]
    kernel = use.eqn.invars[1].aval.shape
    kernel_sizes = [kernel[d] for d in rhs_spec[2:]]
    dtype = accumulator(x, delta)
    # (b, N, *spatial, C) and (b, N, *out_spatial, O)
    x = jnp.transpose(x, [0, 1 + lhs_spec[0], *(1 + d for d in lhs_spec[2:]), 1 + lhs_spec[1]])
    delta = jnp.transpose(
        delta, [0, 1 + out_spec[0], *(1 + d for d in out_spec[2:]), 1 + out_spec[1]]
    )
    x, delta = x.astype(dtype), delta.astype(dtype)
    config = [(0, 0, 0), (0, 0, 0)]
    pads = zip(p["padding"], p["lhs_dilation"], strict=True)
    config += [(lo, hi, dilation - 1) for (lo, hi), dilation in pads]
    x = jax.lax.pad(x, jnp.zeros((), dtype), [*config, (0, 0, 0)])
    out_sizes = delta.shape[2:-1]
    b, n, channels, outputs = x.shape[0], x.shape[1], x.shape[-1], delta.shape[-1]
    x = x.reshape(*x.shape[:-1], groups, channels // groups)
    delta = delta.reshape(*delta.shape[:-1], groups, outputs // groups)
    delta = jnp.transpose(delta.reshape(b, -1, groups, outputs // groups), (0, 2, 3, 1))

    def kernel_grads(x, delta):  # a chunk of examples
        examples, per_offset = x.shape[0], []
        for offset in itertools.product(*(range(k) for k in kernel_sizes)):
            first = [k * d for k, d in zip(offset, p["rhs_dilation"], strict=True)]
            steps = zip(first, out_sizes, p["window_strides"], strict=True)
            last = [f + (size - 1) * stride + 1 for f, size, stride in steps]
            window = jax.lax.slice(
                x,
                [0, 0, *first, 0, 0],
                [examples, n, *last, *x.shape[-2:]],
                [1, 1, *p["window_strides"], 1, 1],
            )
            window = window.reshape(examples, -1, groups, channels // groups)  # (b, T, g, c)
            per_offset.append(  # delta: (b, g, o, T), transposed once for every offset
                jnp.einsum("btgc,bgot->bcgo", window, delta).reshape(
                    examples, channels // groups, -1
                )
            )
        return jnp.stack(per_offset, axis=1)

    per_example = (x.size + delta.size) // b
    chunk = b
    if jax.default_backend() == "cpu" and b * per_example > CONV_CACHED_ELEMENTS:
        chunk = max(1, CONV_CHUNK_ELEMENTS // per_example)
    grads = in_example_chunks(kernel_grads, chunk, x, delta)
    grads = grads.reshape(b, *kernel_sizes, channels // groups, outputs)
    # (b, *kernel spatial, in, out) -> the kernel's own layout
    source = {rhs_spec[0]: spatial + 2, rhs_spec[1]: spatial + 1}
    source |= {d: 1 + i for i, d in enumerate(rhs_spec[2:])}
    return jnp.transpose(grads, [0, *(source[d] for d in range(len(kernel)))])


def in_example_chunks(fn, chunk: int, *arrays: jax.Array) -> jax.Array:
    """``fn(*arrays)`` for a function of a batch of examples (the leading axis of
    ``arrays`` and of its result), about ``chunk`` examples at a time in a loop.

    Example ``e = i·count + j`` goes to iteration ``j``, so a batch split over devices
    along its leading axis stays where it is. ``count`` divides the batch where a count
    at most twice the least one does; otherwise the batch is padded with zeros."""
    size = arrays[0].shape[0]
    least = -(-size // chunk)
    if least == 1:
        return fn(*arrays)
    count = next((c for c in range(least, 2 * least + 1) if size % c == 0), least)
    chunk = -(-size // count)
    arrays = [
        jnp.pad(a, [(0, chunk * count - size)] + [(0, 0)] * (a.ndim - 1)).reshape(
            chunk, count, *a.shape[1:]
        )
        for a in arrays
    ]
    one = jax.eval_shape(fn, *(a[:, 0] for a in arrays))  # one iteration's result

    def iteration(j, out):
        piece = fn(*(jax.lax.dynamic_index_in_dim(a, j, 1, keepdims=False) for a in arrays))
        return jax.lax.dynamic_update_index_in_dim(out, piece, j, 1)

    out = jnp.zeros((chunk, count, *one.shape[1:]), one.dtype)
    out = jax.lax.fori_loop(0, count, iteration, out)
    return out.reshape(chunk * count, *out.shape[2:])[:size]


QUIETLY_MATERIALISED = ("add", "add_any", "sub", "mul", "conv_general_dilated")

RULES: dict[str, Rule] = {
    "dense": Rule(
        is_dense, sq_norms=dense_sq_norm, centred_m2=dense_centred_m2, matrices=dense_matrices
    ),
    "embedding": Rule(is_embedding, sq_norms=embedding_sq_norm),
    "bias": Rule(is_bias, grads=bias_grads, reads_operand=False),
    "gain": Rule(is_gain, grads=gain_grads),
    "conv": Rule(is_conv_kernel, grads=conv_kernel_grads, own_mean=True),
    # Other elementwise and convolution operands: exact per-example gradients of that
    # leaf alone.
    "materialised": Rule(lambda use: use.eqn.primitive.name in QUIETLY_MATERIALISED),
    "generic": Rule(lambda use: True, warn=True),
}


@dataclasses.dataclass
class Plan:
    uses: list[Use]
    fast: dict[int, int]  # leaf -> the id of its one use, handled by a fast rule
    materialised: list[int]  # leaves whose per-example gradients are materialised
    unsupported: set[int]  # the materialised leaves that no rule covers (warned about)
    closed: frozenset[int] = frozenset()  # ids of the scans treated as one opaque use

    @property
    def own_mean(self) -> frozenset[int]:
        """Fast leaves whose ``ḡ`` comes from their rule's per-example ``grads``
        (``Rule.own_mean``): the backward pass skips their gradient."""
        return frozenset(
            leaf
            for leaf, u in self.fast.items()
            if self.uses[u].rule.own_mean
            and self.uses[u].operand_is_leaf
            and not self.uses[u].loops
        )


def make_plan(jaxpr, consts, leaves, example_leaves) -> Plan:
    """Run the program once (abstractly), give each use its rule and each leaf its path.

    Opened scans whose uses are not all covered by a scan-safe ghost rule are closed
    and the program planned again (at most once per scan)."""
    closed: frozenset[int] = frozenset()
    while True:
        plan = _plan(jaxpr, consts, leaves, example_leaves, closed)
        uncovered = {
            id(use.scans[0]) for use in plan.uses if use.scans and not _covered_in_scan(use, plan)
        }
        if not uncovered:
            return plan
        closed = closed | uncovered


def _covered_in_scan(use: Use, plan: Plan) -> bool:
    """A use in an opened scan is covered when its leaf is a fast leaf (used there once)
    whose rule needs no pullback: per-example ``grads`` (summed over the iterations of a
    tied leaf), or, for a stacked leaf, ``sq_norms`` with an exact ``centred_m2`` (the
    statistics of its slices add up), or, for a tied leaf, row ``matrices`` (stacked
    over the iterations into one product)."""
    if len(use.leaves) != 1 or use.tied is None:
        return False
    (leaf,) = use.leaves
    if leaf not in plan.fast or plan.uses[plan.fast[leaf]] is not use:
        return False
    exact = use.rule.matrices if use.tied else use.rule.centred_m2
    return use.rule.grads is not None or exact is not None


def _plan(jaxpr, consts, leaves, example_leaves, closed: frozenset[int]) -> Plan:
    interpreter = Interpreter(closed=closed)
    outs = interpreter.run(jaxpr, consts, leaves, example_leaves)
    if outs[0].kind != EXAMPLE:
        raise ValueError("loss_fn(params, example) must depend on both params and example")
    uses, derived = interpreter.uses, interpreter.derived
    for use in uses:
        use.rule = next(rule for rule in RULES.values() if rule.matches(use))
    uses_of: dict[int, list[int]] = {}
    for u, use in enumerate(uses):
        for leaf in use.leaves:
            uses_of.setdefault(leaf, []).append(u)
    plan = Plan(uses, {}, [], set(), closed)
    for leaf, ids in sorted(uses_of.items()):
        shared = len(ids) > 1 or leaf in derived
        if not shared and uses[ids[0]].rule.fast:
            plan.fast[leaf] = ids[0]
            continue
        plan.materialised.append(leaf)
        if shared or any(uses[u].rule.warn for u in ids):
            plan.unsupported.add(leaf)
    return plan
