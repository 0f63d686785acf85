"""Every public estimator refuses, by name, what is not a per-example loss of float params."""

import jax
import jax.numpy as jnp
import pytest

import jaxgen

PARAMS = {"w": jnp.ones(3)}
BATCH = {"x": jnp.ones((4, 3)), "y": jnp.zeros(4)}


def _scalar(params, z):
    return jnp.sum(params["w"] * z["x"]) ** 2


def _vector(params, z):  # a common slip: per-feature terms, not summed
    return params["w"] * z["x"]


def _batched(params, batch):  # another: a loss written for the whole batch
    return jnp.mean(batch["x"] @ params["w"])


KEY = jax.random.key(0)
ESTIMATORS = {
    "gradient_dispersion": lambda f, p: jaxgen.gradient_dispersion(f, p, BATCH),
    "gradient_dispersion vmap": lambda f, p: jaxgen.gradient_dispersion(f, p, BATCH, method="vmap"),
    "per_example_grads": lambda f, p: jaxgen.per_example_grads(f, p, BATCH),
    "hessian_trace": lambda f, p: jaxgen.hessian_trace(f, p, BATCH, key=KEY, num_probes=2),
    "flatness_term": lambda f, p: jaxgen.flatness_term(f, p, BATCH, BATCH, key=KEY, sigma=0.1),
    "gradient_sensitivity": lambda f, p: jaxgen.gradient_sensitivity(
        f, p, BATCH, key=KEY, sigma=0.1
    ),
    "batch_grad_fn": lambda f, p: jaxgen.batch_grad_fn(f, BATCH)(p),
}


@pytest.mark.parametrize("name", ESTIMATORS)
def test_a_vector_loss_is_refused_with_what_it_returned(name):
    with pytest.raises(
        ValueError, match=r"loss_fn must return one float scalar per example.*\(3,\)"
    ):
        ESTIMATORS[name](_vector, PARAMS)


@pytest.mark.parametrize("name", ["gradient_dispersion", "hessian_trace", "batch_grad_fn"])
def test_a_batched_loss_is_refused(name):
    with pytest.raises(ValueError, match="loss_fn must return one float scalar per example"):
        ESTIMATORS[name](lambda p, z: _batched(p, z) * jnp.ones(2), PARAMS)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_an_integer_parameter_leaf_is_named(name):
    params = {"w": jnp.ones(3), "count": jnp.int32(7)}
    with pytest.raises(ValueError, match=r"params leaf \['count'\] has dtype int32"):
        ESTIMATORS[name](_scalar, params)


def test_the_check_is_inside_jit_too_and_scalars_pass():
    stats = jax.jit(lambda p: jaxgen.gradient_dispersion(_scalar, p, BATCH))(PARAMS)
    assert stats.sq_norms.shape == (4,)
    with pytest.raises(ValueError, match="loss_fn must return one float scalar"):
        jax.jit(lambda p: jaxgen.gradient_dispersion(_vector, p, BATCH).dispersion)(PARAMS)


def test_dynamic_clip_refuses_an_alpha_that_would_enlarge_the_step():
    with pytest.raises(ValueError, match=r"alpha must lie in \(0, 1\], got 2.0"):
        jaxgen.dynamic_clip(initial_norm=1.0, alpha=2.0, start_step=0)
    jaxgen.dynamic_clip(initial_norm=1.0, alpha=1.0, start_step=0)  # the boundary is fine
