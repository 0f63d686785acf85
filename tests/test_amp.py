import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen

A = np.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]])
B = np.array([1.0, -2.0, 0.5])


def _quadratic(w, z):
    """L(w) = ½ wᵀ A w − (b + z)·w, with mean(z) = 0: ∇L_B(w) = A w − b."""
    return 0.5 * w @ jnp.asarray(A, jnp.float32) @ w - jnp.dot(jnp.asarray(B, jnp.float32) + z, w)


BATCH = jnp.array([[0.5, 0.0, -0.5], [-0.5, 0.0, 0.5]])
GRAD_FN = jaxgen.batch_grad_fn(_quadratic, BATCH)


def _reference(w, epsilon, inner_lr, inner_steps):
    w = np.asarray(w, np.float64)
    delta = np.zeros_like(w)
    for _ in range(inner_steps):
        delta = delta + inner_lr * (A @ (w + delta) - B)
        norm = np.linalg.norm(delta)
        if norm > epsilon:
            delta *= epsilon / norm
    return A @ (w + delta) - B, np.linalg.norm(delta)


@pytest.mark.parametrize(
    "epsilon, inner_lr, inner_steps", [(0.1, 1.0, 1), (5.0, 0.05, 1), (0.3, 0.5, 3)]
)
def test_quadratic_closed_form(epsilon, inner_lr, inner_steps):
    w = jnp.array([0.2, -0.4, 1.0])
    transform = jaxgen.amp(epsilon=epsilon, inner_lr=inner_lr, inner_steps=inner_steps)
    updates, state = transform.update(GRAD_FN(w), transform.init(w), w, grad_fn=GRAD_FN)
    expected, norm = _reference(w, epsilon, inner_lr, inner_steps)
    np.testing.assert_allclose(updates, expected, rtol=1e-5)
    np.testing.assert_allclose(state.perturbation_norm, norm, rtol=1e-5)
    assert float(state.perturbation_norm) <= epsilon * (1 + 1e-6)


def test_perturbation_stays_in_the_ball_for_large_steps():
    transform = jaxgen.amp(epsilon=0.05, inner_lr=100.0, inner_steps=4)
    for seed in range(5):
        w = jax.random.normal(jax.random.key(seed), (3,)) * 10
        _, state = transform.update(GRAD_FN(w), transform.init(w), w, grad_fn=GRAD_FN)
        assert float(state.perturbation_norm) <= 0.05 * (1 + 1e-6)


def test_zero_radius_returns_the_clean_gradient():
    w = jnp.array([0.2, -0.4, 1.0])
    transform = jaxgen.amp(epsilon=0.0, inner_lr=1.0)
    updates, _ = transform.update(GRAD_FN(w), transform.init(w), w, grad_fn=GRAD_FN)
    np.testing.assert_allclose(updates, GRAD_FN(w), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"epsilon": -0.1}, "epsilon must be a finite number >= 0, got -0.1"),
        ({"inner_lr": float("nan")}, "inner_lr must be a finite number >= 0"),
        ({"inner_steps": 0}, "inner_steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jaxgen.amp(**{"epsilon": 0.1, "inner_lr": 0.2, **kwargs})
