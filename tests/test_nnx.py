"""jaxgen.nnx: Flax NNX models as pure per-example losses."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgen


class _WithNorm(nnx.Module):
    def __init__(self, rngs, training):
        self.linear = nnx.Linear(4, 3, rngs=rngs)
        self.norm = nnx.BatchNorm(3, use_running_average=not training, rngs=rngs)

    def __call__(self, x):
        return self.norm(self.linear(x))


def _batch(size=5):
    return {"x": jax.random.normal(jax.random.key(0), (size, 4)), "y": jnp.arange(size) % 3}


def test_loss_is_the_models_cross_entropy_and_merge_rebuilds_the_model():
    model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    loss_fn, params, merge = jaxgen.nnx.classifier_loss(model)
    batch = _batch()
    logits = model(batch["x"])
    expected = -jax.nn.log_softmax(logits)[jnp.arange(5), batch["y"]]
    losses = jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)
    np.testing.assert_allclose(losses, expected, rtol=1e-6)
    doubled = jax.tree_util.tree_map(lambda p: 2 * p, params)
    np.testing.assert_allclose(merge(doubled)(batch["x"]), 2 * logits, rtol=1e-6)
    np.testing.assert_allclose(model(batch["x"]), logits)  # the model itself is untouched


def test_other_keys_and_another_pointwise_loss():
    model = nnx.Linear(4, 1, rngs=nnx.Rngs(1))
    squared = lambda out, target: 0.5 * jnp.sum((out - target) ** 2)  # noqa: E731
    loss_fn, params, _ = jaxgen.nnx.classifier_loss(
        model, loss=squared, input_key="image", label_key="target"
    )
    example = {"image": jnp.ones(4), "target": jnp.ones(1)}
    np.testing.assert_allclose(loss_fn(params, example), squared(model(jnp.ones(4)), 1.0))


def test_batchnorm_in_training_mode_is_refused_and_eval_mode_is_exact():
    with pytest.raises(ValueError, match="BatchNorm at norm is in training mode"):
        jaxgen.nnx.classifier_loss(_WithNorm(nnx.Rngs(0), training=True))
    loss_fn, params, _ = jaxgen.nnx.classifier_loss(_WithNorm(nnx.Rngs(0), training=False))
    batch = _batch()
    # Eval-mode BatchNorm folds its scale with the running variance before use, so the
    # scale falls back to exact per-example gradients (silently under "auto").
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto = jaxgen.gradient_dispersion(loss_fn, params, batch, method="auto")
    oracle = jaxgen.gradient_dispersion(loss_fn, params, batch, method="vmap")
    chex.assert_trees_all_close(auto, oracle, rtol=2e-4, atol=1e-6)
