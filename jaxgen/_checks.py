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
