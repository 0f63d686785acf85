import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mlp_loss, mlp_loss_custom_vjp
from jax.flatten_util import ravel_pytree

import jaxgen
from jaxgen._random import gaussian_like


def _quadratic_loss(w, z):
    """ℓ(w, z) = ½ a ‖w − c‖²: Tr H = a·P, ∇ℓ(w+ζ) − ∇ℓ(w) = a·ζ."""
    return 0.5 * z["a"] * jnp.sum((w - z["c"]) ** 2)


def _quadratic_batch(key, size, scale):
    k1, k2 = jax.random.split(key)
    return {
        "a": scale * jax.random.uniform(k1, (size,)),
        "c": 0.1 * jax.random.normal(k2, (size, 5)),
    }


def test_flatness_matches_closed_form_for_a_quadratic():
    """γ(w, s) = σ² P mean_s(a) / 2 exactly, whatever w."""
    train = _quadratic_batch(jax.random.key(0), 16, 3.0)
    heldout = _quadratic_batch(jax.random.key(1), 16, 1.0)
    sigma, params = 0.2, jnp.zeros(5)
    expected = sigma**2 * 5 * (float(train["a"].mean()) - float(heldout["a"].mean())) / 2
    est = jaxgen.flatness_term(
        _quadratic_loss,
        params,
        train,
        heldout,
        key=jax.random.key(2),
        sigma=sigma,
        num_samples=4096,
        chunk_size=512,
    )
    assert est.num_samples == 4096 and float(est.stderr) > 0
    assert abs(float(est.value) - expected) < 4 * float(est.stderr)
    assert float(est.stderr) < 0.1 * abs(expected)


def test_flatness_is_second_order_in_sigma_for_an_mlp(mlp):
    """For small σ the term approaches σ²(Tr H_S − Tr H_S')/2 with exact Hessian traces."""
    params, batch = mlp
    train = jax.tree_util.tree_map(lambda x: x[:5], batch)
    heldout = jax.tree_util.tree_map(lambda x: x[5:], batch)
    trace = lambda b: float(jaxgen.hessian_trace(mlp_loss, params, b, method="exact").value)  # noqa: E731
    sigma = 0.02
    expected = sigma**2 * (trace(train) - trace(heldout)) / 2
    est = jaxgen.flatness_term(
        mlp_loss,
        params,
        train,
        heldout,
        key=jax.random.key(3),
        sigma=sigma,
        num_samples=4000,
        chunk_size=500,
    )
    assert abs(float(est.value) - expected) < 4 * float(est.stderr) + 0.05 * abs(expected)


def test_zero_sigma_gives_zero_flatness(mlp):
    params, batch = mlp
    est = jaxgen.flatness_term(
        mlp_loss, params, batch, batch, key=jax.random.key(0), sigma=0.0, num_samples=3
    )
    assert float(est.value) == 0.0 and float(est.stderr) == 0.0


def test_gradient_sensitivity_matches_closed_form():
    """Ψ = E[a²] σ² P for the quadratic loss."""
    batch = _quadratic_batch(jax.random.key(4), 8, 2.0)
    sigma = 0.3
    expected = float(jnp.mean(batch["a"] ** 2)) * sigma**2 * 5
    est = jaxgen.gradient_sensitivity(
        _quadratic_loss,
        jnp.zeros(5),
        batch,
        key=jax.random.key(5),
        sigma=sigma,
        num_samples=400,
        chunk_size=50,
    )
    assert abs(float(est.value) - expected) < 4 * float(est.stderr)
    assert float(est.stderr) < 0.1 * expected


def test_gradient_sensitivity_against_a_per_example_loop(mlp):
    params, batch = mlp
    key = jax.random.key(6)
    est = jaxgen.gradient_sensitivity(mlp_loss, params, batch, key=key, sigma=0.1, num_samples=2)
    values = []
    for sample_key in jax.random.split(key, 2):
        perturbed = jax.tree_util.tree_map(jnp.add, params, gaussian_like(sample_key, params, 0.1))
        total = 0.0
        for i in range(10):
            z = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
            diff = jax.tree_util.tree_map(
                jnp.subtract, jax.grad(mlp_loss)(params, z), jax.grad(mlp_loss)(perturbed, z)
            )
            total += sum(float(jnp.sum(d**2)) for d in jax.tree_util.tree_leaves(diff))
        values.append(total / 10)
    np.testing.assert_allclose(est.value, np.mean(values), rtol=1e-4)


def test_second_order_sensitivity_is_exact_for_a_diagonal_quadratic():
    """ℓ = ½ Σ_k h_k z_k w_k²: H_z = diag(h ⊙ z), so ‖H_z v‖² = Σ (h z)² for any ±1 v."""
    h = jnp.array([1.0, 2.0, 3.0])
    batch = jnp.array([[1.0, 1.0, 1.0], [2.0, 0.5, -1.0]])
    loss = lambda w, z: 0.5 * jnp.sum(h * z * w**2)  # noqa: E731
    est = jaxgen.gradient_sensitivity(
        loss, jnp.ones(3), batch, key=jax.random.key(0), sigma=0.3, method="second_order"
    )
    per_example = np.sum((np.asarray(h) * np.asarray(batch)) ** 2, axis=1)
    np.testing.assert_allclose(est.value, 0.09 * per_example.mean(), rtol=1e-6)
    np.testing.assert_allclose(est.stderr, 0.09 * per_example.std(ddof=1) / np.sqrt(2), rtol=1e-5)


def test_second_order_sensitivity_against_the_hessian_and_monte_carlo(mlp):
    """E_z ‖H_z‖_F² from jax.hessian; the Monte Carlo Ψ agrees at a small σ."""
    params, batch = mlp
    flat, unravel = ravel_pytree(params)
    frobenius = []
    for i in range(10):
        z = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        hessian = jax.hessian(lambda f, z=z: mlp_loss(unravel(f), z))(flat)
        frobenius.append(float(jnp.sum(hessian**2)))
    exact = np.mean(frobenius)
    est = jaxgen.gradient_sensitivity(
        mlp_loss,
        params,
        batch,
        key=jax.random.key(1),
        sigma=1.0,
        num_samples=400,
        method="second_order",
    )
    assert abs(float(est.value) - exact) < 0.03 * exact
    sigma = 1e-3
    monte_carlo = jaxgen.gradient_sensitivity(
        mlp_loss, params, batch, key=jax.random.key(2), sigma=sigma, num_samples=64
    )
    second = jaxgen.gradient_sensitivity(
        mlp_loss,
        params,
        batch,
        key=jax.random.key(3),
        sigma=sigma,
        num_samples=64,
        method="second_order",
    )
    assert abs(float(monte_carlo.value - second.value)) < 4 * float(
        jnp.hypot(monte_carlo.stderr, 0.03 * second.value)
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sigma": -0.1}, "sigma must be a finite number >= 0, got -0.1"),
        ({"sigma": float("nan")}, "sigma must be a finite number >= 0"),
        ({"num_samples": 0}, "num_samples must be an integer >= 1, got 0"),
        ({"key": None}, "key must be a PRNG key"),
        ({"method": "exact"}, "method must be one of 'monte_carlo', 'second_order'"),
    ],
)
def test_bad_arguments(kwargs, message):
    loss = lambda w, z: jnp.sum(w * z)  # noqa: E731
    arguments = {"key": jax.random.key(0), "sigma": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        jaxgen.gradient_sensitivity(loss, jnp.ones(3), jnp.ones((2, 3)), **arguments)
    if "method" in kwargs:
        return
    with pytest.raises(ValueError, match=message):
        jaxgen.flatness_term(loss, jnp.ones(3), jnp.ones((2, 3)), jnp.ones((2, 3)), **arguments)
    with pytest.raises(ValueError, match="heldout_batch leaves must share"):
        jaxgen.flatness_term(
            loss,
            jnp.ones(3),
            jnp.ones((2, 3)),
            (jnp.ones((2, 3)), jnp.ones(3)),
            key=jax.random.key(0),
            sigma=0.1,
        )


def test_second_order_sensitivity_of_a_custom_vjp_loss(mlp):
    """Forward mode cannot differentiate a custom_vjp; the Hessian-vector products come
    from each example's gradient linearized, equal to the plain function's."""
    params, batch = mlp
    kwargs = {"key": jax.random.key(3), "sigma": 0.5, "num_samples": 4, "method": "second_order"}
    custom = jaxgen.gradient_sensitivity(mlp_loss_custom_vjp, params, batch, **kwargs)
    plain = jaxgen.gradient_sensitivity(mlp_loss, params, batch, **kwargs)
    np.testing.assert_allclose(custom.value, plain.value, rtol=1e-5)
