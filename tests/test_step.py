"""The one training step: against a hand-written SGD step, scanned and looped alike."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_loss

import jaxgen
from jaxgen.experiments import methods
from jaxgen.experiments.step import TrainState, make_segment, make_train_step


def _state(params, optimizer):
    """A fresh state on copies of ``params`` (segments donate their state)."""
    params = jax.tree_util.tree_map(jnp.copy, params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key(0))


def _batches(batch, steps=3):
    """``steps`` minibatches: the batch's examples rolled by one each time."""
    return jax.tree_util.tree_map(
        lambda x: jnp.stack([jnp.roll(x, s, axis=0) for s in range(steps)]), batch
    )


def test_a_step_is_sgd_on_the_mean_gradient_and_logs_v_t(mlp):
    params, batch = mlp
    optimizer = optax.with_extra_args_support(optax.sgd(0.1))
    step = make_train_step(mlp_loss, optimizer, methods.ERM(), dispersion_method="vmap")
    state, metrics = jax.jit(step)(_state(params, optimizer), batch)
    stats = jaxgen.gradient_dispersion(mlp_loss, params, batch, method="vmap")
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, stats.grad)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics.variance, stats.dispersion / 10, rtol=1e-6)
    np.testing.assert_allclose(metrics.loss, stats.loss, rtol=1e-6)
    assert int(state.step) == 1 and float(metrics.weighted_loss) == 0.0


@pytest.mark.parametrize("track_every", [1, 2])
def test_scan_and_loop_segments_agree_and_untracked_steps_are_nan(mlp, track_every):
    params, batch = mlp
    optimizer = optax.with_extra_args_support(optax.sgd(0.1))
    step = make_train_step(mlp_loss, optimizer, methods.ERM(), track_every=track_every)
    batches = _batches(batch)
    scanned, scanned_metrics = make_segment(step, scan=True)(_state(params, optimizer), batches)
    looped, looped_metrics = make_segment(step, scan=False)(_state(params, optimizer), batches)
    chex.assert_trees_all_close(scanned.params, looped.params, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(scanned_metrics, looped_metrics, rtol=1e-5, atol=1e-7)
    tracked = np.isfinite(np.asarray(scanned_metrics.variance)).tolist()
    assert tracked == ([True, True, True] if track_every == 1 else [True, False, True])
    assert int(scanned.step) == int(looped.step) == 3


def test_the_segment_donates_its_state(mlp):
    params, batch = mlp
    optimizer = optax.with_extra_args_support(optax.sgd(0.1))
    step = make_train_step(mlp_loss, optimizer, methods.ERM())
    state = _state(params, optimizer)
    make_segment(step, scan=True)(state, _batches(batch))
    assert all(leaf.is_deleted() for leaf in jax.tree_util.tree_leaves(state.params))


def test_method_hooks_enter_the_step(mlp):
    """A method whose batch hook doubles the inputs and whose post-process halves ḡ."""
    params, batch = mlp

    class Scaled(methods.ERM):
        def batch(self, params, batch, key, task):
            return {"x": 2 * batch["x"], "y": batch["y"]}

        def post(self, loss, grad):
            return jax.tree_util.tree_map(lambda g: g / 2, grad)

    optimizer = optax.with_extra_args_support(optax.sgd(0.1))
    state, metrics = make_train_step(mlp_loss, optimizer, Scaled())(
        _state(params, optimizer), batch
    )
    doubled = {"x": 2 * batch["x"], "y": batch["y"]}
    stats = jaxgen.gradient_dispersion(mlp_loss, params, doubled, method="vmap")
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.05 * g, params, stats.grad)
    chex.assert_trees_all_close(state.params, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics.loss, stats.loss, rtol=1e-6)
