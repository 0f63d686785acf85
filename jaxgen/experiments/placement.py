"""Where a run's arrays live: one device, or a mesh of devices and processes.

Without a mesh, the training split sits on the default device and each segment's
batches are gathered there. With a mesh (``--mesh data=N[,perturb=K]``), the state is
replicated, each segment's batches are gathered on the host and split over ``data``
(every process holds the same host data and places its own shards), and values are
read back with ``jaxgen._sharding.to_host``, which also works when the arrays span
several processes. Only process 0 writes result files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgen import _sharding
from jaxgen._types import PyTree
from jaxgen.experiments.data import Dataset
from jaxgen.experiments.errors import ConfigError


class Placement:
    """The run's devices: ``mesh`` (``None``, or a mesh of a single device: one device)."""

    def __init__(self, mesh: Mesh | None, dataset: Dataset, batch_size: int):
        if mesh is not None and mesh.devices.size == 1:
            mesh = None
        shards = _sharding.data_size(mesh)
        if batch_size % shards:
            raise ConfigError(
                f"the batch of {batch_size} examples cannot be split evenly over data={shards}: "
                "choose a --batch-size that is a multiple of the data axis, or another --mesh"
            )
        self.mesh = mesh
        self.dataset = dataset
        if mesh is None:
            self._x, self._y = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)

    @property
    def writes_files(self) -> bool:
        return jax.process_index() == 0

    def state(self, state: PyTree) -> PyTree:
        """The training state, replicated over the mesh."""
        return state if self.mesh is None else _sharding.replicate(state, self.mesh)

    def batches(self, order: np.ndarray) -> PyTree:
        """The examples of ``order`` (steps, b), stacked; ``b`` split over ``data``."""
        if self.mesh is None:
            return {"x": self._x[order], "y": self._y[order]}
        batch = {"x": self.dataset.x_train[order], "y": self.dataset.y_train[order]}
        return _sharding.shard_batch(batch, self.mesh, axis=1)

    @staticmethod
    def host(value) -> np.ndarray:
        return _sharding.to_host(value)
