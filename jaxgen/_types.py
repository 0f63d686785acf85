"""The two types every jaxgen module speaks: pytrees and per-example losses."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

PyTree = Any
"""A pytree of arrays: parameters, gradients, a batch or one example."""

LossFn = Callable[[PyTree, PyTree], jax.Array]
"""A per-example loss ``loss_fn(params, example) -> scalar``."""
