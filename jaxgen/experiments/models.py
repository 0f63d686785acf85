"""Flax NNX models of the paper, and their conversion to pure per-example losses.

Every model accepts one example without a batch axis (what a per-example loss sees) as
well as a batch. ``build`` makes a model by name; ``--width`` changes it for real.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jaxgen.nnx


def _unbatched(call):
    """Let ``__call__`` take one example of ``ndim`` axes as well as a batch."""

    def wrapper(self, x):
        if x.ndim == self.example_ndim:
            return call(self, x[None])[0]
        return call(self, x)

    return wrapper


class Linear(nnx.Module):
    """Theorem 2: ``f(W, X) = Wᵀ X`` with one output, no bias (inputs have ``‖X‖ = 1``)."""

    example_ndim = 1

    def __init__(self, in_features: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jnp.zeros((in_features,)))

    def __call__(self, x):
        return x @ self.w[...]


class TwoLayerReLU(nnx.Module):
    """Theorem 3: ``f = m^{-1/2} Σ_r A_r ReLU(W_rᵀ X)``, ``A_r = ±1`` fixed, ``W`` trained."""

    example_ndim = 1

    def __init__(self, in_features: int, width: int, *, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (width, in_features)))
        signs = jax.random.rademacher(rngs.params(), (width,)).astype(jnp.float32)
        self.signs = nnx.Variable(signs)  # not a Param: never trained

    def __call__(self, x):
        hidden = jax.nn.relu(x @ self.w[...].T)
        return hidden @ self.signs[...] / math.sqrt(self.signs.shape[0])

    def active_fraction(self, x):
        """``Σ_r I{W_rᵀ x >= 0} / m`` for each example of ``x`` (one example or a batch)."""
        return jnp.mean(x @ self.w[...].T >= 0, axis=-1)


class MLP(nnx.Module):
    """Fully connected ReLU network ``in → widths… → out`` on flattened inputs."""

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs, dropout: float = 0.0):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive layer sizes, got {sizes!r}")
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.in_features = sizes[0]

    def __call__(self, x):
        x = x.reshape(*x.shape[: x.ndim - _feature_axes(x, self.in_features)], -1)
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def _feature_axes(x, in_features: int) -> int:
    """How many trailing axes of ``x`` make up one example of ``in_features`` values."""
    size = 1
    for axes in range(1, x.ndim + 1):
        size *= x.shape[-axes]
        if size == in_features:
            return axes
    raise ValueError(f"input of shape {x.shape} does not end in {in_features} features")


class AlexNet(nnx.Module):
    """AlexNet-style CIFAR CNN (Zhang et al., 2017): conv5-pool-conv5-pool-fc-fc-fc.

    ``width`` is the channel count of both convolutions (64 in the original); the fully
    connected layers scale with it (384 and 192 at width 64).
    """

    example_ndim = 3

    def __init__(
        self, input_shape: Sequence[int], num_classes: int, width: int = 64, *, rngs: nnx.Rngs
    ):
        height, side, in_channels = input_shape
        hidden1, hidden2 = 6 * width, 3 * width
        self.conv1 = nnx.Conv(in_channels, width, (5, 5), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (5, 5), rngs=rngs)
        pooled = math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(side / 2) / 2)
        self.fc1 = nnx.Linear(pooled * width, hidden1, rngs=rngs)
        self.fc2 = nnx.Linear(hidden1, hidden2, rngs=rngs)
        self.fc3 = nnx.Linear(hidden2, num_classes, rngs=rngs)

    @_unbatched
    def __call__(self, x):
        pool = lambda h: nnx.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")  # noqa: E731
        x = pool(jax.nn.relu(self.conv1(x)))
        x = pool(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        return self.fc3(jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nnx.Module):
    """VGG16 with BatchNorm for 32×32 inputs; ``width`` is the first block's channels (64)."""

    example_ndim = 3

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, *, rngs: nnx.Rngs):
        layers, channels = [], in_channels
        for item in _VGG16:
            if item == "M":
                layers.append("M")
                continue
            out = item * width // 64
            layers += [nnx.Conv(channels, out, (3, 3), rngs=rngs), nnx.BatchNorm(out, rngs=rngs)]
            channels = out
        self.layers = nnx.List([layer for layer in layers if layer != "M"])
        self.plan = tuple(item == "M" for item in _VGG16)
        self.head = nnx.Linear(channels, num_classes, rngs=rngs)

    @_unbatched
    def __call__(self, x):
        layers = iter(self.layers)
        for is_pool in self.plan:
            if is_pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                conv, norm = next(layers), next(layers)
                x = jax.nn.relu(norm(conv(x)))
        return self.head(x.reshape(x.shape[0], -1))


class PreActBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.BatchNorm(cin, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.norm2 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), use_bias=False, rngs=rngs)
        self.shortcut = nnx.data(None)
        if stride != 1 or cin != cout:
            self.shortcut = nnx.Conv(cin, cout, (1, 1), strides=stride, use_bias=False, rngs=rngs)

    def __call__(self, x):
        out = jax.nn.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(jax.nn.relu(self.norm2(out)))
        return out + shortcut


class PreActResNet18(nnx.Module):
    """Pre-activation ResNet-18 (He et al., 2016) for 32×32 inputs; ``width`` = 64."""

    example_ndim = 3

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(in_channels, width, (3, 3), use_bias=False, rngs=rngs)
        blocks, cin = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**stage
            blocks += [
                PreActBlock(cin, cout, stride, rngs=rngs),
                PreActBlock(cout, cout, 1, rngs=rngs),
            ]
            cin = cout
        self.blocks = nnx.List(blocks)
        self.norm = nnx.BatchNorm(cin, rngs=rngs)
        self.head = nnx.Linear(cin, num_classes, rngs=rngs)

    @_unbatched
    def __call__(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.norm(x))
        return self.head(jnp.mean(x, axis=(1, 2)))


class ModelSpec(NamedTuple):
    """What the experiments need to know about a model besides its code.

    ``convolutional``: the training loop steps it one jitted update at a time instead of
    scanning (XLA:CPU runs convolutions inside loops up to 40× slower; ``step.py``).
    ``regression``: the squared loss on ±1 targets of Theorems 2 and 3, unit-norm inputs.
    ``images``: it needs (H, W, C) inputs.
    """

    make: Callable[[tuple[int, ...], int, int, nnx.Rngs], nnx.Module]
    convolutional: bool = False
    regression: bool = False
    images: bool = False


SPECS: dict[str, ModelSpec] = {
    "linear": ModelSpec(
        lambda shape, classes, width, rngs: Linear(math.prod(shape), rngs=rngs), regression=True
    ),
    "two-layer-relu": ModelSpec(
        lambda shape, classes, width, rngs: TwoLayerReLU(math.prod(shape), width, rngs=rngs),
        regression=True,
    ),
    "mlp": ModelSpec(
        lambda shape, classes, width, rngs: MLP([math.prod(shape), width, classes], rngs=rngs)
    ),
    "alexnet": ModelSpec(
        lambda shape, classes, width, rngs: AlexNet(shape, classes, width, rngs=rngs),
        convolutional=True,
        images=True,
    ),
    "vgg16": ModelSpec(
        lambda shape, classes, width, rngs: VGG16(shape[-1], classes, width, rngs=rngs),
        convolutional=True,
        images=True,
    ),
    "preactresnet18": ModelSpec(
        lambda shape, classes, width, rngs: PreActResNet18(shape[-1], classes, width, rngs=rngs),
        convolutional=True,
        images=True,
    ),
}
MODELS = tuple(SPECS)


def build(
    name: str, input_shape: Sequence[int], num_classes: int, width: int, *, seed: int = 0
) -> nnx.Module:
    """A model by name. ``width``: hidden units (linear: ignored; two-layer ReLU: ``m``;
    MLP: the hidden layer), or base channels (AlexNet, VGG16, PreActResNet18)."""
    if name not in SPECS:
        raise ValueError(f"model must be one of {', '.join(MODELS)}, got {name!r}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    spec = SPECS[name]
    if spec.images and len(input_shape) != 3:
        raise ValueError(
            f"model {name} needs image inputs (H, W, C), got shape {tuple(input_shape)}"
        )
    return spec.make(tuple(input_shape), num_classes, width, nnx.Rngs(seed))


def squared_loss(output: jax.Array, label: jax.Array) -> jax.Array:
    """``½ (t − f)²`` with the ±1 target ``t = 1 − 2·(label mod 2)`` (Theorems 2 and 3)."""
    target = 1.0 - 2.0 * jnp.mod(label, 2).astype(output.dtype)
    return 0.5 * (target - output) ** 2


def per_example_loss(name: str, model: nnx.Module) -> jaxgen.nnx.PerExampleLoss:
    """``jaxgen.nnx.classifier_loss`` with the loss the model ``name`` is trained with."""
    loss = squared_loss if SPECS[name].regression else jaxgen.nnx.cross_entropy
    return jaxgen.nnx.classifier_loss(model, loss=loss)


def correct(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example correctness: argmax for classifiers, the sign of ``f`` for ±1 targets."""
    if outputs.ndim == 1:
        return (outputs >= 0) == (jnp.mod(labels, 2) == 0)
    return jnp.argmax(outputs, axis=-1) == labels
