"""Hessian-vector products for every loss, one with a ``jax.custom_vjp`` inside included.

Forward mode cannot differentiate a ``custom_vjp`` (nor the gradient of one whose forward
rule calls the function itself, the usual way to write it), so such losses get ``H v``
by reverse mode over reverse mode: the VJP of the gradient, since ``H`` is symmetric.
Every other loss gets the gradient linearized (forward over reverse), which is cheaper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxgen._chunks import has_primitive
from jaxgen._types import PyTree


def has_custom_vjp(fn: Callable[..., Any], *args: Any) -> bool:
    """Whether ``fn(*args)`` runs a ``jax.custom_vjp`` at any depth (traced on shapes)."""
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    return has_primitive(jax.make_jaxpr(fn)(*shapes).jaxpr, ("custom_vjp",))


def hvp_fn(
    scalar_fn: Callable[[PyTree], jax.Array], params: PyTree, *, custom_vjp: bool
) -> Callable[[PyTree], PyTree]:
    """``v ↦ ∇²f(params) v``, prepared once for many ``v``: the gradient linearized, or,
    for a function with a ``custom_vjp`` inside (``has_custom_vjp``), its VJP."""
    grad = jax.grad(scalar_fn)
    if not custom_vjp:
        return jax.linearize(grad, params)[1]
    vjp = jax.vjp(grad, params)[1]
    return lambda v: vjp(v)[0]
