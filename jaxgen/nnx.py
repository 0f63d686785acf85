"""Per-example losses from Flax NNX models, for every jaxgen estimator.

jaxgen's estimators take a pure per-example loss ``loss_fn(params, example)``. A Flax
NNX model is a stateful object; ``classifier_loss`` splits it once into its trainable
parameters and the rest, and returns a loss that merges them back inside, so the
estimators see a function of the parameters alone::

    loss_fn, params, merge = jaxgen.nnx.classifier_loss(model)
    stats = jaxgen.gradient_dispersion(loss_fn, params, {"x": images, "y": labels})
    logits = merge(params)(images)            # the model with these parameters

Training-mode BatchNorm has no per-example loss (a single example's batch statistics are
not the batch's), so it is refused rather than silently giving wrong per-example
statistics; use eval mode (``model.eval()``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._types import LossFn, PyTree

__all__ = ["PerExampleLoss", "classifier_loss", "cross_entropy", "refuse_training_batchnorm"]


def cross_entropy(logits: jax.Array, label: jax.Array) -> jax.Array:
    """``−log softmax(logits)[label]`` for one example and an integer class; for a
    probability vector ``label`` (smoothed or mixed targets), ``−Σ_c label_c log p_c``."""
    if jnp.ndim(label) == jnp.ndim(logits):
        return -jnp.sum(label * jax.nn.log_softmax(logits), axis=-1)
    return -jax.nn.log_softmax(logits)[label]


class PerExampleLoss(NamedTuple):
    """A model split for jaxgen: unpack it as ``loss_fn, params, merge = ...``.

    Attributes:
      loss_fn: ``loss_fn(params, example) -> scalar``, pure in ``params``.
      params: the model's ``nnx.Param`` state, the pytree the estimators differentiate.
      merge: ``merge(params) -> model``: the model rebuilt with ``params`` and the
        non-parameter state held fixed (BatchNorm running statistics, buffers).
    """

    loss_fn: LossFn
    params: PyTree
    merge: Callable[[PyTree], nnx.Module]


def refuse_training_batchnorm(model: nnx.Module) -> None:
    """Raise ``ValueError`` if ``model`` holds a BatchNorm in training mode.

    A per-example loss evaluates one example at a time, so batch statistics would be
    those of a single example and every per-example gradient statistic would be wrong.
    """
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm) and not node.use_running_average:
            where = "/".join(map(str, path)) or "the model"
            raise ValueError(
                f"BatchNorm at {where} is in training mode (use_running_average=False): "
                "per-example gradient statistics need eval-mode statistics; call "
                "model.eval() or construct it with use_running_average=True"
            )


def classifier_loss(
    model: nnx.Module,
    *,
    loss: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    input_key: str = "x",
    label_key: str = "y",
) -> PerExampleLoss:
    """Split ``model`` once into ``(loss_fn, params, merge)``.

        loss_fn(params, example) = loss(model_params(example[input_key]), example[label_key])

    ``model`` must accept one example without a batch axis (what a per-example loss
    sees). Non-parameter state is held fixed at its value when split.

    Args:
      model: a Flax NNX module; BatchNorm layers must be in eval mode.
      loss: pointwise loss of the model output and the label (default: cross-entropy
        of logits and an integer class).
      input_key: the example's entry fed to the model.
      label_key: the example's entry passed to ``loss`` as the label.

    Returns:
      ``PerExampleLoss(loss_fn, params, merge)``.

    Raises:
      ValueError: if a BatchNorm is in training mode.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> loss_fn, params, merge = jaxgen.nnx.classifier_loss(model)
      >>> batch = {"x": jnp.ones((4, 3)), "y": jnp.array([0, 1, 0, 1])}
      >>> jaxgen.gradient_dispersion(loss_fn, params, batch).sq_norms.shape
      (4,)
    """
    refuse_training_batchnorm(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def merge(params: PyTree) -> nnx.Module:
        return nnx.merge(graphdef, params, rest)

    def loss_fn(params: PyTree, example: PyTree) -> jax.Array:
        return loss(merge(params)(example[input_key]), example[label_key])

    return PerExampleLoss(loss_fn, params, merge)
