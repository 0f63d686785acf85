"""Gaussian perturbations shaped like a parameter pytree.

Measured on the 2-core CPU (``benchmarks/gmp.py``): drawing the normals leaf by leaf
inside the jitted update with the default threefry generator is the cheapest exact
option here (5.6 M float32 normals in about 19 ms; ``rbg`` and ``unsafe_rbg`` keys took
about 30 ms, and one flat draw split afterwards was slower still). A typed key of
another implementation (``jax.random.key(seed, impl="rbg")``) is honoured where it is
faster, as on GPUs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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


def gaussian_like(key: jax.Array, params: PyTree, sigma: Any) -> PyTree:
    """``Δ ~ N(0, σ² I)`` shaped like ``params``, one independent key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    noise = [
        (sigma * jax.random.normal(k, leaf.shape, _sampling_dtype(leaf.dtype))).astype(leaf.dtype)
        for k, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noise)
