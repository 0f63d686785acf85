"""What a run measures besides the training steps, at the epochs' edges and at the end.

- ``E_z ‖H_z‖_F²`` at the start of every epoch, for the second-order gradient
  sensitivity of Neu et al. (``jaxgen.gradient_sensitivity(method="second_order")`` with
  ``σ = 1``, one probe for each of 64 training examples).
- At the final weights: ``Tr H`` by Hutchinson (or Hutch++: ``hessian_method``) on n/10
  training examples, the optimal σ of Eq. 2, the Monte Carlo flatness term at ``σ√T``
  against as many test examples, and for the two-layer ReLU network the final fraction
  of active units (Theorem 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jaxgen
from jaxgen._sharding import replicate, to_host
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import rng
from jaxgen.experiments.data import Dataset
from jaxgen.experiments.results import FinalEstimates, StepLogs, optimal_sigma

SENSITIVITY_EXAMPLES = 64


def _subset(dataset: Dataset, index: np.ndarray, *, train: bool) -> dict[str, np.ndarray]:
    """Host arrays: under a mesh of several processes, jit takes them as replicated."""
    x, y = (dataset.x_train, dataset.y_train) if train else (dataset.x_test, dataset.y_test)
    return {"x": x[index], "y": y[index]}


class Estimates:
    """The run's estimators, with their examples and random streams fixed by the seed."""

    def __init__(
        self,
        config: Any,
        dataset: Dataset,
        loss_fn: LossFn,
        active_fraction: Callable[[PyTree, Any], Any] | None,
        mesh: Mesh | None = None,
    ):
        self.config, self.dataset, self.loss_fn = config, dataset, loss_fn
        self.mesh = mesh
        self.active_fraction = active_fraction
        n = dataset.num_train
        chosen = rng.numpy_rng(config.seed, rng.Stream.SENSITIVITY_BATCH).choice(
            n, size=min(SENSITIVITY_EXAMPLES, n), replace=False
        )
        self.sensitivity_batch = _subset(dataset, chosen, train=True)

    def _key(self, stream: rng.Stream, *indices: int):
        """The stream's key, on every device of the mesh (jit then takes it as global)."""
        key = rng.key(self.config.seed, stream, *indices)
        return key if self.mesh is None else replicate(key, self.mesh)

    def _probe_sharding(self) -> NamedSharding | None:
        """Hutchinson probes spread over ``data`` (each device: the whole training set)."""
        if self.mesh is None or "data" not in self.mesh.axis_names:
            return None
        return NamedSharding(self.mesh, PartitionSpec("data"))

    def hessian_frobenius_sq(self, params: PyTree, epoch: int) -> float:
        """``E_z ‖H_z‖_F²`` at the start of ``epoch`` (0-based; ``epochs`` for the end)."""
        estimate = jaxgen.gradient_sensitivity(
            self.loss_fn,
            params,
            self.sensitivity_batch,
            key=self._key(rng.Stream.SENSITIVITY, epoch),
            sigma=1.0,
            num_samples=1,
            method="second_order",
        )
        return float(to_host(estimate.value))

    def final(self, params: PyTree, learning_rates: np.ndarray, logs: StepLogs) -> FinalEstimates:
        config, dataset = self.config, self.dataset
        n, n_test = dataset.num_train, dataset.x_test.shape[0]
        size = max(1, n // 10)
        subsets = rng.numpy_rng(config.seed, rng.Stream.ESTIMATE_SUBSETS)
        train = _subset(dataset, subsets.choice(n, size=size, replace=False), train=True)
        test = _subset(
            dataset, subsets.choice(n_test, size=min(size, n_test), replace=False), train=False
        )
        trace = jaxgen.hessian_trace(
            self.loss_fn,
            params,
            train,
            key=self._key(rng.Stream.HESSIAN_TRACE),
            num_probes=config.hessian_probes,
            method=config.hessian_method,
            probe_sharding=self._probe_sharding(),
        )
        trace = jax.tree_util.tree_map(to_host, trace)
        sigma = optimal_sigma(config, learning_rates, logs, trace, n)
        flatness = jaxgen.flatness_term(
            self.loss_fn,
            params,
            train,
            test,
            key=self._key(rng.Stream.FLATNESS),
            sigma=sigma * math.sqrt(len(learning_rates)) if math.isfinite(sigma) else 0.0,
            num_samples=config.flatness_samples,
        )
        flatness = jax.tree_util.tree_map(to_host, flatness)
        active = None
        if self.active_fraction is not None:
            active = float(to_host(jnp.mean(self.active_fraction(params, dataset.x_train))))
        return FinalEstimates(trace, size, flatness, sigma, active)
