import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from scipy import stats

from jaxgen._random import as_key, gaussian_like, rademacher_like


def test_gaussian_like_is_normal_with_the_requested_scale():
    params = {"a": jnp.zeros((1000, 500)), "b": jnp.zeros(7)}
    noise = gaussian_like(jax.random.key(0), params, 0.5)
    z = np.asarray(noise["a"], np.float64).ravel() / 0.5
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    other = gaussian_like(jax.random.key(1), params, 0.5)
    assert not np.allclose(noise["b"], other["b"])


def test_gaussian_like_neighbours_from_one_block_are_independent():
    """Two neighbours along the last axis share a threefry block (one word each): they,
    and the same column of neighbouring rows (counters differing in the row), must be
    uncorrelated, also in their squares."""
    z = np.asarray(gaussian_like(jax.random.key(4), {"a": jnp.zeros((400, 2, 301))}, 1.0)["a"])
    z = z.astype(np.float64)
    for first, second in [
        (z[..., 0:-1:2], z[..., 1::2]),  # the two words of one block
        (z[..., 1:-1:2], z[..., 2::2]),  # last word of one block, first of the next
        (z[:, 0], z[:, 1]),  # same pair index, neighbouring rows
        (z[:-1], z[1:]),
    ]:
        n = first.size
        assert abs(np.mean(first * second)) < 5 / np.sqrt(n)
        assert abs(np.corrcoef(first.ravel() ** 2, second.ravel() ** 2)[0, 1]) < 5 / np.sqrt(n)
    assert stats.kstest(z[..., -1].ravel(), "norm").pvalue > 1e-3  # the odd column's word


def test_gaussian_like_does_not_depend_on_the_sharding():
    params = {"a": jnp.zeros((8, 12)), "b": jnp.zeros(6)}
    mesh = jax.make_mesh((4,), ("x",), devices=jax.devices()[:4])
    draw = lambda key: gaussian_like(key, params, 0.3)  # noqa: E731
    plain = jax.jit(draw)(jax.random.key(2))
    for spec in (PartitionSpec("x"), PartitionSpec(None, "x")):
        shardings = {"a": NamedSharding(mesh, spec), "b": NamedSharding(mesh, PartitionSpec())}
        sharded = jax.jit(draw, out_shardings=shardings)(jax.random.key(2))
        assert sharded["a"].sharding.spec == spec
        np.testing.assert_array_equal(sharded["a"], plain["a"])


def test_other_key_implementations_draw_with_jax_random_normal():
    params = {"a": jnp.zeros((3, 4))}
    key = jax.random.key(5, impl="rbg")
    (leaf_key,) = jax.random.split(key, 1)
    np.testing.assert_allclose(
        gaussian_like(key, params, 0.5)["a"], 0.5 * jax.random.normal(leaf_key, (3, 4))
    )


def test_rademacher_like_has_independent_fair_signs():
    """E[v vᵀ] = I: fair ±1 entries, uncorrelated, also between neighbouring bits of one
    generator word (entries j and j+1 share a word unless j+1 is a multiple of 32)."""
    params = {"a": jnp.zeros((400, 250)), "b": jnp.zeros((3, 5), jnp.bfloat16)}
    probe = rademacher_like(jax.random.key(0), params)
    v = np.asarray(probe["a"], np.float64).ravel()
    assert set(np.unique(v)) == {-1.0, 1.0} and probe["b"].dtype == jnp.bfloat16
    n = v.size
    assert abs(v.mean()) < 5 / np.sqrt(n)
    for lag in (1, 2, 31, 32, 33):
        assert abs(np.mean(v[:-lag] * v[lag:])) < 5 / np.sqrt(n), lag
    words = v[: n // 32 * 32].reshape(-1, 32)  # every bit position of the word is fair
    assert np.all(np.abs(words.mean(axis=0)) < 5 / np.sqrt(words.shape[0]))
    other = rademacher_like(jax.random.key(1), params)
    assert np.mean(v == np.asarray(other["a"]).ravel()) == pytest.approx(0.5, abs=0.01)


def test_low_precision_leaves_keep_their_dtype_and_scale():
    noise = gaussian_like(jax.random.key(1), {"a": jnp.zeros((300, 200), jnp.bfloat16)}, 0.5)
    assert noise["a"].dtype == jnp.bfloat16
    assert abs(float(jnp.std(noise["a"].astype(jnp.float32))) - 0.5) < 0.01


def test_as_key_accepts_seeds_typed_and_raw_keys():
    typed = as_key(3)
    np.testing.assert_array_equal(
        jax.random.key_data(as_key(jax.random.PRNGKey(3))), jax.random.key_data(typed)
    )
    assert as_key(typed) is typed
    with pytest.raises(ValueError, match="key must be a PRNG key"):
        as_key(jnp.ones(3))


def test_small_leaves_share_one_threefry_call_and_keep_their_own_values():
    from jaxgen._random import OWN_CALL_ELEMENTS, _standard_normals

    params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(7), "big": jnp.zeros((OWN_CALL_ELEMENTS,)),
              "c": jnp.zeros(())}  # fmt: skip
    key = jax.random.key(2)
    jaxpr = str(jax.make_jaxpr(lambda k: gaussian_like(k, params, 1.0))(key))
    assert jaxpr.count("= threefry2x32 ") == 2  # the big leaf's, and the small ones' together
    together = gaussian_like(key, params, 1.0)
    keys = jax.random.split(key, len(params))  # one key per leaf, in tree order
    for leaf_key, name in zip(keys, sorted(params), strict=True):
        (alone,) = _standard_normals(leaf_key[None], [params[name].shape])
        np.testing.assert_allclose(together[name], alone, rtol=2e-7, atol=0)
