"""The training loop on tiny runs, checked against independent recomputation."""

import dataclasses
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgen
from jaxgen import bounds
from jaxgen.experiments import interrupts, loop, methods, models, task
from jaxgen.experiments.callbacks import Callback
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.options import ConfigError
from jaxgen.experiments.results import filled_variances

TINY = TrainConfig(
    width=8, epochs=2, batch_size=20, lr=0.1, num_train=60, hessian_probes=4, flatness_samples=4
)


def _load(out):
    result = json.loads((out / "result.json").read_text())
    steps = dict(np.load(out / "steps.npz"))
    return result, steps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    return loop.run(TINY, out), out


def test_logged_dispersion_is_gradient_dispersion_along_the_same_trajectory(tiny_run):
    """Replay SGD independently: same data order, plain updates, dispersion recomputed."""
    _, out = tiny_run
    _, steps = _load(out)
    dataset = loop.prepare_data(TINY)
    model = models.build("mlp", dataset.x_train.shape[1:], 10, TINY.width, seed=TINY.seed)
    pure = task.trainable("mlp", model)
    loss_fn, params = pure.loss_fn, pure.params
    steps_per_epoch = 60 // 20
    t = 0
    for epoch in range(TINY.epochs):
        for indices in loop.epoch_order(TINY, epoch, 60, steps_per_epoch):
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
    R, n, trace = result.R, result.n, result.hessian_trace
    sigma = bounds.optimal_sigma(lrs, variances, trace, R=R, n=n)
    assert result.optimal_sigma == pytest.approx(float(sigma), rel=1e-5)
    assert result.eq2_bound == pytest.approx(
        float(bounds.eq2(lrs, variances, trace, R=R, n=n)), rel=1e-5
    )
    assert result.theorem1_bound == pytest.approx(
        float(bounds.theorem1(lrs, sigma, variances, R=R, n=n, flatness=result.flatness)),
        rel=1e-5,
    )
    frobenius = np.repeat(steps["hessian_frobenius_sq"][: TINY.epochs], 3)
    sensitivities = 2 * np.arange(6) * float(sigma) ** 2 * frobenius
    assert result.neu2021_bound == pytest.approx(
        float(
            bounds.neu2021(lrs, sigma, sensitivities, variances, R=R, n=n, flatness=result.flatness)
        ),
        rel=1e-5,
    )
    assert result.sum_lr2_variance == pytest.approx(
        float(np.sum(steps["lrs"] ** 2 * steps["variances"])), rel=1e-6
    )
    assert result.gap == pytest.approx(result.test_loss - result.train_loss)
    saved = json.loads((out / "result.json").read_text())
    assert saved == result.to_json()
    for key in ("train_accuracy", "test_accuracy", "num_steps", "hessian_trace", "config"):
        assert key in saved
    assert result.optimizer.startswith("plain SGD")
    metrics = (out / "metrics.csv").read_text().splitlines()
    assert metrics[0].startswith("epoch,train_loss,test_loss") and len(metrics) == 1 + TINY.epochs
    assert (out / "dispersion.png").stat().st_size > 1000


def test_track_every_holds_the_last_measurement(tmp_path):
    config = dataclasses.replace(TINY, track_every=2)
    loop.run(config, tmp_path)
    _, steps = _load(tmp_path)
    tracked = np.isfinite(steps["variances"])
    assert tracked.tolist() == [True, False] * 3
    np.testing.assert_array_equal(
        filled_variances(steps["variances"]), np.repeat(steps["variances"][::2], 2)
    )


def test_theorem_2_and_3_quantities_for_their_models(tmp_path):
    for model in ("linear", "two-layer-relu"):
        result = loop.run(dataclasses.replace(TINY, model=model), tmp_path / model)
        _, steps = _load(tmp_path / model)
        R, n, lrs = result.R, result.n, jnp.asarray(steps["lrs"])
        if model == "linear":
            expected = bounds.linear_network(lrs, jnp.asarray(steps["losses"]), R=R, n=n)
            assert result.theorem2_bound == pytest.approx(float(expected), rel=1e-5)
            assert result.theorem3_bound is None
        else:
            expected = bounds.two_layer_relu(
                lrs,
                jnp.asarray(steps["weighted_losses"]),
                result.final_active_fraction,
                R=R,
                n=n,
            )
            assert result.theorem3_bound == pytest.approx(float(expected), rel=1e-5)
            assert 0 < result.final_active_fraction < 1


class _Interrupt(Exception):
    pass


class _StopAfterFirstEpoch(Callback):
    """Any exception out of a callback: the run stops, its checkpoints stay resumable."""

    def on_epoch(self, row):
        if row.epoch == 1:
            raise _Interrupt


class _SignalAfterFirstEpoch(Callback):
    """A SIGTERM (to this process) at the end of epoch 1: step 3, not a checkpoint step."""

    def on_epoch(self, row):
        if row.epoch == 1:
            signal.raise_signal(signal.SIGTERM)


def test_a_signal_stops_at_a_safe_point_with_a_checkpoint_and_resumes_to_the_same_numbers(
    tmp_path,
):
    config = dataclasses.replace(TINY, epochs=3, checkpoint_every=2)  # 3 steps per epoch
    reference = loop.run(config, tmp_path / "straight")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(interrupts.Interrupted) as stop:
        loop.run(config, tmp_path / "resumed", callbacks=[_SignalAfterFirstEpoch()])
    assert stop.value.status == 143 and isinstance(stop.value, KeyboardInterrupt)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["2", "3"]
    assert not (tmp_path / "resumed" / "result.json").exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the run's handlers are gone
    resumed = loop.run(config, tmp_path / "resumed", resume=True)
    assert resumed == dataclasses.replace(reference, seconds=resumed.seconds)
    np.testing.assert_array_equal(np.array(resumed.epochs), np.array(reference.epochs))
    np.testing.assert_array_equal(
        _load(tmp_path / "straight")[1]["variances"], _load(tmp_path / "resumed")[1]["variances"]
    )


def test_resume_refuses_another_configuration_and_a_fresh_run_refuses_old_checkpoints(tmp_path):
    loop.run(TINY, tmp_path)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.1 → 0.2\)"):
        loop.run(dataclasses.replace(TINY, lr=0.2), tmp_path, resume=True)
    with pytest.raises(ConfigError, match="already holds checkpoints of a run"):
        loop.run(TINY, tmp_path)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = dataclasses.replace(TINY, lr=1e30, checkpoint_every=1)
    with pytest.raises(loop.TrainingDiverged, match="non-finite training loss or weights at step"):
        loop.run(config, tmp_path)
    assert not (tmp_path / "result.json").exists()
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    step = manager.latest_step()
    if step is not None:  # every checkpoint that was written holds finite weights
        restored = manager.restore(step)
        leaves = jax.tree_util.tree_leaves(restored["state"])
        assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_momentum_is_an_option_and_reported(tmp_path):
    result = loop.run(dataclasses.replace(TINY, momentum=0.9, epochs=1), tmp_path)
    assert result.optimizer == "SGD with momentum 0.9 (the bounds assume plain SGD)"


def test_hutch_plus_plus_estimates_the_final_trace(tmp_path, tiny_run):
    """--hessian-method hutch++ reaches hessian_trace; the estimate agrees with the
    Hutchinson run's within their standard errors (same weights, same examples)."""
    config = dataclasses.replace(TINY, hessian_method="hutch++", hessian_probes=6)
    result = loop.run(config, tmp_path / "run")
    plain, _ = tiny_run
    assert result.config["hessian_method"] == "hutch++"
    assert result.train_loss == plain.train_loss  # the estimator changes nothing else
    assert result.hessian_trace != plain.hessian_trace
    spread = np.hypot(result.hessian_trace_stderr, plain.hessian_trace_stderr)
    assert abs(result.hessian_trace - plain.hessian_trace) < 5 * spread


def test_a_conv_model_on_a_mocked_tfds_dataset(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = TrainConfig(
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
        result = loop.run(config, tmp_path / "run")
    assert result.num_steps == 2 and result.n == 40
    assert np.isfinite(result.eq2_bound)


@pytest.mark.parametrize(
    "method",
    [
        methods.GMP(samples=2),
        methods.DGC(start_epoch=1, initial_norm=1.0),
        methods.PerExampleClip(quantile=0.5),
        methods.DPSGD(noise_multiplier=0.5),
    ],
    ids=["gmp", "dgc", "per-example-clip", "dp-sgd"],
)
def test_methods_change_the_run_and_resume_to_the_same_numbers(tmp_path, method, tiny_run):
    config = dataclasses.replace(TINY, epochs=2, method=method, checkpoint_every=3)
    reference = loop.run(config, tmp_path / "straight")
    assert method.summary() in reference.optimizer
    with pytest.raises(_Interrupt):
        loop.run(config, tmp_path / "resumed", callbacks=[_StopAfterFirstEpoch()])
    resumed = loop.run(config, tmp_path / "resumed", resume=True)
    assert resumed == dataclasses.replace(reference, seconds=resumed.seconds)
    plain, _ = tiny_run  # the same run under ERM
    assert plain.train_loss != reference.train_loss


class _Final(Callback):
    def on_trained(self, state):
        self.params = state.params


def test_instruments_are_measured_on_their_subset_and_resume_to_the_same_numbers(tmp_path):
    from jaxgen.experiments import instruments, rng

    config = dataclasses.replace(
        TINY,
        epochs=3,
        bounds=False,
        instruments="hessian-max,spectrum,gsnr,noise-scale,inner-product-test,tic",
        instruments_every=2,
        instruments_examples=32,
    )
    final = _Final()
    reference = loop.run(config, tmp_path / "straight", callbacks=[final])
    rows = (tmp_path / "straight" / "instruments.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["epoch", "hessian_max", "hessian_max_residual"]
    assert [row.split(",")[0] for row in rows[1:]] == ["2", "3"]  # every 2 epochs, and the last
    assert set(np.load(tmp_path / "straight" / "instruments.npz")) == {
        "epochs", "spectrum_nodes", "spectrum_weights"
    }  # fmt: skip
    # the last row, recomputed from the final weights on the same examples and keys
    dataset = loop.prepare_data(config)
    tracked = instruments.Instruments(config, dataset, _tiny_loss(config, dataset), None)
    key = rng.key(config.seed, rng.Stream.INSTRUMENTS, 2, 0)
    top = jaxgen.hessian_eigenvalues(
        tracked.loss_fn, final.params, tracked.batch, key=key, num_iterations=20
    )
    assert reference.instruments["hessian_max"] == pytest.approx(float(top.values[0]), rel=1e-5)
    stats = jaxgen.gradient_dispersion(tracked.loss_fn, final.params, tracked.batch)
    assert reference.instruments["noise_scale"] == pytest.approx(
        float(jaxgen.noise.noise_scale(stats)), rel=1e-5
    )
    with pytest.raises(_Interrupt):
        loop.run(config, tmp_path / "resumed", callbacks=[_StopAfterFirstEpoch()])
    resumed = loop.run(config, tmp_path / "resumed", resume=True)
    assert resumed == dataclasses.replace(reference, seconds=resumed.seconds)
    assert resumed.instruments == reference.instruments
    assert (tmp_path / "resumed" / "instruments.csv").read_text() == "\n".join(rows) + "\n"
    with pytest.raises(ConfigError, match="instruments must be among hessian-max"):
        dataclasses.replace(config, instruments="hessian-max,curvature")


def _tiny_loss(config, dataset):
    spec = models.build(
        config.model, dataset.x_train.shape[1:], dataset.num_classes, config.width, seed=config.seed
    )
    return task.trainable(config.model, spec).loss_fn
