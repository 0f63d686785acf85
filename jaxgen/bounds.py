"""Information-theoretic generalization bounds for SGD, as jitted reductions.

Every per-step argument is an array with one entry per SGD step ``t = 1..T``, with
``T = len(lrs)``; an argument that is constant over training may be given as a scalar.
``variances`` are ``V_t``, the variance of the *minibatch* gradient
(``DispersionStats.minibatch_variance``, i.e. dispersion / b). ``R`` is the
sub-Gaussian constant of the loss and ``n`` the number of training examples.

Inputs that no training run can produce (negative or non-finite learning rates,
variances, losses or sensitivities, ``σ <= 0`` where the formula divides by it, a
``Tr H`` that is not a finite number > 0 where the bound needs one) raise ``ValueError``
when the values are concrete. Under ``jit``, where they cannot be inspected, every bound
returns ``NaN`` for them, never a plausible-looking number.

Formulas from Wang & Mao, *On the Generalization of Models Trained with SGD:
Information-Theoretic Bounds and Implications*, ICLR 2022; Xu & Raginsky, NeurIPS 2017;
Neu, Dziugaite, Haghifam & Roy, COLT 2021.

Example:
  >>> import jax.numpy as jnp
  >>> from jaxgen import bounds
  >>> lrs, variances = jnp.full(100, 0.01), jnp.full(100, 4.0)
  >>> float(bounds.eq2(lrs, variances, 50.0, R=0.1, n=1000))  # doctest: +ELLIPSIS
  0.1889...
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen import _checks

__all__ = [
    "eq2",
    "eq2_time_varying",
    "linear_network",
    "neu2021",
    "optimal_sigma",
    "optimal_sigmas_time_varying",
    "second_order_flatness",
    "theorem1",
    "two_layer_relu",
    "xu_raginsky",
]


def _value(x: Any) -> Any:
    """Accept an estimate (``TraceEstimate``, ``MonteCarloEstimate``) or a plain number."""
    return getattr(x, "value", x)


def _constants(R: Any, n: Any) -> None:
    _checks.positive("R", R)
    n_value = _checks.concrete(n)
    if n_value is not None and (n_value.ndim != 0 or not n_value >= 1):
        raise ValueError(f"n must be a number of training examples >= 1, got {n!r}")


def _per_step(lrs: Any, *, positive: tuple[str, ...] = (), **others: Any) -> None:
    """``lrs`` is 1-D with T >= 1 entries; each other per-step array is scalar or length T.

    Every entry is finite and >= 0 (> 0 for the names in ``positive``), where concrete.
    """
    lrs_shape = np.shape(lrs)
    if len(lrs_shape) != 1 or lrs_shape[0] < 1:
        raise ValueError(
            f"lrs must be a 1-D array with one learning rate per step, got shape {lrs_shape}"
        )
    (steps,) = lrs_shape
    for name, value in others.items():
        shape = np.shape(_value(value))
        if shape not in ((), (steps,)):
            raise ValueError(
                f"{name} must be a scalar or have one entry per step (T = len(lrs) = {steps}), "
                f"got shape {shape}"
            )
    _checks.per_step_values("lrs", lrs)
    for name, value in others.items():
        _checks.per_step_values(name, _value(value), positive=name in positive)


def _curvature(name: str, value: Any) -> None:
    """A ``Tr H`` the second-order bounds can use: a finite number > 0, where concrete."""
    _scalar_arg(name, value)
    number = _checks.concrete(_value(value))
    if number is not None and not (np.isfinite(number) and number > 0):
        raise ValueError(
            f"{name} must be a finite number > 0: the second-order bound needs a positive "
            f"curvature (at Tr H <= 0 the expansion bounds nothing), got {float(number)!r}"
        )


def _valid(*arrays: jax.Array, positive: tuple[jax.Array, ...] = ()) -> jax.Array:
    """Under ``jit``: whether every entry is finite and >= 0 (> 0 for ``positive``)."""
    ok = jnp.array(True)
    for array in arrays:
        ok &= jnp.all(jnp.isfinite(array) & (array >= 0))
    for array in positive:
        ok &= jnp.all(jnp.isfinite(array) & (array > 0))
    return ok


def _scalar_arg(name: str, value: Any) -> None:
    shape = np.shape(_value(value))
    if shape != ():
        raise ValueError(f"{name} must be a scalar, got shape {shape}")


@jax.jit
def _xu_raginsky(mutual_information, R, n):
    valid = _valid(mutual_information)
    return jnp.where(valid, jnp.sqrt(2.0 * R**2 / n * mutual_information), jnp.nan)


def xu_raginsky(mutual_information: Any, *, R: float, n: int) -> jax.Array:
    """Lemma 1 (Xu & Raginsky, 2017): ``|gen| ≤ sqrt(2 R² I(W; S) / n)``.

    Args:
      mutual_information: ``I(W; S)`` in nats (>= 0).
      R: sub-Gaussian constant of the loss.
      n: number of training examples.
    """
    _constants(R, n)
    _scalar_arg("mutual_information", mutual_information)
    _checks.non_negative("mutual_information", mutual_information)
    return _xu_raginsky(mutual_information, R, n)


@jax.jit
def _trajectory(lrs, sigmas, per_step, R, n):
    steps = lrs.shape[0]
    terms = jnp.broadcast_to(lrs**2 / sigmas**2 * per_step, (steps,))
    valid = _valid(lrs, per_step, positive=(sigmas,))
    return jnp.where(valid, jnp.sqrt(R**2 / n * jnp.sum(terms)), jnp.nan)


def neu2021(
    lrs: Any,
    sigmas: Any,
    sensitivities: Any,
    variances: Any,
    *,
    R: float,
    n: int,
    flatness: Any = 0.0,
) -> jax.Array:
    """Lemma 2 (Neu et al., COLT 2021, Theorem 1). ::

        |gen| ≤ sqrt(4R²/n · Σ_t λ_t²/σ_t² · (Ψ_t + Ṽ_t)) + |flatness|

    Args:
      lrs: learning rates ``λ_t``.
      sigmas: standard deviations ``σ_t`` of the auxiliary Gaussian noise (> 0).
      sensitivities: gradient sensitivities ``Ψ(W_{t-1})``
        (``jaxgen.gradient_sensitivity`` with ``σ² = 2 Σ_{i<t} σ_i²``).
      variances: minibatch-gradient variances ``Ṽ_t(W_{t-1})``.
      R: sub-Gaussian constant of the loss.
      n: number of training examples.
      flatness: ``E[γ(W_T,S) − γ(W_T,S')]`` (``jaxgen.flatness_term``); its absolute
        value is added.
    """
    _constants(R, n)
    _per_step(
        lrs,
        sigmas=sigmas,
        sensitivities=sensitivities,
        variances=variances,
        positive=("sigmas",),
    )
    _scalar_arg("flatness", flatness)
    _checks.finite("flatness", _value(flatness))
    return _neu2021(lrs, sigmas, sensitivities, variances, _value(flatness), R, n)


@jax.jit
def _neu2021(lrs, sigmas, sensitivities, variances, flatness, R, n):
    per_step = jnp.where(_valid(sensitivities, variances), sensitivities + variances, jnp.nan)
    return 2.0 * _trajectory(lrs, sigmas, per_step, R, n) + jnp.abs(flatness)


def theorem1(
    lrs: Any, sigmas: Any, variances: Any, *, R: float, n: int, flatness: Any = 0.0
) -> jax.Array:
    """Theorem 1 of Wang & Mao (ICLR 2022). ::

        |gen| ≤ sqrt(R²/n · Σ_t λ_t²/σ_t² · V_t) + |flatness|

    The first term is the trajectory term, the second the flatness term
    ``E[γ(W_T,S) − γ(W_T,S')]`` with ``Δ_T ~ N(0, Σ_t σ_t² I)``. To second order,
    ``flatness = second_order_flatness(sigmas, Tr H)``.

    Args:
      lrs: learning rates ``λ_t``.
      sigmas: standard deviations ``σ_t`` of the auxiliary Gaussian noise (> 0).
      variances: minibatch-gradient variances ``V_t(W_{t-1})``.
      R: sub-Gaussian constant of the loss.
      n: number of training examples.
      flatness: the flatness term; its absolute value is added.
    """
    _constants(R, n)
    _per_step(lrs, sigmas=sigmas, variances=variances, positive=("sigmas",))
    _scalar_arg("flatness", flatness)
    _checks.finite("flatness", _value(flatness))
    trajectory = _trajectory(jnp.asarray(lrs), jnp.asarray(sigmas), jnp.asarray(variances), R, n)
    return trajectory + jnp.abs(_value(flatness))


@functools.partial(jax.jit, static_argnames="steps")
def _second_order_flatness(sigmas, hessian_trace, steps):
    return jnp.sum(jnp.broadcast_to(sigmas**2, (steps,))) * hessian_trace / 2.0


def second_order_flatness(sigmas: Any, hessian_trace: Any, *, num_steps: int | None = None):
    """Second-order flatness term ``(Σ_t σ_t²) · Tr H / 2`` (``T σ² Tr H / 2`` for constant σ).

    Args:
      sigmas: ``σ_t`` per step, or a scalar with ``num_steps`` giving ``T``.
      hessian_trace: ``Tr H`` at the final weights (a number or a ``TraceEstimate``).
      num_steps: ``T`` when ``sigmas`` is a scalar.
    """
    shape = np.shape(sigmas)
    if shape == ():
        _checks.integer("num_steps", num_steps, minimum=1)
        steps = num_steps
    elif len(shape) == 1 and (num_steps is None or num_steps == shape[0]):
        steps = shape[0]
    else:
        raise ValueError(
            f"sigmas must be a scalar or 1-D, and num_steps must match its length; got shape "
            f"{shape} and num_steps={num_steps!r}"
        )
    _scalar_arg("hessian_trace", hessian_trace)
    _checks.per_step_values("sigmas", sigmas)
    _checks.finite("hessian_trace", _value(hessian_trace))
    return _second_order_flatness(jnp.asarray(sigmas), _value(hessian_trace), steps)


@jax.jit
def _eq2(lrs, variances, hessian_trace, R, n):
    steps = lrs.shape[0]
    trajectory = jnp.sum(jnp.broadcast_to(lrs**2 * variances, (steps,)))
    inside = R**2 * steps / n * trajectory * hessian_trace
    return jnp.where(
        _valid(lrs, variances, positive=(hessian_trace,)), 1.5 * jnp.cbrt(inside), jnp.nan
    )


def eq2(lrs: Any, variances: Any, hessian_trace: Any, *, R: float, n: int) -> jax.Array:
    """Eq. (2) of Wang & Mao (ICLR 2022): Theorem 1 minimised over a constant σ. ::

        gen ≤ 3/2 · (R² T / n · Σ_t λ_t² V_t · Tr H)^{1/3}

    It is ``theorem1`` at ``σ* = optimal_sigma(...)`` with the second-order flatness
    ``T σ*² Tr H / 2``, assuming ``L_μ(w_T) ≤ E[L_μ(w_T + Δ_T)]``. ``Tr H`` must be
    > 0 (``ValueError``; ``nan`` under ``jit``): at ``Tr H <= 0`` the expansion bounds
    nothing.

    Args:
      lrs: learning rates ``λ_t``.
      variances: minibatch-gradient variances ``V_t``.
      hessian_trace: ``Tr H`` of the training loss at ``W_T`` (number or ``TraceEstimate``).
      R: sub-Gaussian constant of the loss.
      n: number of training examples.
    """
    _constants(R, n)
    _per_step(lrs, variances=variances)
    _curvature("hessian_trace", hessian_trace)
    return _eq2(jnp.asarray(lrs), jnp.asarray(variances), _value(hessian_trace), R, n)


@jax.jit
def _optimal_sigma(lrs, variances, hessian_trace, R, n):
    steps = lrs.shape[0]
    a = jnp.sqrt(R**2 / n * jnp.sum(jnp.broadcast_to(lrs**2 * variances, (steps,))))
    valid = _valid(lrs, variances, positive=(hessian_trace,))
    return jnp.where(valid, jnp.cbrt(a / (steps * hessian_trace)), jnp.nan)


def optimal_sigma(lrs: Any, variances: Any, hessian_trace: Any, *, R: float, n: int) -> jax.Array:
    """The constant σ that minimises ``a/σ + T Tr H σ²/2``: ``σ* = (a / (T Tr H))^{1/3}``.

    ``a = sqrt(R²/n · Σ_t λ_t² V_t)`` is the trajectory term at ``σ = 1``
    (Wang & Mao, ICLR 2022, derivation of Eq. 2). ``Tr H`` must be > 0, as for ``eq2``.
    """
    _constants(R, n)
    _per_step(lrs, variances=variances)
    _curvature("hessian_trace", hessian_trace)
    return _optimal_sigma(jnp.asarray(lrs), jnp.asarray(variances), _value(hessian_trace), R, n)


@jax.jit
def _time_varying(lrs, variances, hessian_trace, R, n):
    steps = lrs.shape[0]
    scale = jnp.sum(jnp.broadcast_to(lrs * jnp.sqrt(variances), (steps,)))
    bound = 1.5 * jnp.cbrt(R**2 / n * scale**2 * hessian_trace)
    # σ_t² = c λ_t √V_t; the optimal c solves sqrt(R² A / (n c)) = c A Tr H with A = scale.
    c = jnp.cbrt(R**2 / (n * scale * hessian_trace**2))
    sigmas = jnp.sqrt(c * jnp.broadcast_to(lrs * jnp.sqrt(variances), (steps,)))
    valid = _valid(lrs, variances, positive=(hessian_trace,))
    return jnp.where(valid, bound, jnp.nan), jnp.where(valid, sigmas, jnp.nan)


def eq2_time_varying(
    lrs: Any, variances: Any, hessian_trace: Any, *, R: float, n: int
) -> jax.Array:
    """Theorem 1 minimised over a time-varying ``σ_t² ∝ λ_t √V_t`` (second-order flatness). ::

        gen ≤ 3/2 · (R²/n · (Σ_t λ_t √V_t)² · Tr H)^{1/3}

    By Cauchy–Schwarz ``(Σ λ_t √V_t)² ≤ T Σ λ_t² V_t``, so this is never larger than
    ``eq2``. Derived in jaxgen from Theorem 1 of Wang & Mao (ICLR 2022); not in the
    paper. ``Tr H`` must be > 0, as for ``eq2``.
    """
    _constants(R, n)
    _per_step(lrs, variances=variances)
    _curvature("hessian_trace", hessian_trace)
    bound, _ = _time_varying(jnp.asarray(lrs), jnp.asarray(variances), _value(hessian_trace), R, n)
    return bound


def optimal_sigmas_time_varying(
    lrs: Any, variances: Any, hessian_trace: Any, *, R: float, n: int
) -> jax.Array:
    """The per-step ``σ_t`` at which ``theorem1`` with second-order flatness equals
    ``eq2_time_varying`` (``σ_t² = c λ_t √V_t`` with the optimal ``c``); shape ``(T,)``."""
    _constants(R, n)
    _per_step(lrs, variances=variances)
    _curvature("hessian_trace", hessian_trace)
    _, sigmas = _time_varying(jnp.asarray(lrs), jnp.asarray(variances), _value(hessian_trace), R, n)
    return sigmas


@jax.jit
def _cubic_bound(lrs, per_step, curvature, R, n):
    steps = lrs.shape[0]
    total = jnp.sum(jnp.broadcast_to(R**2 * lrs**2 * steps / (4.0 * n) * per_step, (steps,)))
    valid = _valid(lrs, per_step, curvature)
    return jnp.where(valid, 3.0 * jnp.cbrt(curvature * total), jnp.nan)


def linear_network(lrs: Any, losses: Any, *, R: float, n: int) -> jax.Array:
    """Theorem 2 of Wang & Mao (ICLR 2022): linear model ``f = Wᵀ X``, ``‖X‖ = 1``,
    squared loss ``ℓ = ½ (Y − f)²``. ::

        gen ≤ 3 · (Σ_t R² λ_t² T / (4n) · E[ℓ(W_{t-1}, Z)])^{1/3}

    Equal to ``eq2`` with ``V_t = 2 E[ℓ]`` (since ``‖∇ℓ‖² = 2ℓ``) and ``Tr H = 1``.

    Args:
      lrs: learning rates ``λ_t``.
      losses: ``E[ℓ(W_{t-1}, Z)]`` per step (the minibatch mean loss estimates it).
    """
    _constants(R, n)
    _per_step(lrs, losses=losses)
    return _cubic_bound(jnp.asarray(lrs), jnp.asarray(losses), 1.0, R, n)


def two_layer_relu(
    lrs: Any, weighted_losses: Any, final_active_fraction: Any, *, R: float, n: int
) -> jax.Array:
    """Theorem 3 of Wang & Mao (ICLR 2022): ``f = m^{-1/2} Σ_r A_r ReLU(W_rᵀ X)``,
    ``A_r = ±1`` fixed, ``‖X‖ = 1``, squared loss. ::

        gen ≤ 3 · (Σ_r E[I_{r,T}/m] · Σ_t R² λ_t² T/(4n) · E[Σ_r I_{r,t}/m · ℓ(W_{t-1}, Z)])^{1/3}

    Equal to ``eq2`` with ``V_t = 2 E[Σ_r I_{r,t}/m · ℓ]`` and ``Tr H = E[Σ_r I_{r,T}/m]``.

    Args:
      lrs: learning rates ``λ_t``.
      weighted_losses: ``E[(Σ_r I_{r,i,t}/m) · ℓ(W_{t-1}, Z_i)]`` per step, with
        ``I_{r,i,t} = 1{W_{t-1,r}ᵀ X_i >= 0}``.
      final_active_fraction: ``E[Σ_r I_{r,i,T}/m]`` at the final weights.
    """
    _constants(R, n)
    _per_step(lrs, weighted_losses=weighted_losses)
    _scalar_arg("final_active_fraction", final_active_fraction)
    _checks.unit_interval("final_active_fraction", final_active_fraction)
    return _cubic_bound(jnp.asarray(lrs), jnp.asarray(weighted_losses), final_active_fraction, R, n)
