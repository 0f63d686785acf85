"""Flax NNX models, and their conversion to the pure per-example losses jaxgen takes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """Fully connected ReLU network ``in → widths… → out``."""

    def __init__(self, sizes: Sequence[int], *, rngs: nnx.Rngs):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"sizes must list at least two positive layer sizes, got {sizes!r}")
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    return -jax.nn.log_softmax(logits)[label]


def classifier_loss(model: nnx.Module) -> tuple[Callable[[Any, Any], jax.Array], Any, Any]:
    """Split ``model`` once into ``(loss_fn, params, graphdef)``.

    ``loss_fn(params, example)`` is the per-example cross-entropy of
    ``example = {"x": features, "y": label}``; it merges the model inside, so it is a
    pure function of ``params`` as every jaxgen estimator requires.
    """
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, example):
        logits = nnx.merge(graphdef, params)(example["x"])
        return cross_entropy(logits, example["y"])

    return loss_fn, params, graphdef


def accuracy(graphdef: Any, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = nnx.merge(graphdef, params)(x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)
