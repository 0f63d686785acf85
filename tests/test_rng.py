"""A run's random streams: named, reproducible, distinct."""

import itertools

import jax
import numpy as np

from jaxgen.experiments import rng
from jaxgen.experiments.rng import Stream


def _data(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def test_streams_are_reproducible_and_distinct():
    keys = {(seed, stream, *i): rng.key(seed, stream, *i)
            for seed in (0, 1) for stream in Stream for i in ((), (0,), (1,))}  # fmt: skip
    assert len({_data(k) for k in keys.values()}) == len(keys)
    assert _data(rng.key(0, Stream.GMP)) == _data(rng.key(0, Stream.GMP))
    expected = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 5), 7)
    assert _data(rng.key(3, Stream.SENSITIVITY, 7)) == _data(expected)


def test_numpy_generators_follow_the_named_keys():
    draws = {
        (seed, stream): rng.numpy_rng(seed, stream).integers(0, 2**31, 4).tolist()
        for seed, stream in itertools.product((0, 1), Stream)
    }
    assert len({tuple(d) for d in draws.values()}) == len(draws)
    again = rng.numpy_rng(1, Stream.LABEL_NOISE).integers(0, 2**31, 4).tolist()
    assert again == draws[(1, Stream.LABEL_NOISE)]


def test_stream_values_never_change():
    """Renumbering a stream would silently change every earlier run's numbers."""
    assert {s.name: s.value for s in Stream} == {
        "LABEL_NOISE": 1,
        "GMP": 2,
        "HESSIAN_TRACE": 3,
        "FLATNESS": 4,
        "SENSITIVITY": 5,
        "SENSITIVITY_BATCH": 6,
        "ESTIMATE_SUBSETS": 7,
        "STEP": 8,
        "INSTRUMENTS": 9,
        "INSTRUMENT_EXAMPLES": 10,
    }
