"""Training methods: each a small frozen dataclass of its hyper-parameters and a few hooks.

One training step serves every method (``step.py``); a method changes it only through
its hooks, each the identity for ERM:

    batch'  = method.batch(params, batch, key)               # e.g. mixup, adversarial inputs
    loss_i  = method.loss(loss_fn)                           # e.g. label smoothing
    stats   = gradient_dispersion(loss_i, params, batch')    # ḡ and V_t in one pass
    grad    = method.post(stats.loss, stats.grad)            # e.g. flooding
    updates = optax.chain(method.transform(...), sgd)        # e.g. GMP, clipping

Hyper-parameters are ``options`` fields, so each also becomes a command-line flag named
``--<method>-<field>`` with the paper's default. Adding a method is one class here with
``@register``: the CLI, the config and the result files pick it up.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import optax

import jaxgen
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import options
from jaxgen.experiments.options import FRACTION, NON_NEGATIVE_INT, POSITIVE, POSITIVE_INT, UNIT

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method. Subclasses set ``name`` and ``description`` and override hooks.

    ``description`` is one line that says what the method does and which gradient the
    tracked ``V_t`` describes.
    """

    name: ClassVar[str]
    description: ClassVar[str]

    def __post_init__(self):
        options.validate(self, prefix=f"{self.name}_")

    def transform(
        self, *, key: jax.Array, steps_per_epoch: int
    ) -> optax.GradientTransformationExtraArgs | None:
        """The optax piece chained before SGD (``None``: none)."""
        return None

    def loss(self, loss_fn: LossFn) -> LossFn:
        """The per-example loss the step differentiates."""
        return loss_fn

    def batch(self, params: PyTree, batch: PyTree, key: jax.Array) -> PyTree:
        """The minibatch the step trains on (``key``: fresh for every step)."""
        return batch

    def post(self, loss: jax.Array, grad: PyTree) -> PyTree:
        """The gradient handed to the optimizer, from the minibatch loss and gradient."""
        return grad

    def summary(self) -> str:
        """How the run's optimizer description names the method ("" for plain SGD)."""
        return ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name} | dataclasses.asdict(self)


def make(name: str, **hyperparameters: Any) -> Method:
    """The method ``name`` with the given hyper-parameters (the rest at their defaults)."""
    if name not in REGISTRY:
        raise options.ConfigError(f"method must be one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name](**hyperparameters)


@register
@dataclasses.dataclass(frozen=True)
class ERM(Method):
    name = "erm"
    description = "plain SGD on the minibatch loss; V_t is that of the minibatch gradient"


@register
@dataclasses.dataclass(frozen=True)
class GMP(Method):
    """Gaussian model perturbation, Algorithm 2 of Wang & Mao (ICLR 2022)."""

    name = "gmp"
    description = (
        "Gaussian model perturbation (Algorithm 2): (1−ρ)∇L_B(w) + ρ·mean_j ∇L_B(w+Δ_j); "
        "V_t is that of the clean minibatch gradient"
    )
    samples: int = options.option(3, "GMP: k, perturbations per step", POSITIVE_INT)
    sigma: float = options.option(0.03, "GMP: σ of each perturbation", POSITIVE)
    rho: float = options.option(0.5, "GMP: ρ, the weight of the perturbed gradients", UNIT)

    def transform(self, *, key, steps_per_epoch):
        return jaxgen.gmp(self.samples, self.sigma, self.rho, key=key, mode="sequential")

    def summary(self):
        return (
            f"GMP (k={self.samples}, σ={self.sigma}, ρ={self.rho}; "
            "V_t is that of the clean minibatch gradient)"
        )


@register
@dataclasses.dataclass(frozen=True)
class DGC(Method):
    """Dynamic gradient clipping, Algorithm 1 of Wang & Mao (ICLR 2022)."""

    name = "dgc"
    description = (
        "dynamic gradient clipping (Algorithm 1): past T_c, g ← α·G·g/‖g‖ when ‖g‖ > G, "
        "else G ← ‖g‖; V_t is that of the unclipped minibatch gradient"
    )
    alpha: float = options.option(0.1, "clipping: α, the clipped step's fraction of G", FRACTION)
    initial_norm: float = options.option(50.0, "clipping: the initial threshold G", POSITIVE)
    start_epoch: int = options.option(15, "clipping: T_c, in epochs", NON_NEGATIVE_INT)

    def transform(self, *, key, steps_per_epoch):
        start = self.start_epoch * steps_per_epoch
        return jaxgen.dynamic_clip(self.initial_norm, self.alpha, start)

    def summary(self):
        return (
            f"dynamic gradient clipping (α={self.alpha}, G₀={self.initial_norm}, "
            f"from epoch {self.start_epoch})"
        )


def optimizer(
    method: Method, learning_rates: Any, *, momentum: float, key: jax.Array, steps_per_epoch: int
) -> optax.GradientTransformationExtraArgs:
    """The method's optax piece, then SGD stepping by ``learning_rates[t]`` at update ``t``.

    ``learning_rates`` is the array the logs and the bounds use, so the optimizer and
    the bounds cannot disagree about ``λ_t``.
    """
    rates = jax.numpy.asarray(learning_rates, jax.numpy.float32)

    def schedule(count):
        return rates[jax.numpy.minimum(count, rates.size - 1)]

    sgd = optax.sgd(schedule, momentum=momentum or None)
    piece = method.transform(key=key, steps_per_epoch=steps_per_epoch)
    if piece is None:
        return optax.with_extra_args_support(sgd)
    return optax.chain(piece, sgd)
