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


def refuse_training_batchnorm(model: nnx.Module) -> None:
    """Raise if ``model`` holds a BatchNorm in training mode.

    A per-example loss evaluates one example at a time, so batch statistics would be
    those of a single example and every per-example gradient statistic would be wrong.
    Use eval mode (``model.eval()`` or ``use_running_average=True``).
    """
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            where = "/".join(map(str, path)) or "the model"
            raise ValueError(
                f"BatchNorm at {where} is in training mode (use_running_average=False): "
                "per-example gradient statistics need eval-mode statistics; call "
                "model.eval() or construct it with use_running_average=True"
            )


def classifier_loss(model: nnx.Module) -> tuple[Callable[[Any, Any], jax.Array], Any, Any]:
    """Split ``model`` once into ``(loss_fn, params, graphdef)``.

    ``loss_fn(params, example)`` is the per-example cross-entropy of
    ``example = {"x": features, "y": label}``; it merges the model inside, so it is a
    pure function of ``params`` as every jaxgen estimator requires. Non-parameter state
    (BatchNorm running statistics) is held fixed; ``graphdef`` is returned with that
    state so ``accuracy`` can merge the model back.
    """
    refuse_training_batchnorm(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, example):
        logits = nnx.merge(graphdef, params, rest)(example["x"])
        return cross_entropy(logits, example["y"])

    return loss_fn, params, (graphdef, rest)


def accuracy(graphdef: Any, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    """Top-1 accuracy; ``graphdef`` as returned by ``classifier_loss``."""
    definition, rest = graphdef
    logits = nnx.merge(definition, params, rest)(x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)
