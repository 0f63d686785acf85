"""Step time and collectives per step against the number of devices, fixed global batch.

    python benchmarks/scaling.py [--quick] [--devices 1,2,4,8]

The step is the one ``jaxgen bound`` runs (SGD, ``V_t`` tracked by the ghost path, and
the same step without tracking), on a ``data=N`` mesh: the batch split over N devices,
parameters replicated. On a CPU the N devices are simulated on the same cores
(``jax_num_cpu_devices``), so the table measures the overhead of partitioning and of
the collectives, not a speed-up; on N real accelerators the same script measures
scaling. Collectives are counted in the compiled HLO text of one step. Prints a table
and writes ``benchmarks/results/scaling.json``.
"""

from __future__ import annotations

import argparse
import sys

import jax

if __name__ == "__main__":  # before JAX initialises; only the CPU backend reads it
    jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _common import interleaved_medians, machine, save  # noqa: E402

import jaxgen  # noqa: E402
from jaxgen._per_example import mean_loss  # noqa: E402
from jaxgen._sharding import count_collectives  # noqa: E402
from jaxgen.experiments import methods, models, task  # noqa: E402
from jaxgen.experiments.step import TrainState, make_train_step  # noqa: E402

MODELS = {  # name: (model, input shape, classes, width, global batch)
    "MLP 40-512-10 (demo)": ("mlp", (40,), 10, 512, 64),
    "CNN 32×32×3": ("alexnet", (32, 32, 3), 10, 32, 64),
}


def _step(name: str, devices: int, track: bool):
    model_name, shape, classes, width, batch_size = MODELS[name]
    model = task.trainable(model_name, models.build(model_name, shape, classes, width))
    method = methods.ERM()
    optimizer = methods.optimizer(method, [0.01], key=jax.random.key(0), steps_per_epoch=1)
    if track:
        step = make_train_step(model, optimizer, method)
    else:

        def step(state, batch):  # SGD without V_t: value_and_grad and the update
            value_and_grad = jax.value_and_grad(mean_loss, argnums=1)
            loss, grad = value_and_grad(model.loss_fn, state.params, batch)
            updates, opt_state = optimizer.update(grad, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state._replace(step=state.step + 1, params=params, opt_state=opt_state), loss

    step = jax.jit(step, donate_argnums=0)
    state = TrainState(jnp.zeros((), jnp.int32), model.params, optimizer.init(model.params),
                       jax.random.key(1), model.model_state)  # fmt: skip
    keys = jax.random.split(jax.random.key(2))
    batch = {
        "x": jax.random.normal(keys[0], (batch_size, *shape)),
        "y": jax.random.randint(keys[1], (batch_size,), 0, classes),
    }
    if devices > 1:
        mesh = jaxgen.make_mesh({"data": devices})
        state, batch = jaxgen.replicate(state, mesh), jaxgen.shard_batch(batch, mesh)
    text = step.lower(state, batch).compile().as_text()
    holder = [state]

    def run(batch):  # the state is donated: carry it from call to call
        holder[0], metrics = step(holder[0], batch)
        return metrics

    return run, batch, count_collectives(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--devices", default="1,2,4,8", help="device counts to measure")
    args = parser.parse_args()
    counts = [int(n) for n in args.devices.split(",")]
    if max(counts) > jax.device_count():
        sys.exit(f"--devices: at most {jax.device_count()} devices here")
    print(f"machine: {machine()}; {jax.device_count()} {jax.default_backend()} devices")
    header = (f"{'model':<22}{'devices':>8}{'plain ms':>10}{'tracked ms':>12}"
              f"{'× plain':>9}{'× 1 device':>11}  collectives plain / tracked")  # fmt: skip
    print(header)
    print("-" * len(header))
    rows = []
    for name in MODELS:
        calls, collectives = {}, {}
        for n in counts:
            for track in (False, True):
                run, batch, found = _step(name, n, track)
                calls[(n, track)] = (run, (batch,))
                collectives[(n, track)] = found
        medians = interleaved_medians(calls, repeats=3 if args.quick else 5)
        for n in counts:
            plain, tracked = medians[(n, False)], medians[(n, True)]
            counted = {
                kind: {k: v for k, v in collectives[(n, track)].items() if v}
                for kind, track in (("plain", False), ("tracked", True))
            }
            rows.append({"model": name, "devices": n, "plain_ms": 1e3 * plain,
                         "tracked_ms": 1e3 * tracked, "tracked_over_plain": tracked / plain,
                         "over_one_device": tracked / medians[(counts[0], True)],
                         "collectives": counted})  # fmt: skip
            text = " / ".join(
                ", ".join(f"{v} {k}" for k, v in c.items()) or "none" for c in counted.values()
            )
            scaled = tracked / medians[(counts[0], True)]
            print(f"{name:<22}{n:>8}{1e3 * plain:>10.2f}{1e3 * tracked:>12.2f}"
                  f"{tracked / plain:>9.2f}{scaled:>11.2f}  {text}")  # fmt: skip
    print(f"wrote {save('scaling', rows)}")


if __name__ == "__main__":
    main()
