"""Sums over the leading axis: ``jnp.sum(x, axis=0)`` against ``jaxgen._sums.pairwise_sum``.

    python benchmarks/sums.py

Every per-example statistic sums ``b`` rows of a parameter-sized array. On XLA:CPU
(jaxlib 0.10.2) that reduction, written ``jnp.sum(x, 0)``, runs 20-50x slower than the
same bytes summed along the last axis once the output holds 2^16 numbers or more; jaxgen
sums such rows by adding halves (``pairwise_sum``). Each row times, for a ``(b, n)``
float32 array, the three reductions side by side (interleaved medians), and the last
column repeats ``jnp.sum(x, 0)`` with the environment's ``XLA_FLAGS`` when run as

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/sums.py

(which turns off XLA:CPU's YNNPACK fusions, the slow path's source). Prints a table and
writes ``benchmarks/results/sums.json``.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from _common import interleaved_medians, machine, save

from jaxgen._sums import pairwise_sum

SHAPES = [(b, n) for b in (8, 64, 256) for n in (2**12, 2**14, 2**16, 2**18)]


def main() -> None:
    print(f"machine: {machine()}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    leading = jax.jit(lambda x: jnp.sum(x, 0))
    pairwise = jax.jit(pairwise_sum)
    trailing = jax.jit(lambda x: jnp.sum(x, 1))
    rows = []
    header = ("b", 5), ("n", 9), ("sum(x, 0) ms", 15), ("pairwise ms", 13), ("sum(x, 1) ms", 15)
    print("".join(f"{name:>{width}}" for name, width in header) + f"{'ratio':>8}")
    for b, n in SHAPES:
        x = jax.random.normal(jax.random.key(0), (b, n))
        times = interleaved_medians(
            {"leading": (leading, (x,)), "pairwise": (pairwise, (x,)), "trailing": (trailing, (x,))}
        )
        ratio = times["leading"] / times["pairwise"]
        ms = {k: 1e3 * v for k, v in times.items()}
        print(
            f"{b:>5}{n:>9}{ms['leading']:>15.3f}{ms['pairwise']:>13.3f}"
            f"{ms['trailing']:>15.3f}{ratio:>8.1f}"
        )
        rows.append({"b": b, "n": n, **{f"{k}_ms": v for k, v in ms.items()}, "ratio": ratio})
    print(f"wrote {save('sums', rows)}")


if __name__ == "__main__":
    main()
