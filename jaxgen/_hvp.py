"""Hessian-vector products for every loss, one with a ``jax.custom_vjp`` inside included.

Forward mode cannot differentiate a ``custom_vjp`` (nor the gradient of one whose forward
rule calls the function itself, the usual way to write it), so such losses get ``H v``
by reverse mode over reverse mode: the VJP of the gradient, since ``H`` is symmetric.
Every other loss gets the gradient linearized (forward over reverse), which is cheaper.
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from jaxgen._chunks import has_primitive
from jaxgen._types import LossFn, PyTree


def has_custom_vjp(loss_fn: LossFn, params: PyTree, batch: PyTree) -> bool:
    """Whether the per-example ``loss_fn(params, example)`` runs a ``jax.custom_vjp`` at
    any depth (traced on the shapes of one example of ``batch``)."""
    one = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), batch)
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    return has_primitive(jax.make_jaxpr(loss_fn)(shapes, one).jaxpr, ("custom_vjp",))


def hvp_fn(
    scalar_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    custom_vjp: bool,
    outer: str = "forward",
) -> Callable[[PyTree], PyTree]:
    """``v ↦ ∇²f(params) v``, prepared once for many ``v``.

    ``outer="forward"``: the gradient linearized (forward over reverse; its primal pass is
    shared by every product). ``outer="reverse"``: the gradient of the directional
    derivative ``vᵀ∇f`` (reverse over forward), which returns ``H v`` in the parameters'
    own memory layout: on XLA:CPU the linearized gradient of a square weight comes back
    transposed, and every later operation mixing it with ``v`` then read it across the
    grain (a Lanczos step on the benchmarks' MLP was markedly slower). A function with a
    ``custom_vjp`` inside (``has_custom_vjp``) gets the VJP of its gradient either way."""
    grad = jax.grad(scalar_fn)
    if custom_vjp:
        vjp = jax.vjp(grad, params)[1]
        return lambda v: vjp(v)[0]
    if outer == "reverse":
        return lambda v: jax.grad(lambda w: jax.jvp(scalar_fn, (w,), (v,))[1])(params)
    return jax.linearize(grad, params)[1]
