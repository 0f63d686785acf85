"""Curvature and gradient-noise instruments measured during a run (``--instruments``).

Every ``instruments_every`` epochs (and at the last), on a fixed subset of
``instruments_examples`` training examples drawn by the seed, each chosen instrument is
measured at the current weights with keys fixed by the seed and the epoch, so a resumed
run measures the same numbers. Each gives one or two columns of ``instruments.csv``::

    hessian-max         hessian_max, hessian_max_residual   top eigenvalue (Lanczos)
    hessian-min         hessian_min, hessian_min_residual   smallest eigenvalue
    spectrum            trace_per_parameter, trace_sq_per_parameter
                        (SLQ moments Tr H/P and Tr H²/P; nodes, weights: instruments.npz)
    gsnr                gsnr                                 mean GSNR over coordinates
    noise-scale         noise_scale                          B_simple = tr Σ / ‖G‖²
    norm-test           norm_test                            θ of Byrd et al. (2012)
    inner-product-test  inner_product_test                   θ of Bollapragada et al.
    tic                 tic                                  TIC with diag H (Thomas et al.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxgen
from jaxgen import noise
from jaxgen._sharding import replicate, to_host
from jaxgen._types import LossFn, PyTree
from jaxgen.experiments import rng

INSTRUMENTS = (
    "hessian-max",
    "hessian-min",
    "spectrum",
    "gsnr",
    "noise-scale",
    "norm-test",
    "inner-product-test",
    "tic",
)
LANCZOS_ITERATIONS = 20  # per eigenvalue instrument (and per SLQ probe)
SLQ_PROBES = 5
DIAGONAL_PROBES = 20  # TIC's Hessian diagonal


def parse(text: str) -> tuple[str, ...]:
    """``"hessian-max,gsnr"`` → the names, checked, in ``INSTRUMENTS``' order."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else []
    unknown = [n for n in names if n not in INSTRUMENTS]
    if unknown:
        raise ValueError(
            f"instruments must be among {', '.join(INSTRUMENTS)}, got {', '.join(unknown)}"
        )
    return tuple(n for n in INSTRUMENTS if n in names)


def due(config: Any, epoch: int) -> bool:
    """Whether the instruments are measured at the end of ``epoch`` (0-based)."""
    if not config.instruments:
        return False
    return (epoch + 1) % config.instruments_every == 0 or epoch + 1 == config.epochs


class Instruments:
    """The chosen instruments with their examples and keys fixed by the seed."""

    def __init__(self, config: Any, dataset: Any, loss_fn: LossFn, mesh=None):
        self.names = parse(config.instruments)
        self.config, self.loss_fn, self.mesh = config, loss_fn, mesh
        n = dataset.num_train
        chosen = rng.numpy_rng(config.seed, rng.Stream.INSTRUMENT_EXAMPLES).choice(
            n, size=min(config.instruments_examples, n), replace=False
        )
        self.batch = {"x": dataset.x_train[chosen], "y": dataset.y_train[chosen]}

    def _key(self, epoch: int, which: int):
        key = rng.key(self.config.seed, rng.Stream.INSTRUMENTS, epoch, which)
        return key if self.mesh is None else replicate(key, self.mesh)

    def measure(self, params: PyTree, epoch: int) -> dict[str, Any]:
        """``{"epoch": epoch + 1, column: value, ...}`` (``spectrum``: also its nodes and
        weights as lists)."""
        loss_fn, batch, names = self.loss_fn, self.batch, self.names
        row: dict[str, Any] = {"epoch": epoch + 1}
        size = optax.tree.size(params)
        iterations = min(LANCZOS_ITERATIONS, size)
        for which, name in enumerate(("hessian-max", "hessian-min")):
            if name in names:
                top = jaxgen.hessian_eigenvalues(
                    loss_fn, params, batch, key=self._key(epoch, which),
                    num_iterations=iterations, which="largest" if which == 0 else "smallest",
                )  # fmt: skip
                column = name.replace("-", "_")
                row[column] = float(to_host(top.values[0]))
                row[f"{column}_residual"] = float(to_host(top.residuals[0]))
        if "spectrum" in names:
            spectrum = jaxgen.hessian_spectrum(
                loss_fn, params, batch, key=self._key(epoch, 2),
                num_probes=SLQ_PROBES, num_iterations=iterations,
            )  # fmt: skip
            row["trace_per_parameter"] = float(to_host(spectrum.moment(1)[0]))
            row["trace_sq_per_parameter"] = float(to_host(spectrum.moment(2)[0]))
            row["spectrum_nodes"] = np.asarray(to_host(spectrum.nodes)).tolist()
            row["spectrum_weights"] = np.asarray(to_host(spectrum.weights)).tolist()
        moments = None
        if "gsnr" in names or "tic" in names:
            moments = jaxgen.gradient_moments(loss_fn, params, batch)
        if "gsnr" in names:
            gsnr = jnp.concatenate([g.reshape(-1) for g in jax.tree_util.tree_leaves(moments.gsnr)])
            row["gsnr"] = float(to_host(jnp.nanmean(gsnr)))
        if {"noise-scale", "norm-test", "inner-product-test"} & set(names):
            stats = jaxgen.gradient_dispersion(loss_fn, params, batch)
            if "noise-scale" in names:
                row["noise_scale"] = float(to_host(noise.noise_scale(stats)))
            if "norm-test" in names:
                row["norm_test"] = float(to_host(noise.norm_test(stats)))
            if "inner-product-test" in names:
                projections = noise.gradient_projections(loss_fn, params, batch, stats.grad)
                row["inner_product_test"] = float(
                    to_host(noise.inner_product_test(projections, stats.grad))
                )
        if "tic" in names:
            diagonal = jaxgen.hessian_diagonal(
                loss_fn, params, batch, key=self._key(epoch, 3), num_probes=DIAGONAL_PROBES
            )
            row["tic"] = float(to_host(noise.tic_diag(moments.second_moment, diagonal.diagonal)))
        return row


SERIES = ("spectrum_nodes", "spectrum_weights")  # per-epoch arrays: instruments.npz


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The scalar columns of ``instruments.csv``, ``epoch`` first."""
    names = [k for k in rows[0] if k not in SERIES] if rows else []
    return names


def final_values(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The last measurement of each scalar column (``result.json``'s ``instruments``)."""
    if not rows:
        return {}
    return {k: v for k, v in rows[-1].items() if k not in SERIES}
