"""Gradient dispersion against one plain batch gradient, side by side in one process.

    python benchmarks/dispersion.py [--quick]

For each model and batch size, the median time (after warm-up, results blocked on, all
variants timed round-robin so that outside load falls on all alike) of:
a jitted plain batch gradient (``grad`` of the mean loss, the baseline);
``gradient_dispersion`` with ``method="ghost"``, ``"vmap"`` and ``"vmap"`` in
microbatches of 32; the bare per-example gradients ``vmap(grad)``; and, where PyTorch
and BackPACK are installed (``pip install -e .[peers]``), PyTorch's plain backward,
BackPACK's ``Variance`` + ``BatchL2Grad`` extensions and ``torch.func`` per-example
gradients on the same architecture and batch. Ratios are to the baseline of the same
framework; memory is XLA's compiled estimate (arguments + outputs + temporaries); the first
call's time (tracing, compilation and one run) is printed beside it. A
last line per model and batch gives what the vmap path's centring costs over forming
the per-example gradients, ``(vmap − vmap(grad) alone) / vmap(grad) alone`` (target
≤ 1). Prints a table and writes ``benchmarks/results/dispersion.json``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import warnings

import jax
from _common import (
    checkpointed_mlp,
    cnn,
    first_call_seconds,
    interleaved_medians,
    machine,
    mean_loss,
    mlp,
    peak_bytes,
    recurrent,
    save,
    scanned_stack,
    scanned_transformer,
    strided_cnn,
    torch_model,
    torch_on_device,
    torch_timed,
    transformer,
    wide_cnn,
)

import jaxgen

MICROBATCH = 32
MODELS = {
    "MLP 784-1024-1024-10": mlp,
    "CNN 32x32x3": cnn,
    "Transformer block T=32": transformer,
    "Strided+depthwise CNN": strided_cnn,
    "Wide CNN 32x32x64": wide_cnn,
    "MLP under checkpoint": checkpointed_mlp,
    "Scanned stack 4x128": scanned_stack,
    "Scanned transformer 4 blocks": scanned_transformer,
    "RNN cell over 32 steps": recurrent,
}


def _jax_variants(loss_fn, with_vmap: bool):
    variants = {"plain grad": jax.jit(jax.grad(mean_loss(loss_fn)))}
    dispersion = functools.partial(jaxgen.gradient_dispersion, loss_fn)
    variants["ghost"] = jax.jit(functools.partial(dispersion, method="ghost"))
    if with_vmap:
        variants["vmap(grad) alone"] = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))
        variants["vmap"] = jax.jit(functools.partial(dispersion, method="vmap"))
        variants[f"vmap, microbatch {MICROBATCH}"] = jax.jit(
            functools.partial(dispersion, method="vmap", microbatch_size=MICROBATCH)
        )
    return variants


def _torch_rows(name, size, repeats):
    """PyTorch peers: (label, seconds) rows, the plain backward first; [] when unavailable."""
    try:
        import torch
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad, Variance
    except ImportError:
        print("  (PyTorch/BackPACK not installed: pip install -e .[peers] to time the peers)")
        return []
    model, shape = torch_model(name)
    if model is None:
        print(f"  (no PyTorch peer for {name}: BackPACK does not cover attention)")
        return []
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    model, x, y, device = torch_on_device(model, shape, size)
    plain_model = copy.deepcopy(model)  # BackPACK's hooks do not compose with torch.func
    model, loss_fn = extend(model), extend(torch.nn.CrossEntropyLoss())

    def plain():
        model.zero_grad()
        loss_fn(model(x), y).backward()

    def with_backpack():
        model.zero_grad()
        with backpack(Variance(), BatchL2Grad()):
            loss_fn(model(x), y).backward()
        # BackPACK's variance is per coordinate; summed it is (1/b)Σ‖g_i − ḡ‖².
        return sum(p.variance.sum() for p in model.parameters())

    params = {k: v.detach() for k, v in plain_model.named_parameters()}

    def one_loss(p, xi, yi):
        out = torch.func.functional_call(plain_model, p, (xi.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(out, yi.unsqueeze(0))

    per_example = torch.func.vmap(torch.func.grad(one_loss), in_dims=(None, 0, 0))

    def with_func():
        grads = per_example(params, x, y)
        return sum(((g - g.mean(0)) ** 2).sum() for g in grads.values()) / size

    rows = [("PyTorch plain backward", plain), ("BackPACK Variance+BatchL2Grad", with_backpack)]
    rows.append(("torch.func vmap(grad)", with_func))
    calls = {label: (torch_timed(fn, device), ()) for label, fn in rows}
    return list(interleaved_medians(calls, repeats=repeats).items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats")
    parser.add_argument("--no-peers", action="store_true", help="skip PyTorch and BackPACK")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    sizes = (64,) if args.quick else (64, 256)
    rows = []
    print(f"machine: {machine()}")
    header = f"{'model':<24}{'batch':>6}  {'method':<32}{'ms':>10}{'× grad':>9}{'memory MB':>11}"
    header += f"{'first call s':>14}"
    print(header)
    print("-" * len(header))
    chosen = args.models.split(",") if args.models else list(MODELS)
    for name in chosen:
        params, loss_fn, make_batch = MODELS[name](jax.random.key(0))
        for size in sizes:
            batch = make_batch(jax.random.key(1), size)
            variants = _jax_variants(loss_fn, with_vmap=True)
            calls = {method: (fn, (params, batch)) for method, fn in variants.items()}
            first = first_call_seconds(calls)
            medians = interleaved_medians(calls, repeats=repeats)
            results = [
                (method, medians[method], peak_bytes(fn, params, batch))
                for method, fn in variants.items()
            ]
            baseline = results[0][1]
            peers = [] if args.no_peers else _torch_rows(name, size, repeats)
            for label, seconds, memory in results + [(lbl, s, None) for lbl, s in peers]:
                base = peers[0][1] if memory is None else baseline
                rows.append(
                    {
                        "model": name,
                        "batch": size,
                        "method": label,
                        "ms": seconds * 1e3,
                        "ratio": seconds / base,
                        "memory_bytes": memory,
                        "first_call_s": first.get(label),
                    }
                )
                memory_text = "" if memory is None else f"{memory / 2**20:>11.1f}"
                memory_text += "" if label not in first else f"{first[label]:>14.1f}"
                print(
                    f"{name:<24}{size:>6}  {label:<32}{seconds * 1e3:>10.2f}"
                    f"{seconds / base:>9.2f}{memory_text}"
                )
            # DESIGN.md's target for the vmap path: centring no dearer than forming the
            # per-example gradients it centres.
            centring = (medians["vmap"] - medians["vmap(grad) alone"]) / medians["vmap(grad) alone"]
            rows.append({"model": name, "batch": size, "vmap_centring_over_forming": centring})
            print(f"{name:<24}{size:>6}  {'vmap centring / forming':<32}{centring:>19.2f}")
    print(f"wrote {save('dispersion', rows)}")


if __name__ == "__main__":
    main()
