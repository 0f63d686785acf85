"""On-device image augmentation inside the jitted step, from the step's own key.

The protocol of the paper's GMP tables (Wang & Mao, ICLR 2022): a random crop after
4-pixel zero padding, plus a horizontal flip on CIFAR (crop only on SVHN, where flipping
changes digits). Each example draws its own offset and flip; no TensorFlow at run time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen._types import PyTree
from jaxgen.experiments.errors import ConfigError

KINDS = ("none", "crop", "crop-flip")
PADDING = 4
_PAPER = {"cifar10": "crop-flip", "cifar100": "crop-flip", "svhn_cropped": "crop"}


def resolve(kind: str, dataset: str, example_shape: tuple[int, ...]) -> str:
    """``kind`` with ``"paper"`` made concrete for ``dataset``; refuses non-images."""
    if kind == "paper":
        kind = _PAPER.get(dataset, "none")
    if kind != "none" and len(example_shape) != 3:
        raise ConfigError(
            f"augment {kind} needs image inputs (H, W, C); {dataset} has examples of shape "
            f"{tuple(example_shape)}"
        )
    return kind


def augment(batch: PyTree, key: jax.Array, kind: str) -> PyTree:
    """``batch["x"]`` (b, H, W, C) randomly cropped (and flipped) per example."""
    if kind == "none":
        return batch
    x = batch["x"]
    size, height, width, channels = x.shape
    key_crop, key_flip = jax.random.split(key)
    padded = jnp.pad(x, ((0, 0), (PADDING, PADDING), (PADDING, PADDING), (0, 0)))
    offsets = jax.random.randint(key_crop, (size, 2), 0, 2 * PADDING + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    x = jax.vmap(crop)(padded, offsets)
    if kind == "crop-flip":
        flip = jax.random.bernoulli(key_flip, 0.5, (size, 1, 1, 1))
        x = jnp.where(flip, x[:, :, ::-1, :], x)
    return batch | {"x": x}
