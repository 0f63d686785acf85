"""One process of the two-process test in test_sharding.py (not collected by pytest).

    python multihost_worker.py PORT PROCESS_ID OUT CONFIG_JSON

Trains CONFIG_JSON (``TrainConfig.as_dict``) on a ``data=8`` mesh spanning both
processes (4 simulated CPU devices each) and saves the parameters this process holds at
the end, flattened, to ``OUT/params-<process>.npy``; then SIGTERM reaches process 1
only, and each process saves the status its ``interrupts.check()`` stopped with to
``OUT/stopped-<process>.npy`` (both must stop). It imports nothing from the tests:
their conftest simulates 8 devices per process.
"""

import json
import signal
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process, out, config = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process)

import numpy as np  # noqa: E402

from jaxgen import make_mesh  # noqa: E402
from jaxgen._sharding import to_host  # noqa: E402
from jaxgen.experiments import interrupts, loop  # noqa: E402
from jaxgen.experiments.callbacks import Callback  # noqa: E402
from jaxgen.experiments.config import TrainConfig  # noqa: E402


class KeepParams(Callback):
    def on_trained(self, state):
        leaves = jax.tree_util.tree_leaves(state.params)
        flat = np.concatenate([to_host(leaf).ravel() for leaf in leaves])
        np.save(f"{out}/params-{process}.npy", flat)


assert jax.local_device_count() == 4 and jax.device_count() == 8
config = TrainConfig.from_dict(json.loads(config))
loop.run(config, out, mesh=make_mesh("data=8"), callbacks=[KeepParams()])

with interrupts.handled():
    if process == 1:
        signal.raise_signal(signal.SIGTERM)
    try:
        interrupts.check()
        stopped = 0
    except interrupts.Interrupted as stop:
        stopped = stop.status
np.save(f"{out}/stopped-{process}.npy", stopped)
