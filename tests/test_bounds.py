import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import bounds

R, N = 0.1, 1000


@pytest.fixture(scope="module")
def trajectory():
    rng = np.random.default_rng(0)
    steps = 50
    return {
        "lrs": np.where(np.arange(steps) < 25, 0.1, 0.01),
        "variances": rng.uniform(0.5, 4.0, steps),
        "sigmas": rng.uniform(0.01, 0.05, steps),
        "sensitivities": rng.uniform(0.0, 1.0, steps),
        "trace": 37.5,
    }


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def test_xu_raginsky():
    np.testing.assert_allclose(
        bounds.xu_raginsky(3.0, R=R, n=N), np.sqrt(2 * R**2 / N * 3.0), rtol=1e-6
    )


def test_theorem1_and_neu2021_against_numpy_float64(trajectory):
    t = trajectory
    lrs, sig, var, sens = (_f32(t[k]) for k in ("lrs", "sigmas", "variances", "sensitivities"))
    first = np.sqrt(R**2 / N * np.sum(t["lrs"] ** 2 / t["sigmas"] ** 2 * t["variances"]))
    np.testing.assert_allclose(
        bounds.theorem1(lrs, sig, var, R=R, n=N, flatness=-0.25), first + 0.25, rtol=1e-5
    )
    neu = np.sqrt(
        4
        * R**2
        / N
        * np.sum(t["lrs"] ** 2 / t["sigmas"] ** 2 * (t["sensitivities"] + t["variances"]))
    )
    np.testing.assert_allclose(
        bounds.neu2021(lrs, sig, sens, var, R=R, n=N, flatness=0.25), neu + 0.25, rtol=1e-5
    )
    # Neu et al. can never be below Theorem 1 (factor 2 and the extra Ψ >= 0).
    assert bounds.neu2021(lrs, sig, sens, var, R=R, n=N) >= bounds.theorem1(lrs, sig, var, R=R, n=N)


def test_eq2_and_optimal_sigma_against_numpy_float64(trajectory):
    t = trajectory
    steps = len(t["lrs"])
    total = np.sum(t["lrs"] ** 2 * t["variances"])
    expected = 1.5 * (R**2 * steps / N * total * t["trace"]) ** (1 / 3)
    np.testing.assert_allclose(
        bounds.eq2(_f32(t["lrs"]), _f32(t["variances"]), t["trace"], R=R, n=N), expected, rtol=1e-5
    )
    a = np.sqrt(R**2 / N * total)
    np.testing.assert_allclose(
        bounds.optimal_sigma(_f32(t["lrs"]), _f32(t["variances"]), t["trace"], R=R, n=N),
        (a / (steps * t["trace"])) ** (1 / 3),
        rtol=1e-5,
    )


def test_eq2_is_theorem1_at_the_optimal_sigma_and_its_minimum(trajectory):
    t = trajectory
    lrs, var, trace = _f32(t["lrs"]), _f32(t["variances"]), t["trace"]
    steps = len(t["lrs"])
    star = bounds.optimal_sigma(lrs, var, trace, R=R, n=N)

    def at(sigma):
        flatness = bounds.second_order_flatness(sigma, trace, num_steps=steps)
        return float(bounds.theorem1(lrs, sigma, var, R=R, n=N, flatness=flatness))

    eq2 = float(bounds.eq2(lrs, var, trace, R=R, n=N))
    np.testing.assert_allclose(at(star), eq2, rtol=1e-5)
    grid = np.geomspace(float(star) / 10, float(star) * 10, 201)
    assert min(at(s) for s in grid) >= eq2 * (1 - 1e-6)


def test_time_varying_sigma_is_never_worse(trajectory):
    t = trajectory
    lrs, var, trace = _f32(t["lrs"]), _f32(t["variances"]), t["trace"]
    expected = 1.5 * (R**2 / N * np.sum(t["lrs"] * np.sqrt(t["variances"])) ** 2 * trace) ** (1 / 3)
    varying = bounds.eq2_time_varying(lrs, var, trace, R=R, n=N)
    np.testing.assert_allclose(varying, expected, rtol=1e-5)
    assert varying <= bounds.eq2(lrs, var, trace, R=R, n=N)
    sigmas = bounds.optimal_sigmas_time_varying(lrs, var, trace, R=R, n=N)
    assert sigmas.shape == (len(t["lrs"]),)
    flatness = bounds.second_order_flatness(sigmas, trace)
    np.testing.assert_allclose(
        bounds.theorem1(lrs, sigmas, var, R=R, n=N, flatness=flatness), varying, rtol=1e-5
    )
    # Optimal within the family σ_t² = c λ_t √V_t.
    for factor in (0.5, 0.9, 1.1, 2.0):
        scaled = sigmas * np.sqrt(factor)
        other = bounds.theorem1(
            lrs, scaled, var, R=R, n=N, flatness=bounds.second_order_flatness(scaled, trace)
        )
        assert other > varying


def test_constant_arguments_broadcast(trajectory):
    t = trajectory
    lrs, var = _f32(t["lrs"]), _f32(t["variances"])
    np.testing.assert_allclose(
        bounds.theorem1(lrs, 0.03, var, R=R, n=N),
        bounds.theorem1(lrs, jnp.full(50, 0.03), var, R=R, n=N),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        bounds.eq2(lrs, 2.0, 5.0, R=R, n=N),
        bounds.eq2(lrs, jnp.full(50, 2.0), 5.0, R=R, n=N),
        rtol=1e-6,
    )


def test_estimates_are_accepted_where_numbers_are():
    lrs = jnp.full(10, 0.1)
    estimate = jaxgen.TraceEstimate(jnp.float32(4.0), jnp.float32(0.1), 100)
    assert bounds.eq2(lrs, 1.0, estimate, R=R, n=N) == bounds.eq2(lrs, 1.0, 4.0, R=R, n=N)


STEPS = jnp.full(4, 0.1)
BAD = jnp.array([0.1, -0.5, 0.1, 0.1])  # one impossible entry
ONES = jnp.ones(4)
IMPOSSIBLE = [  # (bound, its arguments with one impossible value, the message)
    (bounds.eq2, (BAD, ONES, 1.0), r"lrs must be finite and >= 0, got -0.5 \(entry 1\)"),
    (bounds.eq2, (STEPS, BAD, 1.0), "variances must be finite and >= 0, got -0.5"),
    (bounds.eq2, (STEPS.at[2].set(jnp.nan), ONES, 1.0), "lrs must be finite and >= 0, got nan"),
    (bounds.eq2, (STEPS.at[0].set(jnp.inf), ONES, 1.0), "lrs must be finite and >= 0, got inf"),
    (bounds.eq2, (STEPS, ONES, -1.0), "hessian_trace must be a finite number > 0"),
    (bounds.eq2, (STEPS, ONES, 0.0), "hessian_trace must be a finite number > 0"),
    (bounds.eq2, (STEPS, ONES, jnp.nan), "hessian_trace must be a finite number > 0"),
    (bounds.optimal_sigma, (STEPS, ONES, -2.0), "hessian_trace must be a finite number > 0"),
    (bounds.eq2_time_varying, (STEPS, BAD, 1.0), "variances must be finite and >= 0"),
    (bounds.optimal_sigmas_time_varying, (STEPS, ONES, 0.0), "hessian_trace must be a finite"),
    (bounds.theorem1, (STEPS, 0.0, ONES), "sigmas must be finite and > 0, got 0.0"),
    (bounds.theorem1, (STEPS, 1.0, BAD), "variances must be finite and >= 0"),
    (bounds.neu2021, (STEPS, 1.0, BAD, ONES), "sensitivities must be finite and >= 0"),
    (bounds.linear_network, (STEPS, BAD), "losses must be finite and >= 0"),
    (bounds.two_layer_relu, (STEPS, BAD, 0.5), "weighted_losses must be finite and >= 0"),
]


@pytest.mark.parametrize(("bound", "args", "message"), IMPOSSIBLE)
def test_impossible_inputs_raise_and_give_nan_under_jit(bound, args, message):
    with pytest.raises(ValueError, match=message):
        bound(*args, R=R, n=N)
    under_jit = jax.jit(lambda *a: bound(*a, R=R, n=N))(*args)
    assert np.all(np.isnan(under_jit))


def test_flatness_must_be_finite():
    with pytest.raises(ValueError, match="flatness must be a finite number, got nan"):
        bounds.theorem1(STEPS, 1.0, ONES, R=R, n=N, flatness=jnp.nan)
    with pytest.raises(ValueError, match="sigmas must be finite and >= 0"):
        bounds.second_order_flatness(-0.1, 1.0, num_steps=3)
    assert np.isnan(jax.jit(lambda v: bounds.xu_raginsky(v, R=R, n=N))(-1.0))


def test_bounds_work_inside_jit(trajectory):
    t = trajectory
    compiled = jax.jit(lambda lrs, var, trace: bounds.eq2(lrs, var, trace, R=R, n=N))
    np.testing.assert_allclose(
        compiled(_f32(t["lrs"]), _f32(t["variances"]), t["trace"]),
        bounds.eq2(_f32(t["lrs"]), _f32(t["variances"]), t["trace"], R=R, n=N),
        rtol=1e-6,
    )


def _linear_loss(w, z):
    return 0.5 * (z["y"] - z["x"] @ w) ** 2


def _relu_loss(w, z, signs):
    hidden = jax.nn.relu(w @ z["x"])
    return 0.5 * (z["y"] - signs @ hidden / jnp.sqrt(signs.shape[0])) ** 2


def _unit_batch(key, size, dim):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (size, dim))
    return {"x": x / jnp.linalg.norm(x, axis=1, keepdims=True), "y": jax.random.normal(ky, (size,))}


def test_linear_network_is_eq2_with_the_models_closed_form_statistics():
    """‖∇ℓ‖² = 2ℓ and Tr H = ‖x‖² = 1, measured on the model, turn Eq. 2 into Theorem 2."""
    batch, w = _unit_batch(jax.random.key(0), 8, 5), jnp.zeros(5)
    lrs, losses, second_moments = [], [], []
    for step in range(20):
        stats = jaxgen.gradient_dispersion(_linear_loss, w, batch)
        per_example = jax.vmap(_linear_loss, in_axes=(None, 0))(w, batch)
        np.testing.assert_allclose(stats.sq_norms, 2 * per_example, rtol=1e-5, atol=1e-7)
        lrs.append(0.5 if step < 10 else 0.1)
        losses.append(float(stats.loss))
        second_moments.append(float(jnp.mean(stats.sq_norms)))  # V_t with b = 1 is at most this
        w = w - lrs[-1] * stats.grad
    trace = jaxgen.hessian_trace(_linear_loss, w, batch, method="exact")
    np.testing.assert_allclose(trace.value, 1.0, rtol=1e-5)
    lrs = jnp.asarray(lrs)
    np.testing.assert_allclose(
        bounds.linear_network(lrs, jnp.asarray(losses), R=R, n=N),
        bounds.eq2(lrs, jnp.asarray(second_moments), trace, R=R, n=N),
        rtol=1e-5,
    )


def test_two_layer_relu_is_eq2_with_the_models_closed_form_statistics():
    """‖∇ℓ‖² = 2ℓ·Σ_r I_r/m and Tr H = Σ_r I_r/m (ReLU'' = 0) turn Eq. 2 into Theorem 3."""
    m, dim = 16, 5
    batch = _unit_batch(jax.random.key(1), 8, dim)
    signs = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.5, (m,)), 1.0, -1.0)
    w = jax.random.normal(jax.random.key(3), (m, dim))
    loss = lambda w, z: _relu_loss(w, z, signs)  # noqa: E731
    lrs, weighted, second_moments = [], [], []
    for _ in range(15):
        stats = jaxgen.gradient_dispersion(loss, w, batch)
        active = jnp.mean(batch["x"] @ w.T >= 0, axis=1)  # Σ_r I_{r,i}/m per example
        per_example = jax.vmap(loss, in_axes=(None, 0))(w, batch)
        np.testing.assert_allclose(stats.sq_norms, 2 * active * per_example, rtol=1e-5, atol=1e-7)
        lrs.append(0.3)
        weighted.append(float(jnp.mean(active * per_example)))
        second_moments.append(float(jnp.mean(stats.sq_norms)))
        w = w - lrs[-1] * stats.grad
    final_active = float(jnp.mean(batch["x"] @ w.T >= 0))
    trace = jaxgen.hessian_trace(loss, w, batch, method="exact")
    np.testing.assert_allclose(trace.value, final_active, rtol=1e-5)
    lrs = jnp.asarray(lrs)
    np.testing.assert_allclose(
        bounds.two_layer_relu(lrs, jnp.asarray(weighted), final_active, R=R, n=N),
        bounds.eq2(lrs, jnp.asarray(second_moments), trace, R=R, n=N),
        rtol=1e-5,
    )
    steps = len(lrs)
    expected = 3 * (
        final_active * np.sum(R**2 * np.asarray(lrs) ** 2 * steps / (4 * N) * np.asarray(weighted))
    ) ** (1 / 3)
    np.testing.assert_allclose(
        bounds.two_layer_relu(lrs, jnp.asarray(weighted), final_active, R=R, n=N),
        expected,
        rtol=1e-5,
    )


LRS = jnp.full(4, 0.1)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: bounds.eq2(LRS, jnp.ones(4), 1.0, R=0.0, n=N),
            "R must be a finite number > 0, got 0.0",
        ),
        (lambda: bounds.eq2(LRS, jnp.ones(4), 1.0, R=-1, n=N), "R must be .* got -1"),
        (lambda: bounds.eq2(LRS, jnp.ones(4), 1.0, R=R, n=0), "n must be .* >= 1, got 0"),
        (
            lambda: bounds.eq2(LRS, jnp.ones(3), 1.0, R=R, n=N),
            r"variances must .*T = len\(lrs\) = 4.*\(3,\)",
        ),
        (lambda: bounds.eq2(jnp.ones((2, 2)), 1.0, 1.0, R=R, n=N), "lrs must be a 1-D array"),
        (lambda: bounds.eq2(jnp.ones(0), 1.0, 1.0, R=R, n=N), "lrs must be a 1-D array"),
        (lambda: bounds.eq2(LRS, 1.0, jnp.ones(2), R=R, n=N), "hessian_trace must be a scalar"),
        (lambda: bounds.theorem1(LRS, jnp.ones(5), 1.0, R=R, n=N), "sigmas must"),
        (
            lambda: bounds.theorem1(LRS, 1.0, 1.0, R=R, n=N, flatness=jnp.ones(2)),
            "flatness must be a scalar",
        ),
        (lambda: bounds.neu2021(LRS, 1.0, jnp.ones(2), 1.0, R=R, n=N), "sensitivities must"),
        (lambda: bounds.linear_network(LRS, jnp.ones(5), R=R, n=N), "losses must"),
        (
            lambda: bounds.two_layer_relu(LRS, 1.0, 1.5, R=R, n=N),
            r"final_active_fraction must lie in \[0, 1\], got 1.5",
        ),
        (
            lambda: bounds.xu_raginsky(-1.0, R=R, n=N),
            "mutual_information must be a finite number >= 0",
        ),
        (
            lambda: bounds.second_order_flatness(0.1, 1.0),
            "num_steps must be an integer >= 1, got None",
        ),
    ],
)
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
