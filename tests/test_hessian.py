import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_loss

import jaxgen
from jaxgen._random import rademacher_like


def _to64(tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def test_exact_equals_float64_jax_hessian(mlp):
    params, batch = mlp
    with jax.enable_x64(True):
        params64, batch64 = _to64(params), _to64(batch)
        flat, unravel = jax.flatten_util.ravel_pytree(params64)

        def mean_loss(w):
            return jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0))(unravel(w), batch64))

        reference = float(jnp.trace(jax.hessian(mean_loss)(flat)))
        exact64 = jaxgen.hessian_trace(mlp_loss, params64, batch64, method="exact")
        assert exact64.value.dtype == jnp.float64
        np.testing.assert_allclose(exact64.value, reference, rtol=1e-12)
    exact32 = jaxgen.hessian_trace(mlp_loss, params, batch, method="exact", chunk_size=7)
    np.testing.assert_allclose(exact32.value, reference, rtol=1e-5)
    assert exact32.num_probes == flat.size and float(exact32.stderr) == 0.0


def test_exact_matches_softmax_regression_closed_form():
    """Softmax regression: Tr H = mean_i (‖x_i‖² + 1) Σ_c p_ic (1 − p_ic)."""
    rng = np.random.default_rng(0)
    x, labels = rng.normal(size=(12, 4)), rng.integers(0, 3, size=12)
    w, b = rng.normal(size=(4, 3)), rng.normal(size=3)
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    closed_form = np.mean((np.sum(x**2, 1) + 1) * np.sum(p * (1 - p), 1))

    def loss(params, z):
        return -jax.nn.log_softmax(z["x"] @ params["w"] + params["b"])[z["y"]]

    params = {"w": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(labels)}
    exact = jaxgen.hessian_trace(loss, params, batch, method="exact")
    np.testing.assert_allclose(exact.value, closed_form, rtol=1e-5)


def test_hutchinson_is_within_a_few_standard_errors_of_exact(mlp):
    params, batch = mlp
    exact = float(jaxgen.hessian_trace(mlp_loss, params, batch, method="exact").value)
    estimate = jaxgen.hessian_trace(mlp_loss, params, batch, key=jax.random.key(0), num_probes=400)
    assert estimate.num_probes == 400
    assert 0 < float(estimate.stderr) < 0.2 * abs(exact)
    assert abs(float(estimate.value) - exact) < 4 * float(estimate.stderr)


def test_hutchinson_standard_error_is_the_sample_error(mlp):
    """stderr = std(vᵀHv, ddof=1)/√m, checked against probes evaluated one by one."""
    params, batch = mlp
    key = jax.random.key(5)
    estimate = jaxgen.hessian_trace(mlp_loss, params, batch, key=key, num_probes=6, chunk_size=4)
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def mean_loss(w):
        return jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0))(unravel(w), batch))

    hessian = np.asarray(jax.hessian(mean_loss)(flat), np.float64)
    samples = []
    for probe_key in jax.random.split(key, 6):
        probe = rademacher_like(probe_key, params)
        v = np.asarray(jax.flatten_util.ravel_pytree(probe)[0], np.float64)
        samples.append(v @ hessian @ v)
    np.testing.assert_allclose(estimate.value, np.mean(samples), rtol=1e-4)
    np.testing.assert_allclose(estimate.stderr, np.std(samples, ddof=1) / np.sqrt(6), rtol=1e-3)


def test_chunk_size_does_not_change_the_estimate(mlp):
    params, batch = mlp
    key = jax.random.key(1)
    a = jaxgen.hessian_trace(mlp_loss, params, batch, key=key, num_probes=12, chunk_size=12)
    b = jaxgen.hessian_trace(mlp_loss, params, batch, key=key, num_probes=12, chunk_size=5)
    np.testing.assert_allclose(a.value, b.value, rtol=1e-5)
    single = jaxgen.hessian_trace(mlp_loss, params, batch, key=key, num_probes=1)
    assert np.isnan(float(single.stderr))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lanczos", "key": jax.random.key(0)}, "method must be one of"),
        ({"num_probes": 0, "key": jax.random.key(0)}, "num_probes must be an integer >= 1, got 0"),
        ({"chunk_size": 0, "key": jax.random.key(0)}, "chunk_size must be an integer >= 1, got 0"),
        ({}, "key must be a PRNG key for method='hutchinson', got None"),
        ({"key": 3}, "key must be a PRNG key"),
    ],
)
def test_bad_arguments(kwargs, message):
    loss = lambda w, z: jnp.sum(w**2 * z)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        jaxgen.hessian_trace(loss, jnp.ones(3), jnp.ones((2, 3)), **kwargs)
