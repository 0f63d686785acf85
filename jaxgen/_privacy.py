"""DP-SGD from jaxgen's pieces: clipped gradients, Gaussian noise, a privacy accountant.

DP-SGD (Abadi et al., "Deep learning with differential privacy", CCS 2016) steps along

    g̃ = (1/b) (Σ_i c_i g_i + N(0, σ² C² I)),      c_i = min(1, C/‖g_i‖)

``clipped_grad_fn`` gives the first term (``jaxgen.clipped_grad``), ``dp_noise`` adds the
second as an optax transform, and ``dp_epsilon`` reports the privacy spent with the
``dp-accounting`` package's RDP accountant.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks
from jaxgen._clipped import clipped_grad
from jaxgen._random import as_key, gaussian_like
from jaxgen._types import LossFn, PyTree


def clipped_grad_fn(loss_fn: LossFn, batch: PyTree, **clipping: Any) -> Callable[..., PyTree]:
    """``params ↦ (1/b) Σ_i c_i g_i``: ``jaxgen.clipped_grad(loss_fn, params, batch,
    **clipping).grad``, shaped like ``jaxgen.batch_grad_fn``.

    Its result feeds any optax chain as the gradient, and it can be the ``grad_fn=`` of
    ``jaxgen.gmp``, ``jaxgen.amp`` or ``optax.contrib.sam``, whose perturbed gradients are
    then clipped too. Arguments after ``params`` are ignored (optax's ``grad_fn(params,
    i)`` protocol).

    Example:
      >>> import jax.numpy as jnp, optax, jaxgen
      >>> batch = {"x": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
      >>> grad_fn = jaxgen.clipped_grad_fn(lambda w, z: z["x"] @ w, batch, max_norm=1.0)
      >>> opt = optax.sgd(0.1)
      >>> params = jnp.zeros(2)
      >>> updates, _ = opt.update(grad_fn(params), opt.init(params))
      >>> [round(u, 4) for u in updates.tolist()]
      [-0.045, -0.06]
    """
    _checks.batch_size("batch", batch)

    def grad_fn(params: PyTree, *_: object) -> PyTree:
        return clipped_grad(loss_fn, params, batch, **clipping).grad

    return grad_fn


class DPNoiseState(NamedTuple):
    """State of ``dp_noise``: the PRNG key (split at every update) and the update count."""

    key: jax.Array
    count: jax.Array


def dp_noise(
    noise_multiplier: float, max_norm: float, batch_size: int, *, key: Any = 0
) -> optax.GradientTransformation:
    """The Gaussian mechanism of DP-SGD on a clipped mean gradient: ``g + N(0, s² I)``,
    ``s = σ C / b`` (Abadi et al., CCS 2016), a fresh draw at every update.

    Chain it after a gradient from ``jaxgen.clipped_grad`` (or ``clipped_grad_fn``)
    with the same ``C`` and batch size ``b``: the noise on the sum ``Σ_i c_i g_i`` is then
    ``N(0, σ² C²)``, whose privacy ``dp_epsilon`` accounts for.

    Args:
      noise_multiplier: ``σ >= 0``, the noise's standard deviation in units of ``C``.
      max_norm: ``C > 0``, the clipping threshold of the incoming gradient.
      batch_size: ``b``, the number of examples the gradient averages.
      key: integer seed or PRNG key.

    Example:
      >>> import jax.numpy as jnp, optax, jaxgen
      >>> opt = optax.chain(jaxgen.dp_noise(1.0, max_norm=1.0, batch_size=256), optax.sgd(0.1))
      >>> state = opt.init(jnp.zeros(3))
      >>> updates, state = opt.update(jnp.zeros(3), state)
      >>> updates.shape
      (3,)
    """
    _checks.non_negative("noise_multiplier", noise_multiplier)
    _checks.positive("max_norm", max_norm)
    _checks.count("batch_size", batch_size, minimum=1, static=False)
    key = as_key(key)

    def init_fn(params: PyTree) -> DPNoiseState:
        del params
        return DPNoiseState(key, jnp.zeros([], jnp.int32))

    def update_fn(updates, state: DPNoiseState, params=None):
        del params
        next_key, draw_key = jax.random.split(state.key)
        scale = noise_multiplier * max_norm / batch_size
        noise = gaussian_like(draw_key, updates, scale)
        return optax.tree.add(updates, noise), DPNoiseState(next_key, state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


ACCOUNTANT = "dp_accounting.rdp.RdpAccountant (Poisson-subsampled Gaussian mechanism)"


def dp_epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """The ``ε`` of ``(ε, δ)``-differential privacy after ``steps`` DP-SGD steps.

    Each step is the Gaussian mechanism of noise multiplier ``σ`` on a batch drawn by
    Poisson sampling with rate ``q`` (each example independently); composed over the
    steps by the RDP accountant of the ``dp-accounting`` package (Mironov, 2017; Mironov,
    Talwar & Zhang, 2019), converted to ``(ε, δ)``. ``σ = 0`` gives ``inf``.

    That guarantee assumes Poisson sampling. Fixed-size batches of a shuffled epoch (what
    ``jaxgen train`` draws) are not covered by it; their privacy can be worse (Chua et
    al., "How private are DP-SGD implementations?", ICML 2024), so report the number as
    what Poisson sampling at ``q = b/n`` would give.

    Example:
      >>> import jaxgen
      >>> round(jaxgen.dp_epsilon(1.1, sampling_rate=256 / 60000, steps=14060, delta=1e-5), 2)
      2.6
    """
    _checks.non_negative("noise_multiplier", noise_multiplier)
    _checks.unit_interval("sampling_rate", sampling_rate)
    _checks.count("steps", steps, minimum=0, static=False)
    _checks.unit_interval("delta", delta)
    if noise_multiplier == 0:
        return math.inf
    try:
        import dp_accounting
    except ImportError as error:  # an optional dependency
        raise ImportError(
            "dp_epsilon needs the dp-accounting package: pip install 'jaxgen[privacy]'"
        ) from error
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        int(steps),
    )
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))
