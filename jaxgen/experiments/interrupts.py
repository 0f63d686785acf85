"""Stopping a run cleanly on SIGINT (Ctrl-C) and SIGTERM (what preemptible clusters send).

While ``handled()`` is active, the first signal only records itself. The training loop
reads the record at safe points (after a segment of steps and its checkpoint, before the
final estimates, between the estimates and the result files) with ``check()``, which
raises ``Interrupted``; the loop first saves a checkpoint of the step it reached. Nothing
is cut in half by an exception landing inside a JAX call, an orbax save or a file write.
A second signal acts at once: ``at_once(signum)`` if given (the command line exits with
``128 + signum`` without a traceback), else whatever was installed before (Python's
``KeyboardInterrupt`` for SIGINT, termination for SIGTERM).

``phase(name)`` marks the start of a phase of a run (``start``, ``prepare``,
``restore``, ``segment``, ``evaluate``, ``checkpoint``, ``estimates``, ``write``,
``exit``): when the environment variable ``JAXGEN_PHASES`` names a file, a line
``<monotonic seconds> <name>`` is appended to it. The fault-injection tests use it to
deliver signals inside every phase; otherwise it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import numpy as np

SIGNALS = (signal.SIGINT, signal.SIGTERM)
PHASES_ENV = "JAXGEN_PHASES"

_received: list[int] = []  # signals received while handled, in order
_active = False  # handled() is in force (the outermost one owns the handlers)


class Interrupted(KeyboardInterrupt):
    """A run stopped at a safe point by SIGINT or SIGTERM (its checkpoint is saved)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        """The shell's status for the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


@contextlib.contextmanager
def handled(
    *, at_once: Callable[[int], object] | None = None, pending: Iterable[int] = ()
) -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM are recorded for ``check()``.

    ``pending``: signals already received (by the command's launcher, before Python had
    imported jaxgen). Outside the main thread, or inside another ``handled()``, this
    does nothing: the outer one is in force.
    """
    global _active
    if _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}

    def record(signum, frame):
        if _received:
            if at_once is not None:
                at_once(signum)
            else:
                _restore(previous)
                _deliver(previous[signum], signum, frame)
            return
        _received.append(signum)

    _received[:] = list(pending)
    _active = True
    for signum in SIGNALS:
        signal.signal(signum, record)
    try:
        yield
    finally:
        _restore(previous)
        _active = False


def _restore(handlers: dict) -> None:
    for signum, handler in handlers.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _deliver(handler, signum: int, frame) -> None:
    """Act on ``signum`` as ``handler`` (installed before ``handled``) would have."""
    if callable(handler):
        handler(signum, frame)
    elif handler != signal.SIG_IGN:
        signal.raise_signal(signum)  # SIG_DFL: now restored, so this ends the process


def received() -> int | None:
    """The first signal recorded by ``handled()``, if any."""
    return _received[0] if _received else None


def check() -> None:
    """Raise ``Interrupted`` if a signal was recorded (in any process of the run).

    With several processes every one of them calls ``check`` at the same points, so
    they agree (one small all-gather) and stop together.
    """
    import jax

    signum = received() or 0
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        signum = int(np.max(multihost_utils.process_allgather(np.int32(signum))))
    if signum:
        raise Interrupted(signum)


def phase(name: str) -> None:
    """Mark the start of phase ``name`` in the file ``$JAXGEN_PHASES`` names, if any."""
    path = os.environ.get(PHASES_ENV)
    if not path:
        return
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, f"{time.monotonic():.6f} {name}\n".encode())
    finally:
        os.close(descriptor)
