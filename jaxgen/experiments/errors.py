"""What can go wrong in a run, each failure one type with a message that says what to do.

The command line prints the message as one line and exits with the status given here.

- ``ConfigError`` (status 2): a setting cannot work (a bad value, a model that needs
  images, an output folder that cannot be written, a checkpoint of another run).
- ``OutputError`` (status 1): a file could not be written during the run (disk full, a
  folder made read-only); the checkpoints written before stay usable.
- ``TrainingDiverged`` (status 1): the loss or the weights became non-finite.
- ``RunWarning``: a setting that does nothing, or a damaged checkpoint that was skipped;
  the run goes on (printed as one ``warning:`` line each).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable


class ConfigError(ValueError):
    """A run's configuration cannot work (bad value, incompatible model and data)."""


class OutputError(RuntimeError):
    """A result file or checkpoint could not be written."""


class TrainingDiverged(RuntimeError):
    """The training loss or weights became non-finite."""


class RunWarning(UserWarning):
    """A setting that does nothing, or a damaged checkpoint skipped while resuming."""


@contextlib.contextmanager
def warnings_as_lines(say: Callable[[str], None]):
    """Print each ``RunWarning`` as one ``warning:`` line (other warnings as usual)."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", RunWarning)
        default = warnings.showwarning

        def show(message, category, *args, **kwargs):
            if issubclass(category, RunWarning):
                say(f"warning: {message}")
            else:
                default(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield
