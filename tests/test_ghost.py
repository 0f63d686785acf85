"""Ghost norms against the vmap oracle on the four architectures of the issue."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cnn_loss, mlp_loss, wide_relu_mlp
from flax import nnx

import jaxgen


def _assert_matches_vmap(loss_fn, params, batch, method="ghost"):
    """The dispersion, and the clipped gradient with half the examples clipped."""
    oracle = jaxgen.gradient_dispersion(loss_fn, params, batch, method="vmap")
    ghost = jaxgen.gradient_dispersion(loss_fn, params, batch, method=method)
    chex.assert_trees_all_close(ghost, oracle, rtol=2e-4, atol=1e-6)
    max_norm = float(np.median(np.sqrt(oracle.sq_norms))) * 1.001  # between two norms
    clipped = jaxgen.clipped_grad(loss_fn, params, batch, max_norm=max_norm, method=method)
    reference = jaxgen.clipped_grad(loss_fn, params, batch, max_norm=max_norm, method="vmap")
    chex.assert_trees_all_close(clipped, reference, rtol=2e-4, atol=1e-6)
    return ghost


def _no_warning(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


def test_mlp(mlp):
    _no_warning(lambda: _assert_matches_vmap(mlp_loss, *mlp))


def test_cnn_with_pooling(cnn):
    _no_warning(lambda: _assert_matches_vmap(cnn_loss, *cnn))


class Block(nnx.Module):
    """Embedding, one attention layer, LayerNorms and an MLP; mean-pooled classifier."""

    def __init__(self, vocab=11, width=8, classes=3, *, tied=False, rngs):
        self.embed = nnx.Embed(vocab, width, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=width, qkv_features=width, decode=False, rngs=rngs
        )
        self.norm1 = nnx.LayerNorm(width, rngs=rngs)
        self.norm2 = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)
        self.tied = tied
        self.head = nnx.Linear(width, classes, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + self.attention(self.norm1(h))
        h = h + self.down(jax.nn.gelu(self.up(self.norm2(h))))
        if self.tied:  # logits over the vocabulary through the embedding matrix
            return jnp.mean(self.embed.attend(h), axis=0)
        return self.head(jnp.mean(h, axis=0))


def _block_batch(key, size=6, length=5, classes=3):
    k1, k2 = jax.random.split(key)
    return {
        "x": jax.random.randint(k1, (size, length), 0, 11),
        "y": jax.random.randint(k2, (size,), 0, classes),
    }


def test_transformer_block():
    model = Block(rngs=nnx.Rngs(0))
    loss_fn, params, _ = jaxgen.nnx.classifier_loss(model)
    _no_warning(lambda: _assert_matches_vmap(loss_fn, params, _block_batch(jax.random.key(1))))


def test_tied_weights_fall_back_for_that_parameter_alone():
    model = Block(tied=True, rngs=nnx.Rngs(0))
    loss_fn, params, _ = jaxgen.nnx.classifier_loss(model)
    batch = _block_batch(jax.random.key(2), classes=11)
    with pytest.warns(UserWarning, match=r"embed.*embedding"):
        _assert_matches_vmap(loss_fn, params, batch, method="ghost")
    _no_warning(lambda: _assert_matches_vmap(loss_fn, params, batch, method="auto"))


def test_unsupported_use_falls_back_and_warns_naming_the_parameter():
    def loss_fn(params, z):
        hidden = jnp.tanh(z["x"] @ params["w"])
        return (jnp.exp(params["log_scale"]) * jnp.sum(hidden) - z["y"]) ** 2

    params = {"w": jnp.ones((4, 3)) * 0.1, "log_scale": jnp.array(0.3)}
    batch = {"x": jax.random.normal(jax.random.key(0), (5, 4)), "y": jnp.arange(5.0)}
    with pytest.warns(UserWarning, match="'log_scale'"):
        _assert_matches_vmap(loss_fn, params, batch, method="ghost")


def test_parameter_on_either_side_of_a_matmul_and_a_hand_written_two_layer_relu():
    signs = jnp.array([1.0, -1.0, 1.0, -1.0])

    def loss_fn(w, z):  # W (m, d) @ x (d,): the parameter is the left operand
        return 0.5 * (z["y"] - signs @ jax.nn.relu(w @ z["x"]) / 2.0) ** 2

    batch = {"x": jax.random.normal(jax.random.key(3), (7, 5)), "y": jnp.ones(7)}
    w = jax.random.normal(jax.random.key(4), (4, 5))
    _no_warning(lambda: _assert_matches_vmap(loss_fn, w, batch))


def test_ghost_holds_no_batch_by_parameters_buffer():
    loss_fn, params, batch, per_example_bytes = wide_relu_mlp()

    def temp_bytes(method):
        fn = jax.jit(lambda p, b: jaxgen.gradient_dispersion(loss_fn, p, b, method=method))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes("vmap") >= 0.5 * per_example_bytes  # the oracle holds about one
    assert temp_bytes("ghost") < 0.1 * per_example_bytes


def test_a_loss_that_ignores_the_example_has_no_dispersion():
    """Nothing for ghost norms to follow: computed by the vmap path, exactly."""
    stats = jaxgen.gradient_dispersion(lambda w, z: jnp.sum(w**2), jnp.ones(3), jnp.ones((4, 2)))
    np.testing.assert_allclose(stats.grad, 2 * jnp.ones(3))
    np.testing.assert_allclose(stats.sq_norms, jnp.full(4, 12.0))
    assert float(stats.dispersion) == 0.0


def test_ghost_norms_match_per_example_gradients_layer_by_layer(mlp):
    params, batch = mlp
    stats = jaxgen.gradient_dispersion(mlp_loss, params, batch, method="ghost")
    grads = jaxgen.per_example_grads(mlp_loss, params, batch)
    expected = sum(
        np.sum(np.asarray(g).reshape(10, -1) ** 2, axis=1) for g in jax.tree_util.tree_leaves(grads)
    )
    np.testing.assert_allclose(stats.sq_norms, expected, rtol=1e-5)
    assert stats.per_example_sq_norms is stats.sq_norms


def test_bias_subtracted_and_broadcast_over_a_sequence():
    def loss_fn(params, z):  # (T, d) @ (d, k) − b broadcast from (1, k): b is subtracted
        out = z["x"] @ params["w"] - params["b"].reshape(1, -1)
        return jnp.sum(jnp.tanh(out) ** 2) + params["c"] - z["y"]

    params = {"w": 0.3 * jnp.ones((4, 3)), "b": jnp.array([0.1, -0.2, 0.3]), "c": jnp.array(0.5)}
    batch = {"x": jax.random.normal(jax.random.key(5), (6, 7, 4)), "y": jnp.arange(6.0)}
    _assert_matches_vmap(loss_fn, params, batch, method="auto")


@pytest.mark.parametrize(("size", "chunk", "iterations"), [(7, 3, 3), (6, 4, 2), (6, 6, 0)])
def test_in_example_chunks_equals_one_pass(size, chunk, iterations):
    from jaxgen._ghost.rules import in_example_chunks

    x = jax.random.normal(jax.random.key(0), (size, 3, 2))
    y = jax.random.normal(jax.random.key(1), (size, 2))

    def fn(x, y):  # rows must stay with their examples; padding rows must not leak in
        return jnp.einsum("bij,bj->bi", x, y) + jnp.sum(x, axis=(1, 2))[:, None]

    jaxpr = str(jax.make_jaxpr(lambda x, y: in_example_chunks(fn, chunk, x, y))(x, y))
    assert (f"length={iterations}" in jaxpr) if iterations else (" scan[" not in jaxpr)
    np.testing.assert_allclose(in_example_chunks(fn, chunk, x, y), fn(x, y), rtol=1e-6)


def test_mean_pooled_tokens_whose_output_gradients_are_one_broadcast_row():
    """Under mean pooling every token of a dense layer gets the same ``δ``: XLA:CPU
    (jaxlib 0.10.2) computed the Gram form's vmapped ``dm @ dm.T`` wrongly when it could
    see the broadcast (``rules.opaque``). Without the barrier, the clipped gradient's
    squared norms here were 12 000× off."""
    keys = jax.random.split(jax.random.key(7), 2)
    params = {"w": jax.random.normal(keys[0], (128, 128)) / 8, "head": jnp.ones((128, 3))}

    def loss_fn(params, z):  # 32 tokens: the Gram form, 32 · (128 + 128) <= 128 · 128
        pooled = jnp.mean(z["x"] @ params["w"], axis=0)  # δ: one row, broadcast
        return -jax.nn.log_softmax(jnp.tanh(pooled) @ params["head"])[z["y"]]

    batch = {"x": jax.random.normal(keys[1], (6, 32, 128)), "y": jnp.arange(6) % 3}
    want = jaxgen.gradient_dispersion(loss_fn, params, batch, method="vmap").sq_norms
    clipped = jaxgen.clipped_grad(loss_fn, params, batch, max_norm=1e9, method="ghost")
    np.testing.assert_allclose(clipped.sq_norms, want, rtol=1e-4)
    stats = jaxgen.gradient_dispersion(loss_fn, params, batch, method="ghost")
    np.testing.assert_allclose(stats.sq_norms, want, rtol=1e-4)


def test_xla_computes_a_vmapped_gram_of_broadcast_rows_behind_the_barrier():
    from jaxgen._ghost.rules import opaque

    v = jax.random.normal(jax.random.key(0), (4, 128))

    def gram_sums(v, barrier):  # the rows of each d are copies of v: 32² ‖v‖²
        d = jnp.broadcast_to(v[:, None, :], (4, 32, 128))
        if barrier:
            (d,) = opaque(d)
        return jax.vmap(lambda c: jnp.sum(c @ c.T))(d)

    want = 32**2 * np.sum(np.asarray(v, np.float64) ** 2, axis=1)
    np.testing.assert_allclose(jax.jit(gram_sums, static_argnums=1)(v, True), want, rtol=1e-5)
