"""Training methods: each a small frozen dataclass of its hyper-parameters and a few hooks.

One training step serves every method (``step.py``); a method changes it only through
its hooks, each the identity for ERM:

    batch'  = method.batch(params, batch, key, task)         # mixup, smoothing, adversarial
    loss_i  = method.loss(loss_fn)                           # the per-example loss
    stats   = gradient_dispersion(loss_i, params, batch')    # ḡ and V_t in one pass
    grad    = method.gradient(loss_i, params, batch', ḡ, key) # per-example clipping, DP
    grad    = method.post(stats.loss, grad)                  # flooding
    updates = optax.chain(method.transform(...), sgd)        # GMP, AMP, SAM, clipping

plus ``model_dropout``, the dropout rate the model is built with. Hyper-parameters are
``options`` fields, so each also becomes a command-line flag ``--<method>-<field>``
with the paper's default (Wang & Mao, ICLR 2022, "GMP tables"). Adding a method is one
class here with ``@register``: the CLI, the config and the result files pick it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxgen
from jaxgen._gmp import MODES as GMP_MODES
from jaxgen._privacy import ACCOUNTANT
from jaxgen._random import gaussian_like
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import options
from jaxgen.experiments.options import (
    FRACTION,
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE,
    POSITIVE_INT,
    UNIT,
)

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


class Task(NamedTuple):
    """What a batch hook may use: the minibatch loss and the number of classes.

    ``batch_loss(params, batch)`` is the mean training loss of a batch (for BatchNorm
    models, with batch statistics that are then discarded); ``num_classes`` is 0 for the
    regression models of Theorems 2 and 3.
    """

    batch_loss: Callable[[PyTree, PyTree], jax.Array]
    num_classes: int


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method. Subclasses set ``name`` and ``description`` and override hooks.

    ``description`` is one line that says what the method does and which gradient the
    tracked ``V_t`` describes.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    needs_classes: ClassVar[bool] = False  # soft labels: not for the regression models
    per_example: ClassVar[bool] = False  # needs per-example losses: not for BatchNorm models

    def __post_init__(self):
        options.validate(self, prefix=f"{self.name}_")

    @property
    def model_dropout(self) -> float:
        """The dropout rate the model is built with (0: none)."""
        return 0.0

    def transform(
        self, *, key: jax.Array, steps_per_epoch: int, mesh: Mesh | None = None
    ) -> optax.GradientTransformationExtraArgs | None:
        """The optax piece chained before SGD (``None``: none); ``mesh``: the run's mesh."""
        return None

    def loss(self, loss_fn: LossFn) -> LossFn:
        """The per-example loss the step differentiates."""
        return loss_fn

    def batch(self, params: PyTree, batch: PyTree, key: jax.Array, task: Task) -> PyTree:
        """The minibatch the step trains on (``key``: fresh for every step)."""
        return batch

    def gradient(
        self, loss_fn: LossFn, params: PyTree, batch: PyTree, grad: PyTree, key: jax.Array
    ) -> PyTree:
        """The gradient the step descends instead of the clean minibatch mean ``grad``
        (per-example clipping, DP-SGD; ``key``: fresh for every step). ``V_t`` stays that
        of ``grad``."""
        return grad

    def privacy(self, *, n: int, batch_size: int, steps: int) -> dict[str, Any] | None:
        """The privacy a run spends (``result.json``'s ``privacy``), or ``None``."""
        return None

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


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    """Integer labels as one-hot rows; soft labels (already rows) unchanged."""
    if labels.ndim == 2:
        return labels
    return jax.nn.one_hot(labels, num_classes)


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
    samples: int = options.option(3, "GMP: k, perturbations per step (paper: 3, 10)", POSITIVE_INT)
    sigma: float = options.option(0.03, "GMP: σ of each perturbation", POSITIVE)
    rho: float = options.option(0.5, "GMP: ρ, the weight of the perturbed gradients", UNIT)
    mode: str = options.option(
        "auto",
        "GMP: how the k perturbed gradients are evaluated (jaxgen.gmp; auto: the faster for "
        "the backend, vmap on accelerators, sequential on a CPU)",
        options.one_of(GMP_MODES),
    )

    def transform(self, *, key, steps_per_epoch, mesh=None):
        sharding = None
        if mesh is not None and "perturb" in mesh.axis_names:  # k passes over "perturb"
            sharding = NamedSharding(mesh, PartitionSpec("perturb"))
        return jaxgen.gmp(
            self.samples,
            self.sigma,
            self.rho,
            key=key,
            mode=self.mode,
            perturbation_sharding=sharding,
        )

    def summary(self):
        return (
            f"GMP (k={self.samples}, σ={self.sigma}, ρ={self.rho}; "
            "V_t is that of the clean minibatch gradient)"
        )


@register
@dataclasses.dataclass(frozen=True)
class AMP(Method):
    """Adversarial model perturbation (Zheng, Zhang & Mao, CVPR 2021)."""

    name = "amp"
    description = (
        "adversarial model perturbation: the gradient at the loss's maximum within an L2 "
        "ball of radius ε around w; V_t is that of the clean minibatch gradient"
    )
    epsilon: float = options.option(
        0.5, "AMP: ε, the ball's radius (paper: 0.5 PreActResNet18, 0.1 VGG16)", NON_NEGATIVE
    )
    inner_lr: float = options.option(
        1.0, "AMP: ascent step (paper: 1 PreActResNet18, 0.2 VGG16)", NON_NEGATIVE
    )
    inner_steps: int = options.option(1, "AMP: ascent steps", POSITIVE_INT)

    def transform(self, *, key, steps_per_epoch, mesh=None):
        return jaxgen.amp(self.epsilon, self.inner_lr, self.inner_steps)

    def summary(self):
        return f"AMP (ε={self.epsilon}, ascent step {self.inner_lr}, {self.inner_steps} step(s))"


@register
@dataclasses.dataclass(frozen=True)
class SAM(Method):
    """Sharpness-aware minimisation (Foret et al., 2021) through ``optax.contrib.sam``."""

    name = "sam"
    description = (
        "sharpness-aware minimisation (optax.contrib.sam): the gradient at "
        "w + ρ∇L_B/‖∇L_B‖; V_t is that of the clean minibatch gradient"
    )
    rho: float = options.option(0.05, "SAM: ρ, the ascent radius", POSITIVE)

    def transform(self, *, key, steps_per_epoch, mesh=None):
        ascent = optax.chain(optax.contrib.normalize(), optax.sgd(self.rho))
        return optax.contrib.sam(optax.identity(), ascent, sync_period=2, opaque_mode=True)

    def summary(self):
        return f"SAM (ρ={self.rho}, optax.contrib.sam)"


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

    def transform(self, *, key, steps_per_epoch, mesh=None):
        start = self.start_epoch * steps_per_epoch
        return jaxgen.dynamic_clip(self.initial_norm, self.alpha, start)

    def summary(self):
        return (
            f"dynamic gradient clipping (α={self.alpha}, G₀={self.initial_norm}, "
            f"from epoch {self.start_epoch})"
        )


@register
@dataclasses.dataclass(frozen=True)
class Dropout(Method):
    """Dropout before the model's last layer(s) (``models.py`` says where)."""

    name = "dropout"
    description = (
        "dropout with a fresh mask per example and step; V_t is that of the minibatch "
        "gradient under those masks"
    )
    rate: float = options.option(0.1, "dropout: the rate", UNIT)

    @property
    def model_dropout(self):
        return self.rate

    def batch(self, params, batch, key, task):
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        return batch | {"key": jax.random.split(key, size)}

    def summary(self):
        return f"dropout (rate {self.rate})"


@register
@dataclasses.dataclass(frozen=True)
class LabelSmoothing(Method):
    """Label smoothing: the targets are (1 − ε)·one-hot + ε/C."""

    name = "label-smoothing"
    description = (
        "label smoothing: cross-entropy against (1−ε)·one-hot + ε/C; V_t is that of the "
        "smoothed loss"
    )
    needs_classes = True
    epsilon: float = options.option(0.2, "label smoothing: ε", UNIT)

    def batch(self, params, batch, key, task):
        targets = _one_hot(batch["y"], task.num_classes)
        return batch | {"y": (1.0 - self.epsilon) * targets + self.epsilon / task.num_classes}

    def summary(self):
        return f"label smoothing (ε={self.epsilon})"


@register
@dataclasses.dataclass(frozen=True)
class Flooding(Method):
    """Flooding (Ishida et al., 2020): descend above the level b, ascend below it."""

    name = "flooding"
    description = (
        "flooding: the gradient of abs(L_B − b) + b, i.e. sign(L_B − b)·∇L_B; V_t is that "
        "of the plain minibatch gradient"
    )
    level: float = options.option(0.02, "flooding: the level b", NON_NEGATIVE)

    def post(self, loss, grad):
        sign = jnp.sign(loss - self.level)
        return jax.tree_util.tree_map(lambda g: (sign * g).astype(g.dtype), grad)

    def summary(self):
        return f"flooding (b={self.level})"


@register
@dataclasses.dataclass(frozen=True)
class Mixup(Method):
    """MixUp (Zhang et al., 2018): one λ ~ Beta(α, α) per minibatch, pairs by permutation."""

    name = "mixup"
    description = (
        "mixup: train on λx_i + (1−λ)x_π(i) with targets mixed alike, λ ~ Beta(α, α); "
        "V_t is that of the mixed minibatch"
    )
    needs_classes = True
    alpha: float = options.option(1.0, "mixup: α of Beta(α, α)", POSITIVE)

    def batch(self, params, batch, key, task):
        key_lambda, key_pairs = jax.random.split(key)
        lam = jax.random.beta(key_lambda, self.alpha, self.alpha)
        pairs = jax.random.permutation(key_pairs, batch["x"].shape[0])
        targets = _one_hot(batch["y"], task.num_classes)
        return batch | {
            "x": (lam * batch["x"] + (1.0 - lam) * batch["x"][pairs]).astype(batch["x"].dtype),
            "y": lam * targets + (1.0 - lam) * targets[pairs],
        }

    def summary(self):
        return f"mixup (α={self.alpha})"


@register
@dataclasses.dataclass(frozen=True)
class Adversarial(Method):
    """Adversarial training: one L∞ PGD step of size ε on the inputs (FGSM from x)."""

    name = "adversarial"
    description = (
        "adversarial training: train on x + ε·sign(∇_x L_B), one L∞ step; V_t is that "
        "of the adversarial minibatch"
    )
    epsilon: float = options.option(1 / 255, "adversarial: ε, the L∞ step", NON_NEGATIVE)

    def batch(self, params, batch, key, task):
        def loss_of_inputs(x):
            return task.batch_loss(params, batch | {"x": x})

        direction = jnp.sign(jax.grad(loss_of_inputs)(batch["x"]))
        return batch | {"x": jax.lax.stop_gradient(batch["x"] + self.epsilon * direction)}

    def summary(self):
        return f"adversarial training (one L∞ step, ε={self.epsilon:.4g})"


@register
@dataclasses.dataclass(frozen=True)
class PerExampleClip(Method):
    """Per-example gradient clipping (``jaxgen.clipped_grad``), without noise."""

    name = "per-example-clip"
    description = (
        "per-example clipping: the mean of c_i·g_i, c_i = min(1, C/‖g_i‖) "
        "(jaxgen.clipped_grad); V_t is that of the clean minibatch gradient"
    )
    per_example = True
    max_norm: float = options.option(1.0, "per-example clipping: C, the threshold", POSITIVE)
    quantile: float = options.option(
        0.0,
        "per-example clipping: when > 0, C is this quantile of the batch's per-example "
        "gradient norms instead of --per-example-clip-max-norm",
        UNIT,
    )

    def gradient(self, loss_fn, params, batch, grad, key):
        if self.quantile > 0:
            return jaxgen.clipped_grad(loss_fn, params, batch, quantile=self.quantile).grad
        return jaxgen.clipped_grad(loss_fn, params, batch, max_norm=self.max_norm).grad

    def summary(self):
        if self.quantile > 0:
            return f"per-example clipping (C = the batch's {self.quantile:g}-quantile norm)"
        return f"per-example clipping (C={self.max_norm})"


# What dp_epsilon's number assumes, in result.json beside it.
DP_SAMPLING = (
    "epsilon is what Poisson sampling with rate q = b/n would give (each example in each "
    "step independently, with probability q); this run drew fixed-size batches from a "
    "shuffled epoch, which that guarantee does not cover and which can be less private "
    "(Chua et al., ICML 2024)"
)


@register
@dataclasses.dataclass(frozen=True)
class DPSGD(Method):
    """DP-SGD (Abadi et al., CCS 2016): per-example clipping, then Gaussian noise."""

    name = "dp-sgd"
    description = (
        "DP-SGD: (1/b)(Σ_i c_i·g_i + N(0, σ²C²I)), c_i = min(1, C/‖g_i‖); privacy spent by "
        "dp-accounting's RDP accountant; V_t is that of the clean minibatch gradient"
    )
    per_example = True
    max_norm: float = options.option(1.0, "DP-SGD: C, the clipping threshold", POSITIVE)
    noise_multiplier: float = options.option(
        1.0, "DP-SGD: σ, the noise's standard deviation in units of C", NON_NEGATIVE
    )
    delta: float = options.option(1e-5, "DP-SGD: δ of the reported (ε, δ)", FRACTION)

    def gradient(self, loss_fn, params, batch, grad, key):
        clipped = jaxgen.clipped_grad(loss_fn, params, batch, max_norm=self.max_norm).grad
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        noise = gaussian_like(key, clipped, self.noise_multiplier * self.max_norm / size)
        return optax.tree.add(clipped, noise)

    def privacy(self, *, n, batch_size, steps):
        rate = batch_size / n
        return {
            "epsilon": jaxgen.dp_epsilon(self.noise_multiplier, rate, steps, self.delta),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "max_norm": self.max_norm,
            "sampling_rate": rate,
            "steps": steps,
            "accountant": ACCOUNTANT,
            "sampling": DP_SAMPLING,
        }

    def summary(self):
        return f"DP-SGD (C={self.max_norm}, σ={self.noise_multiplier}, δ={self.delta:g})"


def optimizer(
    method: Method,
    learning_rates: Any,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    key: jax.Array,
    steps_per_epoch: int,
    mesh: Mesh | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The method's optax piece, weight decay, then SGD stepping by ``learning_rates[t]``.

    ``learning_rates`` is the array the logs and the bounds use, so the optimizer and
    the bounds cannot disagree about ``λ_t``. Weight decay is added to the gradient
    before momentum, as PyTorch's SGD does (the protocol of the paper's tables).
    """
    rates = jnp.asarray(learning_rates, jnp.float32)

    def schedule(count):
        return rates[jnp.minimum(count, rates.size - 1)]

    pieces = [method.transform(key=key, steps_per_epoch=steps_per_epoch, mesh=mesh)]
    if weight_decay:
        pieces.append(optax.add_decayed_weights(weight_decay))
    pieces.append(optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
    pieces = [piece for piece in pieces if piece is not None]
    if len(pieces) == 1:
        return optax.with_extra_args_support(pieces[0])
    return optax.chain(*pieces)
