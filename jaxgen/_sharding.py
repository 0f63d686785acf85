"""Meshes for data-parallel statistics and training, without ``jax.pmap``.

A mesh has up to two named axes: ``data`` (the batch is split along it) and
``perturb`` (GMP's k perturbed passes are spread along it). Parameters are replicated;
every jaxgen estimator then runs unchanged under ``jax.jit`` with GSPMD partitioning:
per-example quantities stay on the device that holds the example, and the batch mean
gradient and the scalar dispersion are the only cross-device reductions.

    mesh = jaxgen.make_mesh("data=8")
    batch = jaxgen.shard_batch(batch, mesh)          # leading axis split over "data"
    params = jaxgen.replicate(params, mesh)
    stats = jaxgen.gradient_dispersion(loss_fn, params, batch)   # same numbers

Arrays are built from host data with ``jax.make_array_from_callback``, so the same code
runs on one process or many (``jax.distributed``), each process holding the full host
copy and placing only its own shards.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxgen._types import PyTree

AXES = ("data", "perturb")


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """``"data=4,perturb=2"`` (or a mapping) as ``{"data": 4, "perturb": 2}``.

    ``None`` or ``""``: every device on ``data``.
    """
    if spec is None or spec == "":
        return {"data": jax.device_count()}
    if isinstance(spec, str):
        sizes = {}
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, _, size = part.partition("=")
            try:
                sizes[name.strip()] = int(size)
            except ValueError:
                raise ValueError(
                    f"mesh must look like data=8 or data=4,perturb=2, got {spec!r}"
                ) from None
    else:
        sizes = dict(spec)
    for name, size in sizes.items():
        if name not in AXES:
            raise ValueError(
                f"mesh axis must be one of {', '.join(AXES)}, got {name!r} in {spec!r}"
            )
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh axis {name} must have a size >= 1, got {size!r}")
    if not sizes:
        raise ValueError(f"mesh must name at least one axis, got {spec!r}")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None) -> Mesh:
    """A mesh over the first ``prod(sizes)`` devices, axes in the order given.

    Axis types are explicit: ``AxisType.Auto`` on every axis, so XLA's sharding
    propagation partitions each computation from its inputs' shardings.

    Raises:
      ValueError: an unknown axis, a size < 1, or more devices than there are.
    """
    sizes = parse_mesh_spec(spec)
    needed = math.prod(sizes.values())
    available = jax.device_count()
    if needed > available:
        raise ValueError(
            f"mesh {format_mesh(sizes)} needs {needed} devices, but there are {available} "
            "(on a CPU, JAX_NUM_CPU_DEVICES=N simulates N devices)"
        )
    return jax.make_mesh(
        tuple(sizes.values()),
        tuple(sizes),
        devices=jax.devices()[:needed],
        axis_types=(AxisType.Auto,) * len(sizes),
    )


def format_mesh(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{name}={size}" for name, size in sizes.items())


def data_size(mesh: Mesh | None) -> int:
    """The number of shards along ``data`` (1 without a mesh or such an axis)."""
    if mesh is None or "data" not in mesh.axis_names:
        return 1
    return mesh.shape["data"]


def batch_sharding(mesh: Mesh, ndim: int, *, axis: int = 0) -> NamedSharding:
    """Split array axis ``axis`` over ``data``; every other axis replicated."""
    spec = [None] * ndim
    if "data" in mesh.axis_names:
        spec[axis] = "data"
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _place(value: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(value, jax.Array) and value.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch: PyTree, mesh: Mesh, *, axis: int = 0) -> PyTree:
    """``batch`` with array axis ``axis`` (the examples) split over ``data``.

    The size of that axis must be a multiple of the ``data`` axis size.
    """
    shards = data_size(mesh)

    def place(leaf):
        size = np.shape(leaf)[axis]
        if size % shards:
            raise ValueError(
                f"the batch of {size} examples cannot be split evenly over data={shards}: "
                "choose a batch size that is a multiple of the data axis"
            )
        return _place(leaf, batch_sharding(mesh, np.ndim(leaf), axis=axis))

    return jax.tree_util.tree_map(place, batch)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Every leaf of ``tree`` (parameters, optimizer state, keys) on every device."""

    def place(leaf):
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            data = place(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        return _place(leaf, replicated(mesh))

    return jax.tree_util.tree_map(place, tree)


def to_host(value: Any) -> np.ndarray:
    """A jax array (replicated, sharded, or local) as a NumPy array on this host.

    A replicated array that spans other processes is read from a local copy; a sharded
    one is gathered from every process.
    """
    if not isinstance(value, jax.Array) or value.is_fully_addressable:
        return np.asarray(value)
    if value.sharding.is_fully_replicated:
        return np.asarray(value.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(value, tiled=True))


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def count_collectives(compiled_text: str, *, in_branches: bool = False) -> dict[str, int]:
    """How many of each collective a compiled program's HLO text (``.as_text()``) runs.

    Counts instructions (``... = f32[] all-reduce(...)``; async ones by their ``-start``),
    not references to them, in the computations every run executes: those reached from
    the entry computation without passing through a branch of a ``conditional`` (with
    ``in_branches=True``: in every reachable computation).
    """
    opcode = re.compile(rf"(?<![%\w.-])({'|'.join(COLLECTIVES)})(?:-start)?\(")
    header = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{$")
    calls = re.compile(r"\b(?:to_apply|calls|body|condition)=%?([\w.\-]+)")
    branches = re.compile(
        r"\b(?:branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?([\w.\-]+))"
    )
    counts: dict[str, dict[str, int]] = {}
    edges: dict[str, list[str]] = {}
    entry = current = None
    for line in compiled_text.splitlines():
        if match := header.match(line):
            current = match.group(2)
            entry = current if match.group(1) else entry
            counts[current], edges[current] = dict.fromkeys(COLLECTIVES, 0), []
            continue
        if current is None:
            continue
        for name in opcode.findall(line):
            counts[current][name] += 1
        edges[current] += calls.findall(line)
        if in_branches:
            for group, single in branches.findall(line):
                edges[current] += [n.strip().lstrip("%") for n in (group or single).split(",")]
    total = dict.fromkeys(COLLECTIVES, 0)
    if entry is None:  # a fragment: count every instruction in it
        for line in compiled_text.splitlines():
            for name in opcode.findall(line):
                total[name] += 1
        return total
    seen, stack = set(), [entry]
    while stack:
        name = stack.pop()
        if name in seen or name not in counts:
            continue
        seen.add(name)
        for kind, count in counts[name].items():
            total[kind] += count
        stack += edges[name]
    return total
