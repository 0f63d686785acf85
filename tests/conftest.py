"""Shared tiny models. Eight simulated CPU devices for the multi-device tests.

Compiled programs are cached on disk for the session (subprocesses and notebook kernels
inherit the folder): many tests train the same tiny configurations, and compiling them
again dominates the suite's time on two cores.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_num_cpu_devices", 8)
_CACHE = os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jaxgen-jit-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

collect_ignore = ["multihost_worker.py"]  # a script the two-process test launches

DOCS = Path(__file__).parent.parent / "docs"


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The HTML site, built from a clean environment with warnings as errors."""
    root = tmp_path_factory.mktemp("site")
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # notebooks draw inline
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html"]
        + ["-d", str(root / "doctrees"), str(DOCS), str(root / "html")],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return root / "html"


def mlp_init(key, sizes=(6, 5, 3)):
    params = []
    for k, (fan_in, fan_out) in zip(
        jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:], strict=True), strict=True
    ):
        params.append(
            {
                "w": jax.random.normal(k, (fan_in, fan_out)) / jnp.sqrt(fan_in),
                "b": 0.1 * jnp.ones(fan_out),
            }
        )
    return params


def mlp_apply(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(logits, label):
    return -jax.nn.log_softmax(logits)[label]


def mlp_loss(params, example):
    """Per-example cross-entropy of a tanh MLP."""
    return cross_entropy(mlp_apply(params, example["x"]), example["y"])


@jax.custom_vjp
def custom_vjp_tanh(x):
    """``tanh`` behind a ``jax.custom_vjp`` (forward mode cannot differentiate it), with
    the same derivatives: its backward pass divides by ``cosh²``."""
    return jnp.tanh(x)


custom_vjp_tanh.defvjp(lambda x: (custom_vjp_tanh(x), x), lambda x, g: (g / jnp.cosh(x) ** 2,))


def mlp_loss_custom_vjp(params, example):
    """``mlp_loss`` with its hidden ``tanh`` behind a ``custom_vjp``: the same function."""
    x = example["x"]
    for layer in params[:-1]:
        x = custom_vjp_tanh(x @ layer["w"] + layer["b"])
    return cross_entropy(x @ params[-1]["w"] + params[-1]["b"], example["y"])


def cnn_init(key):
    k1, k2 = jax.random.split(key)
    return {
        "conv": jax.random.normal(k1, (3, 1, 4)) / 3.0,  # (width, in, out), 1-D conv
        "dense": jax.random.normal(k2, (4 * 4, 3)) / 4.0,
    }


def cnn_loss(params, example):
    """Per-example cross-entropy of a 1-D CNN with average pooling."""
    x = example["x"][None, :, None]  # (N=1, length 8, channels 1)
    h = jax.lax.conv_general_dilated(
        x,
        params["conv"],
        window_strides=(1,),
        padding="SAME",
        dimension_numbers=("NWC", "WIO", "NWC"),
    )
    h = jax.nn.relu(h).reshape(1, 4, 2, 4).mean(axis=2)  # pool 8 -> 4
    return cross_entropy(h.reshape(-1) @ params["dense"], example["y"])


@pytest.fixture(scope="session")
def mlp():
    key_p, key_x, key_y = jax.random.split(jax.random.key(0), 3)
    params = mlp_init(key_p)
    batch = {"x": jax.random.normal(key_x, (10, 6)), "y": jax.random.randint(key_y, (10,), 0, 3)}
    return params, batch


@pytest.fixture(scope="session")
def cnn():
    key_p, key_x, key_y = jax.random.split(jax.random.key(1), 3)
    params = cnn_init(key_p)
    batch = {"x": jax.random.normal(key_x, (7, 8)), "y": jax.random.randint(key_y, (7,), 0, 3)}
    return params, batch
