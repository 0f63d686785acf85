"""Every random stream of a run, derived by name from its one seed.

A stream's key is ``fold_in(key(seed), stream)``, folded further with indices where the
stream has one per epoch or per step; NumPy consumers get a generator seeded from that
key's data. Streams are independent by construction, and adding one changes no other.

Two streams are kept as they were before they had names, so that the training
trajectories of earlier versions reproduce: the model's initialisation
(``nnx.Rngs(seed)``, named by Flax itself) and the data order
(``np.random.default_rng([seed, epoch])``, one permutation per epoch).
"""

from __future__ import annotations

import enum

import jax
import numpy as np


class Stream(enum.IntEnum):
    """The named streams; the values are what ``fold_in`` folds in. Never renumber."""

    LABEL_NOISE = 1  # from the data seed: which training labels are replaced, and by what
    GMP = 2  # GMP's perturbations (the key in its optax state)
    HESSIAN_TRACE = 3  # Hutchinson probes for Tr H at the final weights
    FLATNESS = 4  # perturbations of the Monte Carlo flatness term
    SENSITIVITY = 5  # probes for E‖H_z‖_F², folded with the epoch
    SENSITIVITY_BATCH = 6  # which training examples E‖H_z‖_F² is measured on
    ESTIMATE_SUBSETS = 7  # the n/10 train and test examples of Tr H and the flatness
    STEP = 8  # the methods' per-step randomness (folded with the step)
    INSTRUMENTS = 9  # the instruments' probes, folded with the epoch and the instrument
    INSTRUMENT_EXAMPLES = 10  # which training examples the instruments are measured on


def key(seed: int, stream: Stream, *indices: int) -> jax.Array:
    """``fold_in(... fold_in(fold_in(key(seed), stream), i1) ..., ik)``: a typed key."""
    result = jax.random.fold_in(jax.random.key(seed), int(stream))
    for index in indices:
        result = jax.random.fold_in(result, index)
    return result


def numpy_rng(seed: int, stream: Stream, *indices: int) -> np.random.Generator:
    """A NumPy generator seeded from ``key(seed, stream, *indices)``."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key(seed, stream, *indices))))
