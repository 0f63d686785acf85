import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxgen._random import as_key, gaussian_like, standard_normal


def test_standard_normal_is_normal():
    z = np.asarray(standard_normal(jax.random.key(0), (1_000_000,)), np.float64)
    assert abs(z.mean()) < 5 / 1000  # 5 standard errors
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / 1e6)
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 5 * np.sqrt(24 / 1e6)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert 4.5 < np.abs(z).max() < 5.4  # tails as far as float32 inverse-CDF sampling goes


def test_gaussian_like_keeps_structure_dtype_and_scale():
    params = {"a": jnp.zeros((300, 200), jnp.bfloat16), "b": jnp.zeros(7)}
    noise = gaussian_like(jax.random.key(1), params, 0.5)
    assert noise["a"].dtype == jnp.bfloat16 and noise["b"].shape == (7,)
    assert abs(float(jnp.std(noise["a"].astype(jnp.float32))) - 0.5) < 0.01
    other = gaussian_like(jax.random.key(2), params, 0.5)
    assert not np.allclose(noise["b"], other["b"])


def test_float64_leaves_use_jax_normal():
    with jax.enable_x64(True):
        z = standard_normal(jax.random.key(0), (5,), jnp.float64)
        np.testing.assert_array_equal(z, jax.random.normal(jax.random.key(0), (5,), jnp.float64))


def test_as_key_accepts_seeds_typed_and_raw_keys():
    typed = as_key(3)
    np.testing.assert_array_equal(
        jax.random.key_data(as_key(jax.random.PRNGKey(3))), jax.random.key_data(typed)
    )
    assert as_key(typed) is typed
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        as_key(jnp.ones(3))
