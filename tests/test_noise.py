"""``jaxgen.noise``: each summary against its formula on hand-made per-example gradients
(``ℓ(w, z) = z·w`` has ``g_i = z_i``, so the statistics are the rows' own)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import noise

ROWS = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0], [2.0, 1.0, 1.0], [2.0, 3.0, 2.0]])


def _linear(w, z):
    return z @ w


@pytest.fixture(scope="module")
def stats():
    return jaxgen.gradient_dispersion(_linear, jnp.zeros(3), jnp.asarray(ROWS, jnp.float32))


def test_noise_scale_norm_test_and_covariance_trace(stats):
    b, mean = len(ROWS), ROWS.mean(0)
    trace = np.sum((ROWS - mean) ** 2) / (b - 1)
    np.testing.assert_allclose(noise.covariance_trace(stats), trace, rtol=1e-6)
    signal = mean @ mean - trace / b
    np.testing.assert_allclose(noise.noise_scale(stats), trace / signal, rtol=1e-5)
    np.testing.assert_allclose(
        noise.norm_test(stats), np.sqrt(trace / (b * mean @ mean)), rtol=1e-6
    )
    noisy = jaxgen.gradient_dispersion(_linear, jnp.zeros(1), jnp.array([[1.0], [-1.0]]))
    assert float(noise.noise_scale(noisy)) == np.inf  # ‖G‖² estimated ≤ 0


def test_the_inner_product_test_from_projections(stats):
    b, mean = len(ROWS), ROWS.mean(0)
    projections = noise.gradient_projections(
        _linear, jnp.zeros(3), jnp.asarray(ROWS, jnp.float32), stats.grad
    )
    np.testing.assert_allclose(projections, ROWS @ mean, rtol=1e-6)
    variance = np.sum((ROWS @ mean - mean @ mean) ** 2) / (b - 1)
    want = np.sqrt(variance / (b * (mean @ mean) ** 2))
    np.testing.assert_allclose(noise.inner_product_test(projections, stats.grad), want, rtol=1e-5)


def test_two_batch_noise_scale_is_unbiased():
    rng = np.random.default_rng(0)
    grads = rng.normal(0.3, 1.0, size=(200_000, 4))  # ‖G‖² = 4·0.09, tr Σ = 4
    small, big = 8, 64
    g_small = grads[: len(grads) // small * small].reshape(-1, small, 4).mean(1)
    g_big = grads[: len(grads) // big * big].reshape(-1, big, 4).mean(1)
    scale, trace, signal = noise.noise_scale_from_two_batches(
        np.mean(np.sum(g_small**2, 1)), small, np.mean(np.sum(g_big**2, 1)), big
    )
    np.testing.assert_allclose([trace, signal], [4.0, 0.36], rtol=0.05)
    np.testing.assert_allclose(scale, 4.0 / 0.36, rtol=0.1)
    with pytest.raises(ValueError, match="small_size must be below big_size"):
        noise.noise_scale_from_two_batches(1.0, 8, 1.0, 8)


def test_tic_diag_is_second_moment_over_curvature():
    second = {"a": jnp.array([1.0, 4.0]), "b": jnp.array([2.0])}
    curvature = {"a": jnp.array([2.0, 1.0]), "b": jnp.array([4.0])}
    np.testing.assert_allclose(noise.tic_diag(second, curvature, epsilon=0.0), 0.5 + 4.0 + 0.5)
    moments = jaxgen.gradient_moments(_linear, jnp.zeros(3), jnp.asarray(ROWS, jnp.float32))
    np.testing.assert_allclose(moments.second_moment, np.mean(ROWS**2, 0), rtol=1e-6)
