"""The method registry: the paper's defaults, and a new method added in one place."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import optax
from conftest import mlp_loss

import jaxgen
from jaxgen import cli
from jaxgen.experiments import methods, options
from jaxgen.experiments.step import TrainState, make_train_step


def test_the_registry_holds_the_paper_methods_with_its_defaults():
    assert list(methods.REGISTRY) == ["erm", "gmp", "dgc"]
    assert methods.make("gmp") == methods.GMP(samples=3, sigma=0.03, rho=0.5)  # Algorithm 2
    assert methods.make("dgc") == methods.DGC(alpha=0.1, initial_norm=50.0, start_epoch=15)
    for cls in methods.REGISTRY.values():
        assert "V_t" in cls.description  # says which gradient V_t describes


def test_each_method_optimizer_is_its_transform_then_the_logged_learning_rates(mlp):
    params, batch = mlp
    grad_fn = jaxgen.batch_grad_fn(mlp_loss, batch)
    lrs = [0.1, 0.05]
    key = jax.random.key(3)
    for method, piece in [
        (methods.ERM(), optax.identity()),
        (methods.GMP(samples=2), jaxgen.gmp(2, 0.03, 0.5, key=key, mode="sequential")),
        (methods.DGC(start_epoch=0, initial_norm=1e-3), jaxgen.dynamic_clip(1e-3, 0.1, 0)),
    ]:
        ours = methods.optimizer(method, lrs, momentum=0.0, key=key, steps_per_epoch=1)
        reference = optax.chain(piece, optax.sgd(0.05))
        state, ref_state = ours.init(params), reference.init(params)
        for _ in range(2):  # the second update uses the second learning rate
            updates, state = ours.update(grad_fn(params), state, params, grad_fn=grad_fn)
            expected, ref_state = reference.update(
                grad_fn(params), ref_state, params, grad_fn=grad_fn
            )
        chex.assert_trees_all_close(updates, expected, rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class Flooding(methods.Method):
    """The README's example: flooding (Ishida et al., 2020) as a gradient post-process.

    The README decorates it with ``@methods.register``; here the test registers it for
    its own duration only.
    """

    name = "test-flooding"
    description = "flooding: ascend when the minibatch loss is below b; V_t of the plain gradient"
    level: float = options.option(0.02, "flooding: the level b", options.POSITIVE)

    def post(self, loss, grad):
        return jax.tree_util.tree_map(lambda g: jnp.sign(loss - self.level) * g, grad)

    def summary(self):
        return f"flooding (b={self.level})"


def test_a_new_method_needs_one_class_and_reaches_the_step_and_the_cli(mlp, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, Flooding.name, Flooding)
    params, batch = mlp
    optimizer = optax.with_extra_args_support(optax.sgd(1.0))
    state = TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params), jax.random.key(0))
    high = make_train_step(mlp_loss, optimizer, Flooding(level=100.0))(state, batch)[0]
    plain = make_train_step(mlp_loss, optimizer, methods.ERM())(state, batch)[0]
    ascent = jax.tree_util.tree_map(lambda p, q: 2 * p - q, params, plain.params)
    chex.assert_trees_all_close(high.params, ascent, rtol=1e-5)  # below the flood: ascend

    argv = ["bound", "--method", "test-flooding", "--test-flooding-level", "0.5", "--epochs", "1",
            "--width", "8", "--num-train", "60", "--batch-size", "20", "--hessian-probes", "2",
            "--flatness-samples", "2", "--no-progress", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["method"] == {"name": "test-flooding", "level": 0.5}
    assert result["optimizer"].endswith("with flooding (b=0.5)")
