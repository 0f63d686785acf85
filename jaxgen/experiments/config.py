"""The configuration of a run: one frozen dataclass, validated once, that makes the CLI.

Every field is an ``options.option`` with its help text and check: ``TrainConfig(...)``
validates them all on construction (``ConfigError`` naming the field), and the
``jaxgen`` subcommands generate one flag per field from the same definitions. The
training method is a ``methods.Method`` value with its own hyper-parameters.
Everything that determines a run's numbers is here, and nothing else: resuming checks
that a checkpoint was written with an equal configuration.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from jaxgen.experiments import data, methods, models
from jaxgen.experiments.instruments import INSTRUMENTS
from jaxgen.experiments.instruments import parse as parse_instruments
from jaxgen.experiments.options import (
    ANY_INT,
    FLAG,
    HALF_OPEN_UNIT,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    TEXT,
    UNIT,
    Check,
    ConfigError,
    list_of,
    one_of,
    option,
    validate,
)

DISPERSION_METHODS = ("auto", "ghost", "vmap")
HESSIAN_METHODS = ("hutchinson", "hutch++")
AUGMENTATIONS = ("none", "crop", "crop-flip", "paper")
_METHOD = Check(
    "be a training method (jaxgen.experiments.methods)",
    str,
    lambda v: isinstance(v, methods.Method),
)

__all__ = ["ConfigError", "PRESETS", "Preset", "TrainConfig"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a run (and nothing else)."""

    # Data.
    dataset: str = option("mnist1d", "dataset", one_of(data.DATASETS))
    data_dir: str | None = option(
        None, "TFDS data directory (prepared datasets)", TEXT, optional=True
    )
    num_train: int | None = option(
        None, "use the first N training examples", POSITIVE_INT, optional=True
    )
    label_noise: float = option(0.0, "probability that a training label is random", UNIT)
    always_wrong: bool = option(
        False, "noisy labels are always wrong (default: uniform, may be right)", FLAG
    )
    data_seed: int = option(42, "seed of the generated MNIST-1D data and the label noise", ANY_INT)
    # Model.
    model: str = option("mlp", "model", one_of(models.MODELS))
    width: int = option(512, "hidden units / base channels", POSITIVE_INT)
    # Training.
    method: methods.Method = option(methods.ERM(), "training method", _METHOD, flag=False)
    epochs: int = option(20, "epochs", POSITIVE_INT)
    batch_size: int = option(60, "minibatch size b", POSITIVE_INT)
    lr: float = option(0.01, "learning rate λ", POSITIVE)
    lr_milestones: tuple[int, ...] = option(
        (), "epochs at which the learning rate is multiplied by --lr-factor", list_of(POSITIVE_INT)
    )
    lr_factor: float = option(0.1, "learning-rate factor at each milestone", POSITIVE)
    momentum: float = option(0.0, "SGD momentum; 0 is the plain SGD of the theory", HALF_OPEN_UNIT)
    nesterov: bool = option(False, "Nesterov momentum (with --momentum)", FLAG)
    weight_decay: float = option(
        0.0, "L2 weight decay added to the gradient (as in PyTorch's SGD)", NON_NEGATIVE
    )
    augment: str = option(
        "none",
        "on-device augmentation of image batches: random crop after 4-pixel zero padding, "
        "and horizontal flips; paper: crop-flip on CIFAR, crop on SVHN",
        one_of(AUGMENTATIONS),
    )
    seed: int = option(0, "seed of the initialisation, data order and every estimate", ANY_INT)
    checkpoint_every: int = option(0, "steps between checkpoints (0: one epoch)", NON_NEGATIVE_INT)
    # Bound tracking.
    track_every: int = option(
        1, "measure V_t every K steps (held constant in between)", POSITIVE_INT
    )
    dispersion_method: str = option(
        "auto", "how V_t is computed (jaxgen.gradient_dispersion)", one_of(DISPERSION_METHODS)
    )
    bounds: bool = option(
        True, "at the end, measure Tr H and the flatness and compute every bound", FLAG
    )
    R: float = option(0.1, "sub-Gaussian constant of the loss (the authors' choice)", POSITIVE)
    hessian_probes: int = option(100, "Hutchinson probes (products) for Tr H", POSITIVE_INT)
    hessian_method: str = option(
        "hutchinson",
        "estimator of Tr H (jaxgen.hessian_trace); hutch++ is better where a few eigenvalues "
        "dominate (benchmarks/hessian.py) and needs --hessian-probes >= 3",
        one_of(HESSIAN_METHODS),
    )
    flatness_samples: int = option(32, "Monte Carlo samples of the flatness term", POSITIVE_INT)
    # Instruments.
    instruments: str = option(
        "",
        "comma-separated curvature and gradient-noise instruments measured during training "
        f"({', '.join(INSTRUMENTS)}; jaxgen.experiments.instruments)",
        TEXT,
    )
    instruments_every: int = option(1, "measure the instruments every E epochs", POSITIVE_INT)
    instruments_examples: int = option(
        256, "training examples (a fixed subset) the instruments are measured on", POSITIVE_INT
    )

    def __post_init__(self):
        validate(self)
        try:
            parse_instruments(self.instruments)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.hessian_method == "hutch++" and self.hessian_probes < 3:
            raise ConfigError(
                f"hessian_probes must be >= 3 with hessian_method hutch++, "
                f"got {self.hessian_probes}"
            )

    @property
    def optimizer_description(self) -> str:
        """Which optimizer the run used, as ``result.json`` and the report say it."""
        extras = (", Nesterov" if self.nesterov else "") + (
            f", weight decay {self.weight_decay}" if self.weight_decay else ""
        )
        if self.momentum == 0 and not extras:
            text = "plain SGD (no momentum: the setting of the theory)"
        else:
            text = f"SGD with momentum {self.momentum}{extras} (the bounds assume plain SGD)"
        summary = self.method.summary()
        return f"{text}, with {summary}" if summary else text

    def notices(self) -> list[str]:
        """Settings that are valid but do nothing in this configuration."""
        notices = []
        late = [m for m in self.lr_milestones if m >= self.epochs]
        if late:
            notices.append(
                f"lr_milestones {', '.join(map(str, late))} not before the last epoch "
                f"({self.epochs}): the learning rate never changes there"
            )
        if self.always_wrong and self.label_noise == 0:
            notices.append("always_wrong does nothing without label_noise > 0")
        if self.nesterov and self.momentum == 0:
            notices.append("nesterov does nothing without momentum > 0")
        return notices

    def learning_rates(self, steps_per_epoch: int) -> np.ndarray:
        """``λ_t`` for every step: ``lr``, times ``lr_factor`` at each milestone epoch."""
        epochs = np.arange(self.epochs * steps_per_epoch) // steps_per_epoch
        drops = np.zeros(epochs.shape, np.float64)
        for milestone in self.lr_milestones:
            drops += epochs >= milestone
        return self.lr * self.lr_factor**drops

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON values; the method as ``{"name": ..., <hyper-parameters>}``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return values | {"lr_milestones": list(self.lr_milestones), "method": self.method.as_dict()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of ``as_dict``."""
        method = dict(values["method"])
        return cls(
            **values
            | {
                "lr_milestones": tuple(values["lr_milestones"]),
                "method": methods.make(method.pop("name"), **method),
            }
        )


class Preset(NamedTuple):
    """A setting of the paper: what it reproduces, the command, and the values it sets."""

    setting: str
    command: str
    values: dict[str, Any]


PRESETS: dict[str, Preset] = {
    "paper-mnist-mlp": Preset(
        "Wang & Mao (ICLR 2022), Figure 1: MLP 784-512-10 on MNIST, 500 epochs, batch 60, "
        "lr 0.01, plain SGD",
        "jaxgen bound --preset paper-mnist-mlp --data-dir ~/tensorflow_datasets --out runs/mnist",
        {
            "dataset": "mnist",
            "model": "mlp",
            "width": 512,
            "epochs": 500,
            "batch_size": 60,
            "lr": 0.01,
        },
    ),
    "paper-gmp": Preset(
        "Wang & Mao (ICLR 2022), GMP tables: 200 epochs, batch 50, SGD lr 0.1 with Nesterov "
        "momentum 0.9, weight decay 1e-4, lr ×0.1 at epochs 100 and 150, random crop (+ flip "
        "on CIFAR); pick --dataset (svhn_cropped, cifar10, cifar100) and --model (vgg16, "
        "preactresnet18); metric: best test accuracy",
        "jaxgen compare --preset paper-gmp --dataset cifar10 --model preactresnet18 --methods "
        "erm,dropout,label-smoothing,flooding,mixup,adversarial,amp,gmp,gmp:samples=10 "
        "--seeds 10 --data-dir ~/tensorflow_datasets --out runs/gmp-table",
        {
            "epochs": 200,
            "batch_size": 50,
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 1e-4,
            "lr_milestones": (100, 150),
            "lr_factor": 0.1,
            "augment": "paper",
        },
    ),
    "paper-cifar10-alexnet": Preset(
        "Wang & Mao (ICLR 2022), Figure 1: AlexNet-style CNN on CIFAR-10, 200 epochs, "
        "batch 60, lr 0.001, plain SGD",
        "jaxgen bound --preset paper-cifar10-alexnet --data-dir ~/tensorflow_datasets "
        "--out runs/cifar10",
        {
            "dataset": "cifar10",
            "model": "alexnet",
            "width": 64,
            "epochs": 200,
            "batch_size": 60,
            "lr": 0.001,
        },
    ),
}


def from_preset(name: str | None, **overrides: Any) -> TrainConfig:
    """The preset's values (none for ``None``), then ``overrides``."""
    if name is not None and name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    values = dict(PRESETS[name].values) if name is not None else {}
    return TrainConfig(**values | overrides)
