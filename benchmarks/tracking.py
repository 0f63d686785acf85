"""A training step with online bound tracking against a plain SGD step.

    python benchmarks/tracking.py [--quick]

Both are SGD updates on the same model and minibatch, run as the trainer runs them: 20
in one jitted ``lax.scan`` (so Python dispatch is not what is measured), or one jitted
update per call for models with convolutions; the table gives the time per update. The
tracking step is the one ``jaxgen.experiments.step`` runs: ``gradient_dispersion`` gives
the loss, the mean gradient for the update and ``V_t`` together; the plain step uses
``value_and_grad``. Target: tracking <= 1.10x the plain step. Prints a table and writes
``benchmarks/results/tracking.json``.
"""

from __future__ import annotations

import argparse

import jax
import optax
from _common import cnn, interleaved_medians, machine, mean_loss, mlp, save, transformer

import jaxgen

LR = 0.01
SCAN_STEPS = 20


def mnist1d_mlp(key):
    """The demo's model: MLP 40-512-10 on MNIST-1D-shaped inputs."""
    return mlp(key, sizes=(40, 512, 10))


# name: (builder, batch size, has convolutions: stepped one update per call, as the
# trainer steps the models whose ModelSpec says convolutional)
MODELS = {
    "MLP 40-512-10 (demo)": (mnist1d_mlp, 64, False),
    "MLP 784-512-10 (paper, MNIST)": (lambda key: mlp(key, sizes=(784, 512, 10)), 60, False),
    "MLP 784-1024-1024-10": (mlp, 128, False),
    "CNN 32x32x3": (cnn, 60, True),
    "Transformer block T=32": (transformer, 64, False),
}


def _steps(loss_fn, methods, *, loops: bool):
    """Jitted update functions as the trainer runs them: SCAN_STEPS updates in one
    ``lax.scan``, or (``loops``, models with convolutions) one update per call."""
    optimizer = optax.sgd(LR)

    def plain(params, opt_state, batch):
        loss, grad = jax.value_and_grad(mean_loss(loss_fn))(params, batch)
        updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def tracked(method):
        def step(params, opt_state, batch):
            stats = jaxgen.gradient_dispersion(loss_fn, params, batch, method=method)
            updates, opt_state = optimizer.update(stats.grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, stats.minibatch_variance

        return step

    def scanned(step):
        @jax.jit
        def run(params, opt_state, batch):
            def body(carry, _):
                params, opt_state, value = step(*carry, batch)
                return (params, opt_state), value

            return jax.lax.scan(body, (params, opt_state), None, length=SCAN_STEPS)

        return run

    steps = {"plain SGD step": plain} | {f"tracked ({m})": tracked(m) for m in methods}
    if loops:  # what the trainer does for models with convolutions
        return optimizer, {label: jax.jit(step) for label, step in steps.items()}, 1
    return optimizer, {label: scanned(step) for label, step in steps.items()}, SCAN_STEPS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    args = parser.parse_args()
    rows = []
    print(f"machine: {machine()}")
    header = f"{'model':<32}{'batch':>6}  {'step':<20}{'ms':>9}{'× plain':>9}"
    print(header)
    print("-" * len(header))
    for name, (build, size, loops) in MODELS.items():
        params, loss_fn, make_batch = build(jax.random.key(0))
        batch = make_batch(jax.random.key(1), size)
        methods = ("ghost",) if name.startswith("MLP 784-1024") else ("ghost", "vmap")
        optimizer, steps, per_call = _steps(loss_fn, methods, loops=loops)
        state = optimizer.init(params)
        medians = interleaved_medians(
            {label: (fn, (params, state, batch)) for label, fn in steps.items()},
            repeats=3 if args.quick else 5,
        )
        plain = medians["plain SGD step"] / per_call
        for label, total in medians.items():
            seconds = total / per_call
            rows.append(
                {
                    "model": name,
                    "batch": size,
                    "step": label,
                    "ms": seconds * 1e3,
                    "ratio": seconds / plain,
                }
            )
            print(f"{name:<32}{size:>6}  {label:<20}{seconds * 1e3:>9.2f}{seconds / plain:>9.2f}")
    print(f"wrote {save('tracking', rows)}")


if __name__ == "__main__":
    main()
