"""TEMPORARY legacy streams (reproduce the pre-reshape numbers exactly)."""

from __future__ import annotations

import enum

import jax
import numpy as np


class Stream(enum.IntEnum):
    LABEL_NOISE = 1
    GMP = 2
    HESSIAN_TRACE = 3
    FLATNESS = 4
    SENSITIVITY = 5
    SENSITIVITY_BATCH = 6
    ESTIMATE_SUBSETS = 7
    STEP = 8


def key(seed: int, stream: Stream, *indices: int) -> jax.Array:
    if stream == Stream.GMP:
        return jax.random.PRNGKey(seed + 3)
    if stream in (Stream.HESSIAN_TRACE, Stream.FLATNESS):
        return jax.random.split(jax.random.key(seed + 2))[int(stream == Stream.FLATNESS)]
    if stream == Stream.SENSITIVITY:
        (epoch,) = indices
        base = jax.random.key(seed + 1)
        return base if epoch == 0 else jax.random.fold_in(base, epoch)
    if stream == Stream.STEP:
        return jax.random.key(seed + 99)
    raise AssertionError(stream)


def numpy_rng(seed: int, stream: Stream, *indices: int) -> np.random.Generator:
    if stream == Stream.LABEL_NOISE:
        return np.random.default_rng(seed + 1)
    if stream == Stream.SENSITIVITY_BATCH:
        return np.random.default_rng([seed, 7])
    if stream == Stream.ESTIMATE_SUBSETS:
        return np.random.default_rng([seed, 11])
    raise AssertionError(stream)
