"""Per-example gradients and the gradient dispersion of a minibatch.

For a per-example loss ``ℓ(w, z)`` and a batch ``B = {z_1..z_b}`` with per-example
gradients ``g_i = ∇_w ℓ(w, z_i)`` and mean ``ḡ = (1/b) Σ_i g_i``:

    dispersion = (1/b) Σ_i ‖g_i − ḡ‖²      (trace of the per-example covariance)
    V_t        = dispersion / b             (variance of the minibatch mean gradient)

as in Wang & Mao, *On the Generalization of Models Trained with SGD: Information-Theoretic
Bounds and Implications*, ICLR 2022 (Theorem 1, where ``V_t`` enters the bound).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgen import _checks
from jaxgen._chunks import loops_are_slow
from jaxgen._sums import pairwise_sum
from jaxgen._types import LossFn, PyTree

_METHODS = ("auto", "vmap", "ghost")
VMAP_BUFFER_ELEMENTS = 2**22  # per-example gradient numbers "vmap" holds at once by default


def default_microbatch(loss_fn: LossFn, params: PyTree, batch: PyTree) -> int | None:
    """The ``microbatch_size`` that ``method="vmap"`` takes when none is given.

    The whole batch, unless its per-example gradients (``b × P`` numbers) exceed twice
    ``VMAP_BUFFER_ELEMENTS`` (2²² numbers, 16 MB in float32): then the largest chunk
    within it, a divisor of ``b`` where one is at least half that size, so that no
    remainder is compiled apart. Fresh buffers of B×P numbers are slow to write, centre
    and reduce; on the 2-core CPU (``python benchmarks/dispersion.py --no-peers``, the
    ``vmap`` rows before and after) a transformer block took 2.71× → 1.37× a gradient at
    b = 64 and 1.64× → 0.90× at b = 256, a 4-block scanned transformer 1.94× → 1.48×,
    the MLP 784-1024-1024-10 70× → 36× (memory 339 → 54 MB); a 4×128 scanned stack at
    b = 64, whose b × P is just over 2²², was faster whole than in halves (1.48× against
    1.78× a gradient), hence the factor two.
    Only on a CPU backend (not measured elsewhere), and not when the loss convolves:
    XLA:CPU runs convolutions in loops slowly (``jaxgen._chunks.loops_are_slow``).
    """
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    count = optax.tree.size(params)
    if jax.default_backend() != "cpu" or size * count <= 2 * VMAP_BUFFER_ELEMENTS:
        return None
    most = max(1, VMAP_BUFFER_ELEMENTS // count)
    one = jax.tree_util.tree_map(lambda x: x[0], batch)
    if loops_are_slow(jax.grad(loss_fn), params, one):
        return None
    divisor = next(d for d in range(most, 0, -1) if size % d == 0)
    return divisor if 2 * divisor >= most else most


class DispersionStats(NamedTuple):
    """Gradient statistics of one minibatch of ``b`` examples.

    Attributes:
      loss: mean loss ``(1/b) Σ_i ℓ(w, z_i)``.
      grad: mean gradient ``ḡ`` (pytree like ``params``); a training step can reuse it.
      sq_norms: ``(b,)`` per-example squared gradient norms ``‖g_i‖²``.
      dispersion: ``(1/b) Σ_i ‖g_i − ḡ‖²``, the trace of the per-example gradient
        covariance (population normalisation, ``1/b``).
      layer_dispersion: the same sum restricted to each parameter leaf (pytree like
        ``params`` of scalars); its leaves add up to ``dispersion``.
    """

    loss: jax.Array
    grad: PyTree
    sq_norms: jax.Array
    dispersion: jax.Array
    layer_dispersion: PyTree

    @property
    def per_example_sq_norms(self) -> jax.Array:
        """``(b,)`` ``‖g_i‖²``: the same array as ``sq_norms``."""
        return self.sq_norms

    @property
    def batch_size(self) -> int:
        return self.sq_norms.shape[0]

    @property
    def minibatch_variance(self) -> jax.Array:
        """``V_t = dispersion / b``: the variance of the minibatch mean gradient."""
        return self.dispersion / self.batch_size


def mean_loss(loss_fn: LossFn, params: PyTree, batch: PyTree) -> jax.Array:
    """``L_B(w) = (1/b) Σ_i ℓ(w, z_i)``: the per-example loss averaged over ``batch``."""
    return jnp.mean(jax.vmap(loss_fn, in_axes=(None, 0))(params, batch))


def _sq_norms(grads: PyTree) -> jax.Array:
    per_leaf = [
        jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)
        for g in jax.tree_util.tree_leaves(grads)
    ]
    return functools.reduce(jnp.add, per_leaf)


class _ResidualSums(NamedTuple):
    """Per leaf: ``Σ_i r_i`` and ``Σ_i ‖r_i‖²`` for residuals ``r_i = g_i − shift``."""

    total: PyTree
    squares: PyTree


def _residual_sums(loss_fn: LossFn, params: PyTree, chunk: PyTree, shift: PyTree):
    """``_ResidualSums`` of ``chunk``, its losses and its ``‖g_i‖²``. The squared norms are
    taken inside the ``vmap``, example by example, where XLA reduces each gradient in the
    layout it is made in; taken afterwards over the batched gradients, a leaf stacked
    by a ``scan`` comes out (layer, example)-major and XLA:CPU transposed a copy of it
    for every reduction (a scanned 4×128 stack: 21 → 14 ms, ``benchmarks/dispersion.py``)."""

    def one_example(example):
        loss, grads = jax.value_and_grad(loss_fn)(params, example)
        residuals = optax.tree.sub(grads, shift)
        squares = jax.tree_util.tree_map(lambda r: jnp.sum(jnp.square(r)), residuals)
        norms = [jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads)]
        return residuals, squares, loss, functools.reduce(jnp.add, norms)

    residuals, squares, losses, sq_norms = jax.vmap(one_example)(chunk)
    sums = _ResidualSums(
        jax.tree_util.tree_map(pairwise_sum, residuals),
        jax.tree_util.tree_map(jnp.sum, squares),
    )
    return sums, losses, sq_norms


def _split(batch: PyTree, size: int, chunk: int):
    """``batch`` as (full chunks stacked on a new leading axis, remainder or None)."""
    num_full = size // chunk
    head = jax.tree_util.tree_map(
        lambda x: x[: num_full * chunk].reshape(num_full, chunk, *x.shape[1:]), batch
    )
    tail = None
    if num_full * chunk < size:
        tail = jax.tree_util.tree_map(lambda x: x[num_full * chunk :], batch)
    return head, tail


def map_chunks(fn: Callable, batch: PyTree, size: int, chunk: int | None):
    """``fn(piece) -> (per_example, sums)`` over ``chunk``-sized pieces of ``batch``: the
    per-example outputs concatenated, the sums added up."""
    if chunk is None or chunk >= size:
        return fn(batch)
    head, tail = _split(batch, size, chunk)
    first = jax.tree_util.tree_map(lambda x: x[0], head)
    zeros = jax.tree_util.tree_map(
        lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first)[1]
    )

    def body(total, piece):
        per_example, sums = fn(piece)
        return optax.tree.add(total, sums), per_example

    total, per_example = jax.lax.scan(body, zeros, head)
    per_example = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), per_example)
    if tail is not None:
        tail_per_example, tail_sums = fn(tail)
        total = optax.tree.add(total, tail_sums)
        per_example = jax.tree_util.tree_map(
            lambda a, b: jnp.concatenate([a, b]), per_example, tail_per_example
        )
    return per_example, total


@functools.partial(jax.jit, static_argnames=("loss_fn", "microbatch_size"))
def _dispersion_vmap(loss_fn, params, batch, microbatch_size):
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    if microbatch_size is None:  # decided from shapes when traced, not on every call
        microbatch_size = default_microbatch(loss_fn, params, batch)

    # The first example's gradient is the shift: residuals g_i − shift are then of the
    # size of the per-example spread, however large ‖ḡ‖ is, and Σ‖r_i‖² − ‖Σ r_i‖²/b
    # (= Σ‖g_i − ḡ‖² exactly) loses only what its two terms' ratio costs, about
    # 1 + ‖g_1 − ḡ‖²/dispersion ulps: the shifted-data algorithm (Chan, Golub & LeVeque,
    # 1983). One example's gradient costs ~1/b of the batch gradient the shift was before.
    first = jax.tree_util.tree_map(lambda x: x[0], batch)
    shift = jax.grad(loss_fn)(params, first)

    def chunk_sums(chunk):
        sums, losses, norms = _residual_sums(loss_fn, params, chunk, shift)
        return (losses, norms), sums

    (losses, sq_norms), sums = map_chunks(chunk_sums, batch, size, microbatch_size)
    loss = jnp.mean(losses)
    layer_dispersion = jax.tree_util.tree_map(
        lambda squares, total: jnp.maximum(squares - jnp.sum(jnp.square(total)) / size, 0) / size,
        sums.squares,
        sums.total,
    )
    return DispersionStats(
        loss=loss,
        grad=jax.tree_util.tree_map(lambda s, t: s + t / size, shift, sums.total),
        sq_norms=sq_norms,
        dispersion=functools.reduce(jnp.add, jax.tree_util.tree_leaves(layer_dispersion)),
        layer_dispersion=layer_dispersion,
    )


def per_example_grads(
    loss_fn: LossFn, params: PyTree, batch: PyTree, *, microbatch_size: int | None = None
) -> PyTree:
    """Per-example gradients ``g_i = ∇_w ℓ(w, z_i)`` for every example of ``batch``.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``.
      params: the parameters ``w`` (any pytree of float arrays).
      batch: pytree whose leaves share a leading axis of size ``B``; ``example`` is one
        slice of it along that axis.
      microbatch_size: evaluate ``vmap(grad)`` this many examples at a time (bounds the
        memory of intermediate activations; the result is ``B×P`` either way).

    Returns:
      A pytree like ``params`` whose every leaf has a leading axis of size ``B``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * (z["y"] - z["x"] @ w) ** 2
      >>> batch = {"x": jnp.eye(3), "y": jnp.ones(3)}
      >>> jaxgen.per_example_grads(loss, jnp.zeros(3), batch).shape
      (3, 3)
    """
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    grad_one = functools.partial(jax.grad(loss_fn), params)
    if microbatch_size is None:
        return jax.vmap(grad_one)(batch)
    return jax.lax.map(grad_one, batch, batch_size=microbatch_size)


def gradient_dispersion(
    loss_fn: LossFn,
    params: PyTree,
    batch: PyTree,
    *,
    method: str = "auto",
    microbatch_size: int | None = None,
) -> DispersionStats:
    """Mean loss, mean gradient, per-example squared norms and gradient dispersion.

    ``dispersion = (1/b) Σ_i ‖g_i − ḡ‖²``; ``stats.minibatch_variance = dispersion / b`` is
    the ``V_t`` of Theorem 1 in Wang & Mao (ICLR 2022).

    Methods:

    - ``"ghost"``: one forward and one backward pass, no per-example gradient is
      materialised for dense layers (``‖g_i‖² = ‖x_i‖²‖δ_i‖²``, Gram form on sequences)
      or embeddings (any gather mode: out-of-range ids count as JAX's gradient counts
      them); biases, gains, convolution kernels and parameters no rule covers (used in
      several places, transformed before use, a batched ``dot_general`` or a
      ``custom_vjp``) get exact per-example gradients for that parameter alone, with a
      warning naming the latter. Calls are inlined; ``jax.checkpoint`` blocks are
      followed inside and stay rematerialised; a ``scan`` over stacked layers or closing
      over its weights (a recurrent cell, ``fori_loop`` over a block) is opened, each
      slice or each shared weight getting its rule (``jaxgen._ghost``). The
      dispersion is ``Σ_i ‖g_i‖² − b‖ḡ‖²`` per layer, in the parameters' precision or
      float32 if wider; where that difference would cancel all but ``1e5·eps`` of
      ``Σ_i ‖g_i‖²`` (the mean gradient dominating), the layer is recomputed exactly
      from its per-example gradients, a few at a time, inside the same call
      (``lax.cond``: free when not taken), so the relative rounding error stays below
      about ``1.6e-4`` (``jaxgen._ghost.CANCELLATION_EPS``). A program the interpreter
      cannot follow is computed with ``"vmap"``, with a warning.
    - ``"vmap"``: materialises per-example gradients (``microbatch_size`` at a time) and
      sums squared residuals about the first example's gradient (their sum corrects
      for the shift), so it stays accurate in float32 however much ``‖ḡ‖`` dominates:
      the rounding error is about ``1 + ‖g_1 − ḡ‖²/dispersion`` ulps. By default in
      microbatches of at most 2²² numbers of per-example gradients
      (``default_microbatch``).
    - ``"auto"``: ``"ghost"``, silently falling back per parameter; ``"vmap"`` for the
      whole call when a parameter's exact path would run a loop (a ``scan`` it cannot
      open) per example, which costs more than ``"vmap"`` (a scanned 4×128 stack, before
      scans were opened: 5.5× against 2.5× a gradient), or when the interpreter cannot
      follow the program.

    Args:
      loss_fn: per-example loss ``loss_fn(params, example) -> scalar``, a pure function
        (Flax NNX models: ``nnx.split`` once, ``nnx.merge`` inside; BatchNorm in eval
        mode only).
      params: the parameters ``w``.
      batch: pytree whose leaves share a leading axis of size ``b``.
      method: ``"auto"``, ``"ghost"`` or ``"vmap"``.
      microbatch_size: with ``"vmap"``, materialise at most this many per-example
        gradients at once (memory ``microbatch_size × P`` instead of ``b × P``);
        ``None``: ``default_microbatch`` (the whole batch when ``b × P ≤ 2²²``).

    Returns:
      ``DispersionStats(loss, grad, sq_norms, dispersion, layer_dispersion)``.

    Example:
      >>> import jax.numpy as jnp, jaxgen
      >>> loss = lambda w, z: 0.5 * (z["y"] - z["x"] @ w) ** 2
      >>> batch = {"x": jnp.eye(2), "y": jnp.array([1.0, -1.0])}
      >>> float(jaxgen.gradient_dispersion(loss, jnp.zeros(2), batch).dispersion)
      0.5
    """
    _checks.choice("method", method, _METHODS)
    _checks.batch_size("batch", batch)
    _checks.per_example_loss(loss_fn, params, batch)
    _checks.optional_integer("microbatch_size", microbatch_size, minimum=1)
    return ghost_or_vmap(
        method,
        lambda: _dispersion_ghost(loss_fn, params, batch, warn=method == "ghost"),
        lambda: _dispersion_vmap(loss_fn, params, batch, microbatch_size),
    )


def ghost_or_vmap(method: str, ghost, vmap):
    """``vmap()`` for ``method="vmap"``; else ``ghost()``, and ``vmap()`` where the ghost
    interpreter cannot follow the program (with a warning for ``method="ghost"``, at the
    caller of the public function that called this)."""
    if method == "vmap":
        return vmap()
    try:
        return ghost()
    except jax.errors.JaxRuntimeError:
        raise
    except Exception as error:  # a program the ghost interpreter cannot follow
        if method == "ghost":
            warnings.warn(
                f"method='ghost' cannot follow this loss ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:200] if str(error) else ''}); "
                "computed with method='vmap' instead",
                stacklevel=3,
            )
        return vmap()


@functools.partial(jax.jit, static_argnames=("loss_fn", "warn"))
def _dispersion_ghost(loss_fn, params, batch, warn):
    from jaxgen._ghost import ghost_dispersion

    def vmap_path():
        return _dispersion_vmap(loss_fn, params, batch, None)

    return ghost_dispersion(loss_fn, params, batch, warn=warn, fallback=None if warn else vmap_path)
