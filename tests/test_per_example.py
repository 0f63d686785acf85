import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cnn_loss, mlp_loss

import jaxgen


def _oracle_grads(loss_fn, params, batch, dtype=np.float64):
    """Per-example gradients, one jax.grad call per example, flattened to (B, P) in float64."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    rows = []
    for i in range(size):
        example = jax.tree_util.tree_map(lambda x, i=i: x[i], batch)
        grad = jax.grad(loss_fn)(params, example)
        rows.append(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(grad)]))
    return np.asarray(rows, dtype=dtype)


def _reference_dispersion(grads):
    centred = grads - grads.mean(axis=0)
    return np.mean(np.sum(centred**2, axis=1))


@pytest.mark.parametrize("microbatch_size", [None, 3])
def test_per_example_grads_match_a_grad_per_example(mlp, microbatch_size):
    params, batch = mlp
    grads = jaxgen.per_example_grads(mlp_loss, params, batch, microbatch_size=microbatch_size)
    flat = np.concatenate(
        [np.asarray(g).reshape(10, -1) for g in jax.tree_util.tree_leaves(grads)], axis=1
    )
    np.testing.assert_allclose(flat, _oracle_grads(mlp_loss, params, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model, loss_fn", [("mlp", mlp_loss), ("cnn", cnn_loss)])
def test_dispersion_matches_float64_reference(request, model, loss_fn):
    params, batch = request.getfixturevalue(model)
    with jax.enable_x64(True):
        params64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params)
        batch64 = jax.tree_util.tree_map(
            lambda x: jnp.asarray(x, jnp.float64) if x.dtype == jnp.float32 else x, batch
        )
        grads = _oracle_grads(loss_fn, params64, batch64)
        losses = [
            float(loss_fn(params64, jax.tree_util.tree_map(lambda x, i=i: x[i], batch64)))
            for i in range(grads.shape[0])
        ]
    stats = jaxgen.gradient_dispersion(loss_fn, params, batch, method="vmap")
    np.testing.assert_allclose(stats.dispersion, _reference_dispersion(grads), rtol=1e-5)
    np.testing.assert_allclose(stats.sq_norms, np.sum(grads**2, axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.loss, np.mean(losses), rtol=1e-6)
    mean_grad = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(stats.grad)])
    np.testing.assert_allclose(mean_grad, grads.mean(axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.minibatch_variance, stats.dispersion / grads.shape[0])


def test_layer_dispersion_is_per_leaf_and_adds_up(mlp):
    params, batch = mlp
    stats = jaxgen.gradient_dispersion(mlp_loss, params, batch)
    chex.assert_trees_all_equal_structs(stats.layer_dispersion, params)
    grads = jaxgen.per_example_grads(mlp_loss, params, batch)
    for leaf, grad in zip(
        jax.tree_util.tree_leaves(stats.layer_dispersion),
        jax.tree_util.tree_leaves(grads),
        strict=True,
    ):
        flat = np.asarray(grad, np.float64).reshape(10, -1)
        np.testing.assert_allclose(leaf, _reference_dispersion(flat), rtol=1e-5)
    total = sum(float(x) for x in jax.tree_util.tree_leaves(stats.layer_dispersion))
    np.testing.assert_allclose(total, stats.dispersion, rtol=1e-6)


@pytest.mark.parametrize("microbatch_size", [1, 3, 5, 10, 64])
def test_microbatched_equals_full_vmap(mlp, microbatch_size):
    params, batch = mlp
    full = jaxgen.gradient_dispersion(mlp_loss, params, batch, method="vmap")
    chunked = jaxgen.gradient_dispersion(
        mlp_loss, params, batch, method="vmap", microbatch_size=microbatch_size
    )
    chex.assert_trees_all_close(chunked, full, rtol=1e-5, atol=1e-7)


def _wide_loss(w, z):
    return jnp.sum(jnp.tanh(z @ w) ** 2)


def test_vmap_takes_large_batches_in_microbatches_by_default():
    """b × P above 2·2²² numbers: chunks of at most 2²², a divisor of b when one is near
    (only on a CPU, and never for a loss with convolutions there); the result is the
    whole batch's."""
    from jaxgen._per_example import VMAP_BUFFER_ELEMENTS, default_microbatch

    w = jax.random.normal(jax.random.key(0), (512, 256)) / 16  # P = 2¹⁷: 32 examples
    batch = jax.random.normal(jax.random.key(1), (96, 512))
    on_cpu = jax.default_backend() == "cpu"
    assert default_microbatch(_wide_loss, w, batch) == (32 if on_cpu else None)
    assert default_microbatch(_wide_loss, w, batch[:90]) == (30 if on_cpu else None)
    assert default_microbatch(_wide_loss, w, jnp.ones((97, 512))) == (32 if on_cpu else None)
    assert default_microbatch(_wide_loss, w, batch[:64]) is None  # 2·2²²: whole
    conv_w = jnp.ones((3, 8, 8 * VMAP_BUFFER_ELEMENTS // 8 // 24))  # P = 2²² / 3

    def conv_loss(w, x):
        return jnp.sum(jax.lax.conv_general_dilated(x[None], w, (1,), "SAME"))

    assert default_microbatch(conv_loss, conv_w, jnp.ones((16, 8, 3))) is None
    chunked = jaxgen.gradient_dispersion(_wide_loss, w, batch, method="vmap")
    whole = jaxgen.gradient_dispersion(_wide_loss, w, batch, method="vmap", microbatch_size=96)
    chex.assert_trees_all_close(chunked, whole, rtol=1e-5, atol=1e-6)
    jaxpr = jax.make_jaxpr(
        lambda w: jaxgen.gradient_dispersion(_wide_loss, w, batch, method="vmap")
    )
    assert ("scan" in str(jaxpr(w))) is on_cpu


def _dominant_mean_loss(w, z):
    """ℓ(w, z) = w·(m + z): every per-example gradient is m + z, with ‖m‖ ≫ ‖z‖."""
    return jnp.dot(w, 1.0e4 + z)


def _dominant_mean_stats(noise, microbatch_size):
    """``method="vmap"`` on ``_dominant_mean_loss`` with the float32 rows of ``noise``, and
    the float32 gradients JAX forms for them, in float64."""
    stats = jaxgen.gradient_dispersion(
        _dominant_mean_loss,
        jnp.zeros(noise.shape[1]),
        jnp.asarray(noise, jnp.float32),
        method="vmap",
        microbatch_size=microbatch_size,
    )
    grads32 = np.asarray(1.0e4 + np.asarray(noise, np.float32), np.float32)
    return stats, grads32.astype(np.float64)


@pytest.mark.parametrize("microbatch_size", [None, 7])
def test_dispersion_is_sound_in_float32_when_the_mean_dominates(microbatch_size):
    noise = np.asarray(jax.random.normal(jax.random.key(3), (64, 50)), np.float64) * 1e-2
    stats, grads32 = _dominant_mean_stats(noise, microbatch_size)
    # The exact dispersion of the float32 gradients JAX forms (≈ 5e-3, ‖ḡ‖² = 5e9).
    reference = _reference_dispersion(grads32)
    np.testing.assert_allclose(stats.dispersion, reference, rtol=1e-3)
    # The textbook shortcut (1/b)Σ‖g_i‖² − ‖ḡ‖² cannot resolve it in float32.
    naive = jnp.mean(stats.sq_norms) - sum(
        jnp.sum(g**2) for g in jax.tree_util.tree_leaves(stats.grad)
    )
    assert abs(float(naive) - reference) > 100 * reference


@pytest.mark.parametrize("microbatch_size", [None, 7])
def test_dispersion_is_sound_when_the_first_example_is_the_outlier(microbatch_size):
    """The vmap path centres on the first example's gradient: when that example carries
    nearly all of the spread (‖g_1 − ḡ‖² ≈ b × dispersion) on top of a dominant mean,
    the result still holds to about b ulps, and the mean gradient to rounding."""
    noise = np.asarray(jax.random.normal(jax.random.key(4), (64, 50)), np.float64) * 1e-3
    noise[0] = 1.0
    stats, grads32 = _dominant_mean_stats(noise, microbatch_size)
    np.testing.assert_allclose(stats.dispersion, _reference_dispersion(grads32), rtol=1e-4)
    np.testing.assert_allclose(stats.grad, grads32.mean(0), rtol=1e-7)
    np.testing.assert_allclose(stats.sq_norms, np.sum(grads32**2, 1), rtol=1e-6)


def test_dispersion_inside_jit_compiles_once(mlp):
    params, batch = mlp
    traces = []

    @jax.jit
    def step(p, b):
        traces.append(None)
        return jaxgen.gradient_dispersion(mlp_loss, p, b, microbatch_size=4)

    first = step(params, batch)
    second = step(jax.tree_util.tree_map(lambda x: x * 1.01, params), batch)
    assert len(traces) == 1
    assert float(first.dispersion) != float(second.dispersion)
    chex.assert_trees_all_close(
        first, jaxgen.gradient_dispersion(mlp_loss, params, batch), rtol=1e-5, atol=1e-7
    )


def test_auto_is_ghost(mlp):
    params, batch = mlp
    chex.assert_trees_all_close(
        jaxgen.gradient_dispersion(mlp_loss, params, batch, method="auto"),
        jaxgen.gradient_dispersion(mlp_loss, params, batch, method="ghost"),
    )


@pytest.mark.parametrize(
    "kwargs, batch, message",
    [
        ({"method": "exact"}, {"x": jnp.ones((2, 3))}, "method must be one of"),
        (
            {"microbatch_size": 0},
            {"x": jnp.ones((2, 3))},
            "microbatch_size must be an integer >= 1, got 0",
        ),
        ({"microbatch_size": 2.5}, {"x": jnp.ones((2, 3))}, "microbatch_size .* got 2.5"),
        ({}, {"x": jnp.ones((2, 3)), "y": jnp.ones(3)}, r"batch leaves must share .* \[2, 3\]"),
        ({}, {"x": jnp.ones((2, 3)), "s": jnp.float32(1.0)}, "batch leaves must share .* scalar"),
        ({}, {}, "batch must have at least one array leaf"),
        ({}, {"x": jnp.ones((0, 3))}, "batch must hold at least one example"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, batch, message):
    loss = lambda w, z: jnp.sum(w * z["x"])  # noqa: E731
    with pytest.raises(ValueError, match=message):
        jaxgen.gradient_dispersion(loss, jnp.ones(3), batch, **kwargs)


def test_per_example_grads_validates_too():
    loss = lambda w, z: jnp.sum(w * z)  # noqa: E731
    with pytest.raises(ValueError, match="microbatch_size"):
        jaxgen.per_example_grads(loss, jnp.ones(3), jnp.ones((2, 3)), microbatch_size=-1)
    with pytest.raises(ValueError, match="batch leaves must share"):
        jaxgen.per_example_grads(loss, jnp.ones(3), (jnp.ones((2, 3)), jnp.ones((4, 3))))
