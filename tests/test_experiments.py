import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxgen
from jaxgen import cli
from jaxgen.experiments import data, models, report, train


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 5)).astype(np.float32)
    y = rng.integers(0, 3, size=24).astype(np.int32)
    model = models.MLP([5, 8, 3], rngs=nnx.Rngs(0))
    loss_fn, params, graphdef = models.classifier_loss(model)
    return loss_fn, params, graphdef, x, y


def test_mnist1d_is_generated_offline_and_deterministic():
    a, b = data.mnist1d(num_samples=200), data.mnist1d(num_samples=200)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert set(np.unique(a.y_train)) <= set(range(10))


def test_mlp_width_changes_the_parameter_count():
    count = lambda w: sum(  # noqa: E731
        x.size
        for x in jax.tree_util.tree_leaves(nnx.state(models.MLP([40, w, 10], rngs=nnx.Rngs(0))))
    )
    assert count(16) == 40 * 16 + 16 + 16 * 10 + 10
    assert count(32) == 40 * 32 + 32 + 32 * 10 + 10
    with pytest.raises(ValueError, match="sizes must list"):
        models.MLP([40], rngs=nnx.Rngs(0))


def test_logged_variance_is_gradient_dispersion_at_the_previous_weights(tiny):
    """With one minibatch per epoch, step t's V_t is the dispersion at the epoch-(t−1) weights."""
    loss_fn, params, _, x, y = tiny
    seen = [params]
    trained, log = train.sgd_with_tracking(
        loss_fn,
        params,
        x,
        y,
        epochs=3,
        batch_size=24,
        lr=0.1,
        on_epoch=lambda epoch, p, _log: seen.append(p),
    )
    assert log.lrs.shape == log.variances.shape == log.losses.shape == (3,)
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    for t in range(3):
        stats = jaxgen.gradient_dispersion(loss_fn, seen[t], batch)
        np.testing.assert_allclose(log.variances[t], stats.dispersion / 24, rtol=1e-5)
        np.testing.assert_allclose(log.losses[t], stats.loss, rtol=1e-6)
        expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, seen[t], stats.grad)
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            seen[t + 1],
            expected,
        )
    jax.tree_util.tree_map(np.testing.assert_array_equal, trained, seen[-1])


def test_non_finite_loss_stops_with_a_message(tiny):
    loss_fn, params, _, x, y = tiny
    with pytest.raises(FloatingPointError, match="non-finite training loss at step"):
        train.sgd_with_tracking(loss_fn, params, x, y, epochs=3, batch_size=8, lr=1e30)


def test_training_arguments_are_validated(tiny):
    loss_fn, params, _, x, y = tiny
    with pytest.raises(ValueError, match="batch_size must be <= the 24 training examples, got 25"):
        train.sgd_with_tracking(loss_fn, params, x, y, epochs=1, batch_size=25, lr=0.1)
    with pytest.raises(ValueError, match="lr must be a finite number > 0, got -1.0"):
        train.sgd_with_tracking(loss_fn, params, x, y, epochs=1, batch_size=8, lr=-1.0)


def test_write_json_atomic_leaves_no_temporary(tmp_path):
    path = report.write_json_atomic(tmp_path / "sub" / "result.json", {"gap": 0.5})
    assert json.loads(path.read_text()) == {"gap": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]
    with pytest.raises(TypeError):
        report.write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"gap": 0.5}
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_demo_writes_a_consistent_result(tmp_path):
    out = tmp_path / "demo"
    cli.main(["demo", "--out", str(out), "--epochs", "1", "--width", "16", "--num-probes", "4"])
    result = json.loads((out / "result.json").read_text())
    for key in (
        "gap",
        "train_loss",
        "test_loss",
        "train_accuracy",
        "test_accuracy",
        "num_steps",
        "R",
        "sum_lr2_variance",
        "hessian_trace",
        "eq2_bound",
    ):
        assert key in result
    np.testing.assert_allclose(result["gap"], result["test_loss"] - result["train_loss"])
    expected = jaxgen.bounds.eq2(
        jnp.full(result["num_steps"], result["config"]["lr"]),
        result["sum_lr2_variance"] / (result["num_steps"] * result["config"]["lr"] ** 2),
        result["hessian_trace"],
        R=result["R"],
        n=result["n"],
    )
    np.testing.assert_allclose(result["eq2_bound"], expected, rtol=1e-4)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--epochs", "0"], "--epochs: must be an integer >= 1, got 0"),
        (["demo", "--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
        (["demo", "--R", "abc"], "--R: invalid _positive_float value"),
        (["nonsense"], "invalid choice"),
        ([], "the following arguments are required"),
    ],
)
def test_cli_bad_arguments_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err
