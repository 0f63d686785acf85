"""A model made pure for the training step: its losses, its evaluation, its state.

Models without BatchNorm have a per-example loss ``loss_fn(params, example)``, which the
step hands to ``jaxgen.gradient_dispersion`` (``V_t`` tracked). VGG16 and
PreActResNet18 train with BatchNorm batch statistics: their training loss is a mean
over the batch whose statistics change with every example, so there is no per-example
loss and ``V_t`` is not measured (the run says so). Their running averages are
``model_state``, updated by the clean training pass only; evaluation uses them.

Examples are ``{"x": input, "y": label}``; ``y`` is an integer class or a probability
vector (label smoothing, mixup); an optional ``"key"`` (one PRNG key per example) draws
dropout masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jaxgen.nnx
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments.models import SPECS


def squared_loss(output: jax.Array, label: jax.Array) -> jax.Array:
    """``½ (t − f)²`` with the ±1 target ``t = 1 − 2·(label mod 2)`` (Theorems 2 and 3)."""
    target = 1.0 - 2.0 * jnp.mod(label, 2).astype(output.dtype)
    return 0.5 * (target - output) ** 2


def correct(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example correctness: argmax for classifiers, the sign of ``f`` for ±1 targets."""
    if outputs.ndim == 1:
        return (outputs >= 0) == (jnp.mod(labels, 2) == 0)
    return jnp.argmax(outputs, axis=-1) == labels


class Trainable(NamedTuple):
    """The pure functions of a model.

    Attributes:
      params: the trainable ``nnx.Param`` state.
      model_state: the BatchNorm running statistics (empty for other models).
      loss_fn: the per-example loss ``(params, example) -> scalar``, or ``None`` for
        models that train with batch statistics.
      batch_loss: ``(params, model_state, batch) -> (mean loss, new model_state)`` in
        training mode (dropout on where the batch has keys).
      predict: ``(params, model_state, x) -> outputs`` in evaluation mode, batched.
      pointwise: ``(outputs, label) -> loss`` for one example.
      merge: ``(params, model_state) -> model`` in evaluation mode.
    """

    params: PyTree
    model_state: PyTree
    loss_fn: LossFn | None
    batch_loss: Callable[[PyTree, PyTree, PyTree], tuple[jax.Array, PyTree]]
    predict: Callable[[PyTree, PyTree, jax.Array], jax.Array]
    pointwise: Callable[[jax.Array, jax.Array], jax.Array]
    merge: Callable[[PyTree, PyTree], nnx.Module]

    @property
    def per_example(self) -> bool:
        return self.loss_fn is not None


def _call(model: nnx.Module, batch: PyTree) -> jax.Array:
    """The model on ``batch["x"]``, with dropout keys when the batch has them."""
    if "key" in batch:
        return model(batch["x"], key=batch["key"])
    return model(batch["x"])


def trainable(name: str, model: nnx.Module) -> Trainable:
    """Split ``model`` (built by ``models.build(name, ...)``) into pure functions."""
    spec = SPECS[name]
    pointwise = squared_loss if spec.regression else jaxgen.nnx.cross_entropy
    if not spec.batchnorm:
        jaxgen.nnx.refuse_training_batchnorm(model)
    graphdef, params, model_state, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def merge(params: PyTree, model_state: PyTree, *, training: bool = False) -> nnx.Module:
        merged = nnx.merge(graphdef, params, model_state, rest, copy=True)
        if spec.batchnorm and not training:
            merged.eval()
        return merged

    def predict(params, model_state, x):
        return merge(params, model_state)(x)

    def loss_fn(params: PyTree, example: PyTree) -> jax.Array:
        return pointwise(_call(merge(params, model_state), example), example["y"])

    def per_example_batch_loss(params, model_state, batch):
        return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch)), model_state

    def batchnorm_loss(params, model_state, batch):
        model = merge(params, model_state, training=True)
        outputs = _call(model, batch)
        loss = jnp.mean(jax.vmap(pointwise)(outputs, batch["y"]))
        return loss, nnx.state(model, nnx.BatchStat)

    if spec.batchnorm:
        return Trainable(params, model_state, None, batchnorm_loss, predict, pointwise, merge)
    return Trainable(
        params, model_state, loss_fn, per_example_batch_loss, predict, pointwise, merge
    )


def eval_loss_fn(model: Trainable, model_state: Any) -> LossFn:
    """The per-example evaluation-mode loss at fixed ``model_state`` (any model)."""

    def loss_fn(params, example):
        return model.pointwise(model.predict(params, model_state, example["x"]), example["y"])

    return loss_fn
