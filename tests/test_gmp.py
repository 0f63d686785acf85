import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import jaxgen


def _quartic(w, z):
    """L(w) = ¼ Σ w⁴ + z·w: ∇L = w³ + z, E_Δ[∇L(w + Δ)] = w³ + 3σ² w + z."""
    return 0.25 * jnp.sum(w**4) + jnp.dot(z, w)


W = jnp.array([0.5, -1.0, 2.0])
BATCH = jnp.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
GRAD_FN = jaxgen.batch_grad_fn(_quartic, BATCH)


def _update(transform, state, params=W):
    return transform.update(GRAD_FN(params), state, params, grad_fn=GRAD_FN)


@pytest.mark.parametrize("kwargs", [{"sigma": 0.0}, {"rho": 0.0}])
def test_no_noise_or_no_weight_returns_the_clean_gradient(kwargs):
    transform = jaxgen.gmp(num_samples=3, **{"sigma": 0.1, "rho": 0.5, **kwargs})
    updates, _ = _update(transform, transform.init(W))
    np.testing.assert_allclose(updates, GRAD_FN(W), rtol=1e-6)


def test_average_update_matches_the_expected_perturbed_gradient():
    sigma, rho, k, updates_count = 0.2, 0.7, 3, 4000
    transform = jaxgen.gmp(num_samples=k, sigma=sigma, rho=rho, key=7)

    def body(state, _):
        updates, state = _update(transform, state)
        return state, updates

    _, samples = jax.lax.scan(body, transform.init(W), None, length=updates_count)
    samples = np.asarray(samples, np.float64)
    clean = np.asarray(W) ** 3 + np.asarray(BATCH).mean(0)
    expected = clean + rho * 3 * sigma**2 * np.asarray(W)
    stderr = samples.std(0, ddof=1) / np.sqrt(updates_count)
    assert np.all(np.abs(samples.mean(0) - expected) < 4 * stderr)
    assert np.all(np.abs(samples.mean(0) - clean) > 4 * stderr)  # the test can tell them apart


def test_successive_updates_draw_fresh_perturbations():
    transform = jaxgen.gmp(num_samples=2, sigma=0.1, key=3)
    state = transform.init(W)
    first, state = _update(transform, state)
    second, state = _update(transform, state)
    assert not np.allclose(first, second)
    assert int(state.count) == 2
    again, _ = _update(transform, transform.init(W))
    np.testing.assert_array_equal(again, first)  # same key, same draws


def test_vmap_and_sequential_modes_agree_for_the_same_key():
    outputs = []
    for mode in ("vmap", "sequential", "auto"):
        transform = jaxgen.gmp(num_samples=5, sigma=0.3, key=jax.random.key(11), mode=mode)
        outputs.append(_update(transform, transform.init(W))[0])
    chex.assert_trees_all_close(outputs[0], outputs[1], rtol=1e-5)
    assert jax.default_backend() != "cpu" or np.array_equal(outputs[2], outputs[1])  # auto


def test_perturbations_spread_over_a_mesh_axis_give_the_same_update():
    mesh = jax.make_mesh(
        (4,), ("perturb",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,)
    )
    sharded = jaxgen.gmp(
        num_samples=4,
        sigma=0.3,
        key=5,
        perturbation_sharding=NamedSharding(mesh, PartitionSpec("perturb")),
    )
    plain = jaxgen.gmp(num_samples=4, sigma=0.3, key=5)
    run = lambda t: jax.jit(lambda s: _update(t, s)[0])(t.init(W))  # noqa: E731
    np.testing.assert_allclose(run(sharded), run(plain), rtol=1e-5)


def test_raw_and_typed_keys_are_accepted():
    raw = jaxgen.gmp(key=jax.random.PRNGKey(2))
    typed = jaxgen.gmp(key=jax.random.key(2))
    np.testing.assert_array_equal(_update(raw, raw.init(W))[0], _update(typed, typed.init(W))[0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"sigma": -0.1}, "sigma must be a finite number >= 0, got -0.1"),
        ({"rho": 1.5}, r"rho must lie in \[0, 1\], got 1.5"),
        ({"mode": "pmap"}, "mode must be one of 'auto', 'vmap', 'sequential', got 'pmap'"),
        ({"key": "seed"}, "key must be a PRNG key"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxgen.gmp(**kwargs)


def _sequential_temp_bytes(loss_fn, params, batch, num_samples):
    transform = jaxgen.gmp(num_samples=num_samples, sigma=0.1, mode="sequential")
    grad_fn = jaxgen.batch_grad_fn(loss_fn, batch)
    update = jax.jit(lambda p, s: transform.update(grad_fn(p), s, p, grad_fn=grad_fn)[0])
    compiled = update.lower(params, transform.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_sequential_mode_holds_one_perturbed_gradient_whatever_k():
    params = {"w": jnp.ones((64, 64)) / 8, "v": jnp.ones((64, 64)) / 8}
    batch = jnp.ones((4, 64))
    loss_fn = lambda p, x: jnp.sum(jnp.tanh(jnp.tanh(x @ p["w"]) @ p["v"]))  # noqa: E731
    size = 2 * 64 * 64 * 4
    few, many = (_sequential_temp_bytes(loss_fn, params, batch, k) for k in (2, 8))
    assert many - few < size  # straight-line code would keep 6 more perturbed gradients
