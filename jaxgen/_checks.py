"""Eager argument validation shared by every public function.

Each check raises ``ValueError`` naming the argument and the offending value, at call or
construction time. Values that are traced (the function is being called inside an
outer ``jax.jit``) cannot be inspected and are let through: their shapes still are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array, or ``None`` when it is traced."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value)


def _scalar(name: str, value: Any) -> float | None:
    array = concrete(value)
    if array is None:
        return None
    if array.ndim != 0 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{name} must be a real scalar, got {value!r}")
    return float(array)


def positive(name: str, value: Any) -> None:
    """``value`` is a finite scalar > 0."""
    number = _scalar(name, value)
    if number is not None and not (math.isfinite(number) and number > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative(name: str, value: Any) -> None:
    """``value`` is a finite scalar >= 0."""
    number = _scalar(name, value)
    if number is not None and not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def finite(name: str, value: Any) -> None:
    """``value`` is a finite scalar."""
    number = _scalar(name, value)
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def unit_interval(name: str, value: Any) -> None:
    """``value`` is a scalar in [0, 1]."""
    number = _scalar(name, value)
    if number is not None and not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")


def integer(name: str, value: Any, *, minimum: int) -> None:
    """``value`` is a Python integer >= ``minimum`` (a static quantity: a count, a size)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def count(name: str, value: Any, *, minimum: int, static: bool) -> None:
    """``value`` is an integer >= ``minimum``: a Python or NumPy integer, or a 0-d
    integer array (``optax.inject_hyperparams`` turns every number into one). Traced, it
    is let through unless ``static`` (it fixes a shape): then the message says how to
    keep it a Python integer."""
    if isinstance(value, jax.core.Tracer):
        if static:
            raise ValueError(
                f"{name} fixes a shape and must be a Python integer, but it is traced here "
                "(optax.inject_hyperparams makes every number an array): pass "
                f"static_args=({name!r},) to optax.inject_hyperparams"
            )
        if value.ndim != 0 or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        return
    array = np.asarray(value)
    if (
        isinstance(value, bool)
        or array.ndim != 0
        or not np.issubdtype(array.dtype, np.integer)
        or int(array) < minimum
    ):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def optional_integer(name: str, value: Any, *, minimum: int) -> None:
    if value is not None:
        integer(name, value, minimum=minimum)


def choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        allowed = ", ".join(repr(option) for option in options)
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def batch_size(name: str, batch: Any) -> int:
    """The shared leading-axis size of every leaf of ``batch``."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"{name} must have at least one array leaf, got {batch!r}")
    sizes = set()
    for leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} leaves must share a leading batch axis; found a scalar leaf {leaf!r}"
            )
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise ValueError(
            f"{name} leaves must share a leading batch axis; found leading sizes {sorted(sizes)}"
        )
    (size,) = sizes
    if size < 1:
        raise ValueError(f"{name} must hold at least one example, got a leading axis of size 0")
    return int(size)


def key(name: str, value: Any) -> None:
    """``value`` is a PRNG key: a typed key array or a raw ``uint32[2]`` key."""
    if isinstance(value, jax.Array) and jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
        if value.ndim != 0:
            raise ValueError(f"{name} must be a single PRNG key, got shape {value.shape}")
        return
    shape, dtype = np.shape(value), getattr(value, "dtype", None)
    if shape != (2,) or dtype is None or np.dtype(dtype) != np.uint32:
        raise ValueError(
            f"{name} must be a PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)), "
            f"got {value!r}"
        )


def fraction(name: str, value: Any) -> None:
    """``value`` is a scalar in (0, 1]."""
    number = _scalar(name, value)
    if number is not None and not 0.0 < number <= 1.0:
        raise ValueError(f"{name} must lie in (0, 1], got {value!r}")


def per_step_values(name: str, value: Any, *, positive: bool = False) -> None:
    """Every entry of ``value`` is finite and ``>= 0`` (``> 0`` with ``positive``)."""
    array = concrete(value)
    if array is None:
        return
    array = np.asarray(array, np.float64)
    good = np.isfinite(array) & ((array > 0) if positive else (array >= 0))
    if not np.all(good):
        bad = np.flatnonzero(~good.reshape(-1))[0]
        where = f" (entry {bad})" if array.ndim else ""
        requirement = "> 0" if positive else ">= 0"
        value = float(array.reshape(-1)[bad])
        raise ValueError(f"{name} must be finite and {requirement}, got {value!r}{where}")


def _abstract(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((np.shape(x), np.dtype(x.dtype)) for x in leaves)


def float_params(name: str, params: Any) -> None:
    """Every leaf of ``params`` is a float array (jaxgen differentiates all of them)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            raise ValueError(
                f"{name} leaf {jax.tree_util.keystr(path) or '(the root)'} has dtype {dtype}: "
                "every parameter leaf is differentiated, so each must be a float array; keep "
                "integer state out of params (close over it in loss_fn)"
            )


def per_example_loss(loss_fn: Any, params: Any, batch: Any, *, batch_name: str = "batch") -> None:
    """``loss_fn(params, example)`` returns a float scalar for one example of ``batch``.

    Checked once per loss function and shapes, from ``jax.eval_shape``: nothing runs.
    """
    float_params("params", params)
    try:
        key = (loss_fn, _signature(params), _signature(batch))
        hash(key)
    except TypeError:  # an unhashable loss function: check every time
        key = None
    if key is not None and key in _CHECKED_LOSSES:
        return
    example = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), batch
    )
    out = jax.eval_shape(loss_fn, _abstract(params), example)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != () or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
        got = f"shape {shape} and dtype {dtype}" if shape is not None else f"{type(out).__name__}"
        raise ValueError(
            f"loss_fn must return one float scalar per example: loss_fn(params, example) gets "
            f"one example of {batch_name} (no batch axis) and returned {got}; a batched loss "
            "or raw logits is not a per-example loss"
        )
    if key is not None:
        if len(_CHECKED_LOSSES) > 256:
            _CHECKED_LOSSES.clear()
        _CHECKED_LOSSES.add(key)


_CHECKED_LOSSES: set = set()
