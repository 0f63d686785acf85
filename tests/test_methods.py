"""The method registry: the paper's defaults, each method against an independent
computation on a fixed batch, each lowering a tiny model's loss, BatchNorm statistics
left alone by the perturbed passes, and a new method added in one place."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import mlp_apply, mlp_init

import jaxgen
from jaxgen import cli
from jaxgen.experiments import methods, models, options, task
from jaxgen.experiments.step import TrainState, make_train_step

PAPER_DEFAULTS = {  # Wang & Mao (ICLR 2022), "GMP tables" and Algorithm 1
    "erm": {},
    "gmp": {"samples": 3, "sigma": 0.03, "rho": 0.5, "mode": "auto"},  # mode: how, not what
    "amp": {"epsilon": 0.5, "inner_lr": 1.0, "inner_steps": 1},
    "sam": {"rho": 0.05},
    "dgc": {"alpha": 0.1, "initial_norm": 50.0, "start_epoch": 15},
    "dropout": {"rate": 0.1},
    "label-smoothing": {"epsilon": 0.2},
    "flooding": {"level": 0.02},
    "mixup": {"alpha": 1.0},
    "adversarial": {"epsilon": 1 / 255},
    # beyond the paper: jaxgen's defaults (Opacus's C = 1)
    "per-example-clip": {"max_norm": 1.0, "quantile": 0.0},
    "dp-sgd": {"max_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5},
}


@pytest.mark.parametrize(
    "mode, loops", [("sequential", True), ("vmap", False), ("auto", jax.default_backend() == "cpu")]
)
def test_gmp_mode_says_how_the_perturbed_gradients_run(mode, loops):
    """``--gmp-mode`` reaches ``jaxgen.gmp``: sequential passes run in a ``scan``, batched
    ones in one ``vmap``; ``auto`` is sequential on a CPU."""
    params = {"w": jnp.ones((3, 2))}
    grad_fn = jax.grad(lambda p: jnp.sum(jnp.tanh(p["w"]) ** 2))
    transform = methods.make("gmp", mode=mode).transform(key=jax.random.key(0), steps_per_epoch=1)
    update = lambda p, s: transform.update(grad_fn(p), s, p, grad_fn=grad_fn)[0]  # noqa: E731
    assert (" scan[" in str(jax.make_jaxpr(update)(params, transform.init(params)))) == loops


def mlp_loss(params, example):
    """Cross-entropy of the conftest MLP, for integer or soft (smoothed, mixed) labels."""
    return jaxgen.nnx.cross_entropy(mlp_apply(params, example["x"]), example["y"])


def _batch(size=8, classes=3, key=0):
    kx, ky = jax.random.split(jax.random.key(key))
    return {"x": jax.random.normal(kx, (size, 6)), "y": jax.random.randint(ky, (size,), 0, classes)}


def _state(params, optimizer):
    params = jax.tree_util.tree_map(jnp.copy, params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key(0))


def _task(loss_fn=mlp_loss, classes=3):
    def batch_loss(params, batch):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))

    return methods.Task(batch_loss, classes)


def test_the_registry_holds_every_method_of_the_tables_with_the_papers_defaults():
    """And the methods beyond the paper, with jaxgen's defaults."""
    assert set(methods.REGISTRY) == set(PAPER_DEFAULTS)
    for name, defaults in PAPER_DEFAULTS.items():
        method = methods.make(name)
        assert {k: v for k, v in method.as_dict().items() if k != "name"} == defaults, name
        assert "V_t" in type(method).description


@pytest.mark.parametrize("name", sorted(PAPER_DEFAULTS))
def test_each_method_lowers_a_tiny_models_training_loss(name):
    params, batch = mlp_init(jax.random.key(1)), _batch(32)
    # C = 1 clips most of this model's per-example gradients: 30 steps are too few
    overrides = {
        "dgc": {"start_epoch": 0},
        "per-example-clip": {"max_norm": 5.0},
        "dp-sgd": {"max_norm": 5.0, "noise_multiplier": 0.3},
    }
    method = methods.make(name, **overrides.get(name, {}))
    optimizer = methods.optimizer(method, [0.2] * 30, key=jax.random.key(2), steps_per_epoch=1)
    step = jax.jit(make_train_step(mlp_loss, optimizer, method, num_classes=3))
    state = _state(params, optimizer)
    for _ in range(30):
        state, metrics = step(state, batch)
    before = float(_task().batch_loss(params, batch))
    after = float(_task().batch_loss(state.params, batch))
    assert after < 0.85 * before, (name, before, after)
    assert np.isfinite(float(metrics.variance))  # V_t is measured for every method


def test_label_smoothing_is_the_closed_form_mixture_of_cross_entropies():
    params, batch = mlp_init(jax.random.key(1)), _batch()
    smoothed = methods.LabelSmoothing(epsilon=0.2).batch(params, batch, jax.random.key(0), _task())
    loss = float(_task().batch_loss(params, smoothed))
    log_p = jax.nn.log_softmax(mlp_apply(params, batch["x"]))
    nll = -log_p[jnp.arange(8), batch["y"]]
    expected = jnp.mean(0.8 * nll + 0.2 * jnp.mean(-log_p, axis=1))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_flooding_descends_above_the_level_and_ascends_below():
    grad = {"w": jnp.array([1.0, -2.0])}
    method = methods.Flooding(level=0.5)
    chex.assert_trees_all_close(method.post(jnp.float32(0.7), grad), grad)
    chex.assert_trees_all_close(method.post(jnp.float32(0.3), grad), {"w": -grad["w"]})


def test_mixup_mixes_inputs_and_targets_with_one_lambda_and_a_permutation():
    batch = {"x": jax.random.normal(jax.random.key(3), (5, 6)), "y": jnp.arange(5)}
    mixed = methods.Mixup(alpha=1.0).batch(None, batch, jax.random.key(4), _task(classes=5))
    y = np.asarray(mixed["y"])  # row i: λ at class i, 1 − λ at class π(i)
    lam = y[np.arange(5), np.arange(5)]
    others = np.where(np.eye(5, dtype=bool), 0.0, y)
    partner = np.where(others.max(1) > 0, others.argmax(1), np.arange(5))
    moved = partner != np.arange(5)  # an example paired with itself stays as it is
    assert moved.any() and np.allclose(lam[moved], lam[moved][0]) and 0 < lam[moved][0] < 1
    assert sorted(partner.tolist()) == list(range(5))  # a permutation
    lam = lam[moved][0]
    expected = lam * batch["x"] + (1 - lam) * batch["x"][partner]
    np.testing.assert_allclose(mixed["x"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.sum(1), 1.0, rtol=1e-6)


def test_the_adversarial_input_is_on_the_eps_box_along_the_gradient_sign():
    params, batch = mlp_init(jax.random.key(1)), _batch()
    eps = 0.05
    adversarial = methods.Adversarial(epsilon=eps).batch(params, batch, None, _task())
    direction = jax.grad(lambda x: jnp.sum(jax.vmap(mlp_loss, (None, 0))(params, batch | {"x": x})))
    expected = batch["x"] + eps * jnp.sign(direction(batch["x"]))
    np.testing.assert_allclose(adversarial["x"], expected, rtol=1e-6)
    assert float(jnp.max(jnp.abs(adversarial["x"] - batch["x"]))) <= eps + 1e-7
    assert _task().batch_loss(params, adversarial) > _task().batch_loss(params, batch)


def test_sam_is_optax_contrib_sams_own_example():
    """Ours: chain(sam(identity, ascent), sgd); optax's: sam(sgd, ascent)."""
    params, batch = mlp_init(jax.random.key(1)), _batch()
    grad_fn = jaxgen.batch_grad_fn(mlp_loss, batch)
    ours = methods.optimizer(methods.SAM(rho=0.1), [0.3], key=jax.random.key(0), steps_per_epoch=1)
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(0.1))
    theirs = optax.contrib.sam(optax.sgd(0.3), ascent, opaque_mode=True)
    a, _ = ours.update(grad_fn(params), ours.init(params), params, grad_fn=grad_fn)
    b, _ = theirs.update(grad_fn(params), theirs.init(params), params, grad_fn=grad_fn)
    chex.assert_trees_all_close(a, b, rtol=1e-6)


def test_dropout_draws_a_mask_per_example_and_keeps_the_mean():
    h = jnp.ones((4, 2000))
    keys = jax.random.split(jax.random.key(0), 4)
    dropped = models.dropout(h, 0.25, keys)
    kept = np.asarray(dropped != 0)
    assert abs(kept.mean() - 0.75) < 0.02 and np.allclose(dropped[kept], 1 / 0.75)
    assert not np.array_equal(kept[0], kept[1])  # each example its own mask
    single = models.dropout(h[0], 0.25, keys[0])
    np.testing.assert_array_equal(single, dropped[0])  # one example = its row of a batch
    assert models.dropout(h, 0.25, None) is h


def _bn_model():
    model = models.build("preactresnet18", (8, 8, 3), 4, 2, seed=0)
    return task.trainable("preactresnet18", model)


@pytest.mark.parametrize(
    "method",
    [
        methods.GMP(samples=2, sigma=0.5),
        methods.SAM(rho=0.5),
        methods.AMP(epsilon=0.5),
        methods.Adversarial(epsilon=0.0),
    ],  # fmt: skip
    ids=["gmp", "sam", "amp", "adversarial"],
)
def test_batchnorm_statistics_come_from_the_clean_pass_only(method):
    model = _bn_model()
    batch = {"x": jax.random.normal(jax.random.key(5), (4, 8, 8, 3)), "y": jnp.arange(4)}
    expected = model.batch_loss(model.params, model.model_state, batch)[1]  # one clean pass
    optimizer = methods.optimizer(method, [0.1], key=jax.random.key(0), steps_per_epoch=1)
    state = TrainState(jnp.zeros((), jnp.int32), model.params, optimizer.init(model.params),
                       jax.random.key(0), model.model_state)  # fmt: skip
    new, metrics = jax.jit(make_train_step(model, optimizer, method, num_classes=4))(state, batch)
    chex.assert_trees_all_close(new.model_state, expected, rtol=1e-5, atol=1e-7)
    assert not jax.tree_util.tree_all(
        jax.tree_util.tree_map(jnp.array_equal, new.model_state, model.model_state)
    )  # the clean pass did update them
    assert np.isnan(float(metrics.variance))  # no per-example loss: V_t not measured


@dataclasses.dataclass(frozen=True)
class InputNoise(methods.Method):
    """The README's example, registered here for one test only."""

    name = "input-noise"
    description = "inputs x + N(0, σ²) drawn at every step; V_t of the noisy minibatch"
    sigma: float = options.option(0.1, "input noise: σ", options.POSITIVE)

    def batch(self, params, batch, key, task):
        noise = self.sigma * jax.random.normal(key, batch["x"].shape)
        return batch | {"x": batch["x"] + noise}

    def summary(self):
        return f"input noise (σ={self.sigma})"


def test_a_new_method_needs_one_class_and_reaches_the_step_and_the_cli(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, InputNoise.name, InputNoise)
    params, batch = mlp_init(jax.random.key(1)), _batch()
    optimizer = optax.with_extra_args_support(optax.sgd(0.1))
    noisy = make_train_step(mlp_loss, optimizer, InputNoise(sigma=0.5))(
        _state(params, optimizer), batch
    )
    plain = make_train_step(mlp_loss, optimizer, methods.ERM())(_state(params, optimizer), batch)
    assert float(noisy[1].loss) != float(plain[1].loss)  # it trained on other inputs
    argv = ["train", "--method", "input-noise", "--input-noise-sigma", "0.5", "--epochs", "1",
            "--width", "8", "--num-train", "60", "--batch-size", "20", "--no-progress",
            "--mesh", "data=1", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["method"] == {"name": "input-noise", "sigma": 0.5}
    assert result["optimizer"].endswith("with input noise (σ=0.5)")


@pytest.mark.parametrize(
    "method",
    [methods.PerExampleClip(max_norm=0.5), methods.PerExampleClip(quantile=0.5), methods.DPSGD()],
    ids=["clip", "clip-quantile", "dp-sgd"],
)
def test_per_example_clipping_and_dp_sgd_step_along_the_clipped_gradient(method):
    """One step by hand: SGD along ``clipped_grad`` (plus, for DP-SGD, the Gaussian draw
    of the step's own key with standard deviation σC/b); ``V_t`` is the clean one's."""
    from jaxgen._random import gaussian_like
    from jaxgen.experiments.step import _gradient_key

    params, batch = mlp_init(jax.random.key(1)), _batch(16)
    optimizer = methods.optimizer(method, [0.1], key=jax.random.key(2), steps_per_epoch=1)
    state = _state(params, optimizer)
    new_state, metrics = jax.jit(make_train_step(mlp_loss, optimizer, method))(state, batch)
    threshold = {"quantile": 0.5} if getattr(method, "quantile", 0) else {"max_norm": 0.5}
    if method.name == "dp-sgd":
        threshold = {"max_norm": method.max_norm}
    grad = jaxgen.clipped_grad(mlp_loss, params, batch, **threshold).grad
    if method.name == "dp-sgd":
        noise = gaussian_like(_gradient_key(state), grad, method.max_norm / 16)
        grad = optax.tree.add(grad, noise)
    chex.assert_trees_all_close(new_state.params, optax.tree.add_scale(params, -0.1, grad))
    clean = jaxgen.gradient_dispersion(mlp_loss, params, batch)
    np.testing.assert_allclose(metrics.variance, clean.minibatch_variance, rtol=1e-5)


def test_dp_sgd_reports_the_privacy_dp_accounting_gives():
    import dp_accounting

    method = methods.DPSGD(noise_multiplier=0.8, delta=1e-6)
    spent = method.privacy(n=1000, batch_size=50, steps=60)
    accountant = dp_accounting.rdp.RdpAccountant()
    gaussian = dp_accounting.GaussianDpEvent(0.8)
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.05, gaussian), 60)
    assert spent["epsilon"] == pytest.approx(accountant.get_epsilon(1e-6), rel=1e-9)
    assert spent["sampling_rate"] == 0.05 and spent["steps"] == 60
    assert "Poisson" in spent["sampling"] and "fixed-size" in spent["sampling"]
    assert methods.DPSGD(noise_multiplier=0.0).privacy(n=10, batch_size=5, steps=1)[
        "epsilon"
    ] == float("inf")
