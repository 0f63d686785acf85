"""GMP, AMP and dynamic clipping against an ERM step, side by side in one process.

    python benchmarks/gmp.py [--quick]

Every row is one jitted SGD step on the same model and minibatch: ERM (one gradient),
``dynamic_clip``, ``amp`` (one inner step), and ``gmp`` with k = 3 and 10 in both modes.
GMP's floor is timed in the same run: k+1 times one plain gradient pass plus drawing
the k·P Gaussian numbers alone. Where PyTorch is installed
(``pip install -e .[peers]``), the authors' way of doing GMP (k sequential perturbed
passes with ``torch.randn_like``) and a PyTorch ERM step are timed on the same model
and batch. Prints a table and writes ``benchmarks/results/gmp.json``.
"""

from __future__ import annotations

import argparse

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
    """One plain gradient pass, and drawing k·P normals for k = 3 and 10, jitted."""
    grad = jax.jit(jax.grad(mean_loss(loss_fn)))
    draws = {
        k: jax.jit(
            lambda key, k=k: [gaussian_like(kk, params, SIGMA) for kk in jax.random.split(key, k)]
        )
        for k in (3, 10)
    }
    return (grad, (params, batch)), draws


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
    header = f"{'model':<22}{'step':<34}{'ms':>9}{'× ERM':>8}{'× floor':>9}"
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
        (grad, grad_args), draws = _floor_parts(loss_fn, params, batch)
        calls["one gradient"] = (grad, grad_args)
        for k in (3, 10):
            calls[f"{k}·P normals"] = (draws[k], (jax.random.key(0),))
        medians = interleaved_medians(calls, repeats=repeats)
        erm = medians["ERM"]
        floors = {
            k: ((k + 1) * medians["one gradient"], medians[f"{k}·P normals"]) for k in (3, 10)
        }
        results = []
        for label in variants:
            floor = None
            if label.startswith("GMP"):
                floor = sum(floors[int(label.split("k=")[1].split()[0])])
            results.append((label, medians[label], floor, erm))
        for k, (passes_s, draws_s) in floors.items():
            results.append((f"floor k={k}: {k + 1} × one gradient", passes_s, None, erm))
            results.append((f"floor k={k}: {k}·P normals", draws_s, None, erm))
        torch_rows = _torch_rows(name, size, repeats)
        # PyTorch rows are relative to PyTorch's own ERM step.
        results += [(label, s, None, torch_rows[0][1]) for label, s in torch_rows]
        for label, seconds, floor, baseline in results:
            row = {
                "model": name,
                "batch": size,
                "step": label,
                "ms": seconds * 1e3,
                "ratio_to_erm": seconds / baseline,
                "ratio_to_floor": None if floor is None else seconds / floor,
            }
            rows.append(row)
            floor_text = "" if floor is None else f"{seconds / floor:>9.2f}"
            print(
                f"{name:<22}{label:<34}{seconds * 1e3:>9.2f}{seconds / baseline:>8.2f}{floor_text}"
            )
    print(f"wrote {save('gmp', rows)}")


if __name__ == "__main__":
    main()
