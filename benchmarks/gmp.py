"""GMP, AMP and dynamic clipping against an ERM step, side by side in one process.

    python benchmarks/gmp.py [--quick]

Every row is one jitted SGD step on the same model and minibatch: ERM (one gradient),
``dynamic_clip``, ``amp`` (one inner step), and ``gmp`` with k = 3 and 10 in both modes.
GMP's floor is timed in the same run: k+1 times one plain gradient pass plus k times one
draw of P normals by jaxgen's sampler (each part alone, jitted); "× JAX floor" puts the
draws of ``jax.random.normal`` in their place, the floor of a GMP written in plain JAX.
Where PyTorch is installed (``pip install -e .[peers]``), the authors' way of doing GMP
(k sequential perturbed passes with ``torch.randn_like``) and a PyTorch ERM step are
timed on the same model and batch. Prints a table and writes
``benchmarks/results/gmp.json``.
"""

from __future__ import annotations

import argparse
import functools

import jax
import optax
from _common import (
    cnn,
    interleaved_medians,
    machine,
    mean_loss,
    mlp,
    save,
    torch_model,
    torch_on_device,
    torch_timed,
)

import jaxgen
from jaxgen._random import gaussian_like

LR, SIGMA, RHO = 0.01, 0.03, 0.5


def _step(loss_fn, batch, transform):
    optimizer = optax.chain(transform, optax.sgd(LR)) if transform else optax.sgd(LR)

    @jax.jit
    def step(params, state):
        grad_fn = jaxgen.batch_grad_fn(loss_fn, batch)
        updates, state = optimizer.update(grad_fn(params), state, params, grad_fn=grad_fn)
        return optax.apply_updates(params, updates), state

    return step, optimizer.init


def _floor_parts(loss_fn, params, batch):
    """One plain gradient pass, and one draw of P normals by jaxgen and by JAX, jitted."""

    def jax_normals(key):
        leaves = jax.tree_util.tree_leaves(params)
        keys = jax.random.split(key, len(leaves))
        return [
            SIGMA * jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)
        ]

    key = (jax.random.key(0),)
    return {
        "one gradient": (jax.jit(jax.grad(mean_loss(loss_fn))), (params, batch)),
        "P normals": (jax.jit(lambda key: gaussian_like(key, params, SIGMA)), key),
        "P normals, jax.random.normal": (jax.jit(jax_normals), key),
    }


def _floor(medians, k, draw="P normals"):
    """k+1 plain gradients and k draws of P normals, from the parts timed alone."""
    return (k + 1) * medians["one gradient"] + k * medians[draw]


def _torch_rows(name, size, repeats):
    try:
        import torch
    except ImportError:
        print("(PyTorch not installed: pip install -e .[peers] to time the authors' GMP)")
        return []
    torch.manual_seed(0)
    model, x, y, device = torch_on_device(*torch_model(name), size)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = torch.nn.CrossEntropyLoss()

    def erm():
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()

    def authors_gmp(k=3):
        # Algorithm 2 as the authors' code runs it: a clean pass, then k perturbed
        # passes one after another, each drawing torch.randn_like for every parameter.
        optimizer.zero_grad()
        (loss_fn(model(x), y) * (1 - RHO)).backward()
        params = list(model.parameters())
        for _ in range(k):
            noises = [torch.randn_like(p) * SIGMA for p in params]
            with torch.no_grad():
                for p, n in zip(params, noises, strict=True):
                    p.add_(n)
            (loss_fn(model(x), y) * (RHO / k)).backward()
            with torch.no_grad():
                for p, n in zip(params, noises, strict=True):
                    p.sub_(n)
        optimizer.step()

    calls = {
        f"PyTorch ERM step ({device})": (torch_timed(erm, device), ()),
        f"PyTorch GMP k=3, authors' way ({device})": (torch_timed(authors_gmp, device), ()),
    }
    return list(interleaved_medians(calls, repeats=repeats).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="MLP only, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    models = (("MLP 784-1024-1024-10", mlp, 128), ("CNN 32x32x3", cnn, 128))
    rows = []
    print(f"machine: {machine()}")
    header = f"{'model':<22}{'step':<36}{'ms':>9}{'× ERM':>8}{'× floor':>9}{'× JAX floor':>13}"
    print(header)
    print("-" * len(header))
    for name, build, size in models[:1] if args.quick else models:
        params, loss_fn, make_batch = build(jax.random.key(0))
        batch = make_batch(jax.random.key(1), size)
        variants = {"ERM": None, "dynamic_clip": jaxgen.dynamic_clip(50.0, 0.1, 0)}
        variants["AMP (1 inner step)"] = jaxgen.amp(epsilon=0.1, inner_lr=0.2)
        for k in (3, 10):
            for mode in ("vmap", "sequential"):
                variants[f"GMP k={k} {mode}"] = jaxgen.gmp(k, SIGMA, RHO, mode=mode)
        calls = {}
        for label, transform in variants.items():
            step, init = _step(loss_fn, batch, transform)
            calls[label] = (step, (params, init(params)))
        calls |= _floor_parts(loss_fn, params, batch)
        medians = interleaved_medians(calls, repeats=repeats)
        erm = medians["ERM"]
        floor = functools.partial(_floor, medians)
        results = []
        for label in variants:
            k = int(label.split("k=")[1].split()[0]) if label.startswith("GMP") else None
            floors = (floor(k), floor(k, "P normals, jax.random.normal")) if k else (None, None)
            results.append((label, medians[label], erm, *floors))
        for label in ("one gradient", "P normals", "P normals, jax.random.normal"):
            results.append((label, medians[label], erm, None, None))
        for k in (3, 10):
            label = f"floor k={k}: {k + 1} gradients + {k}·P normals"
            results.append((label, floor(k), erm, None, None))
        torch_rows = _torch_rows(name, size, repeats)
        # PyTorch rows are relative to PyTorch's own ERM step.
        results += [(label, s, torch_rows[0][1], None, None) for label, s in torch_rows]
        for label, seconds, baseline, own_floor, jax_floor in results:
            ratios = [None if f is None else seconds / f for f in (own_floor, jax_floor)]
            rows.append(
                {
                    "model": name,
                    "batch": size,
                    "step": label,
                    "ms": seconds * 1e3,
                    "ratio_to_erm": seconds / baseline,
                    "ratio_to_floor": ratios[0],
                    "ratio_to_jax_floor": ratios[1],
                }
            )
            text = "".join(
                "" if r is None else f"{r:>{w}.2f}" for r, w in zip(ratios, (9, 13), strict=True)
            )
            print(f"{name:<22}{label:<36}{seconds * 1e3:>9.2f}{seconds / baseline:>8.2f}{text}")
    print(f"wrote {save('gmp', rows)}")


if __name__ == "__main__":
    main()
