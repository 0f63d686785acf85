"""Per-example clipped gradients against one plain batch gradient, in one process.

    python benchmarks/clipping.py [--quick] [--no-peers] [--models ...]

For each model and batch size, the median time (after warm-up, results blocked on, the
variants timed round-robin) of: a jitted plain batch gradient (``grad`` of the mean
loss, the baseline); ``jaxgen.clipped_grad`` with ``method="ghost"`` (book-keeping on
the ghost backward pass) and ``method="vmap"``; and, where installed, jax-privacy's
``clipped_grad`` (per-example gradients by ``vmap``) on the same function, weights and
batch. On the MLP and the CNN, Opacus's ghost clipping (``GradSampleModuleFastGradient
Clipping``: a norms backward, then a second backward of ``Σ_i c_i ℓ_i``) and PyTorch's
plain backward run on a PyTorch twin holding the same weights and batch. Ratios are to
the plain gradient of the same framework. Every variant's clipped mean gradient is
compared with jaxgen's ``vmap`` result (largest difference relative to the largest
entry, ``max |Δ| / max |g|``). The threshold is the batch's median per-example norm, so
half the examples are clipped. Memory is XLA's compiled estimate for the JAX variants.
Prints a table and writes ``benchmarks/results/clipping.json``.
"""

from __future__ import annotations

import argparse
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from _common import (
    as_jax_layout,
    cnn,
    first_call_seconds,
    interleaved_medians,
    machine,
    mean_loss,
    median_seconds,
    mlp,
    peak_bytes,
    recurrent,
    save,
    scanned_stack,
    torch_model,
    torch_twin,
    transformer,
)

import jaxgen

SLOW_SECONDS = 2.0
MODELS = {
    "MLP 784-1024-1024-10": mlp,
    "CNN 32x32x3": cnn,
    "Transformer block T=32": transformer,
    "Scanned stack 4x128": scanned_stack,
    "RNN cell over 32 steps": recurrent,
}


def _jax_variants(loss_fn, max_norm):
    clip = functools.partial(jaxgen.clipped_grad, loss_fn, max_norm=max_norm)
    variants = {
        "plain grad": jax.jit(jax.grad(mean_loss(loss_fn))),
        "jaxgen ghost": jax.jit(lambda p, b: clip(p, b, method="ghost").grad),
        "jaxgen vmap": jax.jit(lambda p, b: clip(p, b, method="vmap").grad),
    }
    try:
        import jax_privacy
    except ImportError:
        print("  (jax-privacy not installed: pip install jax-privacy to time it)")
        return variants
    summed = jax_privacy.clipped_grad(
        loss_fn, l2_clip_norm=max_norm, batch_argnums=1, keep_batch_dim=False
    )

    def privacy_mean(params, batch):
        size = jax.tree_util.tree_leaves(batch)[0].shape[0]
        return jax.tree_util.tree_map(lambda g: g / size, summed(params, batch))

    variants["jax-privacy clipped_grad"] = jax.jit(privacy_mean)
    return variants


def _relative_difference(got, want) -> float:
    got, want = (
        np.concatenate(
            [np.asarray(x, np.float64).reshape(-1) for x in jax.tree_util.tree_leaves(t)]
        )
        for t in (got, want)
    )
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _opacus_rows(name, params, batch, max_norm, reference, repeats):
    """(label, seconds, relative difference) rows: PyTorch's plain backward, then Opacus's
    ghost clipping; [] when unavailable."""
    try:
        import torch
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError:
        print("  (Opacus not installed: pip install opacus to time it)")
        return []
    twin = torch_twin(name, params, batch)
    if twin is None:
        return []
    model, x, y, _ = twin
    size = x.shape[0]
    warnings.filterwarnings("ignore", module="opacus")
    plain_model = torch_model(name)[0]
    plain_model.load_state_dict(model.state_dict())
    plain_loss = torch.nn.CrossEntropyLoss()

    def plain():
        plain_model.zero_grad()
        plain_loss(plain_model(x), y).backward()

    ghost = GradSampleModuleFastGradientClipping(
        model, max_grad_norm=max_norm, use_ghost_clipping=True, loss_reduction="mean"
    )
    optimizer = DPOptimizerFastGradientClipping(
        torch.optim.SGD(ghost.parameters(), lr=0.0),
        noise_multiplier=0.0,
        max_grad_norm=max_norm,
        expected_batch_size=size,
        loss_reduction="mean",
    )
    criterion = DPLossFastGradientClipping(
        ghost, optimizer, torch.nn.CrossEntropyLoss(), loss_reduction="mean"
    )

    def opacus_ghost():
        optimizer.zero_grad()
        criterion(ghost(x), y).backward()

    opacus_ghost()
    # After its second backward, .grad holds Σ_i c_i g_i: the mean divides by b.
    clipped = [p.grad / size for p in ghost.parameters()]
    difference = _relative_difference(as_jax_layout(name, clipped), reference)
    calls = {"PyTorch plain backward": (plain, ()), "Opacus ghost clipping": (opacus_ghost, ())}
    medians = interleaved_medians(calls, repeats=repeats)
    return [
        ("PyTorch plain backward", medians["PyTorch plain backward"], None),
        ("Opacus ghost clipping", medians["Opacus ghost clipping"], difference),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 64 only, fewer repeats")
    parser.add_argument("--no-peers", action="store_true", help="skip jax-privacy and Opacus")
    parser.add_argument("--models", help=f"comma-separated subset of: {', '.join(MODELS)}")
    args = parser.parse_args()
    repeats = 3 if args.quick else 5
    sizes = (64,) if args.quick else (64, 256)
    rows = []
    print(f"machine: {machine()}")
    header = f"{'model':<24}{'batch':>6}  {'method':<28}{'ms':>10}{'× grad':>9}"
    header += f"{'memory MB':>11}{'first call s':>14}{'rel. diff':>11}"
    print(header)
    print("-" * len(header))
    chosen = args.models.split(",") if args.models else list(MODELS)
    for name in chosen:
        params, loss_fn, make_batch = MODELS[name](jax.random.key(0))
        for size in sizes:
            batch = make_batch(jax.random.key(1), size)
            norms = jnp.sqrt(jaxgen.gradient_dispersion(loss_fn, params, batch).sq_norms)
            max_norm = float(jnp.median(norms))
            variants = _jax_variants(loss_fn, max_norm)
            if args.no_peers:
                variants.pop("jax-privacy clipped_grad", None)
            calls = {method: (fn, (params, batch)) for method, fn in variants.items()}
            first = first_call_seconds(calls)
            # A variant whose call takes seconds (jax-privacy on the MLP) is timed apart,
            # three calls: interleaving it would take minutes per round.
            slow = {m: c for m, c in calls.items() if first[m] > SLOW_SECONDS}
            fast = {m: c for m, c in calls.items() if m not in slow}
            medians = interleaved_medians(fast, repeats=repeats)
            medians |= {
                m: median_seconds(fn, *a, repeats=3, warmup=0, min_time=0)
                for m, (fn, a) in slow.items()
            }
            reference = variants["jaxgen vmap"](params, batch)
            results = [
                (
                    method,
                    medians[method],
                    peak_bytes(fn, params, batch),
                    None
                    if method == "plain grad"
                    else _relative_difference(fn(params, batch), reference),
                )
                for method, fn in variants.items()
            ]
            peers = []
            if not args.no_peers:
                peers = _opacus_rows(name, params, batch, max_norm, reference, repeats)
            baseline = results[0][1]
            for label, seconds, memory, difference in results + [
                (lbl, s, None, d) for lbl, s, d in peers
            ]:
                base = peers[0][1] if label in dict((p[0], p) for p in peers) else baseline
                rows.append(
                    {
                        "model": name,
                        "batch": size,
                        "method": label,
                        "ms": seconds * 1e3,
                        "ratio": seconds / base,
                        "memory_bytes": memory,
                        "first_call_s": first.get(label),
                        "relative_difference": difference,
                    }
                )
                text = (
                    f"{name:<24}{size:>6}  {label:<28}{seconds * 1e3:>10.2f}{seconds / base:>9.2f}"
                )
                text += f"{memory / 2**20:>11.1f}" if memory is not None else f"{'':>11}"
                text += f"{first[label]:>14.1f}" if label in first else f"{'':>14}"
                text += f"{difference:>11.1e}" if difference is not None else ""
                print(text)
    print(f"wrote {save('clipping', rows)}")


if __name__ == "__main__":
    main()
