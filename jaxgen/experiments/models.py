"""Flax NNX models of the paper.

Every model accepts one example without a batch axis (what a per-example loss sees) as
well as a batch. ``build`` makes a model by name; ``--width`` changes it for real.
Models with hidden layers take ``dropout`` (the rate) and, when called, ``key``: one
PRNG key per example (one key for one example), so that each example draws its own
mask; without a key they are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


def _unbatched(call):
    """Let ``__call__`` take one example of ``ndim`` axes as well as a batch."""

    def wrapper(self, x, key=None):
        if x.ndim == self.example_ndim:
            return call(self, x[None], None if key is None else key[None])[0]
        return call(self, x, key)

    return wrapper


def dropout(h: jax.Array, rate: float, key: jax.Array | None, *, stream: int = 0) -> jax.Array:
    """Inverted dropout of ``h`` (one example, or a batch with one key per example)."""
    if key is None or rate == 0.0:
        return h
    if rate >= 1.0:
        return jnp.zeros_like(h)

    def mask(k, shape):
        return jax.random.bernoulli(jax.random.fold_in(k, stream), 1.0 - rate, shape)

    keep = mask(key, h.shape) if key.ndim == 0 else jax.vmap(mask, (0, None))(key, h.shape[1:])
    return jnp.where(keep, h / (1.0 - rate), 0.0).astype(h.dtype)


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
        self.dropout = dropout  # after every hidden layer

    def __call__(self, x, key=None):
        x = x.reshape(*x.shape[: x.ndim - _feature_axes(x, self.in_features)], -1)
        for i, layer in enumerate(self.layers[:-1]):
            x = dropout(jax.nn.relu(layer(x)), self.dropout, key, stream=i)
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
        self,
        input_shape: Sequence[int],
        num_classes: int,
        width: int = 64,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        self.dropout = dropout  # after each hidden fully connected layer
        height, side, in_channels = input_shape
        hidden1, hidden2 = 6 * width, 3 * width
        self.conv1 = nnx.Conv(in_channels, width, (5, 5), rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (5, 5), rngs=rngs)
        pooled = math.ceil(math.ceil(height / 2) / 2) * math.ceil(math.ceil(side / 2) / 2)
        self.fc1 = nnx.Linear(pooled * width, hidden1, rngs=rngs)
        self.fc2 = nnx.Linear(hidden1, hidden2, rngs=rngs)
        self.fc3 = nnx.Linear(hidden2, num_classes, rngs=rngs)

    @_unbatched
    def __call__(self, x, key=None):
        pool = lambda h: nnx.max_pool(h, (3, 3), strides=(2, 2), padding="SAME")  # noqa: E731
        x = pool(jax.nn.relu(self.conv1(x)))
        x = pool(jax.nn.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = dropout(jax.nn.relu(self.fc1(x)), self.dropout, key, stream=0)
        x = dropout(jax.nn.relu(self.fc2(x)), self.dropout, key, stream=1)
        return self.fc3(x)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nnx.Module):
    """VGG16 with BatchNorm for 32×32 inputs; ``width`` is the first block's channels (64)."""

    example_ndim = 3

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        self.dropout = dropout  # before the classifier
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
    def __call__(self, x, key=None):
        layers = iter(self.layers)
        for is_pool in self.plan:
            if is_pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2))
            else:
                conv, norm = next(layers), next(layers)
                x = jax.nn.relu(norm(conv(x)))
        return self.head(dropout(x.reshape(x.shape[0], -1), self.dropout, key))


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

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 64,
        *,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
    ):
        self.dropout = dropout  # before the classifier
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
    def __call__(self, x, key=None):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        x = jax.nn.relu(self.norm(x))
        return self.head(dropout(jnp.mean(x, axis=(1, 2)), self.dropout, key))


class ModelSpec(NamedTuple):
    """What the experiments need to know about a model besides its code.

    ``convolutional``: the training loop steps it one jitted update at a time instead of
    scanning (XLA:CPU runs convolutions inside loops up to 40× slower; ``step.py``).
    ``regression``: the squared loss on ±1 targets of Theorems 2 and 3, unit-norm inputs.
    ``images``: it needs (H, W, C) inputs. ``batchnorm``: it trains with batch statistics,
    so it has no per-example loss in training and ``V_t`` is not measured.
    ``dropout``: it takes a dropout rate.
    """

    make: Callable[..., nnx.Module]  # (input shape, classes, width, rngs, dropout)
    convolutional: bool = False
    regression: bool = False
    images: bool = False
    batchnorm: bool = False
    dropout: bool = True


SPECS: dict[str, ModelSpec] = {
    "linear": ModelSpec(
        lambda shape, classes, width, rngs, dropout: Linear(math.prod(shape), rngs=rngs),
        regression=True,
        dropout=False,
    ),
    "two-layer-relu": ModelSpec(
        lambda shape, classes, width, rngs, dropout: TwoLayerReLU(
            math.prod(shape), width, rngs=rngs
        ),
        regression=True,
        dropout=False,
    ),
    "mlp": ModelSpec(
        lambda shape, classes, width, rngs, dropout: MLP(
            [math.prod(shape), width, classes], rngs=rngs, dropout=dropout
        )
    ),
    "alexnet": ModelSpec(
        lambda shape, classes, width, rngs, dropout: AlexNet(
            shape, classes, width, rngs=rngs, dropout=dropout
        ),
        convolutional=True,
        images=True,
    ),
    "vgg16": ModelSpec(
        lambda shape, classes, width, rngs, dropout: VGG16(
            shape[-1], classes, width, rngs=rngs, dropout=dropout
        ),
        convolutional=True,
        images=True,
        batchnorm=True,
    ),
    "preactresnet18": ModelSpec(
        lambda shape, classes, width, rngs, dropout: PreActResNet18(
            shape[-1], classes, width, rngs=rngs, dropout=dropout
        ),
        convolutional=True,
        images=True,
        batchnorm=True,
    ),
}
MODELS = tuple(SPECS)


def build(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    width: int,
    *,
    seed: int = 0,
    dropout: float = 0.0,
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
    if dropout and not spec.dropout:
        raise ValueError(f"model {name} has no hidden layer to apply dropout to")
    return spec.make(tuple(input_shape), num_classes, width, nnx.Rngs(seed), dropout)
