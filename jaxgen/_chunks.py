"""One way to evaluate a function over many probes or samples: vmapped rows, in sequence.

Every estimator that averages over random draws (Hutchinson probes, the exact trace's
basis vectors, flatness and sensitivity samples) evaluates ``fn`` on ``chunk_size`` draws
at a time under ``vmap`` and the rows one after another. The rows are unrolled into
straight-line code on a CPU, not a ``lax.map`` (a while loop): XLA:CPU runs convolutions
inside loops about 40× slower than outside them (``benchmarks/hessian.py``), while
straight rows cost only compile time, proportional to their number. Beyond
``MAX_UNROLLED`` rows (e.g. the exact trace of a model with many parameters) the rows run
in a loop. On other backends they always do: on an H100 the rows ran as fast in a loop as
unrolled, and 20 unrolled rows took about 5× as long to compile as two
(``benchmarks/hessian.py``, its ``first call s`` column). ``loops_are_slow`` tells other
loops (GMP's perturbations) when to unroll.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

MAX_UNROLLED = 32


def map_in_rows(
    fn: Callable[[Any], jax.Array],
    xs: jax.Array,
    chunk_size: int,
    *,
    row_constraint: Callable[[jax.Array], jax.Array] | None = None,
    unroll: bool | None = None,
) -> jax.Array:
    """``vmap(fn)(xs)``, computed ``chunk_size`` elements of ``xs`` at a time.

    ``row_constraint`` is applied to each row of inputs (e.g. a sharding constraint that
    spreads the row over devices). The last row is padded by repeating inputs, whose
    outputs are dropped. ``unroll``: the rows in straight-line code (``True``) or in a
    ``lax.map`` (``False``); by default unrolled on a CPU backend, up to ``MAX_UNROLLED``.
    """
    count = xs.shape[0]
    width = min(chunk_size, count)
    rows = -(-count // width)
    padded = xs[jnp.arange(rows * width) % count].reshape(rows, width, *xs.shape[1:])

    def row(row_xs):
        if row_constraint is not None:
            row_xs = row_constraint(row_xs)
        return jax.vmap(fn)(row_xs)

    if unroll is None:
        unroll = jax.default_backend() == "cpu" and rows <= MAX_UNROLLED
    if unroll:
        out = jnp.concatenate([row(padded[r]) for r in range(rows)])
    else:
        out = jax.lax.map(row, padded)
        out = out.reshape(rows * width, *out.shape[2:])
    return out[:count]


def _inner_jaxprs(eqn) -> list[jcore.Jaxpr]:
    inner = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                inner.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                inner.append(item)
    return inner


def has_primitive(jaxpr: jcore.Jaxpr, names: tuple[str, ...]) -> bool:
    """Whether ``jaxpr``, or a jaxpr inside one of its equations, has an equation whose
    primitive's name starts with one of ``names``."""
    return any(
        eqn.primitive.name.startswith(names)
        or any(has_primitive(inner, names) for inner in _inner_jaxprs(eqn))
        for eqn in jaxpr.eqns
    )


def convolves(jaxpr: jcore.Jaxpr) -> bool:
    """Whether ``jaxpr``, or a jaxpr inside one of its equations, has a convolution."""
    return has_primitive(jaxpr, ("conv_general_dilated",))


def loops_are_slow(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` belongs in straight-line code rather than a loop body: on a
    CPU backend, when its program has a convolution (XLA:CPU runs those about 40× slower
    inside loops: ``benchmarks/hessian.py``)."""
    if jax.default_backend() != "cpu":
        return False
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    return convolves(jax.make_jaxpr(fn)(*shapes).jaxpr)
