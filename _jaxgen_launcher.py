"""The ``jaxgen`` command's entry point, outside the package on purpose.

Importing ``jaxgen`` imports JAX, which takes a second or two. This module holds SIGINT
and SIGTERM from its first line, before that import, so that a signal at any moment of a
run is jaxgen's to handle (``jaxgen.experiments.interrupts``): one received during the
imports stops the command as soon as it starts, with one line and status 130 or 143; a
second one exits at once. (Before this module runs, in the few hundredths of a second
Python takes to start, a signal has its default effect: the process ends, which the
shell reports as 130 or 143 all the same, and nothing has been written.) It marks the
``import`` phase as ``interrupts.phase`` does, which it cannot import yet.
"""

import os
import signal
import sys
import time


def main() -> None:
    held: list[int] = []

    def hold(signum, frame):
        if held:
            words = [arg for arg in sys.argv[1:2] if not arg.startswith("-")]
            what = "interrupted" if signum == signal.SIGINT else "stopped by SIGTERM"
            line = f"{what} again: stopped at once, before the run started; run it again"
            os.write(2, f"{' '.join(['jaxgen', *words])}: {line}\n".encode())
            os._exit(128 + signum)
        held.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, hold)
    if os.environ.get("JAXGEN_PHASES"):
        with open(os.environ["JAXGEN_PHASES"], "a") as phases:
            phases.write(f"{time.monotonic():.6f} import\n")
    from jaxgen import cli

    cli.run_command(pending=held)
