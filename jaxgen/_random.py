"""Gaussian perturbations shaped like a parameter pytree.

GMP draws ``k·P`` Gaussian numbers per update, and on a CPU that costs as much as the
gradients (``benchmarks/gmp.py``). ``jax.random.normal`` with threefry keys (JAX's
default, ``jax_threefry_partitionable``) hashes one threefry-2x32 block per number and
keeps one word of its two (their XOR). jaxgen keeps both: each block, keyed by the leaf's
key and a counter pair (flat index over the leading axes, index of a pair of neighbours
along the last axis), gives two neighbouring numbers, as Random123 intends its 2×32-bit
output. The counters are iotas, so a draw partitions over any axis like JAX's own, and
its values do not depend on the sharding. Each word becomes a uniform on
``[nextafter(−1, 0), 1)`` and then ``√2·erfinv(u)``, as in ``jax.random.normal``.

``python benchmarks/gmp.py`` times one draw of the P = 1.86 M normals of an MLP
784-1024-1024-10 both ways, leaf by leaf inside ``jit``: 5.3 ms here against 6.9 ms for
``jax.random.normal`` on the 2-core CPU (``benchmarks/README.md``). Box–Muller on both
words was slower than the inverse CDF when tried, rbg / unsafe_rbg keys slower than
threefry, and a uniform formed by hand saves nothing over ``jax.random.uniform``.
Leaves are drawn in float32 (low-precision leaves are then rounded, so their tails stay
Gaussian); float64 leaves and keys of other implementations (``jax.random.key(seed,
impl="rbg")``, faster on some GPUs) are drawn by ``jax.random.normal``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.random import threefry2x32_p

from jaxgen import _checks
from jaxgen._types import PyTree


def as_key(key: Any, name: str = "key") -> jax.Array:
    """A typed PRNG key from an integer seed, a typed key or a raw ``uint32[2]`` key."""
    if isinstance(key, int) and not isinstance(key, bool):
        return jax.random.key(key)
    if (  # an integer seed as a 0-d array (optax.inject_hyperparams makes numbers arrays)
        isinstance(key, jax.Array | np.ndarray)
        and key.ndim == 0
        and jnp.issubdtype(key.dtype, jnp.integer)
    ):
        return jax.random.key(key)
    _checks.key(name, key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    return jax.random.wrap_key_data(jnp.asarray(key, jnp.uint32))


def _sampling_dtype(dtype) -> jnp.dtype:
    """Draw low-precision leaves in float32 and round, so their tails stay Gaussian."""
    return jnp.promote_types(dtype, jnp.float32)


def _pair_counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Threefry counters of each pair of neighbours along the last axis of ``shape``: the
    flat index over the leading axes, and the pair's index along the last axis."""
    pairs = (*shape[:-1], -(-shape[-1] // 2))
    row = jnp.zeros(pairs, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape) - 1)):
        row = row + lax.broadcasted_iota(jnp.uint32, pairs, axis) * np.uint32(stride)
        stride *= shape[axis]
    return row, lax.broadcasted_iota(jnp.uint32, pairs, len(pairs) - 1)


_LOWEST = np.nextafter(np.float32(-1.0), np.float32(0.0))


# Leaves of at least this many numbers get a threefry call of their own
# (``_standard_normal``); smaller ones share one (``_standard_normals``).
OWN_CALL_ELEMENTS = 2**16


def _draws_by_threefry(key: jax.Array, shape: tuple[int, ...], dtype) -> bool:
    threefry = str(jax.random.key_impl(key)) == "threefry2x32"
    return dtype == jnp.float32 and threefry and math.prod(shape[:-1]) < 2**32


def _standard_normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """N(0, 1) draws of ``shape``: two per threefry block (see the module docstring)."""
    if not _draws_by_threefry(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)
    full = shape or (1,)
    first, second = threefry2x32_p.bind(*jax.random.key_data(key), *_pair_counters(full))
    return _normal_from_words(_in_shape(jnp.stack([first, second], axis=-1), shape))


def _in_shape(pairs: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Numbers made two by two in the order of ``_pair_counters(shape)`` as ``shape`` (the
    last pair of an odd last axis gives one)."""
    full = shape or (1,)
    return pairs.reshape(*full[:-1], -1)[..., : full[-1]].reshape(shape)


def _normal_from_words(words: jax.Array) -> jax.Array:
    """Each 32-bit word as a uniform on ``[nextafter(−1, 0), 1)``, then ``√2·erfinv(u)``."""
    one_to_two = lax.bitcast_convert_type((words >> 9) | np.uint32(0x3F800000), jnp.float32)
    uniform = jnp.maximum(_LOWEST, (one_to_two - 1.0) * (1.0 - _LOWEST) + _LOWEST)
    return np.float32(np.sqrt(2.0)) * lax.erf_inv(uniform)


def _standard_normals(keys: jax.Array, shapes: list[tuple[int, ...]]) -> list[jax.Array]:
    """N(0, 1) draws of each of ``shapes`` (float32, threefry keys), two per threefry
    block (see the module docstring), all hashed by one threefry call: XLA:CPU compiles
    each call into a loop of its own, so a model of many small leaves compiled its draws
    far longer than its gradient. The values are those of one call per leaf."""
    words, rows, pairs = [], [], []
    for key, shape in zip(keys, shapes, strict=True):
        row, pair = _pair_counters(shape or (1,))
        rows.append(row.reshape(-1))
        pairs.append(pair.reshape(-1))
        words.append(jnp.broadcast_to(jax.random.key_data(key)[:, None], (2, row.size)))
    key_words = jnp.concatenate(words, axis=1)
    first, second = threefry2x32_p.bind(*key_words, jnp.concatenate(rows), jnp.concatenate(pairs))
    normals = _normal_from_words(jnp.stack([first, second], axis=-1))
    draws, start = [], 0
    for shape, row in zip(shapes, rows, strict=True):
        draws.append(_in_shape(normals[start : start + row.size], shape))
        start += row.size
    return draws


def gaussian_like(key: jax.Array, params: PyTree, sigma: Any) -> PyTree:
    """``Δ ~ N(0, σ² I)`` shaped like ``params``, one independent key per leaf."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    dtypes = [_sampling_dtype(leaf.dtype) for leaf in leaves]
    small = [
        i
        for i, (leaf, dtype) in enumerate(zip(leaves, dtypes, strict=True))
        if leaf.size < OWN_CALL_ELEMENTS and _draws_by_threefry(keys[i], leaf.shape, dtype)
    ]
    draws = {}
    if small:
        shapes = [leaves[i].shape for i in small]
        draws = dict(zip(small, _standard_normals(keys[np.asarray(small)], shapes), strict=True))
    noise = [
        draws[i] if i in draws else _standard_normal(keys[i], leaf.shape, dtype)
        for i, (leaf, dtype) in enumerate(zip(leaves, dtypes, strict=True))
    ]
    noise = [(sigma * n).astype(leaf.dtype) for n, leaf in zip(noise, leaves, strict=True)]
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
