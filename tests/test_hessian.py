import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_loss, mlp_loss_custom_vjp

import jaxgen
from jaxgen import _hessian
from jaxgen._hvp import hvp_fn
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


def test_a_custom_vjp_loss_takes_its_hessian_by_reverse_over_reverse_once(mlp, monkeypatch):
    """Forward mode cannot differentiate a custom_vjp whose forward rule calls the function
    itself: its H v is the VJP of the gradient. The same function without the custom_vjp
    (whose exact trace is checked against float64 jax.hessian above) gives the same
    estimates from the same probes, and Hutch++ prepares one H v for its sketch and its
    quadratic forms."""
    params, batch = mlp
    for kwargs in ({"method": "exact"}, {"key": jax.random.key(0), "num_probes": 9},
                   {"key": jax.random.key(0), "num_probes": 9, "method": "hutch++"}):  # fmt: skip
        custom = jaxgen.hessian_trace(mlp_loss_custom_vjp, params, batch, **kwargs)
        plain = jaxgen.hessian_trace(mlp_loss, params, batch, **kwargs)
        np.testing.assert_allclose(custom.value, plain.value, rtol=1e-5, err_msg=str(kwargs))
    prepared = []

    def counted_hvp_fn(*args, **kwargs):
        prepared.append(kwargs)
        return hvp_fn(*args, **kwargs)

    monkeypatch.setattr(_hessian, "hvp_fn", counted_hvp_fn)
    fresh_loss = lambda p, z: mlp_loss_custom_vjp(p, z)  # noqa: E731  (a new trace)
    jaxgen.hessian_trace(
        fresh_loss, params, batch, key=jax.random.key(0), num_probes=6, method="hutch++"
    )
    assert prepared == [{"custom_vjp": True, "outer": "forward"}]


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


def _quadratic_loss(w, z):
    """ℓ(w, z) = ½ (zᵀw)²: the Hessian of the batch mean is (1/b) Σ z zᵀ."""
    return 0.5 * jnp.dot(z, w) ** 2


def _spiked_batch(size=40, dim=24, spikes=3):
    """Rows with ``spikes`` large directions beside small isotropic noise: a Hessian
    whose trace a few eigenvalues dominate."""
    rng = np.random.default_rng(0)
    directions = np.linalg.qr(rng.normal(size=(dim, spikes)))[0]
    rows = rng.normal(size=(size, spikes)) * 10 @ directions.T + 0.3 * rng.normal(size=(size, dim))
    return jnp.asarray(rows, jnp.float32)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)])
def test_hutch_plus_plus_is_exact_once_its_sketch_spans_the_hessian(dtype, rtol):
    """With ⌊m/3⌋ ≥ P the sketch spans every direction: the deflated trace is the whole
    trace and the residual term vanishes (bf16 parameters: orthonormalised in float32)."""
    batch = _spiked_batch(dim=8).astype(dtype)
    rows = np.asarray(batch, np.float64)
    hessian = rows.T @ rows / batch.shape[0]
    estimate = jaxgen.hessian_trace(
        _quadratic_loss, jnp.zeros(8, dtype), batch, key=jax.random.key(0), num_probes=26,
        method="hutch++", chunk_size=4,
    )  # fmt: skip
    assert estimate.num_probes == 26 and estimate.value.dtype == dtype
    np.testing.assert_allclose(float(estimate.value), np.trace(hessian), rtol=rtol)
    assert abs(float(estimate.stderr)) < rtol * np.trace(hessian)


def test_hutch_plus_plus_is_unbiased_and_beats_hutchinson_on_a_few_dominant_eigenvalues():
    batch = _spiked_batch()
    exact = float(jaxgen.hessian_trace(_quadratic_loss, jnp.zeros(24), batch, method="exact").value)
    values, stderrs = {"hutchinson": [], "hutch++": []}, {"hutchinson": [], "hutch++": []}
    for seed in range(12):
        for method in values:
            estimate = jaxgen.hessian_trace(
                _quadratic_loss, jnp.zeros(24), batch, key=jax.random.key(seed), num_probes=12,
                method=method,
            )  # fmt: skip
            values[method].append(float(estimate.value))
            stderrs[method].append(float(estimate.stderr))
    for method in values:
        spread = np.std(values[method], ddof=1)
        assert abs(np.mean(values[method]) - exact) < 4 * spread / np.sqrt(12), method
        # E[est | Q] = Tr H for every sketch Q, so the mean reported variance is the
        # variance over seeds (loosely: 12 seeds).
        assert 1 / 3 < np.mean(np.square(stderrs[method])) / spread**2 < 3, method
    errors = {m: np.sqrt(np.mean((np.asarray(v) - exact) ** 2)) for m, v in values.items()}
    # 3 spikes carry ~97% of the trace and the sketch has 4 vectors: what is left of
    # Hutch++'s error is the noise floor's.
    assert errors["hutch++"] < 0.1 * errors["hutchinson"]


def test_hutch_plus_plus_matches_its_formula_on_the_mlp(mlp):
    """Tr(QᵀHQ) + mean over residual probes of (I − QQᵀ)g through H, from jax.hessian,
    with the same keys; forward-over-forward quadratic forms and linearized products."""
    params, batch = mlp
    key = jax.random.key(3)
    estimate = jaxgen.hessian_trace(
        mlp_loss, params, batch, key=key, num_probes=8, method="hutch++", chunk_size=3
    )
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def mean_loss(w):
        return jnp.mean(jax.vmap(mlp_loss, in_axes=(None, 0))(unravel(w), batch))

    hessian = np.asarray(jax.hessian(mean_loss)(flat), np.float64)
    keys = jax.random.split(key, 8 - 2)
    probes = [
        np.asarray(jax.flatten_util.ravel_pytree(rademacher_like(k, params))[0], np.float64)
        for k in keys
    ]
    basis = np.linalg.qr(hessian @ np.stack(probes[:2], axis=1))[0]
    residuals = [g - basis @ (basis.T @ g) for g in probes[2:]]
    samples = [r @ hessian @ r for r in residuals]
    expected = np.trace(basis.T @ hessian @ basis) + np.mean(samples)
    np.testing.assert_allclose(estimate.value, expected, rtol=1e-4)
    np.testing.assert_allclose(estimate.stderr, np.std(samples, ddof=1) / 2, rtol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "lanczos", "key": jax.random.key(0)}, "method must be one of"),
        ({"num_probes": 0, "key": jax.random.key(0)}, "num_probes must be an integer >= 1, got 0"),
        ({"chunk_size": 0, "key": jax.random.key(0)}, "chunk_size must be an integer >= 1, got 0"),
        ({}, "key must be a PRNG key for method='hutchinson', got None"),
        ({"method": "hutch++"}, "key must be a PRNG key for method='hutch\\+\\+', got None"),
        (
            {"method": "hutch++", "num_probes": 2, "key": jax.random.key(0)},
            "num_probes must be an integer >= 3 for method='hutch\\+\\+'",
        ),
        ({"key": 3}, "key must be a PRNG key"),
    ],
)
def test_bad_arguments(kwargs, message):
    loss = lambda w, z: jnp.sum(w**2 * z)  # noqa: E731
    with pytest.raises(ValueError, match=message):
        jaxgen.hessian_trace(loss, jnp.ones(3), jnp.ones((2, 3)), **kwargs)
