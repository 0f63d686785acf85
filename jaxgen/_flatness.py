"""Monte Carlo estimates of the perturbation terms of the SGD bounds.

Flatness (Wang & Mao, ICLR 2022, Theorem 1; Neu et al., COLT 2021):

    γ(w, s) = E_Δ[L_s(w + Δ) − L_s(w)],   Δ ~ N(0, σ² I)
    flatness = E[γ(w, S) − γ(w, S')]      (S: training data, S': held-out data)

Gradient sensitivity (Neu et al., COLT 2021, Theorem 1):

    Ψ(w) = E_{Z, ζ} ‖∇ℓ(w, Z) − ∇ℓ(w + ζ, Z)‖²,   ζ ~ N(0, σ² I)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks
from jaxgen._chunks import map_in_rows
from jaxgen._hvp import has_custom_vjp, hvp_fn
from jaxgen._per_example import _sq_norms, mean_loss
from jaxgen._random import gaussian_like, rademacher_like
from jaxgen._types import LossFn, PyTree

_SENSITIVITY_METHODS = ("monte_carlo", "second_order")


class MonteCarloEstimate(NamedTuple):
    """A Monte Carlo mean with its standard error (sample std / √num_samples)."""

    value: jax.Array
    stderr: jax.Array
    num_samples: int


def mean_and_stderr(samples: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    """Sample mean and its standard error ``std(ddof=1)/√m`` (``nan`` for one sample)."""
    value = jnp.mean(samples)
    if num_samples == 1:
        return value, jnp.full_like(value, jnp.nan)
    return value, jnp.std(samples, ddof=1) / math.sqrt(num_samples)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_samples", "chunk_size"))
def _flatness(loss_fn, params, train_batch, heldout_batch, key, sigma, num_samples, chunk_size):
    clean_gap = mean_loss(loss_fn, params, train_batch) - mean_loss(loss_fn, params, heldout_batch)

    def sample(sample_key):
        perturbed = optax.tree.add(params, gaussian_like(sample_key, params, sigma))
        gap = mean_loss(loss_fn, perturbed, train_batch) - mean_loss(
            loss_fn, perturbed, heldout_batch
        )
        return gap - clean_gap

    keys = jax.random.split(key, num_samples)
    return mean_and_stderr(map_in_rows(sample, keys, chunk_size), num_samples)


def flatness_term(
    loss_fn: LossFn,
    params: PyTree,
    train_batch: PyTree,
    heldout_batch: PyTree,
    *,
    key: jax.Array,
    sigma: float,
    num_samples: int = 32,
    chunk_size: int = 8,
) -> MonteCarloEstimate:
    """Monte Carlo estimate of the flatness term ``E[γ(w, S) − γ(w, S')]``.

    ``γ(w, s) = E_Δ[L_s(w + Δ) − L_s(w)]`` with ``Δ ~ N(0, σ² I)``. Each sample draws one
    ``Δ_j`` and uses it on both batches (common random numbers), so the estimate is

        (1/m) Σ_j [(L_S(w+Δ_j) − L_S(w)) − (L_S'(w+Δ_j) − L_S'(w))]

    In Theorem 1 of Wang & Mao (ICLR 2022) ``Δ = Δ_T`` has variance ``Σ_t σ_t²`` per
    coordinate: pass ``sigma = sqrt(Σ_t σ_t²)`` (``σ√T`` for a constant ``σ``). To second
    order the term is ``σ² (Tr H_S − Tr H_S') / 2``.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the trained weights ``w``.
      train_batch: examples from the training set ``S``.
      heldout_batch: examples from a held-out set ``S'`` of the same distribution.
      key: PRNG key for the perturbations.
      sigma: standard deviation of each coordinate of ``Δ``.
      num_samples: number of perturbations ``m``.
      chunk_size: perturbations evaluated together under ``vmap``.

    Returns:
      ``MonteCarloEstimate(value, stderr, num_samples)``; ``stderr`` is ``nan`` for one
      sample.

    Example:
      >>> import jax, jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * z * jnp.sum(w**2)   # Tr H = 2·z, γ = σ²·z
      >>> est = jaxgen.flatness_term(loss, jnp.zeros(2), jnp.full(4, 2.0), jnp.ones(4),
      ...                            key=jax.random.key(0), sigma=0.1, num_samples=2000)
      >>> bool(abs(est.value - 0.01) < 4 * est.stderr)
      True
    """
    _checks.batch_size("train_batch", train_batch)
    _checks.batch_size("heldout_batch", heldout_batch)
    _checks.per_example_loss(loss_fn, params, train_batch, batch_name="train_batch")
    _checks.per_example_loss(loss_fn, params, heldout_batch, batch_name="heldout_batch")
    _checks.key("key", key)
    _checks.non_negative("sigma", sigma)
    _checks.integer("num_samples", num_samples, minimum=1)
    _checks.integer("chunk_size", chunk_size, minimum=1)
    value, stderr = _flatness(
        loss_fn,
        params,
        train_batch,
        heldout_batch,
        key,
        sigma,
        num_samples,
        min(chunk_size, num_samples),
    )
    return MonteCarloEstimate(value, stderr, num_samples)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_samples", "chunk_size"))
def _sensitivity(loss_fn, params, batch, key, sigma, num_samples, chunk_size):
    per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))
    clean = per_example(params, batch)

    def sample(sample_key):
        perturbed = optax.tree.add(params, gaussian_like(sample_key, params, sigma))
        difference = optax.tree.sub(clean, per_example(perturbed, batch))
        return jnp.mean(_sq_norms(difference))

    keys = jax.random.split(key, num_samples)
    return mean_and_stderr(map_in_rows(sample, keys, chunk_size), num_samples)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_samples"))
def _second_order_sensitivity(loss_fn, params, batch, key, sigma, num_samples):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    custom_vjp = has_custom_vjp(loss_fn, params, batch)

    def one_example(example, probe_keys):
        hvp = hvp_fn(lambda p: loss_fn(p, example), params, custom_vjp=custom_vjp)

        def probe_sample(probe_key):
            hv = hvp(rademacher_like(probe_key, params))
            return sigma**2 * optax.tree.norm(hv, squared=True)

        return jnp.mean(jax.vmap(probe_sample)(probe_keys))

    keys = jax.random.split(key, size * num_samples).reshape(size, num_samples)
    return mean_and_stderr(jax.vmap(one_example)(batch, keys), size)


def gradient_sensitivity(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    key: jax.Array,
    sigma: float,
    num_samples: int = 8,
    chunk_size: int = 1,
    method: str = "monte_carlo",
) -> MonteCarloEstimate:
    """Estimate of the local gradient sensitivity ``Ψ(w)`` of Neu et al.

    ``Ψ(w) = E_{Z,ζ} ‖∇ℓ(w, Z) − ∇ℓ(w + ζ, Z)‖²`` with ``ζ ~ N(0, σ² I)``, averaged over
    the examples of ``batch``. In Neu et al. (COLT 2021, Theorem 1), at step ``t`` the
    perturbation has variance ``2 Σ_{i<t} σ_i²``.

    - ``"monte_carlo"``: ``num_samples`` draws of ``ζ``; each draw materialises the
      per-example gradients of ``batch`` (memory ``b × P``). The standard error is over
      the draws.
    - ``"second_order"``: ``∇ℓ(w + ζ) − ∇ℓ(w) ≈ H_Z ζ``, so ``Ψ ≈ σ² E_Z ‖H_Z‖_F²``, with
      ``‖H_z‖_F² = E_v ‖H_z v‖²`` for Rademacher ``v`` (``num_samples`` probes per
      example, one Hessian-vector product each, from the example's gradient linearized
      once, or its VJP for a loss with a ``jax.custom_vjp``). Exact for quadratic losses,
      linear in ``σ²``: with ``sigma=1`` the value is ``E_Z ‖H_Z‖_F²`` itself, which a
      training loop can measure once and scale by each step's variance. The standard error is
      over the examples (each one's probes averaged), since ``Ψ`` is an expectation
      over ``Z`` (``nan`` for one example).

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the weights ``w``.
      batch: examples ``Z``.
      key: PRNG key for the perturbations or probes.
      sigma: standard deviation of each coordinate of ``ζ``.
      num_samples: draws of ``ζ`` (``"monte_carlo"``) or probes per example
        (``"second_order"``).
      chunk_size: with ``"monte_carlo"``, draws evaluated together under ``vmap``.
      method: ``"monte_carlo"`` or ``"second_order"``.

    Returns:
      ``MonteCarloEstimate(value, stderr, num_samples)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * jnp.sum((w - z) ** 2)   # ∇ℓ(w+ζ) − ∇ℓ(w) = ζ
      >>> est = jaxgen.gradient_sensitivity(loss, jnp.zeros(3), jnp.ones((2, 3)),
      ...                                   key=jax.random.key(0), sigma=0.5)
      >>> bool(abs(est.value - 3 * 0.25) < 4 * est.stderr)
      True
      >>> float(jaxgen.gradient_sensitivity(loss, jnp.zeros(3), jnp.ones((2, 3)),
      ...       key=jax.random.key(0), sigma=0.5, method="second_order").value)   # σ²‖I‖_F²
      0.75
    """
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.key("key", key)
    _checks.non_negative("sigma", sigma)
    _checks.integer("num_samples", num_samples, minimum=1)
    _checks.integer("chunk_size", chunk_size, minimum=1)
    _checks.choice("method", method, _SENSITIVITY_METHODS)
    if method == "second_order":
        value, stderr = _second_order_sensitivity(loss_fn, params, batch, key, sigma, num_samples)
    else:
        value, stderr = _sensitivity(
            loss_fn, params, batch, key, sigma, num_samples, min(chunk_size, num_samples)
        )
    return MonteCarloEstimate(value, stderr, num_samples)
