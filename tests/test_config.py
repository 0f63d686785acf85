"""The run configuration: one definition per field, validated once."""

import dataclasses

import numpy as np
import optax
import pytest

from jaxgen.experiments import config, methods
from jaxgen.experiments.config import TrainConfig
from jaxgen.experiments.options import ConfigError


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"epochs": 2.5}, "epochs must be an integer >= 1, got 2.5"),
        ({"lr": -1.0}, "lr must be a finite number > 0, got -1.0"),
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"label_noise": 1.5}, r"label_noise must lie in \[0, 1\], got 1.5"),
        ({"momentum": 1.0}, r"momentum must lie in \[0, 1\), got 1.0"),
        ({"model": "transformer"}, "model must be one of linear, two-layer-relu, mlp"),
        ({"dispersion_method": "exact"}, "dispersion_method must be one of auto, ghost, vmap"),
        ({"hessian_method": "exact"}, r"hessian_method must be one of hutchinson, hutch\+\+"),
        (
            {"hessian_method": "hutch++", "hessian_probes": 2},
            r"hessian_probes must be >= 3 with hessian_method hutch\+\+, got 2",
        ),
        ({"lr_milestones": (0,)}, r"lr_milestones must be an integer >= 1, got \(0,\)"),
        ({"num_train": 0}, "num_train must be an integer >= 1, got 0"),
        ({"method": "gmp"}, "method must be a training method"),
    ],
)
def test_bad_configurations_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**change)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("gmp", {"rho": 1.5}, r"gmp_rho must lie in \[0, 1\], got 1.5"),
        ("gmp", {"samples": 0}, "gmp_samples must be an integer >= 1, got 0"),
        ("gmp", {"mode": "pmap"}, "gmp_mode must be one of auto, vmap, sequential, got 'pmap'"),
        ("dgc", {"start_epoch": -1}, "dgc_start_epoch must be an integer >= 0, got -1"),
        ("dgc", {"alpha": 0.0}, r"dgc_alpha must lie in \(0, 1\], got 0.0"),
        ("dgc", {"alpha": 2.0}, r"dgc_alpha must lie in \(0, 1\], got 2.0"),
        ("lookahead", {}, "method must be one of erm, gmp, amp, sam, dgc, dropout"),
    ],
)
def test_bad_method_hyperparameters_name_the_method_and_field(name, change, message):
    with pytest.raises(ConfigError, match=message):
        methods.make(name, **change)


def test_optional_fields_accept_none_and_the_config_is_hashable():
    a = TrainConfig(num_train=None, data_dir=None, method=methods.GMP(sigma=0.05))
    b = TrainConfig(method=methods.GMP(sigma=0.05))
    assert a == b and hash(a) == hash(b) and a != TrainConfig()


def test_as_dict_is_plain_json_and_round_trips():
    original = TrainConfig(lr_milestones=(2, 4), method=methods.DGC(alpha=0.2))
    values = original.as_dict()
    assert values["lr_milestones"] == [2, 4]
    assert values["method"] == {
        "name": "dgc",
        "alpha": 0.2,
        "initial_norm": 50.0,
        "start_epoch": 15,
    }
    assert TrainConfig.from_dict(values) == original


def test_learning_rate_milestones():
    c = TrainConfig(lr=0.1, epochs=4, lr_milestones=(1, 3), lr_factor=0.5)
    lrs = c.learning_rates(2)
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.05, 0.05, 0.05, 0.05, 0.025, 0.025])
    schedule = optax.piecewise_constant_schedule(0.1, {2: 0.5, 6: 0.5})
    np.testing.assert_allclose([schedule(t) for t in range(8)], lrs, rtol=1e-6)


def test_the_optimizer_description_names_momentum_and_the_method():
    assert TrainConfig().optimizer_description == (
        "plain SGD (no momentum: the setting of the theory)"
    )
    gmp = TrainConfig(momentum=0.9, method=methods.GMP())
    assert gmp.optimizer_description == (
        "SGD with momentum 0.9 (the bounds assume plain SGD), with GMP (k=3, σ=0.03, ρ=0.5; "
        "V_t is that of the clean minibatch gradient)"
    )


def test_presets_fill_in_the_papers_settings_and_overrides_win():
    mnist = config.from_preset("paper-mnist-mlp", epochs=3)
    assert (mnist.dataset, mnist.model, mnist.width) == ("mnist", "mlp", 512)
    assert (mnist.batch_size, mnist.lr, mnist.epochs) == (60, 0.01, 3)
    alexnet = config.from_preset("paper-cifar10-alexnet")
    assert (alexnet.dataset, alexnet.model, alexnet.epochs, alexnet.lr) == (
        "cifar10",
        "alexnet",
        200,
        0.001,
    )
    for preset in config.PRESETS.values():
        assert preset.setting.startswith("Wang & Mao") and preset.command.startswith("jaxgen ")
    assert config.from_preset(None) == TrainConfig()
    with pytest.raises(ConfigError, match="preset must be one of"):
        config.from_preset("paper-imagenet")


def test_every_field_has_help_and_a_check():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata["help"] and field.metadata["check"], field.name
