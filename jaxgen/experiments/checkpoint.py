"""Orbax checkpoints of a run: the ``TrainState``, the step logs and the configuration.

A checkpoint is written every ``checkpoint_every`` steps (and at the end) under
``DIR/checkpoints``; the two newest are kept. ``--resume`` restores the newest and
continues to the same numbers as an uninterrupted run; it refuses a checkpoint written
with another configuration, and a fresh run refuses a folder that already holds one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxgen.experiments.options import ConfigError
from jaxgen.experiments.results import StepLogs


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(leaves: list) -> list:
    """PRNG keys are stored as their raw key data."""
    return [jax.random.key_data(x) if _is_key(x) else x for x in leaves]


class Checkpoints:
    """Save and restore ``(state, logs)`` with the configuration they belong to."""

    def __init__(self, directory: Path):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(directory.absolute(), options=options)

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
        """The newest checkpoint as ``(state like template, logs)``, or ``None``."""
        step = self.latest_step()
        if step is None:
            return None
        ocp = self._ocp
        leaves, treedef = jax.tree_util.tree_flatten(template)
        abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _storable(leaves)]
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), logs=ocp.args.JsonRestore()
            ),
        )
        saved = dict(restored["logs"])
        if saved.pop("config") != config:
            raise ConfigError(
                "--resume: the checkpoint was written with a different configuration; "
                "use the same arguments or another --out"
            )
        state = [
            jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t) else x
            for x, t in zip(restored["state"], leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, state), StepLogs.from_json(saved)
