"""``gradient_moments`` (mean, variance, GSNR per coordinate) against float64
``vmap(grad)``, on every program shape the ghost path meets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cnn_init, cnn_loss, mlp_init, mlp_loss, wide_relu_mlp
from test_spectrum import _batch, _stacked

import jaxgen


def _oracle(loss_fn, params, batch):
    with jax.enable_x64(True):
        to64 = lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
        grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(
            jax.tree_util.tree_map(to64, params), jax.tree_util.tree_map(to64, batch)
        )
        grads = [np.asarray(g) for g in jax.tree_util.tree_leaves(grads)]
    return [g.mean(0) for g in grads], [g.var(0) for g in grads]


def _sequence_model():
    """Dense layers on token rows (the exact path) and a bias, mean-pooled."""
    keys = jax.random.split(jax.random.key(8), 3)
    params = {
        "w": jax.random.normal(keys[0], (6, 5)) / 2,
        "b": jnp.zeros(5),
        "out": jnp.ones((5, 3)),
    }

    def loss_fn(params, z):
        h = jnp.tanh(z["x"] @ params["w"] + params["b"]).mean(0)
        return -jax.nn.log_softmax(h @ params["out"])[z["y"]]

    kx, ky = jax.random.split(keys[2])
    batch = {"x": jax.random.normal(kx, (8, 4, 6)), "y": jax.random.randint(ky, (8,), 0, 3)}
    return loss_fn, params, batch


PROGRAMS = {
    "mlp": lambda: (mlp_loss, mlp_init(jax.random.key(2)), _batch()),
    "cnn": lambda: (
        cnn_loss,
        cnn_init(jax.random.key(6)),
        {"x": jax.random.normal(jax.random.key(9), (6, 8)), "y": jnp.arange(6) % 3},
    ),
    "tokens": _sequence_model,
    "scanned checkpointed stack": _stacked,
}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("program", PROGRAMS)
def test_moments_match_per_example_gradients(program, method):
    loss_fn, params, batch = PROGRAMS[program]()
    mean, variance = _oracle(loss_fn, params, batch)
    got = jaxgen.gradient_moments(loss_fn, params, batch, method=method)
    for a, b in zip(jax.tree_util.tree_leaves(got.mean), mean, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got.variance), variance, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
    gsnr = [m**2 / v for m, v in zip(mean, variance, strict=True)]
    for a, b in zip(jax.tree_util.tree_leaves(got.gsnr), gsnr, strict=True):
        np.testing.assert_allclose(a, b, rtol=5e-3, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got.layer_gsnr), gsnr, strict=True):
        np.testing.assert_allclose(a, np.mean(b), rtol=5e-3)
    dispersion = jaxgen.gradient_dispersion(loss_fn, params, batch).dispersion
    total = sum(float(jnp.sum(v)) for v in jax.tree_util.tree_leaves(got.variance))
    np.testing.assert_allclose(total, dispersion, rtol=1e-3)


def test_the_dense_ghost_path_forms_no_per_example_gradient_and_runs_sharded():
    loss_fn, params, batch, per_example_bytes = wide_relu_mlp()
    compiled = jax.jit(lambda p, b: jaxgen.gradient_moments(loss_fn, p, b, method="ghost").variance)
    memory = compiled.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
    assert memory < 0.2 * per_example_bytes
    mesh = jaxgen.make_mesh("data=2")
    batch = {"x": jax.random.normal(jax.random.key(1), (16, 64)), "y": jnp.arange(16) % 10}
    one = jaxgen.gradient_moments(loss_fn, params, batch, method="ghost")
    many = jaxgen.gradient_moments(
        loss_fn, jaxgen.replicate(params, mesh), jaxgen.shard_batch(batch, mesh), method="ghost"
    )
    for a, b in zip(*map(jax.tree_util.tree_leaves, (one.variance, many.variance)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_bad_input():
    params, batch = mlp_init(jax.random.key(2)), _batch()
    with pytest.raises(ValueError, match="method must be one of"):
        jaxgen.gradient_moments(mlp_loss, params, batch, method="fast")
    with pytest.raises(ValueError, match="loss_fn must return one float scalar per example"):
        jaxgen.gradient_moments(lambda p, z: z["x"] * 1.0, params, batch)
