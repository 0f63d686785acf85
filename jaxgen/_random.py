"""Gaussian perturbations shaped like a parameter pytree.

GMP draws ``k·P`` Gaussian numbers per update, and on a CPU that costs more than the
gradients (``benchmarks/gmp.py``). Measured on the 2-core CPU for the 5.6 M normals of
k = 3 on an MLP 784-1024-1024-10, drawn leaf by leaf inside ``jit`` (medians of 9):

    jax.random.normal, threefry keys                         21 ms
    jax.random.normal, rbg / unsafe_rbg keys                 30 ms
    one flat threefry draw of all 5.6 M numbers, split       35 ms (bits alone)
    raw threefry bits alone, per leaf                        10 ms
    24 raw bits -> uniform -> √2·erfinv(2u − 1) by hand      21 ms

So the threefry bits are half the cost and the inverse-CDF transform the other half;
forming the uniform by hand saves nothing over ``jax.random.normal``, and bfloat16
draws lose the tails. jaxgen therefore draws with ``jax.random.normal`` per leaf, inside
the jitted update (float32 for low-precision leaves, then rounded). A typed key of
another implementation (``jax.random.key(seed, impl="rbg")``) is honoured where it is
faster, as on some GPUs.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxgen import _checks
from jaxgen._types import PyTree


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


def gaussian_like(key: jax.Array, params: PyTree, sigma: Any) -> PyTree:
    """``Δ ~ N(0, σ² I)`` shaped like ``params``, one independent key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (sigma * jax.random.normal(k, leaf.shape, _sampling_dtype(leaf.dtype))).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)


def _rademacher(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """±1 entries, one random bit each: 32 signs from every 32-bit word of the generator
    (every bit of threefry's output is an independent fair coin), 4× faster on a CPU than
    ``jax.random.rademacher``, which spends a word per sign."""
    size = math.prod(shape)
    words = jax.random.bits(key, (-(-size // 32),), jnp.uint32)
    bits = (words[:, None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    signs = 1 - 2 * bits.reshape(-1)[:size].astype(jnp.int8)
    return signs.astype(dtype).reshape(shape)


def rademacher_like(key: jax.Array, params: PyTree) -> PyTree:
    """Independent ±1 entries shaped like ``params`` (``E[v vᵀ] = I``), one key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    probes = [_rademacher(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, probes)
