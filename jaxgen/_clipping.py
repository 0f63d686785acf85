"""Dynamic gradient clipping as an optax transform (Wang & Mao, ICLR 2022, Algorithm 1)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks
from jaxgen._types import PyTree


class DynamicClipState(NamedTuple):
    """State of ``dynamic_clip``, for training loops to log.

    Attributes:
      threshold: ``G``, the last unclipped gradient norm past ``start_step`` (initially
        ``initial_norm``).
      count: the number of updates seen (the step ``t`` of the last update).
      num_clipped: how many updates were clipped.
    """

    threshold: jax.Array
    count: jax.Array
    num_clipped: jax.Array


def dynamic_clip(
    initial_norm: float, alpha: float, start_step: int
) -> optax.GradientTransformation:
    """Dynamic gradient clipping, Algorithm 1 of Wang & Mao (ICLR 2022).

    At step ``t`` (1-based) with gradient ``g`` and threshold ``G``::

        t <= start_step:            g passes unchanged
        t >  start_step, ‖g‖ > G:   g ← α · G · g / ‖g‖      (G unchanged)
        t >  start_step, ‖g‖ <= G:  G ← ‖g‖                 (g unchanged)

    ``‖g‖`` is the global L2 norm over all leaves. Clipping rescales *to* ``α G``, so the
    step can only shrink (unlike the authors' code, which rescaled to a fixed 50). A
    gradient with a non-finite norm passes unchanged, is not counted as clipped and never
    becomes ``G``, so the training loop's own NaN check sees it.

    The paper used ``α = 0.1``, ``initial_norm = 50`` and ``start_step`` = 15 epochs (MLP
    on MNIST) or 20 epochs (AlexNet on CIFAR-10) of steps.

    Args:
      initial_norm: the initial threshold ``G`` (> 0).
      alpha: the clipping factor ``α`` in (0, 1]: a clipped step is at most ``α G``, and
        ``α > 1`` would enlarge the gradients it is meant to clip.
      start_step: ``T_c``; clipping starts at step ``T_c + 1`` (>= 0).

    Returns:
      An ``optax.GradientTransformation`` with state ``DynamicClipState``.

    Example:
      >>> import jax.numpy as jnp, optax, jaxgen
      >>> clip = jaxgen.dynamic_clip(initial_norm=50.0, alpha=0.1, start_step=0)
      >>> state = clip.init(jnp.zeros(2))
      >>> g, state = clip.update(jnp.array([3.0, 4.0]), state)   # ‖g‖ = 5 <= 50: G ← 5
      >>> g, state = clip.update(jnp.array([6.0, 8.0]), state)   # ‖g‖ = 10 > 5: clipped
      >>> g.tolist(), float(state.threshold), int(state.num_clipped)
      ([0.30000001192092896, 0.4000000059604645], 5.0, 1)
    """
    _checks.positive("initial_norm", initial_norm)
    _checks.fraction("alpha", alpha)
    _checks.count("start_step", start_step, minimum=0, static=False)

    def init_fn(params: PyTree) -> DynamicClipState:
        del params
        return DynamicClipState(
            threshold=jnp.asarray(initial_norm, jnp.float32),
            count=jnp.zeros([], jnp.int32),
            num_clipped=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: PyTree, state: DynamicClipState, params: PyTree | None = None
    ) -> tuple[PyTree, DynamicClipState]:
        del params
        step = state.count + 1
        norm = optax.tree.norm(updates).astype(jnp.float32)
        usable = (step > start_step) & jnp.isfinite(norm)
        clip = usable & (norm > state.threshold)
        scale = jnp.where(clip, alpha * state.threshold / jnp.where(clip, norm, 1.0), 1.0)
        clipped = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), updates)
        threshold = jnp.where(usable & ~clip, norm, state.threshold)
        return clipped, DynamicClipState(
            threshold, step, state.num_clipped + clip.astype(jnp.int32)
        )

    return optax.GradientTransformation(init_fn, update_fn)
