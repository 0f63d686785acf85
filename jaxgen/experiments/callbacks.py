"""What a run tells the outside while it trains: ``Callback`` hooks and a progress bar.

``loop.run`` calls each callback's hooks; the base class does nothing, so a callback
overrides only what it needs. The command line passes a ``ProgressBar``; a test can pass a
callback that raises to interrupt a run at a chosen epoch.
"""

from __future__ import annotations

import math

from jaxgen.experiments.results import EpochMetrics


class Callback:
    """No-op hooks; override any of them."""

    def on_start(self, total_steps: int, done_steps: int) -> None:
        """Before training (``done_steps > 0`` when resuming)."""

    def on_steps(self, steps: int, *, epoch: int, loss: float, dispersion: float) -> None:
        """After ``steps`` more updates; ``loss`` is the last minibatch loss."""

    def on_epoch(self, row: EpochMetrics) -> None:
        """After an epoch, with its evaluation on the full splits."""

    def on_end(self) -> None:
        """After the last step (also when the run stops early with an error)."""

    def on_trained(self, state) -> None:
        """With the final ``TrainState`` (parameters, optimizer and BatchNorm state),
        before the final estimates."""


class ProgressBar(Callback):
    """A rich progress bar showing epoch, loss and dispersion."""

    def on_start(self, total_steps, done_steps):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  dispersion {task.fields[dispersion]:.3e}"),
            TimeRemainingColumn(),
            transient=True,
        )
        self.task = self.progress.add_task(
            "train",
            total=total_steps,
            completed=done_steps,
            epoch=0,
            loss=math.nan,
            dispersion=math.nan,
        )
        self.progress.start()

    def on_steps(self, steps, *, epoch, loss, dispersion):
        self.progress.update(
            self.task, advance=steps, epoch=epoch, loss=loss, dispersion=dispersion
        )

    def on_end(self):
        self.progress.stop()


class EpochPrinter(Callback):
    """One line per epoch (what ``jaxgen dispersion`` prints)."""

    def __init__(self, say=print):
        self.say = say

    def on_epoch(self, row):
        self.say(
            f"epoch {row.epoch:4d}  dispersion {row.dispersion:.4e}  "
            f"train acc {row.train_accuracy:.3f}  test acc {row.test_accuracy:.3f}"
        )
