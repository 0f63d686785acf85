"""Hessian trace per probe against one plain batch gradient, side by side in one process.

    python benchmarks/hessian.py [--quick] [--probes M] [--models ...] [--no-estimators]

For each model: a jitted plain batch gradient (the baseline), ``hessian_trace`` with
``M`` Hutchinson probes (chunks of 1 and of 10 probes), and the two ways of forming one
``H v`` that jaxgen does not use: forward-over-reverse (``jvp`` of ``grad``) and the
gradient linearized once, applied to each probe, both as straight rows of probes like
``hessian_trace``; and, in a ``lax.map`` loop, what ``hessian_trace`` did before (the
XLA:CPU convolution-in-a-loop slowdown), and ``hessian_trace`` with its rows of probes in
a ``lax.map`` (what ``jaxgen._chunks.map_in_rows`` does beyond ``MAX_UNROLLED`` rows).
Each variant's first call (tracing, compilation and one run) is timed too: unrolled rows
cost compile time. Where PyTorch is installed
(``pip install -e .[peers]``): its plain backward and PyHessian's Hutchinson step
(double backward, ``vᵀ H v`` per probe) on the same architecture and batch. Times per
probe are divided by the plain gradient of the same framework.

Then Hutch++ against Hutchinson at the same number of products (``--estimator-probes``,
default 30), at the initial weights and after ``--train-steps`` steps of SGD (lr 0.1) on
the same batch (the paper takes ``Tr H`` at the final weights): each method's time per
call and the spread of its estimate over ``--seeds`` keys (it measures the error
itself, not the reported standard error); their product ``error² × time`` compares the
error each buys per second. Prints tables and writes
``benchmarks/results/hessian.json``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import numpy as np
import optax
from _common import (
    cnn,
    first_call_seconds,
    interleaved_medians,
    machine,
    mean_loss,
    mlp,
    save,
    torch_model,
    torch_on_device,
    torch_timed,
    transformer,
)

import jaxgen
from jaxgen import _chunks
from jaxgen._chunks import map_in_rows
from jaxgen._random import rademacher_like

MODELS = {  # name: (model, batch size)
    "MLP 784-1024-1024-10": (mlp, 128),
    "CNN 32x32x3": (cnn, 32),
    "Transformer block T=32": (transformer, 32),
}


def _hvp_variants(loss_fn, probes: int):
    batch_loss = mean_loss(loss_fn)
    grad = jax.grad(batch_loss)

    def fwd_over_rev(params, batch, key, chunk, loop=False):
        def sample(k):
            v = rademacher_like(k, params)
            return optax.tree.vdot(v, jax.jvp(lambda p: grad(p, batch), (params,), (v,))[1])

        keys = jax.random.split(key, probes)
        if loop:
            return jax.lax.map(sample, keys, batch_size=chunk)
        return map_in_rows(sample, keys, chunk)

    def linearized(params, batch, key, chunk):
        _, hvp = jax.linearize(lambda p: grad(p, batch), params)

        def sample(k):
            v = rademacher_like(k, params)
            return optax.tree.vdot(v, hvp(v))

        return map_in_rows(sample, jax.random.split(key, probes), chunk)

    def trace(params, batch, key, chunk, loss_fn=loss_fn):
        return jaxgen.hessian_trace(
            loss_fn, params, batch, key=key, num_probes=probes, chunk_size=chunk
        ).value

    def trace_rows_in_loop(params, batch, key, chunk):
        # MAX_UNROLLED is read when traced; a loss of its own, so that hessian_trace's
        # jit cache does not hand back the unrolled program
        unrolled, _chunks.MAX_UNROLLED = _chunks.MAX_UNROLLED, 0
        try:
            return trace(params, batch, key, chunk, loss_fn=lambda p, e: loss_fn(p, e))
        finally:
            _chunks.MAX_UNROLLED = unrolled

    jit = functools.partial(jax.jit, static_argnums=3)
    return {
        "hessian_trace, chunk 1": (jit(trace), 1),
        "hessian_trace, chunk 10": (jit(trace), 10),
        "hessian_trace, chunk 10, rows in lax.map": (jit(trace_rows_in_loop), 10),
        "fwd-over-rev H v, chunk 1": (jit(fwd_over_rev), 1),
        "linearized H v, chunk 1": (jit(linearized), 1),
        "fwd-over-rev H v in lax.map (before)": (
            jax.jit(functools.partial(fwd_over_rev, loop=True), static_argnums=3),
            10,
        ),
    }


def _torch_rows(name: str, batch_size: int, probes: int, repeats: int):
    """PyTorch: (label, seconds per call, calls per probe) rows; [] when unavailable."""
    try:
        import torch
    except ImportError:
        return []
    model, shape = torch_model(name)
    if model is None:
        return []
    torch.manual_seed(0)
    model, x, y, device = torch_on_device(model, shape, batch_size)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()

    def pyhessian():  # PyHessian's trace(): one double backward per Rademacher probe
        loss = torch.nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        total = 0.0
        for _ in range(probes):
            v = [torch.randint_like(p, high=2) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            total += sum((a * b).sum() for a, b in zip(hv, v, strict=True)).item()
        return total

    calls = {
        "torch plain backward": (torch_timed(plain, device), ()),
        "torch PyHessian (double backward)": (torch_timed(pyhessian, device), ()),
    }
    medians = interleaved_medians(calls, repeats=repeats, block_time=0.0)
    return [(label, seconds) for label, seconds in medians.items()]


def _sgd_step(loss_fn, lr=0.1):
    grad = jax.grad(mean_loss(loss_fn))
    return jax.jit(lambda params, batch: optax.tree.add_scale(params, -lr, grad(params, batch)))


def _estimator_rows(name, params, loss_fn, batch, probes: int, seeds: int, repeats: int):
    """Hutchinson and Hutch++ with ``probes`` products: ms per call, the std of the
    estimate over ``seeds`` keys, and the mean reported standard error."""

    def estimate(method):
        def call(params, batch, key):
            est = jaxgen.hessian_trace(
                loss_fn, params, batch, key=key, num_probes=probes, method=method
            )
            return est.value, est.stderr

        return jax.jit(call)

    methods = {"hutchinson": estimate("hutchinson"), "hutch++": estimate("hutch++")}
    key = jax.random.key(2)
    medians = interleaved_medians(
        {m: (fn, (params, batch, key)) for m, fn in methods.items()},
        repeats=repeats,
        block_time=0.0,
    )
    rows = []
    for method, fn in methods.items():
        draws = [fn(params, batch, jax.random.key(seed)) for seed in range(seeds)]
        values = np.asarray([float(value) for value, _ in draws])
        rows.append(
            {
                "model": name, "estimator": method, "probes": probes, "seeds": seeds,
                "ms": 1e3 * medians[method], "mean": float(values.mean()),
                "std_over_seeds": float(values.std(ddof=1)),
                "mean_stderr": float(np.mean([float(stderr) for _, stderr in draws])),
            }
        )  # fmt: skip
    for row in rows:
        row["error2_x_time"] = (row["std_over_seeds"] ** 2 * row["ms"]) / (
            rows[0]["std_over_seeds"] ** 2 * rows[0]["ms"]
        )
    return rows


def _estimator_table(models, args, repeats: int) -> list[dict]:
    """Hutch++ against Hutchinson for each model: prints the table, returns its rows."""
    rows = []
    print(f"\nHutch++ against Hutchinson, {args.estimator_probes} products, {args.seeds} keys")
    header = f"{'model, SGD steps':<34}{'estimator':<12}{'ms':>9}{'mean':>12}{'std/seeds':>11}"
    print(header + f"{'mean stderr':>12}{'err²×time':>10}")
    print("-" * (len(header) + 22))
    for name, (model, batch_size) in models.items():
        params, loss_fn, make_batch = model(jax.random.key(0))
        batch = make_batch(jax.random.key(1), batch_size)
        step = _sgd_step(loss_fn)
        for steps in (0, args.train_steps):
            trained = params
            for _ in range(steps):
                trained = step(trained, batch)
            for row in _estimator_rows(
                name, trained, loss_fn, batch, args.estimator_probes, args.seeds, repeats
            ):
                rows.append(row | {"sgd_steps": steps})
                label = f"{name}, {steps} steps"
                print(
                    f"{label:<34}{row['estimator']:<12}{row['ms']:>9.1f}{row['mean']:>12.4g}"
                    f"{row['std_over_seeds']:>11.3g}{row['mean_stderr']:>12.3g}"
                    f"{row['error2_x_time']:>10.2f}"
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--probes", type=int, default=20, help="Hutchinson probes per call")
    parser.add_argument("--estimator-probes", type=int, default=30, help="products, Hutch++ rows")
    parser.add_argument("--seeds", type=int, default=10, help="keys, Hutch++ rows")
    parser.add_argument("--train-steps", type=int, default=200, help="SGD steps, Hutch++ rows")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--no-estimators", action="store_true", help="skip the Hutch++ rows")
    args = parser.parse_args()
    models = MODELS if args.models is None else {m: MODELS[m] for m in args.models.split(",")}
    repeats = 3 if args.quick else 5
    print(f"machine: {machine()}; {args.probes} probes per call")
    header = f"{'model':<24}{'variant':<40}{'ms/probe':>10}{'× grad':>8}{'first call s':>14}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, (model, batch_size) in models.items():
        params, loss_fn, make_batch = model(jax.random.key(0))
        batch = make_batch(jax.random.key(1), batch_size)
        key = jax.random.key(2)
        calls = {"plain grad": (jax.jit(jax.grad(mean_loss(loss_fn))), (params, batch))}
        for label, (fn, chunk) in _hvp_variants(loss_fn, args.probes).items():
            calls[label] = (fn, (params, batch, key, chunk))
        first = first_call_seconds(calls)
        medians = interleaved_medians(calls, repeats=repeats, block_time=0.0)
        baseline = medians.pop("plain grad")
        measured = [(label, seconds / args.probes) for label, seconds in medians.items()]
        torch_rows = _torch_rows(name, batch_size, args.probes, repeats)
        torch_baseline = dict(torch_rows).pop("torch plain backward", None)
        print(f"{name:<24}{'plain grad':<40}{1e3 * baseline:>10.2f}{1.0:>8.2f}"
              f"{first['plain grad']:>14.1f}")  # fmt: skip
        for label, per_probe in measured:
            ratio = per_probe / baseline
            rows.append({"model": name, "variant": label, "ms_per_probe": 1e3 * per_probe,
                         "ratio": ratio, "first_call_s": first[label]})  # fmt: skip
            print(f"{name:<24}{label:<40}{1e3 * per_probe:>10.2f}{ratio:>8.2f}"
                  f"{first[label]:>14.1f}")  # fmt: skip
        if torch_baseline:
            per_probe = dict(torch_rows)["torch PyHessian (double backward)"] / args.probes
            ratio = per_probe / torch_baseline
            rows.append({"model": name, "variant": "torch PyHessian", "ms_per_probe":
                         1e3 * per_probe, "ratio": ratio})  # fmt: skip
            print(f"{name:<24}{'torch plain backward':<40}{1e3 * torch_baseline:>10.2f}{1.0:>8.2f}")
            print(f"{name:<24}{'torch PyHessian (double backward)':<40}"
                  f"{1e3 * per_probe:>10.2f}{ratio:>8.2f}")  # fmt: skip
    if not args.no_estimators:
        rows += _estimator_table(models, args, repeats)
    print(f"wrote {save('hessian', rows)}")


if __name__ == "__main__":
    main()
