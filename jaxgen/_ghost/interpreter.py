"""A small jaxpr interpreter that finds where parameters meet example data.

It re-evaluates a per-example loss equation by equation, tagging every value with what it
depends on (``Value``): parameters only, the example, or neither. An equation that takes
both is a *use* (``Use``): the places where ghost norms read an example operand ``x`` and,
through a zero probe added to the output, the output gradient ``δ``. Plain calls
(``jit`` and the like) are inlined so that the uses inside them are seen.

A ``scan`` whose parameter operands are scanned inputs (stacked weights, one slice per
iteration: ``lax.scan`` over layers, flax ``nn.scan``, equinox stacks) or constants (the
same weight at every iteration: a recurrent cell, ``fori_loop`` over a block), each a pure
view of one leaf, is *opened*: its body is interpreted inside a ``lax.scan`` again, with
each use's probes as scanned inputs and its example operands as scanned outputs (or,
for a tapped use, nothing: ``Tap``), so a use in the body is seen once per iteration
(``Use.loops``). A stacked leaf's per-example gradient is the stack of its slices'
gradients; a tied leaf's is their sum (``Use.tied``). The planner closes (treats as one
opaque use) any scan whose uses would not all get a ghost rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
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
    scans: tuple[Any, ...] = ()  # the opened scan equations around it, outermost first
    operand_is_leaf: bool = False  # the parameter operand is the leaf itself, as passed
    operand_size: int = 0  # elements of the parameter operand (one iteration's, in a loop)
    leaf_size: int = 0  # elements of the leaf it is a view of

    @property
    def loops(self) -> tuple[int, ...]:
        """Trip counts of the opened scans around the use: its captured operands, output
        gradients and probes carry these leading axes (before the batch axis)."""
        return tuple(scan.params["length"] for scan in self.scans)

    @property
    def tied(self) -> bool | None:
        """In opened scans: ``True`` when the parameter operand is the whole leaf at every
        iteration (closed over by the loops: ``g_i`` is the sum over iterations),
        ``False`` when it is one slice per iteration (the slices partition the leaf),
        ``None`` when neither (a slice of an outer loop closed over by an inner one)."""
        if not self.leaf_size:  # not a pure view of a leaf
            return None
        if self.operand_size == self.leaf_size:
            return True
        if self.operand_size * math.prod(self.loops) == self.leaf_size:
            return False
        return None

    @property
    def single_view(self) -> bool:
        """One example operand and one parameter operand that is a pure view of a leaf."""
        return self.view_leaf is not None and len(self.example_positions) == 1


class Interpreter:
    """Evaluates a per-example jaxpr, tracking which values depend on parameters.

    With ``probes`` set, adds ``probes[u]`` to the outputs of use ``u`` and records the
    example operands of every use in ``captured``; a use with a statistic in ``taps``
    (``Tap``) instead passes its output through ``tapped``, so that the gradient with
    respect to its probe is the statistic, and records nothing.
    """

    def __init__(self, probes=None, closed: frozenset[int] = frozenset(), taps=None):
        self.probes = probes
        self.closed = closed  # ids of the scan equations not to open
        self.taps = taps  # per use: a Tap or None, with probes
        self.leaf_values: list[Any] = []  # the leaves as passed to run(), not views of them
        self.uses: list[Use] = []
        self.derived: set[int] = set()
        self.captured: list[list[Any]] = []

    def _fresh(self) -> Interpreter:
        """An interpreter of the same kind without probes, for a body's layout."""
        fresh = type(self)(closed=self.closed)
        fresh.leaf_values = self.leaf_values
        return fresh

    def run(self, jaxpr, consts, leaves, example_leaves):
        """Evaluate; ``example_leaves=None`` marks the example inputs without values."""
        if example_leaves is None:
            example_leaves = [None] * (len(jaxpr.invars) - len(leaves))
        self.leaf_values = list(leaves)
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
            layout = self._opened(eqn, entries)
            if layout is not None:
                return self._scan(eqn, entries, layout)
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
        discovery = self._fresh()
        layout = discovery._eval(jaxpr, [Value(c, CONST) for c in consts], entries)
        start = len(self.uses)
        probes, taps = self._inner(start, len(discovery.uses))

        def block(values, block_probes):
            inner = Interpreter(block_probes, self.closed, taps)
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

    def _inner(self, start: int, count: int):
        """The probes and taps of the ``count`` uses from ``start`` (those of a block or
        a loop body), or ``(None, None)`` without probes."""
        if self.probes is None:
            return None, None
        end = start + count
        return self.probes[start:end], None if self.taps is None else self.taps[start:end]

    def _opened(self, eqn, entries: list[Value]):
        """The layout (``_scan_layout``) of a ``scan`` to open, else ``None``. Opened:
        parameters enter only as scanned inputs (their slices partition the leaf) or
        constants (tied), each a pure (bijective) view of one leaf, and no carry is
        parameter-derived."""
        if eqn.primitive.name != "scan" or id(eqn) in self.closed:
            return None
        num_consts, num_carry = scan_counts(eqn)
        carries = entries[num_consts : num_consts + num_carry]
        others = entries[:num_consts] + entries[num_consts + num_carry :]
        if any(e.kind == PARAM for e in carries) or not all(
            isinstance(e.view, int) for e in others if e.kind == PARAM
        ):
            return None
        return self._scan_layout(eqn, entries)

    def _body_args(self, eqn, entries, carry_kinds, carry_values, xs_values) -> list[Value]:
        """The body's arguments: the scan's constants, the carries with their (joined)
        kinds, and one iteration's slices, a parameter slice still a view of its leaf."""
        num_consts, num_carry = scan_counts(eqn)
        num_fixed = num_consts + num_carry
        consts = entries[:num_consts]
        carries = [Value(v, k) for v, k in zip(carry_values, carry_kinds, strict=True)]
        xs = [e._replace(value=v) for e, v in zip(entries[num_fixed:], xs_values, strict=True)]
        return [*consts, *carries, *xs]

    def _scan_layout(self, eqn, entries):
        """``(carry kinds, discovery interpreter, output Values)`` of one iteration, the
        carries' kinds joined until they are stable (a constant carry that the body
        mixes with the example is example data from then on), or ``None`` where a
        parameter would be carried."""
        num_consts, num_carry = scan_counts(eqn)
        body = eqn.params["jaxpr"]
        carry_entries = entries[num_consts : num_consts + num_carry]
        kinds = [e.kind for e in carry_entries]
        carry_values = [e.value for e in carry_entries]
        xs_values = [
            None if e.value is None else jax.lax.index_in_dim(e.value, 0, keepdims=False)
            for e in entries[num_consts + num_carry :]
        ]
        while True:
            discovery = self._fresh()
            args = self._body_args(eqn, entries, kinds, carry_values, xs_values)
            outs = discovery._eval(body.jaxpr, [Value(c, CONST) for c in body.consts], args)
            joined = [
                EXAMPLE if EXAMPLE in (k, o.kind) else o.kind
                for k, o in zip(kinds, outs[:num_carry], strict=True)
            ]
            if PARAM in joined:
                return None
            if joined == kinds:
                return kinds, discovery, outs
            kinds = joined

    def _scan(self, eqn, entries, layout) -> list[Value]:
        """An opened ``scan``; see the module docstring."""
        kinds, discovery, outs = layout
        num_consts, num_carry = scan_counts(eqn)
        body = eqn.params["jaxpr"]
        start = len(self.uses)
        probes, taps = self._inner(start, len(discovery.uses))
        if probes is None:
            values = bind(eqn, [e.value for e in entries])
            captured = discovery.captured
        else:

            def step(carry_values, scanned):
                xs_values, iteration_probes = scanned
                inner = Interpreter(iteration_probes, self.closed, taps)
                args = self._body_args(eqn, entries, kinds, carry_values, xs_values)
                results = inner._eval(body.jaxpr, [Value(c, CONST) for c in body.consts], args)
                values = [r.value for r in results]
                return values[:num_carry], (values[num_carry:], inner.captured)

            init = [e.value for e in entries[num_consts : num_consts + num_carry]]
            xs = [e.value for e in entries[num_consts + num_carry :]]
            carry, (ys, captured) = jax.lax.scan(
                step,
                init,
                (xs, probes),
                length=eqn.params["length"],
                reverse=eqn.params["reverse"],
                unroll=eqn.params["unroll"],
            )
            values = [*carry, *ys]
        self.uses += [dataclasses.replace(u, scans=(eqn, *u.scans)) for u in discovery.uses]
        self.captured += captured
        self.derived |= discovery.derived
        results = []
        for value, out in zip(values, outs, strict=True):
            if out.kind == PARAM:  # a parameter value leaving the loop: not a plain view
                self.derived |= out.leaves
            results.append(Value(value, out.kind, out.leaves))
        return results

    def _parameter_only(self, eqn, entries, outs) -> list[Value]:
        deps = frozenset().union(*(e.leaves for e in entries))
        params = [e for e in entries if e.kind == PARAM]
        view = None
        if len(params) == 1 and len(eqn.outvars) == 1:
            origin = params[0].view
            if eqn.primitive.name in VIEWS:
                view = origin
            elif eqn.primitive.name == "broadcast_in_dim" and origin is not None:
                leaf = origin if isinstance(origin, int) else origin[1]
                adds_unit_axes = outs[0].size == entries[0].value.size  # (d,) -> (1, d)
                view = leaf if adds_unit_axes and isinstance(origin, int) else ("broadcast", leaf)
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
        if view_leaf is not None and view_leaf < len(self.leaf_values):
            operand, leaf = entries[params[0]].value, self.leaf_values[view_leaf]
            use.operand_is_leaf = operand is leaf
            use.operand_size, use.leaf_size = jnp.size(operand), jnp.size(leaf)
        self.uses.append(use)
        operands = [entries[i].value for i in examples]
        tap = None if self.taps is None else self.taps[use_id]
        self.captured.append([] if tap else operands)
        if tap is not None:
            (out,) = outs
            outs = [tapped(tap, out, operands if tap.reads_operands else [], self.probes[use_id])]
        elif self.probes is not None:
            outs = [
                o if p is None else o + p for o, p in zip(outs, self.probes[use_id], strict=True)
            ]
        return [Value(o, EXAMPLE) for o in outs]


class Tap(NamedTuple):
    """A per-example statistic of a use, ``statistic(operands, delta)`` from the example
    operands (when ``reads_operands``) and the output gradient ``δ`` of one example."""

    statistic: Any
    reads_operands: bool


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def tapped(tap: Tap, out, operands, probe):
    """``out``, unchanged; its VJP gives ``tap.statistic(operands, δ)`` as the gradient
    with respect to ``probe`` (a zero of the statistic's shape), computed in the backward
    pass where ``δ`` is made, instead of ``δ`` and the operands leaving it."""
    del tap, operands, probe
    return out


def _tapped_fwd(tap, out, operands, probe):
    del tap, probe
    return out, operands


def _tapped_bwd(tap, operands, delta):
    return delta, None, tap.statistic(operands, delta)


tapped.defvjp(_tapped_fwd, _tapped_bwd)


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


def scan_counts(eqn) -> tuple[int, int]:
    """``(constants, carries)`` among a ``scan`` equation's operands, which come in that
    order before the scanned inputs: its parameters ``num_consts`` and ``num_carry`` up to
    jax 0.10, the lengths of the first two parts of its ``ft_in`` from jax 0.11."""
    if "num_consts" in eqn.params:
        return eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carries, _ = eqn.params["ft_in"].unpack()
    return len(consts), len(carries)


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
    over arrays, values computed from neither parameters nor the example).

    ``in_loops``: the uses in opened scans are recorded too, one value per iteration
    stacked on leading loop axes (``Use.loops``), constants as arrays of their operand's
    dtype; otherwise they are ``None``.
    """

    def __init__(self, closed: frozenset[int] = frozenset(), in_loops: bool = False):
        super().__init__(closed=closed)
        self.in_loops = in_loops
        self.operands: list[list[Any] | None] = []
        self.constants: list[dict[int, Any] | None] = []

    def _apply(self, eqn, entries):
        kinds = {e.kind for e in entries}
        if EXAMPLE in kinds and PARAM in kinds:
            if inlinable(eqn) is not None:
                return super()._apply(eqn, entries)
            layout = self._opened(eqn, entries)
            if layout is not None:
                return self._scan(eqn, entries, layout)
        if EXAMPLE in kinds:
            if PARAM in kinds:
                self.operands.append([e.value for e in entries if e.kind == PARAM])
                self.constants.append(
                    {
                        i: jnp.asarray(e.value, eqn.invars[i].aval.dtype)
                        if self.in_loops
                        else e.value
                        for i, e in enumerate(entries)
                        if e.kind == CONST
                    }
                )
            return [Value(None, EXAMPLE) for _ in eqn.outvars]
        return super()._apply(eqn, entries)

    def _scan(self, eqn, entries, layout) -> list[Value]:
        """The parameter-derived part of an opened ``scan``, as a loop over its
        non-example values. The uses inside get no operands (``None``): their leaves
        have ghost rules, so no pullback reads them."""
        kinds, discovery, outs = layout
        num_consts, num_carry = scan_counts(eqn)
        body = eqn.params["jaxpr"]
        kept = [k != EXAMPLE for k in kinds]

        def step(kept_values, xs_values):
            values = iter(kept_values)
            carry_values = [next(values) if keep else None for keep in kept]
            inner = ParamOnly(self.closed, self.in_loops)
            args = self._body_args(eqn, entries, kinds, carry_values, xs_values)
            results = inner._eval(body.jaxpr, [Value(c, CONST) for c in body.consts], args)
            carry = [r.value for r, keep in zip(results[:num_carry], kept, strict=True) if keep]
            ys = [None if r.kind == EXAMPLE else r.value for r in results[num_carry:]]
            return carry, (ys, (inner.operands, inner.constants) if self.in_loops else None)

        carries = entries[num_consts : num_consts + num_carry]
        init = [e.value for e, keep in zip(carries, kept, strict=True) if keep]
        xs = [None if e.kind == EXAMPLE else e.value for e in entries[num_consts + num_carry :]]
        carry, (ys, recorded) = jax.lax.scan(
            step, init, xs, length=eqn.params["length"], reverse=eqn.params["reverse"]
        )
        carry = iter(carry)
        values = [next(carry) if keep else None for keep in kept] + list(ys)
        if recorded is None:
            self.operands += [None] * len(discovery.operands)
            self.constants += [None] * len(discovery.constants)
        else:
            self.operands += recorded[0]
            self.constants += recorded[1]
        return [Value(v, o.kind, o.leaves) for v, o in zip(values, outs, strict=True)]
