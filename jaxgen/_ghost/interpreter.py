"""A small jaxpr interpreter that finds where parameters meet example data.

It re-evaluates a per-example loss equation by equation, tagging every value with what it
depends on (``Value``): parameters only, the example, or neither. An equation that takes
both is a *use* (``Use``): the places where ghost norms read an example operand ``x`` and,
through a zero probe added to the output, the output gradient ``δ``. Plain calls
(``jit`` and the like) are inlined so that the uses inside them are seen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.extend.core as jcore
import jax.numpy as jnp

# Inlined calls. ``remat2`` (jax 0.10+), ``checkpoint`` and ``remat`` (older) are
# ``jax.checkpoint``: their uses get their rules, and the block is evaluated under
# ``jax.checkpoint`` again (same policy), so its activations are still recomputed.
REMATS = ("remat2", "remat", "checkpoint")
CALLS = ("jit", "pjit", "closed_call", "core_call", *REMATS)
VIEWS = (
    "convert_element_type",
    "reshape",
    "transpose",
    "squeeze",
    "expand_dims",
    "copy",
    "copy_p",
)
PARAM, EXAMPLE, CONST = "param", "example", "const"


class Value(NamedTuple):
    """A value of the per-example program and what it depends on.

    ``kind`` is ``PARAM`` (depends on parameters only), ``EXAMPLE`` (on the example)
    or ``CONST``; ``leaves`` are the parameter leaves a ``PARAM`` value depends on;
    ``view`` is the leaf it is a pure view of (an ``int``), ``("broadcast", leaf)`` for a
    broadcast of one, or ``None``.
    """

    value: Any
    kind: str
    leaves: frozenset[int] = frozenset()
    view: int | tuple[str, int] | None = None


@dataclasses.dataclass
class Use:
    """An equation where parameter-derived values meet example data."""

    eqn: Any
    example_positions: tuple[int, ...]
    param_positions: tuple[int, ...]
    leaves: frozenset[int]  # leaves the parameter operands depend on
    view_leaf: int | None  # the leaf, when the only parameter operand is a pure view of it
    probe_avals: tuple[Any, ...]  # one per output; None for non-float outputs
    rule: Any = None  # the rules.Rule that handles it, set when planning

    @property
    def single_view(self) -> bool:
        """One example operand and one parameter operand that is a pure view of a leaf."""
        return self.view_leaf is not None and len(self.example_positions) == 1


class Interpreter:
    """Evaluates a per-example jaxpr, tracking which values depend on parameters.

    With ``probes`` set, adds ``probes[u]`` to the outputs of use ``u`` and records the
    example operands of every use in ``captured``.
    """

    def __init__(self, probes=None):
        self.probes = probes
        self.uses: list[Use] = []
        self.derived: set[int] = set()
        self.captured: list[list[Any]] = []

    def run(self, jaxpr, consts, leaves, example_leaves):
        """Evaluate; ``example_leaves=None`` marks the example inputs without values."""
        if example_leaves is None:
            example_leaves = [None] * (len(jaxpr.invars) - len(leaves))
        args = [Value(v, PARAM, frozenset([i]), i) for i, v in enumerate(leaves)]
        args += [Value(v, EXAMPLE) for v in example_leaves]
        return self._eval(jaxpr, [Value(c, CONST) for c in consts], args)

    def _eval(self, jaxpr, consts, args):
        env: dict[Any, Value] = {}

        def read(atom) -> Value:
            if isinstance(atom, jcore.Literal):
                return Value(atom.val, CONST)
            return env[atom]

        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))
        for eqn in jaxpr.eqns:
            entries = [read(a) for a in eqn.invars]
            env.update(zip(eqn.outvars, self._apply(eqn, entries), strict=True))
        return [read(a) for a in jaxpr.outvars]

    def _apply(self, eqn, entries: list[Value]) -> list[Value]:
        kinds = {e.kind for e in entries}
        meets = EXAMPLE in kinds and PARAM in kinds
        if meets:
            inner = inlinable(eqn)
            if inner is not None:
                jaxpr, consts = inner
                if eqn.primitive.name in REMATS and self.probes is not None:
                    return self._rematerialised(eqn, jaxpr, consts, entries)
                return self._eval(jaxpr, [Value(c, CONST) for c in consts], entries)
        outs = bind(eqn, [e.value for e in entries])
        if meets:
            return self._use(eqn, entries, outs)
        if PARAM in kinds:
            return self._parameter_only(eqn, entries, outs)
        kind = EXAMPLE if EXAMPLE in kinds else CONST
        return [Value(o, kind) for o in outs]

    def _rematerialised(self, eqn, jaxpr, consts, entries) -> list[Value]:
        """A ``jax.checkpoint`` block with probes: its uses and what they depend on come
        from a plain evaluation (dead code afterwards), the values from the block
        re-evaluated under ``jax.checkpoint`` with its probes in and captures out."""
        discovery = Interpreter()
        layout = discovery._eval(jaxpr, [Value(c, CONST) for c in consts], entries)
        start = len(self.uses)
        probes = self.probes[start : start + len(discovery.uses)]

        def block(values, block_probes):
            inner = Interpreter(block_probes)
            args = [e._replace(value=v) for e, v in zip(entries, values, strict=True)]
            outs = inner._eval(jaxpr, [Value(c, CONST) for c in consts], args)
            return [o.value for o in outs], inner.captured

        checkpointed = jax.checkpoint(
            block, prevent_cse=eqn.params.get("prevent_cse", True), policy=eqn.params.get("policy")
        )
        values, captured = checkpointed([e.value for e in entries], probes)
        self.uses += discovery.uses
        self.derived |= discovery.derived
        self.captured += captured
        return [v._replace(value=x) for v, x in zip(layout, values, strict=True)]

    def _parameter_only(self, eqn, entries, outs) -> list[Value]:
        deps = frozenset().union(*(e.leaves for e in entries))
        params = [e for e in entries if e.kind == PARAM]
        view = None
        if len(params) == 1 and len(eqn.outvars) == 1:
            origin = params[0].view
            if eqn.primitive.name in VIEWS:
                view = origin
            elif eqn.primitive.name == "broadcast_in_dim" and origin is not None:
                view = ("broadcast", origin if isinstance(origin, int) else origin[1])
        if view is None:
            self.derived |= deps
        return [Value(o, PARAM, deps, view) for o in outs]

    def _use(self, eqn, entries, outs) -> list[Value]:
        use_id = len(self.uses)
        params = tuple(i for i, e in enumerate(entries) if e.kind == PARAM)
        examples = tuple(i for i, e in enumerate(entries) if e.kind == EXAMPLE)
        view_leaf = None
        if len(params) == 1 and isinstance(entries[params[0]].view, int):
            view_leaf = entries[params[0]].view
        avals = tuple(
            v.aval if jnp.issubdtype(v.aval.dtype, jnp.inexact) else None for v in eqn.outvars
        )
        deps = frozenset().union(*(entries[i].leaves for i in params))
        use = Use(eqn, examples, params, deps, view_leaf, avals)
        self.uses.append(use)
        self.captured.append([entries[i].value for i in examples])
        if self.probes is not None:
            outs = [
                o if p is None else o + p for o, p in zip(outs, self.probes[use_id], strict=True)
            ]
        return [Value(o, EXAMPLE) for o in outs]


def inlinable(eqn):
    """``(jaxpr, consts)`` of a plain call (``jit`` and the like), else ``None``."""
    if eqn.primitive.name not in CALLS:
        return None
    inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner.jaxpr, inner.consts
    if isinstance(inner, jcore.Jaxpr) and not inner.constvars:
        return inner, []
    return None


def bind(eqn, values):
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns = []
    if isinstance(bind_params, tuple):  # jax < 0.8 returns (subfuns, params)
        subfuns, bind_params = bind_params
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *values, **bind_params)
    return list(outs) if eqn.primitive.multiple_results else [outs]


class ParamOnly(Interpreter):
    """Evaluates only the parameter-derived part; records each use's parameter operands
    (``operands``) and its constant operands by position (``constants``: literals, closed
    over arrays, values computed from neither parameters nor the example)."""

    def __init__(self):
        super().__init__()
        self.operands: list[list[Any]] = []
        self.constants: list[dict[int, Any]] = []

    def _apply(self, eqn, entries):
        kinds = {e.kind for e in entries}
        if EXAMPLE in kinds and PARAM in kinds and inlinable(eqn) is not None:
            return super()._apply(eqn, entries)
        if EXAMPLE in kinds:
            if PARAM in kinds:
                self.operands.append([e.value for e in entries if e.kind == PARAM])
                self.constants.append(
                    {i: e.value for i, e in enumerate(entries) if e.kind == CONST}
                )
            return [Value(None, EXAMPLE) for _ in eqn.outvars]
        return super()._apply(eqn, entries)
