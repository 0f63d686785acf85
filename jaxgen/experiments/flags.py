"""The training flags of the command line, made from the config and the method registry.

Every ``TrainConfig`` field is a flag (``options.add_flags``); ``--method`` picks a
registered method and ``--<method>-<field>`` sets its hyper-parameters; ``--preset``
fills in a setting of the paper first. ``config_from_args`` turns the parsed flags back
into a ``TrainConfig``; ``parse_methods`` reads the ``--methods`` list of ``compare``.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from typing import Any

from jaxgen.experiments import config, methods, options
from jaxgen.experiments.errors import ConfigError, RunWarning


def add_training_flags(parser: argparse.ArgumentParser, *, out_default: str) -> None:
    """``--out``, ``--preset``, every config field, ``--method`` and its fields, ``--resume``."""
    parser.add_argument("--out", default=out_default, help=f"output folder (default {out_default})")
    presets = "; ".join(f"{name}: {p.setting}" for name, p in config.PRESETS.items())
    parser.add_argument("--preset", choices=sorted(config.PRESETS), help=presets)
    options.add_flags(parser.add_argument_group("run"), config.TrainConfig)
    described = "; ".join(f"{name}: {cls.description}" for name, cls in methods.REGISTRY.items())
    parser.add_argument("--method", choices=list(methods.REGISTRY), help=described)
    for name, cls in methods.REGISTRY.items():
        options.add_flags(parser.add_argument_group(f"--method {name}"), cls, prefix=f"{name}-")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    devices = parser.add_argument_group("devices and hosts")
    devices.add_argument(
        "--mesh",
        help="data=N[,perturb=K]: split batches over N devices (GMP's perturbations over K); "
        "default: every device on data (fewer, to divide the batch size)",
    )
    devices.add_argument("--coordinator", help="host:port of process 0 (jax.distributed)")
    devices.add_argument("--num-processes", type=int, help="processes in a multi-host run")
    devices.add_argument("--process-id", type=int, help="this process's index, from 0")


def method_flags(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The ``--<name>-<field>`` values given on the command line."""
    return options.values_from(args, methods.REGISTRY[name], prefix=f"{name}-")


def config_from_args(
    args: argparse.Namespace, *, defaults: dict[str, Any] | None = None, **overrides: Any
) -> config.TrainConfig:
    """The config the flags describe: ``defaults``, the preset, the flags, ``overrides``."""
    values = options.values_from(args, config.TrainConfig)
    preset = config.PRESETS[args.preset].values if args.preset else {}
    for name, value in values.items():
        if name in preset and preset[name] != value:
            warnings.warn(
                f"{options.flag_name(name)} {value} replaces the preset's {preset[name]}: the "
                f"run is no longer the setting of {args.preset}",
                RunWarning,
                stacklevel=2,
            )
    method = getattr(args, "method", None) or "erm"
    for name in methods.REGISTRY:
        given = method_flags(args, name)
        if name == method:
            values["method"] = methods.make(name, **given)
        elif given and getattr(args, "methods", None) is None:
            flag = options.flag_name(next(iter(given)), f"{name}-")
            raise ConfigError(f"{flag} applies to --method {name}, not to {method}")
    return config.from_preset(args.preset, **(defaults or {}) | values | overrides)


def parse_methods(text: str, args: argparse.Namespace) -> list[tuple[str, methods.Method]]:
    """``"erm,gmp,gmp:samples=10"`` → ``[(label, method), ...]``.

    A method's ``--<method>-<field>`` flags are its defaults; ``name:field=value``
    (``:``-separated pairs) sets a field for that entry alone.
    """
    entries = []
    for spec in (part.strip() for part in text.split(",")):
        if not spec:
            continue
        name, *pairs = spec.split(":")
        if name not in methods.REGISTRY:
            raise ConfigError(
                f"--methods: {name!r} is not a method; choose from {', '.join(methods.REGISTRY)}"
            )
        fields = {f.name: f for f in dataclasses.fields(methods.REGISTRY[name])}
        values = method_flags(args, name)
        for pair in pairs:
            key, _, raw = pair.partition("=")
            key = key.replace("-", "_")
            if key not in fields or not raw:
                known = ", ".join(fields) or "none"
                raise ConfigError(f"--methods: {spec!r}: {name} has fields {known}")
            try:
                values[key] = fields[key].metadata["check"].parse(raw)
            except ValueError:
                raise ConfigError(f"--methods: {spec!r}: bad value {raw!r} for {key}") from None
        entries.append((spec, methods.make(name, **values)))
    if not entries:
        raise ConfigError("--methods: give at least one method, e.g. erm,gmp")
    labels = [label for label, _ in entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods: each entry once, got {text!r}")
    return entries


def start_distributed(args: argparse.Namespace) -> int:
    """``jax.distributed.initialize`` when a multi-host run is asked for (flags or the
    environment variables JAX reads, e.g. ``JAX_COORDINATOR_ADDRESS``); CPU processes
    talk through gloo. Returns this process's index (0 when there is only one)."""
    import os

    import jax

    given = (args.coordinator, args.num_processes, args.process_id)
    if all(value is None for value in given) and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        return 0
    if jax.config.jax_platforms in (None, "", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    return jax.process_index()


def mesh_from_args(args: argparse.Namespace, batch_size: int):
    """The ``--mesh``; by default every device on ``data``, or the most that divide the
    batch size (with a warning). A mesh of one device is no mesh."""
    import jax

    from jaxgen import _sharding

    try:
        if args.mesh:
            mesh = _sharding.make_mesh(args.mesh)
        else:
            count = jax.device_count()
            data = max(d for d in range(1, count + 1) if batch_size % d == 0)
            if data < count:
                warnings.warn(
                    f"--batch-size {batch_size} is not a multiple of the {count} devices: "
                    f"using --mesh data={data}",
                    RunWarning,
                    stacklevel=2,
                )
            mesh = _sharding.make_mesh({"data": data})
    except ValueError as error:
        raise ConfigError(f"--mesh: {str(error).removeprefix('mesh ')}") from error
    return None if mesh.devices.size == 1 else mesh
