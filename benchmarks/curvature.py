"""Curvature and gradient-noise instruments against PyHessian and BackPACK.

    python benchmarks/curvature.py [--quick] [--no-peers] [--models ...]

On each model (batch 64; 256 without ``--quick``), in one process:

- **Top eigenvalue.** ``jaxgen.hessian_eigenvalues`` with 4, 5, ..., 30 Lanczos steps
  until its value is within 1e-3 of the reference (Lanczos with 40 steps); the products
  (one per step) and seconds (median) of that run; the same with
  ``reorthogonalize=False``. PyHessian's ``eigenvalues(tol=1e-3)`` (power iteration) on a
  PyTorch twin holding the same weights and batch: its value, products (counted) and
  seconds; its ``tol`` bounds the change between iterations, not the error, so it runs
  again at 1e-4, 1e-5, 1e-6 until its value is within 1e-3 of the reference too, and
  those products and seconds are reported beside. PyHessian's ``trace(maxIter=20)``:
  seconds per product beside ``jaxgen.hessian_trace``'s (Hutchinson), Lanczos's product
  alone and a whole Lanczos step (20 steps).
  PyHessian's ``density`` calls ``torch.eig``, removed from PyTorch: not run.
- **Spectrum.** ``jaxgen.hessian_spectrum`` (4 probes × 10 steps): seconds.
- **Per-coordinate statistics.** ``jaxgen.gradient_moments`` (ghost) against a plain
  gradient; BackPACK's ``Variance``, ``SumGradSquared`` and ``DiagHessian`` against
  PyTorch's plain backward on the twin, the variance compared entry by entry with
  jaxgen's; ``jaxgen.hessian_diagonal`` (100 probes) against BackPACK's exact diagonal.

Prints a table and writes ``benchmarks/results/curvature.json``.
"""

from __future__ import annotations

import argparse
import functools
import time
import warnings

import jax
import numpy as np
from _common import (
    as_jax_layout,
    cnn,
    interleaved_medians,
    machine,
    mean_loss,
    median_seconds,
    mlp,
    save,
    torch_transformer_twin,
    torch_twin,
    transformer,
)

import jaxgen
from jaxgen import _spectrum

MODELS = {"MLP 784-1024-1024-10": mlp, "CNN 32x32x3": cnn, "Transformer block T=32": transformer}
TOLERANCE = 1e-3
REFERENCE_STEPS = 40
PYHESSIAN_TOLERANCES = (1e-3, 1e-4, 1e-5, 1e-6)


def _relative(a, b) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def _top_eigenvalue(loss_fn, params, batch, reference, *, reorthogonalize=True):
    """Lanczos steps, value and seconds to within ``TOLERANCE`` of the reference."""
    estimate = functools.partial(
        jaxgen.hessian_eigenvalues, loss_fn, key=0, reorthogonalize=reorthogonalize
    )
    for steps in (4, 5, 6, 7, 8, 10, 12, 15, 20, 30, REFERENCE_STEPS):
        top = estimate(params, batch, num_iterations=steps)
        if _relative(top.values[0], reference) <= TOLERANCE:
            break
    run = functools.partial(estimate, num_iterations=steps)
    seconds = median_seconds(lambda p, b: run(p, b).values, params, batch, repeats=5)
    return float(top.values[0]), steps, seconds


def _per_product(loss_fn, params, batch):
    """Seconds per product: Hutchinson's quadratic forms, Lanczos's products alone (the
    ``H v`` that ``hessian_eigenvalues`` prepares, timed by itself), and a whole Lanczos
    step (the product and the reorthogonalisation against 20 rows)."""
    trace = functools.partial(jaxgen.hessian_trace, loss_fn, key=jax.random.key(1), num_probes=20)
    lanczos = functools.partial(jaxgen.hessian_eigenvalues, loss_fn, key=0, num_iterations=20)

    @jax.jit
    def product(p, b, v):
        return _spectrum._matvec(loss_fn, p, b)[0](v)

    calls = {
        "plain grad": (jax.jit(jax.grad(mean_loss(loss_fn))), (params, batch)),
        "hessian_trace (20 probes)": (lambda p, b: trace(p, b).value, (params, batch)),
        "Lanczos product": (product, (params, batch, params)),
        "Lanczos (20 steps)": (lambda p, b: lanczos(p, b).values, (params, batch)),
    }
    medians = interleaved_medians(calls, repeats=3)
    return (
        medians["plain grad"],
        medians["hessian_trace (20 probes)"] / 20,
        medians["Lanczos product"],
        medians["Lanczos (20 steps)"] / 20,
    )


def _pyhessian_rows(name, params, batch, reference):
    try:
        import sys

        import pyhessian  # noqa: F401  (its package attribute ``hessian`` is the class)
        import torch

        pyhessian_module = sys.modules["pyhessian.hessian"]
    except ImportError:
        print("  (PyHessian not installed: pip install pyhessian)")
        return {}
    if name.startswith("Transformer"):
        twin = torch_transformer_twin(params, batch)
    else:
        twin = torch_twin(name, params, batch)
    if twin is None:
        return {}
    model, x, y, _ = twin
    warnings.filterwarnings("ignore")
    counted = {"products": 0}
    product = pyhessian_module.hessian_vector_product

    def counting(*args, **kwargs):
        counted["products"] += 1
        return product(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counting
    try:
        torch.manual_seed(0)
        engine = pyhessian_module.hessian(
            model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False
        )
        runs = {}
        for tol in PYHESSIAN_TOLERANCES:  # its tol: the relative change between iterations
            times, values, products = [], [], []
            for _ in range(3):
                torch.manual_seed(0)
                counted["products"] = 0
                start = time.perf_counter()
                eigenvalues, _ = engine.eigenvalues(tol=tol, top_n=1)
                times.append(time.perf_counter() - start)
                values.append(eigenvalues[0])
                products.append(counted["products"])
            runs[tol] = (float(np.median(values)), int(np.median(products)), np.median(times))
            if _relative(runs[tol][0], reference) <= TOLERANCE:
                break
        counted["products"] = 0
        start = time.perf_counter()
        engine.trace(maxIter=20, tol=0.0)
        per_product = (time.perf_counter() - start) / max(counted["products"], 1)
    finally:
        pyhessian_module.hessian_vector_product = product
    value, products, seconds = runs[TOLERANCE]
    accurate_tol = next(
        (tol for tol, run in runs.items() if _relative(run[0], reference) <= TOLERANCE), None
    )
    accurate = runs[accurate_tol] if accurate_tol else (float("nan"),) * 3
    return {
        "value": value,
        "products": products,
        "seconds": float(seconds),
        "accurate_tol": accurate_tol,
        "accurate_value": accurate[0],
        "accurate_products": accurate[1],
        "accurate_seconds": float(accurate[2]),
        "trace_per_product": per_product,
    }


def _backpack_rows(name, params, batch, moments):
    try:
        import torch
        from backpack import backpack, extend
        from backpack.extensions import DiagHessian, SumGradSquared, Variance
    except ImportError:
        print("  (BackPACK not installed: pip install backpack-for-pytorch)")
        return {}
    twin = torch_twin(name, params, batch)
    if twin is None:
        return {}
    model, x, y, _ = twin
    warnings.filterwarnings("ignore")
    model = extend(model)
    loss_fn = extend(torch.nn.CrossEntropyLoss())

    def plain():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    def with_extension(extension):
        def run():
            model.zero_grad()
            with backpack(extension()):
                loss_fn(model(x), y).backward()

        return run

    calls = {
        "PyTorch plain backward": (plain, ()),
        "BackPACK Variance": (with_extension(Variance), ()),
        "BackPACK SumGradSquared": (with_extension(SumGradSquared), ()),
        "BackPACK DiagHessian": (with_extension(DiagHessian), ()),
    }
    medians = interleaved_medians(calls, repeats=3)
    with_extension(Variance)()
    # BackPACK's per-example gradients are those of the mean loss, g_i / b: its
    # ``variance`` is jaxgen's over b².
    size = x.shape[0]
    variance = as_jax_layout(name, [p.variance * size**2 for p in model.parameters()])
    with_extension(DiagHessian)()
    diagonal = as_jax_layout(name, [p.diag_h for p in model.parameters()])
    got = np.concatenate(
        [np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(moments.variance)]
    )
    want = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(variance)])
    return {
        "seconds": medians,
        "variance_difference": float(np.max(np.abs(got - want)) / np.max(np.abs(want))),
        "diagonal": diagonal,
    }


def _measure(name, loss_fn, params, batch, *, peers: bool) -> dict:
    reference = float(
        jaxgen.hessian_eigenvalues(
            loss_fn, params, batch, key=0, num_iterations=REFERENCE_STEPS
        ).values[0]
    )
    value, steps, seconds = _top_eigenvalue(loss_fn, params, batch, reference)
    plain_value, plain_steps, plain_seconds = _top_eigenvalue(
        loss_fn, params, batch, reference, reorthogonalize=False
    )
    grad_seconds, trace_product, lanczos_product, lanczos_step = _per_product(
        loss_fn, params, batch
    )
    row = {
        "top_eigenvalue": reference,
        "jaxgen_value": value,
        "jaxgen_steps": steps,
        "jaxgen_seconds": seconds,
        "jaxgen_plain_value": plain_value,
        "jaxgen_plain_steps": plain_steps,
        "jaxgen_plain_seconds": plain_seconds,
        "grad_seconds": grad_seconds,
        "trace_per_product_over_grad": trace_product / grad_seconds,
        "lanczos_product_over_grad": lanczos_product / grad_seconds,
        "lanczos_step_over_grad": lanczos_step / grad_seconds,
    }
    spectrum = functools.partial(
        jaxgen.hessian_spectrum, loss_fn, key=2, num_probes=4, num_iterations=10
    )
    row["spectrum_seconds"] = median_seconds(
        lambda p, b: spectrum(p, b).nodes, params, batch, repeats=3
    )
    moments_fn = jax.jit(
        lambda p, b: jaxgen.gradient_moments(loss_fn, p, b, method="ghost").variance
    )
    plain = jax.jit(jax.grad(mean_loss(loss_fn)))
    medians = interleaved_medians(
        {"plain": (plain, (params, batch)), "moments": (moments_fn, (params, batch))}, repeats=3
    )
    row["moments_over_grad"] = medians["moments"] / medians["plain"]
    diagonal_fn = functools.partial(jaxgen.hessian_diagonal, loss_fn, key=3, num_probes=100)
    row["diagonal_seconds"] = median_seconds(
        lambda p, b: diagonal_fn(p, b).diagonal, params, batch, repeats=3
    )
    if not peers:
        return row
    peer = _pyhessian_rows(name, params, batch, reference)
    if peer:
        row |= {f"pyhessian_{k}": v for k, v in peer.items()}
        row["pyhessian_value_difference"] = _relative(peer["value"], reference)
        row["pyhessian_over_jaxgen_seconds"] = peer["seconds"] / seconds
        row["pyhessian_accurate_over_jaxgen_seconds"] = peer["accurate_seconds"] / seconds
        row["pyhessian_accurate_over_jaxgen_plain_seconds"] = (
            peer["accurate_seconds"] / plain_seconds
        )
    moments = jaxgen.gradient_moments(loss_fn, params, batch, method="ghost")
    packed = _backpack_rows(name, params, batch, moments)
    if packed:
        base = packed["seconds"]["PyTorch plain backward"]
        row |= {
            f"{k.replace(' ', '_')}_over_backward": v / base for k, v in packed["seconds"].items()
        }
        row["backpack_variance_difference"] = packed["variance_difference"]
        row["jaxgen_variance_seconds_over_grad"] = row["moments_over_grad"]
        estimate = diagonal_fn(params, batch).diagonal
        got = np.concatenate([np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(estimate)])
        want = np.concatenate(
            [np.asarray(v).ravel() for v in jax.tree_util.tree_leaves(packed["diagonal"])]
        )
        row["hutchinson_diagonal_relative_error"] = float(
            np.linalg.norm(got - want) / np.linalg.norm(want)
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only")
    parser.add_argument("--no-peers", action="store_true", help="skip PyHessian and BackPACK")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    args = parser.parse_args()
    sizes = (64,) if args.quick else (64, 256)
    rows = []
    print(f"machine: {machine()}")
    chosen = args.models.split(",") if args.models else list(MODELS)
    for name in chosen:
        params, loss_fn, make_batch = MODELS[name](jax.random.key(0))
        for size in sizes:
            batch = make_batch(jax.random.key(1), size)
            row = {"model": name, "batch": size} | _measure(
                name, loss_fn, params, batch, peers=not args.no_peers
            )
            rows.append(row)
            print(
                ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
    print(f"wrote {save('curvature', rows)}")


if __name__ == "__main__":
    main()
