"""Gaussian perturbations shaped like a parameter pytree.

GMP draws ``k·P`` Gaussian numbers per update, and on a CPU that costs more than the
gradients (``benchmarks/gmp.py``). Measured on the 2-core CPU for the 5.6 M normals of
k = 3 on an MLP 784-1024-1024-10, drawn leaf by leaf inside ``jit``:

    jax.random.normal, threefry keys            21 ms
    jax.random.normal, rbg / unsafe_rbg keys    30 ms
    raw threefry bits alone                      9 ms
    standard_normal below, threefry keys        14 ms

``standard_normal`` uses the inverse-CDF method of ``jax.random.normal``
(``√2 · erfinv(2u − 1)``) but forms ``u`` directly from the 24 high bits of one
``uint32`` on the symmetric midpoint grid ``(m + ½)/2²⁴``, skipping the float
arithmetic that ``jax.random.uniform`` spends on its ``[minval, maxval)`` mapping. The
resolution (24 bits) and tails (to 5.3σ) match ``jax.random.normal``'s own float32
sampler. Float64 leaves use ``jax.random.normal``. A typed key of another
implementation (``jax.random.key(seed, impl="rbg")``) is honoured where that is faster,
as on some GPUs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import _checks

PyTree = Any


def as_key(key: Any, name: str = "key") -> jax.Array:
    """A typed PRNG key from an integer seed, a typed key or a raw ``uint32[2]`` key."""
    if isinstance(key, int) and not isinstance(key, bool):
        return jax.random.key(key)
    _checks.key(name, key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _sampling_dtype(dtype) -> jnp.dtype:
    """Draw low-precision leaves in float32 and round, so their tails stay Gaussian."""
    return jnp.promote_types(dtype, jnp.float32)


def standard_normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """``N(0, 1)`` as ``√2 · erfinv(2u − 1)``, ``u = (m + ½) / 2²⁴``, ``m`` 24 random bits."""
    if jnp.finfo(dtype).bits > 32:
        return jax.random.normal(key, shape, dtype)
    bits = jax.random.bits(key, shape, jnp.uint32)
    centred = ((bits >> 8).astype(jnp.float32) + 0.5) * (2.0 / 2**24) - 1.0
    return (np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(centred)).astype(dtype)


def gaussian_like(key: jax.Array, params: PyTree, sigma: Any) -> PyTree:
    """``Δ ~ N(0, σ² I)`` shaped like ``params``, one independent key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (sigma * standard_normal(k, leaf.shape, _sampling_dtype(leaf.dtype))).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)
