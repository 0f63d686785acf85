"""Gradient dispersion against one plain batch gradient, side by side in one process.

    python benchmarks/dispersion.py [--quick]

For each model and batch size: the median time of a jitted plain batch gradient
(``grad`` of the mean loss), of the bare per-example gradients ``vmap(grad)`` (no
statistics), of ``gradient_dispersion(method="vmap")`` and of the microbatched
variant, their ratios to the plain gradient, and XLA's compiled memory estimate of
each. Prints a table and writes ``benchmarks/results/dispersion.json``.
"""

from __future__ import annotations

import argparse
import functools

import jax
from _common import cnn, machine, mean_loss, median_seconds, mlp, peak_bytes, save

import jaxgen

MICROBATCH = 32


def _variants(loss_fn):
    plain = jax.jit(jax.grad(mean_loss(loss_fn)))
    vmap = jax.jit(functools.partial(jaxgen.gradient_dispersion, loss_fn, method="vmap"))
    micro = jax.jit(
        functools.partial(
            jaxgen.gradient_dispersion, loss_fn, method="vmap", microbatch_size=MICROBATCH
        )
    )
    oracle = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))
    return {
        "plain grad": plain,
        "vmap(grad) alone": oracle,
        "vmap": vmap,
        f"vmap, microbatch {MICROBATCH}": micro,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    sizes = (64,) if args.quick else (64, 256)
    rows = []
    print(f"machine: {machine()}")
    header = f"{'model':<22}{'batch':>6}  {'method':<22}{'ms':>10}{'× grad':>9}{'memory MB':>11}"
    print(header)
    print("-" * len(header))
    for name, build in (("MLP 784-1024-1024-10", mlp), ("CNN 32x32x3", cnn)):
        params, loss_fn, make_batch = build(jax.random.key(0))
        for size in sizes:
            batch = make_batch(jax.random.key(1), size)
            baseline = None
            for method, fn in _variants(loss_fn).items():
                seconds = median_seconds(fn, params, batch, repeats=repeats)
                baseline = baseline or seconds
                memory = peak_bytes(fn, params, batch)
                rows.append(
                    {
                        "model": name,
                        "batch": size,
                        "method": method,
                        "ms": seconds * 1e3,
                        "ratio": seconds / baseline,
                        "memory_bytes": memory,
                    }
                )
                print(
                    f"{name:<22}{size:>6}  {method:<22}{seconds * 1e3:>10.2f}"
                    f"{seconds / baseline:>9.2f}{memory / 2**20:>11.1f}"
                )
    print(f"wrote {save('dispersion', rows)}")


if __name__ == "__main__":
    main()
