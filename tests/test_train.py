"""The trainer on tiny runs, checked against independent recomputation."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxgen
from jaxgen import bounds
from jaxgen.experiments import models, train

TINY = train.TrainConfig(
    width=8, epochs=2, batch_size=20, lr=0.1, num_train=60, hessian_probes=4, flatness_samples=4
)


def _load(out):
    result = json.loads((out / "result.json").read_text())
    steps = dict(np.load(out / "steps.npz"))
    return result, steps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return train.run(TINY, out, progress=False), out


def test_logged_dispersion_is_gradient_dispersion_along_the_same_trajectory(tiny_run):
    """Replay SGD independently: same data order, plain updates, dispersion recomputed."""
    _, out = tiny_run
    _, steps = _load(out)
    dataset = train.prepare_data(TINY)
    model = models.build("mlp", dataset.x_train.shape[1:], 10, TINY.width, seed=TINY.seed)
    loss_fn, params, _ = models.classifier_loss(model)
    steps_per_epoch = 60 // 20
    t = 0
    for epoch in range(TINY.epochs):
        for indices in train.epoch_order(TINY, epoch, 60, steps_per_epoch):
            batch = {
                "x": jnp.asarray(dataset.x_train[indices]),
                "y": jnp.asarray(dataset.y_train[indices]),
            }
            stats = jaxgen.gradient_dispersion(loss_fn, params, batch, method="vmap")
            np.testing.assert_allclose(steps["variances"][t], stats.dispersion / 20, rtol=1e-4)
            np.testing.assert_allclose(steps["losses"][t], stats.loss, rtol=1e-5)
            params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, stats.grad)
            t += 1
    assert t == len(steps["variances"]) == len(steps["lrs"]) == 6


def test_result_bounds_equal_the_bounds_recomputed_from_the_logs(tiny_run):
    result, out = tiny_run
    _, steps = _load(out)
    lrs, variances = jnp.asarray(steps["lrs"]), jnp.asarray(steps["variances"])
    R, n, trace = result["R"], result["n"], result["hessian_trace"]
    sigma = bounds.optimal_sigma(lrs, variances, trace, R=R, n=n)
    assert result["optimal_sigma"] == pytest.approx(float(sigma), rel=1e-5)
    assert result["eq2_bound"] == pytest.approx(
        float(bounds.eq2(lrs, variances, trace, R=R, n=n)), rel=1e-5
    )
    assert result["theorem1_bound"] == pytest.approx(
        float(bounds.theorem1(lrs, sigma, variances, R=R, n=n, flatness=result["flatness"])),
        rel=1e-5,
    )
    frobenius = np.repeat(steps["hessian_frobenius_sq"][: TINY.epochs], 3)
    sensitivities = 2 * np.arange(6) * float(sigma) ** 2 * frobenius
    assert result["neu2021_bound"] == pytest.approx(
        float(
            bounds.neu2021(
                lrs, sigma, sensitivities, variances, R=R, n=n, flatness=result["flatness"]
            )
        ),
        rel=1e-5,
    )
    assert result["sum_lr2_variance"] == pytest.approx(
        float(np.sum(steps["lrs"] ** 2 * steps["variances"])), rel=1e-6
    )
    assert result["gap"] == pytest.approx(result["test_loss"] - result["train_loss"])
    for key in ("train_accuracy", "test_accuracy", "num_steps", "hessian_trace", "config"):
        assert key in result
    assert result["optimizer"].startswith("plain SGD")
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,train_loss,test_loss") and len(metrics) == 1 + TINY.epochs
    assert (out / "dispersion.png").stat().st_size > 1000


def test_track_every_holds_the_last_measurement(tmp_path):
    config = dataclasses.replace(TINY, track_every=2)
    train.run(config, tmp_path, progress=False)
    _, steps = _load(tmp_path)
    tracked = np.isfinite(steps["variances"])
    assert tracked.tolist() == [True, False] * 3
    np.testing.assert_array_equal(
        train.filled_variances(steps["variances"]), np.repeat(steps["variances"][::2], 2)
    )


def test_theorem_2_and_3_quantities_for_their_models(tmp_path):
    for model in ("linear", "two-layer-relu"):
        result = train.run(dataclasses.replace(TINY, model=model), tmp_path / model, progress=False)
        _, steps = _load(tmp_path / model)
        R, n, lrs = result["R"], result["n"], jnp.asarray(steps["lrs"])
        if model == "linear":
            expected = bounds.linear_network(lrs, jnp.asarray(steps["losses"]), R=R, n=n)
            assert result["theorem2_bound"] == pytest.approx(float(expected), rel=1e-5)
        else:
            expected = bounds.two_layer_relu(
                lrs,
                jnp.asarray(steps["weighted_losses"]),
                result["final_active_fraction"],
                R=R,
                n=n,
            )
            assert result["theorem3_bound"] == pytest.approx(float(expected), rel=1e-5)
            assert 0 < result["final_active_fraction"] < 1


class _Interrupt(Exception):
    pass


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    config = dataclasses.replace(TINY, epochs=3, checkpoint_every=2)
    reference = train.run(config, tmp_path / "straight", progress=False)

    def stop_after_first_epoch(epoch, _row):
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(config, tmp_path / "resumed", progress=False, on_epoch=stop_after_first_epoch)
    assert not (tmp_path / "resumed" / "result.json").exists()
    resumed = train.run(config, tmp_path / "resumed", resume=True, progress=False)
    for key, value in reference.items():
        if key != "seconds":
            assert resumed[key] == value, key
    np.testing.assert_array_equal(
        _load(tmp_path / "straight")[1]["variances"], _load(tmp_path / "resumed")[1]["variances"]
    )


def test_resume_refuses_another_configuration_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    train.run(TINY, tmp_path, progress=False)
    with pytest.raises(train.ConfigError, match="different configuration"):
        train.run(dataclasses.replace(TINY, lr=0.2), tmp_path, resume=True, progress=False)
    with pytest.raises(train.ConfigError, match="already holds checkpoints of a run"):
        train.run(TINY, tmp_path, progress=False)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = dataclasses.replace(TINY, lr=1e30, checkpoint_every=1)
    with pytest.raises(train.TrainingDiverged, match="non-finite training loss or weights at step"):
        train.run(config, tmp_path, progress=False)
    assert not (tmp_path / "result.json").exists()
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    step = manager.latest_step()
    if step is not None:  # every checkpoint that was written holds finite weights
        restored = manager.restore(step)
        leaves = jax.tree_util.tree_leaves(restored["state"])
        assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"label_noise": 1.5}, r"label_noise must lie in \[0, 1\], got 1.5"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\), got 1.0"),
        ({"model": "transformer"}, "model must be one of"),
        ({"method": "exact"}, "method must be one of"),
    ],
)
def test_bad_configurations(change, message):
    with pytest.raises(train.ConfigError, match=message):
        dataclasses.replace(TINY, **change)


def test_momentum_is_an_option_and_reported(tmp_path):
    result = train.run(dataclasses.replace(TINY, momentum=0.9, epochs=1), tmp_path, progress=False)
    assert result["optimizer"] == "SGD with momentum 0.9 (the bounds assume plain SGD)"


def test_learning_rate_milestones():
    config = dataclasses.replace(TINY, epochs=4, lr_milestones=(1, 3), lr_factor=0.5)
    lrs = train.learning_rates(config, 2)
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025])
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5, 6: 0.5})
    np.testing.assert_allclose([schedule(t) for t in range(8)], lrs, rtol=1e-6)


def test_scan_and_loop_segments_agree():
    dataset = train.prepare_data(TINY)
    model = models.build("mlp", dataset.x_train.shape[1:], 10, 8)
    loss_fn, params, _ = models.classifier_loss(model)
    optimizer = optax.sgd(0.1)
    step = train._make_step(loss_fn, optimizer, 2, "auto", None)
    x, y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    order = jnp.asarray(train.epoch_order(TINY, 0, 60, 3))
    carry = (params, optimizer.init(params))
    scanned = train._make_segment(step, scan=True)(carry, x, y, jnp.arange(3), order)
    looped = train._make_segment(step, scan=False)(carry, x, y, jnp.arange(3), order)
    chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-7)


def test_a_conv_model_on_a_mocked_tfds_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = train.TrainConfig(
        dataset="cifar10",
        model="alexnet",
        width=4,
        epochs=1,
        batch_size=20,
        data_dir=str(tmp_path / "data"),
        hessian_probes=2,
        flatness_samples=2,
    )
    with tfds.testing.mock_data(num_examples=40):
        result = train.run(config, tmp_path / "run", progress=False)
    assert result["num_steps"] == 2 and result["n"] == 40
    assert np.isfinite(result["eq2_bound"])


@pytest.mark.parametrize("regularizer", ["gmp", "dgc"])
def test_regularized_runs_resume_to_the_same_numbers(tmp_path, regularizer):
    config = dataclasses.replace(
        TINY,
        epochs=2,
        regularizer=regularizer,
        dgc_start_epoch=1,
        dgc_initial_norm=1.0,
        gmp_samples=2,
        checkpoint_every=3,
    )
    reference = train.run(config, tmp_path / "straight", progress=False)
    assert regularizer in reference["optimizer"].lower() or "clipping" in reference["optimizer"]

    def stop(epoch, _row):
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(config, tmp_path / "resumed", progress=False, on_epoch=stop)
    resumed = train.run(config, tmp_path / "resumed", resume=True, progress=False)
    for key in ("train_loss", "test_loss", "eq2_bound", "sum_lr2_variance"):
        assert resumed[key] == reference[key], key
    plain = train.run(dataclasses.replace(TINY, epochs=2), tmp_path / "plain", progress=False)
    assert plain["train_loss"] != reference["train_loss"]  # the regularizer changed the run
