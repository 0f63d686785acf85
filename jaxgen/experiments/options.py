"""Dataclass fields that carry their help text and check, so a setting is written once.

``option(default, help, check)`` declares a field of a frozen config dataclass;
``validate(instance)`` runs every field's check (from ``__post_init__``), and
``add_flags(parser, cls)`` makes one command-line flag per field with the same check as
its argparse ``type``. A config, a training method and the CLI therefore share one
definition of each setting and one message for each bad value.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from jaxgen.experiments.errors import ConfigError

__all__ = ["Check", "ConfigError", "option", "validate", "add_flags", "values_from"]


@dataclasses.dataclass(frozen=True)
class Check:
    """What a value must satisfy: ``requirement`` completes "must ...", e.g. "be > 0"."""

    requirement: str
    parse: Callable[[str], Any]
    accepts: Callable[[Any], bool]
    choices: tuple[str, ...] | None = None  # the values, when they are a list of names
    item: Check | None = None  # for a list: the check of each item

    def message(self, value: Any) -> str:
        return f"must {self.requirement}, got {value}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def integer(minimum: int) -> Check:
    return Check(f"be an integer >= {minimum}", int, lambda v: _is_int(v) and v >= minimum)


POSITIVE_INT = integer(1)
NON_NEGATIVE_INT = integer(0)
ANY_INT = Check("be an integer", int, _is_int)
POSITIVE = Check(
    "be a finite number > 0", float, lambda v: _is_number(v) and math.isfinite(v) and v > 0
)
UNIT = Check("lie in [0, 1]", float, lambda v: _is_number(v) and 0.0 <= v <= 1.0)
NON_NEGATIVE = Check(
    "be a finite number >= 0", float, lambda v: _is_number(v) and math.isfinite(v) and v >= 0
)
HALF_OPEN_UNIT = Check("lie in [0, 1)", float, lambda v: _is_number(v) and 0.0 <= v < 1.0)
FRACTION = Check("lie in (0, 1]", float, lambda v: _is_number(v) and 0.0 < v <= 1.0)
TEXT = Check("be text", str, lambda v: isinstance(v, str))
FLAG = Check("be true or false", bool, lambda v: isinstance(v, bool))


def one_of(options: Sequence[str]) -> Check:
    options = tuple(options)
    return Check(f"be one of {', '.join(options)}", str, lambda v: v in options, choices=options)


def list_of(item: Check) -> Check:
    """A tuple of items, written on the command line as ``a,b,c``."""

    def parse(text: str) -> tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())

    def accepts(value: Any) -> bool:
        return isinstance(value, tuple) and all(map(item.accepts, value))

    return Check(item.requirement, parse, accepts, item=item)


def option(
    default: Any, help: str, check: Check, *, optional: bool = False, flag: bool = True
) -> Any:
    """A dataclass field with its help text and check; ``optional``: ``None`` allowed.

    ``flag=False`` keeps the field off the command line (set from Python or a preset).
    """
    metadata = {"help": help, "check": check, "optional": optional, "flag": flag}
    return dataclasses.field(default=default, metadata=metadata)


def validate(instance: Any, *, prefix: str = "") -> None:
    """Raise ``ConfigError("<prefix><field> must ..., got ...")`` for the first bad field."""
    for field in dataclasses.fields(instance):
        if "check" not in field.metadata:
            continue
        value, check = getattr(instance, field.name), field.metadata["check"]
        if value is None and field.metadata["optional"]:
            continue
        if not check.accepts(value):
            raise ConfigError(f"{prefix}{field.name} {check.message(repr(value))}")


def argparse_type(check: Check) -> Callable[[str], Any]:
    def convert_one(check: Check, text: str) -> Any:
        try:
            value = check.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(check.message(text)) from None
        if not check.accepts(value):
            raise argparse.ArgumentTypeError(check.message(text))
        return value

    def convert(text: str) -> Any:
        if check.item is None:
            return convert_one(check, text)
        items = check.parse(text)
        if not items:
            raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
        return tuple(convert_one(check.item, item) for item in items)

    return convert


def flag_name(field_name: str, prefix: str = "") -> str:
    return "--" + (prefix + field_name).replace("_", "-")


def add_flags(group: Any, cls: type, *, prefix: str = "") -> None:
    """One flag ``--<prefix><field>`` per option of ``cls``, defaulting to ``None`` (unset)."""
    for field in dataclasses.fields(cls):
        if "check" not in field.metadata or not field.metadata["flag"]:
            continue
        check, dest = field.metadata["check"], prefix.replace("-", "_") + field.name
        default = field.default
        help_text = field.metadata["help"] + ("" if default is None else f" (default {default})")
        if check is FLAG:
            group.add_argument(
                flag_name(field.name, prefix),
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        elif check.choices is not None:
            group.add_argument(
                flag_name(field.name, prefix), dest=dest, choices=check.choices, help=help_text
            )
        else:
            group.add_argument(
                flag_name(field.name, prefix),
                dest=dest,
                type=argparse_type(check),
                help=help_text,
            )


def values_from(args: argparse.Namespace, cls: type, *, prefix: str = "") -> dict[str, Any]:
    """The options of ``cls`` set on the command line (see ``add_flags``), by field name."""
    values = {}
    for field in dataclasses.fields(cls):
        value = getattr(args, prefix.replace("-", "_") + field.name, None)
        if value is not None:
            values[field.name] = value
    return values
