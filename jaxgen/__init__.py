"""jaxgen: generalization of SGD-trained models in JAX.

Per-example gradient statistics, information-theoretic generalization bounds and the
regularizers of Wang & Mao, *On the Generalization of Models Trained with SGD:
Information-Theoretic Bounds and Implications* (ICLR 2022).
"""

import importlib as _importlib
from importlib import metadata as _metadata

from jaxgen import bounds, noise
from jaxgen._amp import AMPState, amp
from jaxgen._clipped import ClippedGrad, clipped_grad
from jaxgen._clipping import DynamicClipState, dynamic_clip
from jaxgen._curvature import HessianDiagonal, hessian_diagonal
from jaxgen._flatness import MonteCarloEstimate, flatness_term, gradient_sensitivity
from jaxgen._gmp import GMPState, gmp
from jaxgen._grad_fn import batch_grad_fn
from jaxgen._hessian import TraceEstimate, hessian_trace
from jaxgen._moments import GradientMoments, gradient_moments
from jaxgen._per_example import DispersionStats, gradient_dispersion, per_example_grads
from jaxgen._privacy import DPNoiseState, clipped_grad_fn, dp_epsilon, dp_noise
from jaxgen._sharding import make_mesh, replicate, shard_batch
from jaxgen._spectrum import (
    EigenEstimate,
    Spectrum,
    hessian_eigenvalues,
    hessian_spectrum,
    spectral_density,
)

try:
    __version__ = _metadata.version("jaxgen")
except _metadata.PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name == "nnx":  # imports Flax only when asked for
        return _importlib.import_module("jaxgen.nnx")
    raise AttributeError(f"module 'jaxgen' has no attribute {name!r}")


__all__ = [
    "AMPState",
    "ClippedGrad",
    "DPNoiseState",
    "DispersionStats",
    "DynamicClipState",
    "EigenEstimate",
    "GMPState",
    "GradientMoments",
    "HessianDiagonal",
    "MonteCarloEstimate",
    "Spectrum",
    "TraceEstimate",
    "amp",
    "batch_grad_fn",
    "bounds",
    "clipped_grad",
    "clipped_grad_fn",
    "dp_epsilon",
    "dp_noise",
    "dynamic_clip",
    "flatness_term",
    "gmp",
    "gradient_dispersion",
    "gradient_moments",
    "gradient_sensitivity",
    "hessian_diagonal",
    "hessian_eigenvalues",
    "hessian_spectrum",
    "hessian_trace",
    "make_mesh",
    "nnx",
    "noise",
    "per_example_grads",
    "replicate",
    "shard_batch",
    "spectral_density",
]
