"""Orbax checkpoints of a run: the ``TrainState``, the step logs and the configuration.

A checkpoint is written every ``checkpoint_every`` steps (and at the end) under
``DIR/checkpoints``; the two newest are kept. ``--resume`` restores the newest and
continues to the same numbers as an uninterrupted run. It first compares the stored
configuration with the run's and names the fields that differ; a checkpoint that cannot
be read is moved aside (``<step>.damaged``, nothing is deleted) and the next older one
is used, with a warning. A save cut off by ``kill -9`` leaves orbax's
``<step>.orbax-checkpoint-tmp`` folder: it is never read, and it is removed the next time
the run's checkpoints are opened, with one warning. (Ctrl-C and SIGTERM never cut a save:
``interrupts`` lets the loop stop only between saves.)
"""

from __future__ import annotations

import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import jax

from jaxgen.experiments.errors import ConfigError, RunWarning
from jaxgen.experiments.results import StepLogs

TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a checkpoint being written


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(leaves: list) -> list:
    """PRNG keys are stored as their raw key data."""
    return [jax.random.key_data(x) if _is_key(x) else x for x in leaves]


def _drop_closed_loop_reports() -> None:
    """Keep a failed restore's aftermath off stderr.

    When orbax fails to read a damaged checkpoint, it closes its event loop while
    TensorStore reads are still pending; each of them later reports ``RuntimeError:
    Event loop is closed`` as an unraisable exception (a traceback on stderr, harmless:
    nothing waits for those reads). From the first restore on, this drops exactly those
    reports and passes every other one to the hook that was there.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: stored → current"`` for every setting that differs."""
    names = sorted(set(stored) | set(current))
    return [
        f"{name}: {stored.get(name)!r} → {current.get(name)!r}"
        for name in names
        if stored.get(name) != current.get(name)
    ]


class Checkpoints:
    """Save and restore ``(state, logs)`` with the configuration they belong to."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory.absolute()
        self._remove_unfinished()
        self._open()

    def _open(self) -> None:
        options = self._ocp.CheckpointManagerOptions(
            max_to_keep=2, enable_async_checkpointing=False
        )
        self.manager = self._ocp.CheckpointManager(self.directory, options=options)

    def close(self) -> None:
        """Stop orbax's threads (call once the run is over, however it ended)."""
        self.manager.close()

    def _remove_unfinished(self) -> None:
        """Delete the folders of saves that were cut off (orbax writes a checkpoint under
        a temporary name and renames it when complete), with one warning."""
        leftovers = sorted(self.directory.glob(f"*{TMP_SUFFIX}*"))
        if jax.process_index() == 0:
            for leftover in leftovers:
                shutil.rmtree(leftover, ignore_errors=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxgen: unfinished checkpoints removed")
        if not leftovers or jax.process_index() > 0:
            return
        names = ", ".join(p.name for p in leftovers)
        warnings.warn(
            f"removed {names} from {self.directory}: a checkpoint cut off while being "
            "written (the complete ones are kept)",
            RunWarning,
            stacklevel=3,
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, logs: StepLogs, config: dict[str, Any]) -> None:
        ocp = self._ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_storable(jax.tree_util.tree_leaves(state))),
                logs=ocp.args.JsonSave(logs.to_json() | {"config": config}),
            ),
        )
        self.manager.wait_until_finished()

    def restore(self, template: Any, config: dict[str, Any]) -> tuple[Any, StepLogs] | None:
        """The newest intact checkpoint as ``(state like template, logs)``, or ``None``.

        Raises ``ConfigError`` if it was written with another configuration, or if
        checkpoints exist and none of them can be read.
        """
        _drop_closed_loop_reports()  # before a read fails: the reports may come at once
        damaged = []
        while (step := self.latest_step()) is not None:
            try:
                saved = self._restore_logs(step)
            except Exception as error:  # orbax and TensorStore raise many types
                damaged.append(self._set_aside(step, error))
                continue
            changes = config_changes(saved.pop("config"), config)
            if changes:
                raise ConfigError(
                    f"--resume: the checkpoint in {self.directory} was written with other "
                    f"settings ({'; '.join(changes)}); use the same arguments, or another --out"
                )
            try:
                state = self._restore_state(step, template)
            except Exception as error:
                damaged.append(self._set_aside(step, error))
                continue
            return state, StepLogs.from_json(saved)
        if damaged:
            raise ConfigError(
                f"--resume: no intact checkpoint in {self.directory} ({'; '.join(damaged)}); "
                "start over with another --out, or remove that folder yourself"
            )
        return None

    def _restore_logs(self, step: int) -> dict[str, Any]:
        ocp = self._ocp
        restored = self.manager.restore(step, args=ocp.args.Composite(logs=ocp.args.JsonRestore()))
        return dict(restored["logs"])

    def _restore_state(self, step: int, template: Any) -> Any:
        ocp = self._ocp
        leaves, treedef = jax.tree_util.tree_flatten(template)
        abstract = [  # restored onto the template's devices, whatever wrote them
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            for x in _storable(leaves)
        ]
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        state = [
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x
            for x, t in zip(restored["state"], leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, state)

    def _set_aside(self, step: int, error: Exception) -> str:
        """Rename a damaged checkpoint to ``<step>.damaged`` and say so."""
        source = self.directory / str(step)
        if jax.process_count() > 1:  # every process would rename it: leave it to the user
            raise ConfigError(
                f"--resume: checkpoint step {step} in {self.directory} is damaged ({error}); "
                "resume once with a single process (it sets damaged checkpoints aside), "
                "or move that folder away yourself"
            )
        target = source.with_name(f"{step}.damaged")
        suffix = 1
        while target.exists():
            target, suffix = source.with_name(f"{step}.damaged-{suffix}"), suffix + 1
        self.manager.close()
        source.rename(target)
        self._open()
        cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"checkpoint step {step} in {self.directory} is damaged ({cause[:200]}); moved "
            f"it aside to {target.name} and trying the next older one",
            RunWarning,
            stacklevel=3,
        )
        return f"step {step}: {cause[:200]}"
